"""`qaa`: the server-side commands (up, demo, worker, API, API keys, migrations).

It lives in `workers/` because `qaa worker` needs the worker's Celery app and `service/` must not import
`workers`. Each command imports what it needs when it runs, so `qaa keys list` never loads torch.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import typer

from client.version import add_version_option
from service.queueing import QUEUES

app = typer.Typer(help="QAA training service: server-side commands.", no_args_is_help=True)


add_version_option(app, "qaa")


keys = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
app.add_typer(keys, name="keys")
spec_app = typer.Typer(help="Job spec files, offline: write a commented starter, check a file.", no_args_is_help=True)
app.add_typer(spec_app, name="spec")


@spec_app.command("validate")
def spec_validate(
    path: str = typer.Argument(..., help="Job spec, YAML or JSON."),
    set_: list[str] = typer.Option(None, "--set", help="Override a spec value: dotted.path=value (repeatable)."),
    json_output: bool = typer.Option(False, "--json", help="Print {valid, errors} as JSON."),
) -> None:
    """Check a spec file without a server, with the server's own messages (exit 2 if it is invalid). Here, not in
    qaa-client, because it runs the server's schema and the client speaks HTTP only."""
    from pathlib import Path

    from pydantic import ValidationError

    from client import render
    from client.spec_file import SpecFileError, apply_overrides, load_spec
    from service.spec import parse_spec, validation_errors

    try:
        spec = apply_overrides(load_spec(Path(path)), set_ or [])
        parsed = parse_spec(spec)
    except SpecFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except ValidationError as exc:
        errors = validation_errors(exc)
        if json_output:
            render.print_json({"valid": False, "errors": errors})
        else:
            for e in errors:
                typer.echo(f"{e['path'] or '(spec)'}: {e['message']}", err=True)
        raise typer.Exit(2) from None
    summary = {"valid": True, "kind": parsed.kind, "method": parsed.method.kind, "queue": parsed.queue}
    if json_output:
        render.print_json(summary)
    else:
        typer.echo(f"{path}: valid ({parsed.kind}, method {parsed.method.kind}, queue {parsed.queue})")


@spec_app.command("init")
def spec_init(
    method: str = typer.Option("qaa", "--method", help="qaa, lora, prefix, sora or full."),
    out: str = typer.Option(None, "--out", help="Write here instead of to stdout."),
) -> None:
    """Print a commented starter spec for a method, every value its default (docs/spec.md has every key)."""
    from pathlib import Path

    from service.spec_reference import starter

    try:
        text = starter(method)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if out is None:
        typer.echo(text, nl=False)
    elif Path(out).exists():
        typer.echo(f"error: {out} exists; not overwritten", err=True)
        raise typer.Exit(2)
    else:
        Path(out).write_text(text)


def parse_queues(text: str) -> list[str]:
    names = [q.strip() for q in text.split(",") if q.strip()]
    unknown = sorted(set(names) - set(QUEUES))
    if not names or unknown:
        raise typer.BadParameter(f"queues are a comma-separated subset of {','.join(QUEUES)}, got {text!r}")
    return list(dict.fromkeys(names))


DURATION_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """`90d`, `12h`, `30m`, `2w`: a key's lifetime."""
    match = re.fullmatch(r"\s*(\d{1,6})\s*([mhdw])\s*", text or "")
    if match is None or int(match[1]) == 0:
        raise typer.BadParameter(f"a positive whole number of m, h, d or w, such as 90d or 12h; got {text!r}")
    return timedelta(**{DURATION_UNITS[match[2]]: int(match[1])})


