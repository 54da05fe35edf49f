"""Where runs execute: a Kubernetes cluster or this machine, behind one small interface."""

from launcher.backends.base import Backend, Progress, RunStatus, SubmitResult

__all__ = ["Backend", "Progress", "RunStatus", "SubmitResult"]
