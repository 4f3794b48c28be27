"""`qaa-client`: submit, watch and compare training jobs of a QAA service over HTTP.

Exit codes, for scripts: 0 done, 1 the job failed or was cancelled, 2 usage (bad flags, an unreadable or
invalid spec, any other refused request), 3 the server is unreachable or failing (5xx), 4 the API key was
refused, 5 a download failed its integrity check (a SHA-256 that differs from the server's, an unsafe name).
Every command takes `--output json`, which prints the API's JSON (errors too, as `{"error": ...}`); following a
job (`watch`, `submit --watch`) then streams JSON Lines, one `{"job", "points"}` object per poll, the last one final.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, NoReturn

import typer
from rich.table import Table

from client import compare as comparing
from client import config, render
from client.api import ApiClient, ApiError, AuthRefused, Unreachable
from client.spec_file import SpecFileError, apply_overrides, evaluate_spec, load_spec, local_dataset
from client.version import add_version_option
from client.watch import follow, watch_live

EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_INTEGRITY = 5
#: The artifact a worker writes a job's own log lines to (`workers.job_log`).
LOG_ARTIFACT = "job.log"

app = typer.Typer(
    help="Submit, watch and compare QAA training jobs (exit codes: 0 done, 1 job failed or cancelled, "
    "2 usage, 3 server unreachable, 4 key refused, 5 a download failed its integrity check).",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
)


add_version_option(app, "qaa-client")
datasets_app = typer.Typer(help="Your uploaded datasets (JSONL of {prompt, completion}).", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
credentials_app = typer.Typer(help="Secrets the server keeps for you: the IBM Quantum token.", no_args_is_help=True)
app.add_typer(credentials_app, name="credentials")


class Output(StrEnum):
    text = "text"
    json = "json"


class MetricsFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


UrlOpt = Annotated[
    str | None,
    typer.Option("--url", help="Server URL (default: QAA_URL, the credentials file, http://127.0.0.1:8000)."),
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", help="API key (default: QAA_API_KEY, then $QAA_HOME/credentials).", show_default=False),
]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="text for people, json for scripts.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a spec value: dotted.path=value, value read as YAML (repeatable)."),
]
SpecArg = Annotated[Path, typer.Argument(help="Job spec, YAML or JSON.", show_default=False)]
IntervalOpt = Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between polls.")]


# --- errors and exit codes ---------------------------------------------------------------------------------


def fail(code: int, message: str, output: Output, problem: ApiError | None = None) -> NoReturn:
    render.console(stderr=True).print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    if output is Output.json:
        error: dict[str, Any] = {"exit_code": code, "message": message}
        if problem is not None:
            error.update(status=problem.status, detail=problem.detail, errors=problem.errors)
        render.print_json({"error": error})
    raise typer.Exit(code)


def problem_message(exc: ApiError) -> str:
    """The server's words: its detail, then one line per field or line it names."""
    if not exc.errors:
        return f"the server refused the request ({exc.status}): {exc.detail}"
    fields = "\n".join(f"  {e.get('path') or '(body)'}: {e.get('message')}" for e in exc.errors)
    return f"the server refused the request ({exc.status}):\n{fields}"


@contextlib.contextmanager
def connected(url: str | None, api_key: str | None, output: Output) -> Iterator[ApiClient]:
    """An API client; every way the server can say no becomes a message and an exit code."""
    try:
        conn = config.resolve(url, api_key)
    except config.ConfigError as exc:
        fail(EXIT_USAGE, str(exc), output)
    try:
        with ApiClient(conn.url, conn.api_key) as api:
            yield api
    except Unreachable as exc:
        fail(EXIT_UNREACHABLE, f"{exc}\n  is it running? (`qaa up`), or point --url / QAA_URL at it", output)
    except AuthRefused as exc:
        fail(EXIT_AUTH, f"the server at {conn.url} refused the API key ({conn.key_source}): {exc.detail}", output, exc)
    except ApiError as exc:
        code = EXIT_USAGE if exc.status < 500 else EXIT_UNREACHABLE
        fail(code, problem_message(exc), output, exc)


def read_spec(path: Path, overrides: list[str] | None, output: Output) -> dict[str, Any]:
    try:
        return apply_overrides(load_spec(path), overrides or [])
    except SpecFileError as exc:
        fail(EXIT_USAGE, str(exc), output)


def exit_for(job: dict[str, Any]) -> None:
    if job["status"] in ("failed", "cancelled"):
        raise typer.Exit(EXIT_JOB_FAILED)


def show(output: Output, data: Any, *renderables: Any) -> None:
    if output is Output.json:
        render.print_json(data)
    else:
        out = render.console()
        for item in renderables:
            out.print(item)


