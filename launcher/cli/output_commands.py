"""`launcher report` and `launcher pull` (click only: parse, call launcher.outputs, print).
`register(main, handle_errors)` adds them to the CLI group."""

from __future__ import annotations

import contextlib
import json
import sys
import webbrowser
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from kubetune.errors import KubetuneError, UserError
from kubetune.humanize import count
from launcher import api
from launcher.cli.run_commands import LOCAL, cluster_options, out_option
from launcher.cli.run_commands import OUTPUT as FORMAT


def _location(run: str, local: bool, cluster: api.ClusterOptions) -> Any:
    from launcher.outputs import locate

    return locate(run, lambda name: api.backend_for_run(name, local=local, cluster=cluster))


@click.command()
@click.argument("run")
@click.option("--open", "open_it", is_flag=True, help="Open the report in a web browser.")
@click.option(
    "--expires",
    type=int,
    default=3600,
    show_default=True,
    metavar="SECONDS",
    help="Lifetime of the presigned links (a run in the cloud).",
)
@out_option(
    "Write a copy of the page here (cloud: with presigned links, default a new temp folder; "
    "local: links into the run folder)."
)
@LOCAL
@FORMAT
@cluster_options
def report(
    run: str,
    open_it: bool,
    expires: int,
    out: Path | None,
    local: bool,
    output: str,
    cluster: api.ClusterOptions,
) -> None:
    """Print the path of RUN's report.html.

    The runner rewrites the report at each validation and at the end: loss and learning-rate
    curves, validation images by step and prompt, checkpoints kept, the resolved config.
    RUN is a run name, a store URI (s3://, gs://, az://) or a local output folder. For a run
    in the cloud the page is copied here with its links to the full-size grids presigned
    (valid --expires seconds); `--format json` also gives `url`, a presigned URL of the
    stored page to share (its thumbnails and curves are inline; its grid links need
    credentials).

    \b
    Examples:
      launcher report quickstart --open
      launcher report my-lora -n training -o my-lora.html   # grid links valid for an hour
    """
    from launcher.outputs import report_location

    store = _location(run, local, cluster).open()
    view = report_location(store, expires, out)
    note = _stale_note(run, store, local, cluster)
    if output == "json":
        doc = {"run": run, "report": view.report, **({"note": note} if note else {})}
        click.echo(json.dumps(doc if view.url is None else {**doc, "url": view.url}, indent=2))
    else:
        click.echo(view.report)
    if note:
        click.echo(note, err=True)
    if open_it and not webbrowser.open(Path(view.report).resolve().as_uri()):
        click.echo("no web browser found here; open the address above yourself", err=True)


def _stale_note(run: str, store: Any, local: bool, cluster: api.ClusterOptions) -> str | None:
    """Whether the run's page predates its end: for a run named, from its process or Job
    (``launcher.outputs.stale_report_note``); for a folder or URI, from its record and lease
    (``launcher.outputs.lapsed_ending``). Best effort."""
    from launcher.outputs import lapsed_ending, page_note, stale_report_note

    if _is_location(run):
        ending = lapsed_ending(store)
        return page_note(run, ending) if ending else None
    try:
        return stale_report_note(api.backend_for_run(run, local=local, cluster=cluster).status(run))
    except KubetuneError:  # the page is there; its note is not worth an error
        return None


def _is_location(run: str) -> bool:
    """A folder or store URI rather than a run name (a DNS label: no slash, no dot first)."""
    return "://" in run or "/" in run or run.startswith(".")


@click.command()
@click.argument("run")
@click.option("--step", type=int, metavar="N", help="A checkpoint's weights instead of the final.")
@click.option("--final", is_flag=True, help="The final weights (the default).")
@out_option("Destination folder (default: ./<run>-final or ./<run>-step-00000N).", folder=True)
@LOCAL
@FORMAT
@cluster_options
def pull(
    run: str,
    step: int | None,
    final: bool,
    out: Path | None,
    local: bool,
    output: str,
    cluster: api.ClusterOptions,
) -> None:
    """Download RUN's final weights (or checkpoint N's, without its training state),
    each file checked against the manifest.

    \b
    Examples:
      launcher pull quickstart                    # -> ./quickstart-final/
      launcher pull my-lora --step 1200 -o lora/
      launcher pull my-lora --format json         # CI: where the files went
    """
    from kubetune.layout import FINAL, step_name  # pydantic: not at `launcher --help`
    from launcher.outputs import lapsed_ending
    from launcher.outputs import pull as do_pull

    if step is not None and final:
        raise UserError("--step and --final exclude each other", hint="pass one of them")
    if out is not None and out.name in ("json", "text") and not out.exists():
        raise UserError(
            f"-o {out.name} names the destination folder",
            hint=f"for a {out.name} report use --format {out.name}",
        )
    dest = out or Path(f"{Path(run.rstrip('/')).name}-{FINAL if step is None else step_name(step)}")
    store = _location(run, local, cluster).open()
    with _progress_bar(output == "text" and sys.stderr.isatty()) as (on_start, on_file):
        result = do_pull(store, dest, step=step, on_start=on_start, on_file=on_file)
    ending = lapsed_ending(store)  # its runner killed: no later checkpoint will come
    note = f"note: {run} is {ending}" if ending else None
    if output == "json":
        doc = result.to_json()
        click.echo(json.dumps({**doc, "note": note} if note else doc, indent=2))
    else:
        click.echo(
            f"pulled {count(len(result.files), 'file')} ({result.bytes / 1e6:.1f} MB) of "
            f"{result.what} step {result.step} into {result.dest}/"
        )
        for name in result.files:
            click.echo(f"  {name}")
    if note:
        click.echo(note, err=True)


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[tuple[Callable[[int], None], Callable[[Any], None]]]:
    """(start(total bytes), advance(file entry)): a click progress bar on stderr."""
    with contextlib.ExitStack() as stack:
        bar: Any = None

        def start(total: int) -> None:
            nonlocal bar
            if enabled:
                bar = stack.enter_context(
                    click.progressbar(length=max(total, 1), label="pulling", file=sys.stderr)
                )

        def advance(entry: Any) -> None:
            if bar is not None:
                bar.update(entry.size)

        yield start, advance


COMMANDS = (report, pull)


def register(group: click.Group, handle_errors: Callable[[Any], Any]) -> None:
    for command in COMMANDS:
        if command.callback is not None:
            command.callback = handle_errors(command.callback)
        group.add_command(command)
