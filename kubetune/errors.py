"""One exception hierarchy for kubetune.

Dependency errors (pydantic, obstore, kubernetes ApiException, OSError) are translated into
these at module boundaries; the CLIs map them to exit codes and one-line messages.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # environment / infrastructure problem (storage down, cluster unreachable)
EXIT_USER_ERROR = 2  # bad input: config, dataset, CLI usage
EXIT_PREEMPTED = 143  # SIGTERM handled: checkpoint written, safe to retry (128 + SIGTERM)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): no checkpoint written now
OUT_OF_MEMORY = (
    "out of memory (lower train_batch_size or resolution, or enable gradient_checkpointing)"
)


class KubetuneError(Exception):
    """Base class. ``str(err)`` is a complete one-line message for the user."""

    exit_code: int = EXIT_FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class UserError(KubetuneError):
    """Something the user can fix in their input; exit status 2."""

    exit_code = EXIT_USER_ERROR


class ConfigError(UserError):
    """The config file is invalid. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "<config>") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(problems) if problems else f"{source}: invalid config")


class DataError(UserError):
    """The dataset is unusable (missing/corrupt image, bad caption file, empty dataset...)."""


class BadExamples(DataError):
    """Several bad examples in one line (the first, and how many more); ``problems`` holds
    every one, a line each (`launcher validate --data` lists them)."""

    def __init__(self, problems: list[str], message: str, hint: str | None = None) -> None:
        self.problems = problems
        super().__init__(message, hint=hint)

    def __reduce__(self) -> tuple[type[BadExamples], tuple[list[str], str, str | None]]:
        # pickled whole (a forked preflight hands it to the runner), not as its message
        return type(self), (self.problems, self.message, self.hint)


class StorageError(KubetuneError):
    """Object storage failed in a way retries did not fix (exit 1)."""


class StorageUserError(UserError):
    """Object storage refused the request for a reason the user must fix (no such bucket,
    bad credentials, a key escaping its prefix)."""


class ClusterError(KubetuneError):
    """The Kubernetes API failed or refused (exit 1)."""


class ResumeMismatchError(UserError):
    """A checkpoint exists but was written by an incompatible config."""


class RunLocked(UserError):
    """Another runner holds the run's lease (one writer per run); exit status 2."""


class LeaseLost(RunLocked):
    """This runner's lease was taken over: it must not write to the run any more."""


class Preempted(KubetuneError):
    """Raised inside the runner after SIGTERM once the checkpoint is published."""

    exit_code = EXIT_PREEMPTED


class ProcessGroupError(KubetuneError):
    """The processes of a multi-process run disagree (their weights differ) or lost each
    other (a rank or node died, a collective timed out); exit status 1, retry resumes."""


def exit_code_for(err: BaseException) -> int:
    """The exit status ``python -m runner`` ends with when ``err`` ends it: a kubetune error's
    own, 130 for Ctrl-C, 1 for anything else (an uncaught exception exits 1)."""
    if isinstance(err, KubetuneError):
        return err.exit_code
    return EXIT_INTERRUPTED if isinstance(err, KeyboardInterrupt) else EXIT_FAILURE


def error_line(err: BaseException) -> str:
    """One line saying what ended a run: a kubetune error's message (its first line), the
    out-of-memory advice, Ctrl-C, or another exception's first line (its type if empty)."""
    if isinstance(err, MemoryError):
        return OUT_OF_MEMORY
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