# --- commands ----------------------------------------------------------------------------------------------


@app.command()
def submit(
    spec_file: SpecArg,
    set_: SetOpt = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the job to its end (exit code by outcome).")] = False,
    interval: IntervalOpt = 1.0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Submit a job; a local dataset file named in the spec is uploaded first. Prints the job id."""
    spec = read_spec(spec_file, set_, output)
    with connected(url, api_key, output) as api:
        dataset = local_dataset(spec, spec_file)
        if dataset is not None:
            uploaded = api.upload_dataset(dataset)
            spec["dataset"] = uploaded["id"]
            note(output, f"uploaded {dataset} as {uploaded['id']} ({uploaded['rows']} examples)")
        job = _submit(api, spec, watch, interval, output)
    exit_for(job)


@app.command()
def resubmit(
    job_id: Annotated[str, typer.Argument(help="The job whose spec to submit again.", show_default=False)],
    set_: SetOpt = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the new job to its end.")] = False,
    interval: IntervalOpt = 1.0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Submit a job's spec again, changed by --set (e.g. --set training.steps=400). Prints the new job id."""
    with connected(url, api_key, output) as api:
        try:
            spec = apply_overrides(api.get_job(job_id)["spec"], set_ or [])
        except SpecFileError as exc:
            fail(EXIT_USAGE, str(exc), output)
        job = _submit(api, spec, watch, interval, output)
    exit_for(job)


@app.command()
def logs(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None, output: OutputOpt = Output.text) -> None:
    """Print a job's own log lines (its worker's records while it ran, secrets redacted; stored when it ends)."""
    import tempfile

    with connected(url, api_key, output) as api:
        found = [a for a in api.artifacts(job_id) if a["name"] == LOG_ARTIFACT]
        if not found:
            job = api.get_job(job_id)
            fail(EXIT_USAGE, f"job {job_id} has no log yet ({job['status']}): it is stored when the job ends", output)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / LOG_ARTIFACT
            api.download_artifact(found[0], path)
            text = path.read_text(encoding="utf-8", errors="replace")
    if output is Output.json:
        render.print_json({"job": job_id, "lines": text.splitlines()})
    else:
        sys.stdout.write(text)


@datasets_app.command("upload")
def datasets_upload(
    path: Annotated[Path, typer.Argument(help="A JSONL file of {prompt, completion} lines.", show_default=False)],
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Upload a dataset; prints its id (use it as `dataset: ds_...` in a spec)."""
    if not path.is_file():
        fail(EXIT_USAGE, f"{path} is not a file", output)
    with connected(url, api_key, output) as api:
        dataset = api.upload_dataset(path)
    show(output, dataset, dataset["id"])


@datasets_app.command("list")
def datasets_list(url: UrlOpt = None, api_key: KeyOpt = None, output: OutputOpt = Output.text) -> None:
    """Your datasets, newest first."""
    with connected(url, api_key, output) as api:
        rows = api.datasets()
    table = Table("id", "name", "rows", "bytes", "created")
    for d in rows:
        table.add_row(d["id"], str(d.get("name")), str(d.get("rows")), str(d.get("size")), str(d.get("created_at")))
    show(output, rows, table)


@datasets_app.command("delete")
def datasets_delete(
    dataset_id: str, url: UrlOpt = None, api_key: KeyOpt = None, output: OutputOpt = Output.text
) -> None:
    """Delete a dataset (refused while a queued or running job names it)."""
    with connected(url, api_key, output) as api:
        api.delete_dataset(dataset_id)
    show(output, {"deleted": dataset_id}, f"deleted {dataset_id}")


@credentials_app.command("set-ibm")
def credentials_set_ibm(
    instance: Annotated[
        str | None, typer.Option("--instance", help="IBM Cloud instance (CRN), if yours needs one.")
    ] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Store your IBM Quantum token for `ibm:` jobs. The token is read from stdin (piped) or a hidden prompt,
    never from the command line, where it would stay in the shell's history."""
    token = (
        sys.stdin.readline().strip() if not sys.stdin.isatty() else typer.prompt("IBM Quantum token", hide_input=True)
    )
    if not token:
        fail(EXIT_USAGE, "no token given (pipe it on stdin, or type it at the prompt)", output)
    with connected(url, api_key, output) as api:
        stored = api.set_ibm_token(token, instance)
    show(output, stored, "IBM Quantum token stored (write-only: the server never shows it again)")


@credentials_app.command("show")
def credentials_show(url: UrlOpt = None, api_key: KeyOpt = None, output: OutputOpt = Output.text) -> None:
    """Which credentials are stored (never their secrets)."""
    with connected(url, api_key, output) as api:
        rows = api.credentials()
    table = Table(*(rows[0].keys() if rows else ["kind"]))
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    show(output, rows, table if rows else "no credentials stored")


@credentials_app.command("delete")
def credentials_delete(url: UrlOpt = None, api_key: KeyOpt = None, output: OutputOpt = Output.text) -> None:
    """Forget your IBM Quantum token."""
    with connected(url, api_key, output) as api:
        api.delete_ibm_token()
    show(output, {"deleted": "ibm"}, "IBM Quantum token deleted")


@app.command()
def evaluate(
    job_id: Annotated[str, typer.Argument(help="A succeeded QAA job whose adapter to evaluate.", show_default=False)],
    backend: Annotated[str, typer.Option("--backend", help="Where to run it: fake:<Name>, ibm:<name>, aer.")],
    mitigation: Annotated[
        list[str] | None,
        typer.Option("--mitigation", help="m3, trex, twirling, zne or dd (XY4 decoupling); repeatable."),
    ] = None,
    shots: Annotated[
        int | None, typer.Option("--shots", min=1, help="Shots per circuit (default: the backend's).")
    ] = None,
    samples: Annotated[int | None, typer.Option("--samples", min=1, help="Test examples (default: the job's).")] = None,
    set_: SetOpt = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the evaluation to its end.")] = False,
    interval: IntervalOpt = 1.0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Run a trained adapter on another backend beside the exact engine and report the hardware gap (a job of
    kind evaluate: priced and budgeted like training, inference only)."""
    with connected(url, api_key, output) as api:
        trained = api.get_job(job_id)
        try:
            spec = evaluate_spec(trained["spec"], job_id, backend, shots=shots, mitigation=mitigation or [],
                                 samples=samples)  # fmt: skip
            spec = apply_overrides(spec, set_ or [])
        except SpecFileError as exc:
            fail(EXIT_USAGE, str(exc), output)
        job = _submit(api, spec, watch, interval, output)
    exit_for(job)


@app.command()
def watch(
    job_id: str,
    interval: IntervalOpt = 1.0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Follow a job to its end with a live progress bar, then show its evaluation."""
    with connected(url, api_key, output) as api:
        job = _watch(api, job_id, interval, output)
    exit_for(job)


def _submit(api: ApiClient, spec: dict[str, Any], watch: bool, interval: float, output: Output) -> dict[str, Any]:
    """Submit `spec`; with `watch`, follow the job to its end. Returns the job as last seen."""
    job = api.submit_job(spec)
    if not watch:
        show(output, job, job["id"])
        note(output, f"job {job['id']} queued on {job['queue']}; follow it with: qaa-client watch {job['id']}")
        return job
    if output is Output.text:
        render.console().print(job["id"])
    return _watch(api, job["id"], interval, output)


def _watch(api: ApiClient, job_id: str, interval: float, output: Output) -> dict[str, Any]:
    """Follow a job: a live bar on stderr (text), or one JSON line per poll on stdout (json: `{"job": ...,
    "points": [the metric points new since the line before]}`; the last line holds the final job)."""
    try:
        if output is Output.json:
            job, _ = follow(api, job_id, interval=interval, on_poll=_json_lines())
        else:
            job, _ = watch_live(api, job_id, render.console(stderr=True), interval=interval)
    except KeyboardInterrupt:
        note(output, f"stopped watching; the job goes on (qaa-client cancel {job_id} stops it)")
        raise typer.Exit(130) from None
    if output is Output.text:
        show(output, job, *render.job_tables(job))
    if job["status"] in ("failed", "cancelled"):
        note(output, f"job {job_id} {job['status']}" + (f": {job['error']}" if job.get("error") else ""))
    return job


def _json_lines():
    """`follow`'s on_poll for `-o json`: each poll one line, flushed, so a pipe sees it at once."""
    sent = 0

    def emit(job: dict[str, Any], counters: Any) -> None:
        nonlocal sent
        sys.stdout.write(json.dumps({"job": job, "points": counters.points[sent:]}, default=str) + "\n")
        sys.stdout.flush()
        sent = len(counters.points)

    return emit


def note(output: Output, message: str) -> None:
    """A remark for people on stderr, so stdout stays what scripts parse."""
    if output is Output.text:
        render.console(stderr=True).print(message, markup=False, highlight=False, soft_wrap=True)


@app.command()
def status(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None, output: OutputOpt = Output.text) -> None:
    """A job's state, progress, quantum usage and evaluation (exit 1 if it failed or was cancelled)."""
    with connected(url, api_key, output) as api:
        job = api.get_job(job_id)
    show(output, job, *render.job_tables(job))
    exit_for(job)


@app.command("list")
def list_jobs(
    state: Annotated[
        list[str] | None,
        typer.Option("--state", help="Only jobs in this state (repeatable): queued, running, succeeded, ..."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many jobs, newest first.")] = 50,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Your jobs, newest first."""
    with connected(url, api_key, output) as api:
        jobs = api.list_jobs(state, limit)
    show(output, jobs, render.jobs_table(jobs))


@app.command()
def cancel(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None, output: OutputOpt = Output.text) -> None:
    """Cancel a job: a queued one at once, a running one within a step."""
    with connected(url, api_key, output) as api:
        job = api.cancel_job(job_id)
    show(output, job, f"job {job['id']}: {job['status']}")


@app.command()
def metrics(
    job_id: str,
    format_: Annotated[
        MetricsFormat | None, typer.Option("--format", help="table, csv or json (default: table; json with -o json).")
    ] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Every metric point of a job (loss, learning rate, eval loss, ...), in step order."""
    with connected(url, api_key, output) as api:
        points = api.metrics(job_id)
    chosen = format_ or (MetricsFormat.json if output is Output.json else MetricsFormat.table)
    if chosen is MetricsFormat.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=render.metric_columns(points), lineterminator="\n")
        writer.writeheader()
        writer.writerows(points)
    elif chosen is MetricsFormat.json:
        render.print_json(points)
    else:
        render.console().print(render.metrics_table(points))


@app.command()
def download(
    job_id: str,
    dest: Annotated[Path | None, typer.Option("--dest", help="Folder to write into (default: ./JOB_ID).")] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Download every artifact of a job (streamed; each file's SHA-256 checked)."""
    folder = dest or Path(job_id)
    written = []
    with connected(url, api_key, output) as api:
        for artifact in api.artifacts(job_id):
            name = PurePosixPath(artifact["name"])
            if name.is_absolute() or ".." in name.parts:
                fail(EXIT_INTEGRITY, f"the server named an artifact {artifact['name']!r}; refusing to write it", output)
            path = folder.joinpath(*name.parts)
            digest = api.download_artifact(artifact, path)
            if digest != artifact["sha256"]:
                path.unlink()  # not the file the job wrote: nothing corrupt is left behind to be used
                fail(
                    EXIT_INTEGRITY,
                    f"{artifact['name']}: SHA-256 {digest} differs from the {artifact['sha256']} the job recorded; "
                    "the file was not kept",
                    output,
                )
            written.append({**artifact, "path": str(path)})
    table = Table("artifact", "bytes", "written to")
    for item in written:
        table.add_row(item["name"], render.fmt(item["size"]), item["path"])
    show(output, written, table if written else f"job {job_id} has no artifacts (yet)")


@app.command()
def backends(url: UrlOpt = None, api_key: KeyOpt = None, output: OutputOpt = Output.text) -> None:
    """Execution backends the server offers: simulators and fake IBM devices."""
    with connected(url, api_key, output) as api:
        found = api.backends()
    show(output, found, render.backends_table(found))


@app.command()
def estimate(
    spec_file: SpecArg,
    set_: SetOpt = None,
    d_in: Annotated[
        int | None, typer.Option("--d-in", min=1, help="Adapted modules' input width (non-builtin models).")
    ] = None,
    adapters: Annotated[
        int | None, typer.Option(min=1, help="How many modules are adapted (non-builtin models).")
    ] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Circuits, shots, primitive calls and a time range for a spec, before anything runs."""
    spec = read_spec(spec_file, set_, output)
    with connected(url, api_key, output) as api:
        est = api.estimate(spec, d_in=d_in, adapters=adapters)
    show(output, est, *render.estimate_tables(est))


@app.command()
def compare(
    job_ids: Annotated[list[str], typer.Argument(help="Jobs to put side by side.", show_default=False)],
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also write their loss curves overlaid to this PNG.")
    ] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Methods side by side: trainable share, BLEU, ROUGE-L, BERTScore, final loss, time per step, memory."""
    with connected(url, api_key, output) as api:
        fetched = [(api.get_job(job_id), api.metrics(job_id)) for job_id in job_ids]
    rows = [comparing.row(job, points) for job, points in fetched]
    if plot is not None:
        comparing.plot({f"{r['id']} {r['method']}": points for r, (_, points) in zip(rows, fetched, strict=True)}, plot)
        note(output, f"loss curves written to {plot}")
    show(output, rows, comparing.table(rows))


if __name__ == "__main__":
    app()
