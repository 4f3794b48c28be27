"""`--version` for both command lines (`qaa-client`, and the server's `qaa`): the installed package's version."""

from __future__ import annotations

from importlib import metadata

import typer


def add_version_option(app: typer.Typer, prog: str) -> None:
    """Give `app` an eager `--version` that prints `prog <version>` and exits."""

    def print_version(value: bool) -> None:
        if value:
            typer.echo(f"{prog} {metadata.version('qaa-service')}")
            raise typer.Exit()

    @app.callback()
    def _options(
        version: bool = typer.Option(
            False, "--version", callback=print_version, is_eager=True, help="Print the version."
        ),
    ) -> None:
        pass