@app.command()
def worker(
    queues: str = typer.Option(",".join(QUEUES), help="Queues to serve, comma-separated."),
    concurrency: int = typer.Option(1, min=1, max=64, help="Jobs run at once (one process each)."),
    loglevel: str = typer.Option("INFO", help="Celery log level."),
    name: str = typer.Option(None, help="Celery node name, e.g. gpu1@%h (distinct names for workers on one host)."),
) -> None:
    """Start a Celery worker (and its reconciler thread).

    One job at a time runs in the worker process itself (solo pool): a SIGKILL stops the job with the worker,
    and the job resumes elsewhere from its checkpoint. `--concurrency N` > 1 uses N prefork children, which
    die with their parent. Mingle, gossip and worker heartbeats need fanout (the embedded broker has none)
    and nothing here uses them, so they are off.
    """
    names = parse_queues(queues)
    from workers.app import app as celery

    pool = "solo" if concurrency == 1 else "prefork"
    celery.worker_main(
        [
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--queues={','.join(names)}",
            f"--loglevel={loglevel}",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            *([f"--hostname={name}"] if name else []),
        ]
    )


def _set_address(host: str | None, port: int | None):
    """Flags win over `QAA_HOST`/`QAA_PORT`, here and in every child process; the settings after that."""
    import os

    from service.settings import get_settings

    if host:
        os.environ["QAA_HOST"] = host
    if port:
        os.environ["QAA_PORT"] = str(port)
    get_settings.cache_clear()
    return get_settings()


