"""kubetune's `notify:` section: webhooks told about a run's events (kubetune extension)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from kubetune.config.base import ConfigModel, Problems, exactly_one
from kubetune.config.cluster import SecretKeyRef

NotifyEvent = Literal["started", "checkpoint", "validation", "succeeded", "failed", "preempted"]
ALL_EVENTS: tuple[NotifyEvent, ...] = (
    "started",
    "checkpoint",
    "validation",
    "succeeded",
    "failed",
    "preempted",
)
HMAC_ENV = "KUBETUNE_NOTIFY_HMAC_SECRET"
URL_ENV_PREFIX = "KUBETUNE_NOTIFY_URL_"
_URL = re.compile(r"^https?://[^/\s]+")


def url_env(index: int) -> str:
    """Environment variable that carries webhook ``index``'s URL from its Secret."""
    return f"{URL_ENV_PREFIX}{index}"


class WebhookConfig(ConfigModel):
    """One webhook endpoint that receives JSON POSTs (kubetune extension)."""

    url: str | None = None
    """The endpoint, e.g. `https://ci.example.com/hooks/kubetune` (kubetune extension). A URL
    that embeds a token (Slack, Teams) belongs in `url_secret` instead."""
    url_secret: SecretKeyRef | None = None
    """A Kubernetes Secret key holding the URL, for URLs that embed a token (kubetune
    extension). Local runs read it from `KUBETUNE_NOTIFY_URL_<index>`."""
    events: list[NotifyEvent] = Field(default_factory=lambda: list(ALL_EVENTS))
    """Events to send: started, checkpoint, validation, succeeded, failed, preempted (kubetune
    extension; default all)."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not _URL.match(value):
            raise ValueError(f"{value!r} must be an http(s):// URL")
        if value is not None and re.match(r"^https?://[^/]*@", value):
            raise ValueError("must not embed credentials; put the URL in url_secret")
        return value

    @model_validator(mode="after")
    def _one_url(self) -> WebhookConfig:
        p = Problems()
        exactly_one(p, {"url": self.url, "url_secret": self.url_secret}, "where to send")
        p.check(bool(self.events), "events", "list at least one event, or drop this webhook")
        p.raise_if_any()
        return self


class NotifyConfig(ConfigModel):
    """Webhook notifications about the run (kubetune extension). Sending never blocks or
    fails training: each POST is retried a bounded number of times, then dropped."""

    webhooks: list[WebhookConfig] = Field(min_length=1)
    """Endpoints to notify (kubetune extension)."""
    hmac_secret: SecretKeyRef | None = None
    """Kubernetes Secret key whose value signs each body: header `X-Kubetune-Signature:
    sha256=<hex HMAC-SHA256>` (kubetune extension). Local runs read it from
    `KUBETUNE_NOTIFY_HMAC_SECRET`."""
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    """Timeout of one POST (kubetune extension)."""
    max_attempts: int = Field(default=3, ge=1, le=10)
    """Attempts per notification before it is dropped (kubetune extension)."""
