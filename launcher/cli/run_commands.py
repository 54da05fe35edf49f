"""`launcher render / submit / status / logs / cancel / list` (click only: parse, call
launcher.api, print). `register(main, handle_errors)` adds them to the CLI group."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kubetune.errors import EXIT_FAILURE, EXIT_OK, EXIT_USER_ERROR
from launcher import api

if TYPE_CHECKING:
    from launcher.backends.base import Backend, RunStatus, SubmitResult

OUTPUT = click.option(
    "--format",
    "--output",
    "output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one machine-readable document on stdout (for CI).",
)
LOCAL = click.option(
    "--local", is_flag=True, help="A run on this machine (`submit --local`) instead of the cluster."
)


def out_option(help: str, *, folder: bool = False, dest: str = "out") -> Callable[[Any], Any]:
    """``-o/--out``: where a command writes (a file, or a folder with ``folder``); -o means
    this in every command (the output format is ``--format``)."""
    return click.option(
        "-o",
        "--out",
        dest,
        type=click.Path(file_okay=not folder, dir_okay=folder, path_type=Path),
        metavar="DIR" if folder else "FILE",
        help=help,
    )


def cluster_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """kubectl-like --kubeconfig / --context / --namespace, passed on as `cluster`."""

    @click.option(
        "--kubeconfig",
        envvar="KUBECONFIG",
        metavar="PATH",
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster).",
    )
    @click.option("--context", metavar="NAME", help="kubeconfig context to use.")
    @click.option(
        "--namespace",
        "-n",
        metavar="NS",
        help="Namespace (default: job.namespace, then the context's).",
    )
    @functools.wraps(fn)
    def wrapper(
        kubeconfig: str | None, context: str | None, namespace: str | None, **kwargs: Any
    ) -> Any:
        if kubeconfig and ":" in kubeconfig:
            kubeconfig = kubeconfig.split(":")[0]
        return fn(cluster=api.ClusterOptions(kubeconfig, context, namespace), **kwargs)

    return wrapper


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    @click.argument("config")
    @click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config field, e.g. --set max_train_steps=100.",
    )
    @click.option("--name", metavar="NAME", help="Run name (sets job.name).")
    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        return fn(**kwargs)

    return wrapper


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def run_exit_code(status: RunStatus) -> int:
    """`submit --wait`'s exit status: 0 if the run succeeded, 2 if it failed on bad input (the
    runner exited 2: config or data), else 1."""
    if status.phase == "Succeeded":
        return EXIT_OK
    bad_input = f"exit code {EXIT_USER_ERROR}"
    if status.reason == bad_input or (status.message or "").startswith(f"{bad_input}:"):
        return EXIT_USER_ERROR
    return EXIT_FAILURE


def output_lines(status: RunStatus) -> list[str]:
    """Where to look once a run ended: the outputs, its newest checkpoint and final weights."""
    from kubetune.layout import checkpoint_key  # pydantic: not at --help time

    uri = status.output_uri.rstrip("/")
    lines = [f"outputs: {uri}"]
    if status.phase == "Succeeded":
        step = status.progress.last_checkpoint_step if status.progress else None
        if step is not None:
            lines.append(f"  checkpoint: {uri}/{checkpoint_key(step)}/")
            lines.append(f"  validation: {uri}/validation/ (grid.png per validation step)")
        lines.append(f"  final:      {uri}/final/")
        lines.append(f"  report:     {uri}/report.html")
    return lines


@click.command()
@config_options
@click.option("--namespace", "-n", metavar="NS", help="Namespace to put in the manifests.")
def render(
    config: str, overrides: tuple[str, ...], name: str | None, namespace: str | None
) -> None:
    """Print the ConfigMap and Job that `submit` would create (no cluster needed).

    \b
    Example:
      launcher render lora.yaml | kubectl apply --dry-run=server -f -
    """
    cfg = api.load(config, overrides, name)
    click.echo(api.render(cfg, namespace), nl=False)


@click.command()
@config_options
@click.option("--wait", is_flag=True, help="Block until the run ends; exit 0 on success, 1 not.")
@click.option(
    "--follow", "-f", is_flag=True, help="Stream the logs until the run ends (implies --wait)."
)
@LOCAL
@click.option(
    "--replace",
    is_flag=True,
    help="Delete a run of the same name with another config first; a Succeeded run of this "
    "config (local or cluster) starts over from step 0.",
)
@click.option(
    "--timeout",
    type=float,
    default=None,
    metavar="SECONDS",
    help="With --wait: give up (exit 1) after this long.",
)
@click.option("--poll-interval", type=float, default=2.0, hidden=True)
@click.option(
    "--sweep",
    "sweeps",
    multiple=True,
    metavar="KEY=V1,V2",
    help="Submit one run per combination of the swept values (repeatable). Values that "
    "contain commas: a YAML / JSON list, KEY='[\"a cat, sitting\", a dog]'.",
)
@OUTPUT
@cluster_options
def submit(
    config: str,
    overrides: tuple[str, ...],
    name: str | None,
    wait: bool,
    follow: bool,
    local: bool,
    replace: bool,
    timeout: float | None,
    poll_interval: float,
    sweeps: tuple[str, ...],
    output: str,
    cluster: api.ClusterOptions,
) -> None:
    """Validate CONFIG and start it as a Kubernetes Job (or locally with --local).

    Submitting the same config again returns the existing run, or resumes it from its newest
    checkpoint when it ended Failed (a failed Job is deleted and created anew; outputs stay)
    or, locally, was preempted or cancelled (as a restarted pod does); another config under
    the same run name is an error unless --replace. A cluster Job that submit deletes has its
    pods' log tails saved first (`launcher logs` prints them).
    With --sweep, every combination becomes its own run named `<run>-<hash of its values>`
    and labelled with the sweep (re-submitting is a no-op);
    `--local` runs them one after another, a cluster queues them (job.queue_name).

    \b
    Examples:
      launcher submit lora.yaml
      launcher submit --wait --format json lora.yaml      # CI: exit 0 only if it trained
      launcher submit --local --follow examples/quickstart.yaml
      launcher submit lora.yaml --sweep optimizer.learning_rate=1e-4,5e-5 --sweep lora_rank_dim=4,16
      launcher submit lora.yaml --sweep 'validation_prompts=[["a cat, sitting"], ["a dog"]]'
    """
    if sweeps:
        from launcher.sweep_runs import submit_sweep
        from launcher.sweeps import expand, parse_axes

        sweep, members = expand(config, overrides, name, parse_axes(sweeps))  # all valid first
        echo = functools.partial(click.echo, err=output == "json")
        doc, ok = submit_sweep(
            sweep,
            members,
            api.get_backend(local=local, cluster=cluster),
            wait=wait or follow,
            echo=echo,
            poll=poll_interval,
            replace=replace,
        )
        if output == "json":
            _emit_json(doc)
        sys.exit(EXIT_OK if ok else EXIT_FAILURE)
    cfg = api.load(config, overrides, name)
    backend = api.get_backend(local=local, cluster=cluster)
    from launcher.backends.local import LocalBackend

    if isinstance(backend, LocalBackend):  # a missing dataset or bucket: exit 2 now, not later
        from launcher.config_files import check_local_data

        backend.check_home()
        check_local_data(config, cfg, list(overrides))
    result = api.submit(cfg, backend, replace=replace)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if output == "text":
        where = f" in namespace {result.namespace}" if result.namespace else ""
        if result.note:
            click.echo(f"{result.run}: {result.note} ({backend.name} job {result.job_name}{where})")
        else:
            verb = "submitted" if result.created else "already submitted (same config)"
            click.echo(f"{result.run}: {verb} as {backend.name} job {result.job_name}{where}")
        click.echo(f"outputs: {result.output_uri}")
        if result.saved_logs:
            click.echo(
                f"logs of the replaced pods: {result.saved_logs} (`launcher logs` shows them)"
            )
    if not (wait or follow):
        if output == "json":
            _emit_json({"submit": result.__dict__})
        return
    with _detach_on_interrupt(result.run, backend.name):
        status = _follow_and_wait(backend, result, follow, output, timeout, poll_interval)
    if output == "json":
        _emit_json({"submit": result.__dict__, "status": status.to_json()})
    else:
        click.echo(status.summary())
        for line in output_lines(status):
            click.echo(line)
    sys.exit(run_exit_code(status))


def _follow_and_wait(
    backend: Backend,
    result: SubmitResult,
    follow: bool,
    output: str,
    timeout: float | None,
    poll: float,
) -> RunStatus:
    finished = not result.created and backend.status(result.run).done
    if follow and not finished:  # this attempt only: a resumed run's earlier log is `logs`
        from launcher.follow import follow as follow_lines
        from launcher.follow import wants_bar

        err = output == "json"
        lines = backend.logs(result.run, follow=True, latest=True)
        follow_lines(lines, lambda line: click.echo(line, err=err), bar=not err and wants_bar())

    def echo(status: RunStatus) -> None:  # intermediate states; the final one is printed after
        if not status.done:
            click.echo(status.summary(), err=True)

    quiet = output == "json" or follow  # --follow already streams the progress lines
    return api.wait(
        backend, result.run, timeout=timeout, poll=poll, on_change=None if quiet else echo
    )


@contextlib.contextmanager
def _detach_on_interrupt(run: str, backend: str) -> Iterator[None]:
    """Ctrl-C / SIGTERM while following or waiting stops only the watching: say that the
    run goes on and how to reach or cancel it, then exit 130."""
    previous = signal.getsignal(signal.SIGTERM)

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except KeyboardInterrupt:
        flag = " --local" if backend == "local" else ""
        click.echo(
            f"\nstopped following; the run {run} goes on ({backend}). `launcher status{flag} "
            f"{run}` shows it, `launcher logs{flag} -f {run}` follows it again, "
            f"`launcher cancel{flag} {run}` stops it",
            err=True,
        )
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command()
@click.argument("run", required=False)
@click.option(
    "--sweep", metavar="NAME", help="Every run of this sweep side by side (step, loss, values)."
)
@LOCAL
@OUTPUT
@cluster_options
def status(
    run: str | None, sweep: str | None, local: bool, output: str, cluster: api.ClusterOptions
) -> None:
    """Phase, reason, retries and training progress of RUN (or of every run of --sweep).

    RUN may also be a run's output folder or store URI (s3://, gs://, az://): then its
    progress record and its lease say whether it runs (a record that says running under a
    lease that expired unrenewed, its runner killed, is 'not running ... no end recorded').

    \b
    Examples:
      launcher status quickstart
      launcher status my-lora --format json      # CI: phase, step, loss as one document
      launcher status s3://bucket/runs/my-lora   # from the storage alone
      launcher status --sweep lr-search
    """
    if sweep:
        _print_sweep(api.get_backend(local=local, cluster=cluster), sweep, output)
        return
    if not run:
        raise click.UsageError("name a RUN or --sweep NAME (`launcher list` shows the runs)")
    if "://" in run or "/" in run or run.startswith("."):  # a folder or URI, not a run name
        _print_location_status(run, output)
        return
    result = api.backend_for_run(run, local=local, cluster=cluster).status(run)
    if output == "json":
        _emit_json(result.to_json())
        return
    click.echo(result.summary())
    if result.nodes > 1:
        click.echo(
            f"job: {result.job_name}  nodes: {result.nodes}  pods: {len(result.pods)}  "
            f"failed pods: {result.retries}"
        )
    else:
        click.echo(
            f"job: {result.job_name}  attempts: {len(result.pods)}  "
            f"failed attempts: {result.retries}"
        )
    click.echo(f"outputs: {result.output_uri}")
    if result.progress_error:
        click.echo(f"progress: unavailable ({result.progress_error})")


def _print_location_status(run: str, output: str) -> None:
    """``status`` of a run's output folder or store URI: no process or Job to ask, so its
    record and its lease say whether it runs (``launcher.outputs.LocationStatus``)."""
    from launcher.outputs import LocationStatus, locate

    location = locate(run, lambda name: None)  # a path or URI: no backend asked
    result = LocationStatus.read(location.open(), location.uri)
    if output == "json":
        _emit_json(result.to_json())
    else:
        click.echo(result.summary())


@click.command()
@click.argument("run")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming, across pod restarts.")
@click.option(
    "--rank",
    type=click.IntRange(min=0),
    default=None,
    metavar="K",
    help="Multi-node runs: the logs of node K (its pod's completion index; default 0, the "
    "node that logs progress).",
)
@LOCAL
@cluster_options
def logs(
    run: str, follow: bool, rank: int | None, local: bool, cluster: api.ClusterOptions
) -> None:
    """Print the logs of RUN (every attempt, oldest first, on a cluster with the log tails
    saved when submit replaced a Job; one node of a multi-node run).

    \b
    Examples:
      launcher logs -f quickstart
      launcher logs my-lora --rank 1             # node 1 of a multi-node run
    """
    from launcher.follow import follow as follow_lines
    from launcher.follow import wants_bar

    backend = api.backend_for_run(run, local=local, cluster=cluster)
    lines = backend.logs(run, follow=follow, rank=rank)
    watching = _detach_on_interrupt(run, backend.name) if follow else contextlib.nullcontext()
    with watching:  # Ctrl-C ends the following, not the run: say so
        follow_lines(lines, click.echo, bar=follow and wants_bar())


@click.command()
@click.argument("run")
@click.option("--wait", is_flag=True, help="Return once the Job and its pods are gone.")
@click.option(
    "--timeout",
    type=float,
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="With --wait: give up (exit 1) after this long.",
)
@LOCAL
@OUTPUT
@cluster_options
def cancel(
    run: str, wait: bool, timeout: float, local: bool, output: str, cluster: api.ClusterOptions
) -> None:
    """Stop RUN (the Job is deleted; outputs in storage stay). The run is Cancelling until
    the cluster has removed the Job, then Cancelled.

    \b
    Examples:
      launcher cancel quickstart
      launcher cancel my-lora --wait --timeout 120
    """
    backend = api.backend_for_run(run, local=local, cluster=cluster)
    result = backend.cancel(run, wait=wait, timeout=timeout)
    if output == "json":
        _emit_json(result.to_json())
    elif result.phase in ("Cancelling", "Cancelled"):
        click.echo(result.summary())
    else:
        click.echo(f"{result.summary()} (already ended: nothing to cancel)")


def _print_sweep(backend: Backend, sweep: str, output: str) -> None:
    from launcher.sweep_runs import sweep_json, sweep_statuses, sweep_table

    statuses = sweep_statuses(backend, sweep)
    click.echo(sweep_json(statuses) if output == "json" else "\n".join(sweep_table(statuses)))


@click.command(name="list")
@LOCAL
@click.option(
    "--sweep", metavar="NAME", help="Only the runs of this sweep, with step, loss and values."
)
@OUTPUT
@cluster_options
def list_runs(local: bool, sweep: str | None, output: str, cluster: api.ClusterOptions) -> None:
    """List kubetune runs in the namespace (or on this machine with --local, or when no
    cluster is configured).

    \b
    Examples:
      launcher list
      launcher list --sweep lr-search --format json
    """
    if not local and not api.cluster_configured(cluster):
        click.echo(
            "no cluster configured (no --kubeconfig, $KUBECONFIG or ~/.kube/config): "
            "showing the runs on this machine",
            err=True,
        )
        local = True
    backend = api.get_backend(local=local, cluster=cluster)
    if sweep:
        _print_sweep(backend, sweep, output)
        return
    from launcher.backends.base import UNREADABLE

    runs = backend.list()
    for r in runs:  # listed anyway; say which file and why once, as an error
        if r.phase == UNREADABLE:
            click.echo(f"error: {r.message}", err=True)
    if output == "json":
        _emit_json([r.to_json() for r in runs])
        return
    if not runs:
        where, how = ("on this machine", "submit --local") if local else ("here", "submit")
        click.echo(f"no runs {where} yet; `launcher {how} CONFIG` starts one", err=True)
        return
    rows = [("RUN", "PHASE", "REASON", "FAILED", "JOB", "OUTPUT")] + [
        (r.run, r.phase, r.reason or "-", str(r.retries), r.job_name, r.output_uri or "-")
        for r in runs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        click.echo("  ".join([*cells, row[-1]]))


COMMANDS = (render, submit, status, logs, cancel, list_runs)


def register(group: click.Group, handle_errors: Callable[[Any], Any]) -> None:
    """Add the commands to `group`, each wrapped in the CLI's error mapping."""
    for command in COMMANDS:
        if command.callback is not None:
            command.callback = handle_errors(command.callback)
        group.add_command(command)