@app.command()
def up(
    workers: int = typer.Option(1, min=1, max=32, help="Worker processes (one job at a time each)."),
    queues: str = typer.Option(",".join(QUEUES), help="Queues the workers serve, comma-separated."),
    host: str = typer.Option(None, help="Address the API binds to (default: QAA_HOST)."),
    port: int = typer.Option(None, help="API port (default: QAA_PORT)."),
    grace: float = typer.Option(60, min=0, help="Seconds to wait for a clean stop before killing."),
) -> None:
    """Start the API and worker(s) together; Ctrl-C stops them all (running jobs resume at the next start)."""
    import signal
    import time

    from service.auth import credentials_path
    from workers.stack import POLL_S, Stack, StackError, describe

    names = ",".join(parse_queues(queues))
    settings = _set_address(host, port)
    # Ctrl-C, `docker stop`, systemd: stop cleanly. SIGINT explicitly too: a process started in the background
    # of a shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    stack = Stack(settings, workers=workers, queues=names)
    try:
        stack.start()
        typer.echo(f"QAA is up: dashboard {stack.url}/")
        if settings.database_url is None:
            typer.echo(f"  API key:  {credentials_path(settings)} (qaa-client reads it)")
        for label, value in describe(settings).items():
            typer.echo(f"  {label + ':':9} {value}")
        typer.echo(f"  workers:  {workers} on queues {names}")
        typer.echo("Ctrl-C stops everything; running jobs resume at the next start.")
        while True:
            time.sleep(POLL_S)
            stack.supervise()
    except KeyboardInterrupt:
        typer.echo("stopping: workers hand their jobs back, then the API ...", err=True)
        stack.stop(grace)
        typer.echo("stopped", err=True)
    except StackError as exc:
        typer.echo(f"qaa up: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        stack.stop(grace=5)  # a no-op when already stopped


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
def demo(
    spec: str = typer.Option("examples/demo.yaml", help="The main demo job."),
    hardware_spec: str = typer.Option("examples/fake-manila.yaml", help="The hardware-path job (fake backend)."),
    plot: str = typer.Option("demo-loss.png", help="Where to save the loss curve."),
) -> None:
    """Run the demo: start the stack if none runs, train SmolLM2 with QAA, then a job on a fake IBM device."""
    import signal
    from pathlib import Path

    from workers.demo import run_demo

    for signum in (signal.SIGINT, signal.SIGTERM):  # a stack the demo started is stopped on either
        signal.signal(signum, _interrupt)
    raise typer.Exit(run_demo(Path(spec), Path(hardware_spec), Path(plot)))


@app.command()
def bench(
    url: str = typer.Option(None, help="A running server (key: QAA_API_KEY or credentials); default: start one."),
    quick: bool = typer.Option(False, help="Minutes-long smoke version: tiny Llama, synthetic data, one seed."),
    seeds: int = typer.Option(None, min=1, help="Seeds of the five headline rows (variants run seed 0)."),
    steps: int = typer.Option(None, min=1, help="Training steps of every row but the hardware tuning."),
    samples: int = typer.Option(None, min=1, help="Test MRs generated and scored per job (E2E has 630)."),
    out: str = typer.Option("benchmarks/results", help="Folder for methods.json, methods.md, loss_curves.png."),
    resume: bool = typer.Option(False, help="Keep the jobs a previous run in --out finished (by id, in the store)."),
) -> None:
    """Compare full fine-tuning, LoRA, prefix, SoRA and QAA (and QAA on fake devices) as real jobs, one at a time:
    learning rates chosen on validation MRs first, then every row at its method's rate."""
    import signal
    from pathlib import Path

    from workers.bench import run_bench

    for signum in (signal.SIGINT, signal.SIGTERM):  # the running job is cancelled and its stack stopped
        signal.signal(signum, _interrupt)
    raise typer.Exit(
        run_bench(url=url, quick=quick, seeds=seeds, steps=steps, samples=samples, out=Path(out), resume=resume)
    )


@app.command()
def api(
    host: str = typer.Option(None, help="Address to bind (default: QAA_HOST)."),
    port: int = typer.Option(None, help="Port (default: QAA_PORT)."),
) -> None:
    """Serve the REST API and dashboard (uvicorn, `service.app:app`)."""
    import uvicorn

    # The app reads the address from settings too (it writes the URL into the credentials file).
    settings = _set_address(host, port)
    uvicorn.run("service.app:app", host=settings.host, port=settings.port)


@app.command("migrate")
def migrate_command() -> None:
    """Upgrade the job store's schema to the newest migration."""
    from service.settings import get_settings
    from service.store import migrate

    migrate(get_settings().sqlalchemy_url)
    typer.echo("job store schema is current")


def _store():
    from service.store import Store

    return Store.from_settings(migrate=True)


@keys.command("create")
def keys_create(
    owner: str = typer.Argument(..., help="The owner the key acts for."),
    label: str = typer.Option(None, help="A note to recognise the key by."),
    expires_in: str = typer.Option(None, help="Lifetime, e.g. 90d, 12h, 2w (default: until revoked)."),
) -> None:
    """Create a key and print it once: only its hash is stored."""
    lifetime = parse_duration(expires_in) if expires_in is not None else None
    store = _store()
    try:
        key, plaintext = store.create_api_key(owner, label=label, expires_in=lifetime)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="OWNER") from exc
    finally:
        store.close()
    until = f", expires {_when(key.expires_at)}" if key.expires_at else ""
    typer.echo(f"created {key.id} for {key.owner}{until}; the key (shown once):", err=True)
    typer.echo(plaintext)


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment else "-"


@keys.command("list")
def keys_list(owner: str = typer.Option(None, help="Only this owner's keys.")) -> None:
    """List keys (id, owner, prefix, label, state, created, expires, revoked); never the keys themselves."""
    store = _store()
    try:
        rows = store.list_api_keys(owner)
    finally:
        store.close()
    now = datetime.now(UTC)
    for key in rows:
        state = "revoked" if key.revoked_at else "expired" if key.expires_at and key.expires_at <= now else "live"
        typer.echo(
            f"{key.id}\t{key.owner}\t{key.prefix}...\t{key.label or '-'}\t{state}\t{_when(key.created_at)}\t"
            f"expires: {_when(key.expires_at)}\trevoked: {_when(key.revoked_at)}"
        )


@keys.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id (from `qaa keys list`).")) -> None:
    """Revoke a key: requests bearing it are refused from now on."""
    store = _store()
    try:
        revoked = store.revoke_api_key(key_id)
    finally:
        store.close()
    if not revoked:
        typer.echo(f"no live key {key_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


if __name__ == "__main__":
    app()
