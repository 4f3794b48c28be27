"""`qaa`: the server-side commands (worker, API, API keys, migrations).

It lives in `workers/` because `qaa worker` needs the worker's Celery app and `service/` must not import
`workers`. Each command imports what it needs when it runs, so `qaa keys list` never loads torch.
"""

from __future__ import annotations

import typer

from service.queueing import QUEUES

app = typer.Typer(help="QAA training service: server-side commands.", no_args_is_help=True)
keys = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
app.add_typer(keys, name="keys")


def parse_queues(text: str) -> list[str]:
    names = [q.strip() for q in text.split(",") if q.strip()]
    unknown = sorted(set(names) - set(QUEUES))
    if not names or unknown:
        raise typer.BadParameter(f"queues are a comma-separated subset of {','.join(QUEUES)}, got {text!r}")
    return list(dict.fromkeys(names))


@app.command()
def worker(
    queues: str = typer.Option(",".join(QUEUES), help="Queues to serve, comma-separated."),
    concurrency: int = typer.Option(1, min=1, max=64, help="Jobs run at once (one process each)."),
    loglevel: str = typer.Option("INFO", help="Celery log level."),
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
        ]
    )


@app.command()
def api(
    host: str = typer.Option(None, help="Address to bind (default: QAA_HOST)."),
    port: int = typer.Option(None, help="Port (default: QAA_PORT)."),
) -> None:
    """Serve the REST API and dashboard (uvicorn, `service.app:app`)."""
    import os

    import uvicorn

    from service.settings import get_settings

    # The app reads the address from settings too (it writes the URL into the credentials file): flags win there.
    if host:
        os.environ["QAA_HOST"] = host
    if port:
        os.environ["QAA_PORT"] = str(port)
    get_settings.cache_clear()
    settings = get_settings()
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
) -> None:
    """Create a key and print it once: only its hash is stored."""
    store = _store()
    try:
        key, plaintext = store.create_api_key(owner, label=label)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="OWNER") from exc
    finally:
        store.close()
    typer.echo(f"created {key.id} for {key.owner}; the key (shown once):", err=True)
    typer.echo(plaintext)


@keys.command("list")
def keys_list(owner: str = typer.Option(None, help="Only this owner's keys.")) -> None:
    """List keys (id, owner, prefix, label, created, revoked); never the keys themselves."""
    store = _store()
    try:
        rows = store.list_api_keys(owner)
    finally:
        store.close()
    for key in rows:
        revoked = key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "-"
        created = key.created_at.isoformat(timespec="seconds")
        typer.echo(f"{key.id}\t{key.owner}\t{key.prefix}...\t{key.label or '-'}\t{created}\trevoked: {revoked}")


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
