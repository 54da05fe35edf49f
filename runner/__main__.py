"""``python -m runner CONFIG [--no-resume] [--force-restart]``: the container's entrypoint.

Thin on purpose: parse, load the config, install the SIGTERM handler, call
``runner.session.run.run``, and map kubetune errors to exit codes and one-line messages.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kubetune.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    OUT_OF_MEMORY,
    KubetuneError,
    Preempted,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m runner",
        description="Train one kubetune config in the foreground: what each Kubernetes pod\n"
        "runs. On your machine, `launcher submit --local CONFIG` runs this same entrypoint\n"
        "in the background and tracks it (status, logs, report, resume).",
        epilog="example:\n  python -m runner examples/quickstart.yaml --set max_train_steps=10\n\n"
        "exit status: 0 trained, 2 bad config or data, 143 stopped by SIGTERM after a\n"
        "checkpoint (the next start resumes), 130 Ctrl-C, 1 anything else",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="path to the YAML config (or - for stdin)")
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start from step 0 (discards this run's existing checkpoints)",
    )
    parser.add_argument(
        "--force-restart",
        action="store_true",
        help="start over even if the checkpoints came from another config",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set max_train_steps=10",
    )
    return parser.parse_args(argv)


def setup_logging() -> None:
    level = os.environ.get("KUBETUNE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("urllib3", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def quiet_libraries() -> None:
    """Keep `kubectl logs` readable: no download/loading progress bars or advisory warnings
    from the ML libraries unless KUBETUNE_LOG_LEVEL=DEBUG."""
    if os.environ.get("KUBETUNE_LOG_LEVEL", "").upper() == "DEBUG":
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings(
        "ignore", category=UserWarning, module=r"(diffusers|transformers|peft|huggingface_hub)"
    )


def fail_fast_on_local_data(source: str, cfg: object, overrides: list[str] | None = None) -> None:
    """A model path that is not there (and no Hub name), a local dataset that cannot be listed
    (missing folder or JSONL, a bad line): DataError with `file:line: field.path` now, not
    after the libraries and the model have loaded."""
    from kubetune.config.loader import field_problems
    from kubetune.config.paths import model_path_problems, with_working_folder_hints
    from kubetune.dataset.local_check import local_data_problems
    from kubetune.errors import DataError

    problems = model_path_problems(cfg) + local_data_problems(cfg)
    problems = with_working_folder_hints(source, cfg, problems)
    if problems:
        raise DataError("\n".join(field_problems(source, problems, overrides)))


def leave_out_bitsandbytes(cfg: object) -> None:
    """peft imports bitsandbytes whenever it is installed (the `adam8bit` / `gpu` extras), and
    that import loads torch's compiler (~1-3 s per process here), though only
    ``optimizer.use_8bit`` uses it: a run without it marks it absent (``sys.modules`` None)."""
    if not getattr(getattr(cfg, "optimizer", None), "use_8bit", False):
        sys.modules.setdefault("bitsandbytes", None)  # type: ignore[arg-type]


def launched_as_rank_0() -> bool:
    """Whether this process is its run's global rank 0 (torchrun and accelerate launch set
    ``RANK``; one process is rank 0): the one that runs the data preflight."""
    return os.environ.get("RANK", "0") == "0"


def describe_error(err: KubetuneError, cfg: object | None) -> str:
    """The one line to print for `err`: a cloud dataset's or the output bucket's error (a
    missing bucket, no credentials, an empty prefix) names its config field
    (`kubetune.config.dataset_errors`)."""
    from kubetune.config.dataset_errors import dataset_problem, output_problem

    found = dataset_problem(err, cfg) or output_problem(err, cfg)
    return f"{found[0]}: {found[1]}" if found else str(err)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    quiet_libraries()
    cfg = None
    try:
        from kubetune.config import load_config

        cfg = load_config(args.config, overrides=args.set)  # fail fast, before torch loads
        leave_out_bitsandbytes(cfg)
        # a missing folder or model path: exit 2 before torch loads
        fail_fast_on_local_data(args.config, cfg, args.set)
        from runner.models.hub_reach import go_offline_if_unreachable

        offline = go_offline_if_unreachable(cfg)  # before any ML library reads the setting
        if offline:
            logging.getLogger("runner").warning(offline)
        from kubetune.config import output_uri, run_name

        logging.getLogger("runner").info(
            "run %s (outputs in %s): checking the dataset while the libraries load",
            run_name(cfg),
            output_uri(cfg),
        )
        from kubetune.dataset.preflight import start_preflight

        data = None  # several processes: global rank 0's preflight, its report shared
        if launched_as_rank_0():
            data = start_preflight(cfg)  # listing + header reads overlap imports + model load
        from runner.reporting.terminal import logs_above_bar, wants_bar
        from runner.session.run import run
        from runner.training.loop import install_sigterm_handler

        stop = install_sigterm_handler()
        with logs_above_bar(wants_bar()):  # a bar at a terminal; plain lines in a log or pod
            run(cfg, resume=not args.no_resume, force_restart=args.force_restart, stop=stop,
                data=data)  # fmt: skip
    except Preempted as err:  # a planned stop (its checkpoint published), not an error
        print(f"kubetune: {err}", file=sys.stderr)
        return err.exit_code
    except KubetuneError as err:
        print(f"kubetune: error: {describe_error(err, cfg)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(
            "kubetune: interrupted (Ctrl-C): no checkpoint written now; running it again "
            "resumes from its newest checkpoint (SIGTERM writes one before stopping)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except MemoryError:
        print(f"kubetune: error: {OUT_OF_MEMORY}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
