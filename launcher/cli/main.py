"""The `launcher` command line (click only: parse, call, map errors to exit codes)."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from kubetune.errors import EXIT_FAILURE, EXIT_USER_ERROR, KubetuneError
from launcher import __version__
from launcher.cli.run_commands import OUTPUT as FORMAT
from launcher.cli.run_commands import out_option

F = TypeVar("F", bound=Callable[..., Any])
OUT_FILE = out_option("Write to this file instead of stdout.")
PIPELINE_CHOICES = [
    "SD_LORA",
    "SD_TEXTUAL_INVERSION",
    "SDXL_LORA",
    "SDXL_TEXTUAL_INVERSION",
    "SDXL_LORA_AND_TEXTUAL_INVERSION",
    "SDXL_FINETUNE",
    "FLUX_LORA",
]


class PipelineType(click.Choice):
    """A training type, shown as configs spell it (SD_LORA) and typed in any case; a typo
    gets the closest type."""

    def __init__(self) -> None:
        super().__init__(PIPELINE_CHOICES, case_sensitive=True)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.upper() in PIPELINE_CHOICES:
            return value.upper()
        import difflib

        close = difflib.get_close_matches(str(value).upper(), PIPELINE_CHOICES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        self.fail(f"{value!r} is not a pipeline type; {hint}use one of {', '.join(self.choices)}")


def fail(message: str, code: int) -> None:
    """Print each line of `message` as `error: ...` on stderr and exit with `code`."""
    for line in message.splitlines() or [message]:
        click.echo(f"error: {line}", err=True)
    sys.exit(code)


def emit_json_error(message: str, code: int) -> None:
    """`--format json`'s document for a refused command: `{"error": {exit_code, problems}}`
    on stdout (one problem per line of the message), so CI always has JSON to read."""
    problems = message.splitlines() or [message]
    click.echo(json.dumps({"error": {"exit_code": code, "problems": problems}}, indent=2))


def handle_errors(fn: F) -> F:
    """Map kubetune errors to one-line messages and their exit codes (2 = user error), and a
    file that cannot be read or written to `PATH: why` (exit 1); with `--format json` also
    a JSON error document on stdout."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KubetuneError as err:
            if kwargs.get("output") == "json":
                emit_json_error(str(err), err.exit_code)
            fail(str(err), err.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except OSError as err:  # a file this machine will not read or write (an -o path)
            if err.filename is None:
                raise
            why = err.strerror or str(err)
            if isinstance(err, FileExistsError) and os.path.isfile(err.filename):
                why = "a file, where a folder is needed"  # mkdir(parents=True) through it
            message = f"{err.filename}: {why}"
            if kwargs.get("output") == "json":
                emit_json_error(message, EXIT_FAILURE)
            fail(message, EXIT_FAILURE)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kubetune launcher")
def main() -> None:
    """kubetune: train SD 1.5 / SDXL / FLUX.1 LoRA, Textual Inversion and SDXL fine-tunes as
    Kubernetes Jobs.

    \b
    Typical flow:
      launcher init --type SDXL_LORA -o lora.yaml   # a commented starting config
      launcher validate lora.yaml                  # every problem, with line numbers
      launcher submit --local lora.yaml            # train on this machine
      launcher submit --wait lora.yaml             # or as a GPU Job on your cluster

    Exit status: 0 ok, 1 environment/cluster/storage failure, 2 bad input.
    """


@main.command()
@click.argument("configs", nargs=-1, required=True, metavar="CONFIG...")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a field before validating, e.g. --set max_train_steps=100.",
)
@FORMAT
@click.option(
    "--data",
    "check_data",
    is_flag=True,
    help="Also download and fully decode every example of each dataset, local or s3:// "
    "(credentials from AWS_* variables), with a progress bar on stderr; every "
    "undecodable or missing image is listed, one error line each (exit 2).",
)
@handle_errors
def validate(
    configs: tuple[str, ...], overrides: tuple[str, ...], output: str, check_data: bool
) -> None:
    """Check config files without touching a cluster or storage (`--data`: and read the
    datasets they name).

    Reports every problem at once, one line each, as FILE:LINE: field.path: what to fix.
    Use `-` to read a config from stdin. Exits 0 when all files are valid, 2 otherwise.

    \b
    Examples:
      launcher validate lora.yaml
      launcher validate --format json configs/*.yaml
      cat lora.yaml | launcher validate -
      launcher validate --data lora.yaml           # and decode every image, before submitting
    """
    from launcher.config_files import results_to_json, validate_file, verify_dataset

    results = [validate_file(c, list(overrides)) for c in configs]
    if check_data:
        for result in results:
            with _DataProgress(result.file) as bar:
                verify_dataset(result, list(overrides), bar.update)
    if output == "json":
        click.echo(results_to_json(results))
    else:
        for result in results:
            if result.valid:
                click.echo(f"ok: {result.file}: {result.summary}")
            for line in result.warnings:
                click.echo(f"warning: {result.file}: {line}", err=True)
            for line in result.notes:
                click.echo(f"note: {line}", err=True)
            for line in result.errors:
                click.echo(f"error: {line}", err=True)
    if not all(r.valid for r in results):
        sys.exit(EXIT_USER_ERROR)


class _DataProgress:
    """A progress bar on stderr for `validate --data`, sized once the total is known."""

    def __init__(self, label: str) -> None:
        self.label, self.bar, self.done = label, None, 0

    def __enter__(self) -> _DataProgress:
        return self

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            bar = click.progressbar(length=total, label=f"decoding {self.label}", file=sys.stderr)
            self.bar = bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@main.command()
@click.option(
    "--type",
    "-t",
    "pipeline_type",
    required=True,
    type=PipelineType(),
    help="What to train.",
)
@OUT_FILE
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@handle_errors
def init(pipeline_type: str, out: Path | None, force: bool) -> None:
    """Write a commented starting config for a pipeline type.

    Its dataset folder (under data/ beside the file) does not exist yet: put your images
    (with same-named .txt captions) there, or point data_loader.dataset at them, pick the base
    model, then `launcher validate`.

    \b
    Example:
      launcher init --type SDXL_LORA -o lora.yaml
    """
    from launcher.config_files import starter_next_step, write_starter

    text = write_starter(pipeline_type, out, force)
    if out is None:
        click.echo(text, nl=False)
    else:
        click.echo(f"wrote {out}; {starter_next_step(out)}", err=True)


@main.command()
@OUT_FILE
@handle_errors
def schema(out: Path | None) -> None:
    """Print the JSON Schema of the config file, for editor completion.

    \b
    With the YAML language server (VS Code, Neovim...), put this first line in a config:
      # yaml-language-server: $schema=./kubetune.schema.json
    Example:
      launcher schema -o kubetune.schema.json
    """
    from launcher.config_files import schema_text

    text = schema_text()
    if out is None:
        click.echo(text)
    else:
        out.write_text(text + "\n", encoding="utf-8")
        click.echo(f"wrote {out}", err=True)


from launcher.cli.run_commands import register as _register_cluster_commands  # noqa: E402

_register_cluster_commands(main, handle_errors)

from launcher.cli.output_commands import register as _register_output_commands  # noqa: E402

_register_output_commands(main, handle_errors)

from launcher.cli.ui_command import register as _register_ui_command  # noqa: E402

_register_ui_command(main, handle_errors)
