"""`launcher ui` (click only: parse, check the bind, start launcher.ui.server). The web stack
is imported only when the command runs: `launcher --help` never loads it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from kubetune.errors import UserError

INSTALL_HINT = "install the UI extra: pip install 'kubetune[ui]'"


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    default=8765,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0: any free one).",
)
@click.option("--open", "open_browser", is_flag=True, help="Open the page in a web browser.")
@click.option(
    "--root",
    "roots",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Folder the page may read and write configs in when bound beyond loopback "
    "(repeatable; default: the current folder).",
)
@click.option(
    "--new-token",
    is_flag=True,
    help="Beyond loopback: make a random access token and print it (else KUBETUNE_UI_TOKEN).",
)
@click.option("--local-only", is_flag=True, help="Never contact a cluster: local runs only.")
@click.option(
    "--cluster-only",
    is_flag=True,
    help="Never train on this machine: submit to and list the cluster only (the chart's UI).",
)
def ui(
    host: str,
    port: int,
    open_browser: bool,
    roots: tuple[Path, ...],
    new_token: bool,
    local_only: bool,
    cluster_only: bool,
) -> None:
    """Configure, validate, submit and watch runs in a web page (needs `kubetune[ui]`).

    Binds 127.0.0.1 by default. Any other address needs a token (KUBETUNE_UI_TOKEN, or
    --new-token), and then the page reads and writes files only under --root folders.

    \b
    Examples:
      launcher ui --open
      KUBETUNE_UI_TOKEN=$(cat token) launcher ui --host 0.0.0.0 --root configs/
    """
    from launcher.ui.security import settings_for

    settings = settings_for(
        host,
        port,
        list(roots) or [Path.cwd()],
        new_token=new_token,
        local_only=local_only,
        cluster_only=cluster_only,
    )
    try:
        from launcher.ui.server import serve
    except ImportError as err:
        raise UserError(f"launcher ui needs {err.name}", hint=INSTALL_HINT) from None
    serve(settings, open_browser=open_browser)


def register(group: click.Group, handle_errors: Callable[[Any], Any]) -> None:
    if ui.callback is not None:
        ui.callback = handle_errors(ui.callback)
    group.add_command(ui)
