"""Webhook notifications against a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import socket
import time

import pytest
import yaml
from webhook_receiver import WebhookReceiver

from kubetune.config import parse_config
from kubetune.config.notify import HMAC_ENV, NotifyConfig, url_env
from kubetune.errors import ConfigError
from runner.reporting.notify import SIGNATURE_HEADER, Notifier

CONTEXT = {"run": "demo", "output_uri": "s3://b/p/demo"}


def notify_cfg(url: str | None = None, **extra: object) -> NotifyConfig:
    hook = {"url": url} if url else {"url_secret": {"name": "hooks", "key": "ci"}}
    return NotifyConfig.model_validate({"webhooks": [hook], **extra})


def test_events_arrive_as_json_with_context_and_fields() -> None:
    with WebhookReceiver() as hook:
        notifier = Notifier(notify_cfg(hook.url), CONTEXT, env={})
        notifier.emit("started", step=0)
        notifier.emit("checkpoint", step=20, loss=0.25, uri="s3://b/p/demo/checkpoints/x/")
        notifier.close(timeout=10)
    assert hook.events() == ["started", "checkpoint"]
    body = hook.requests[1].json
    assert body["run"] == "demo" and body["step"] == 20 and body["loss"] == 0.25
    assert body["output_uri"] == "s3://b/p/demo" and body["time"].endswith("+00:00")
    assert hook.requests[1].headers["X-Kubetune-Event"] == "checkpoint"
    assert SIGNATURE_HEADER not in hook.requests[0].headers


def test_hmac_signature_matches_the_body() -> None:
    cfg = notify_cfg(None, hmac_secret={"name": "hooks", "key": "hmac"})
    with WebhookReceiver() as hook:
        env = {url_env(0): hook.url, HMAC_ENV: "s3cret"}
        notifier = Notifier(cfg, CONTEXT, env=env)
        notifier.emit("succeeded", step=40)
        notifier.close(timeout=10)
    (request,) = hook.requests
    expected = hmac.new(b"s3cret", request.body, hashlib.sha256).hexdigest()
    assert request.headers[SIGNATURE_HEADER] == f"sha256={expected}"


def test_only_the_chosen_events_are_sent() -> None:
    with WebhookReceiver() as hook:
        cfg = NotifyConfig.model_validate(
            {"webhooks": [{"url": hook.url, "events": ["succeeded", "failed"]}]}
        )
        notifier = Notifier(cfg, CONTEXT, env={})
        for event in ("started", "checkpoint", "validation", "failed"):
            notifier.emit(event, step=1)
        notifier.close(timeout=10)
    assert hook.events() == ["failed"]


def test_server_errors_are_retried_then_delivered() -> None:
    with WebhookReceiver(fail_first=2) as hook:
        notifier = Notifier(notify_cfg(hook.url, max_attempts=3), CONTEXT, env={}, backoff_s=0.01)
        notifier.emit("failed", step=3, error="boom")
        notifier.close(timeout=10)
    assert hook.attempts == 3 and hook.events() == ["failed"]


def test_retries_are_bounded_and_client_errors_not_retried() -> None:
    with WebhookReceiver(fail_first=100) as hook:
        notifier = Notifier(notify_cfg(hook.url, max_attempts=4), CONTEXT, env={}, backoff_s=0.01)
        notifier.emit("failed", step=3)
        notifier.close(timeout=10)
        assert hook.attempts == 4 and hook.requests == []
    with WebhookReceiver(fail_first=100, fail_status=404) as hook:
        notifier = Notifier(notify_cfg(hook.url, max_attempts=4), CONTEXT, env={}, backoff_s=0.01)
        notifier.emit("failed", step=3)
        notifier.close(timeout=10)
        assert hook.attempts == 1


def test_an_unreachable_endpoint_never_blocks_the_caller() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    notifier = Notifier(notify_cfg(dead, timeout_seconds=0.5), CONTEXT, env={}, backoff_s=0.01)
    started = time.monotonic()
    for step in range(200):  # more than the queue holds: the overflow is dropped, not awaited
        notifier.emit("checkpoint", step=step)
    emitted = time.monotonic() - started
    notifier.close(timeout=1.0)
    assert emitted < 1.0  # emit only queues
    assert notifier._thread is None


def test_missing_secret_env_turns_notifications_off() -> None:
    cfg = notify_cfg("http://127.0.0.1:9/hook", hmac_secret={"name": "hooks"})
    assert Notifier(cfg, CONTEXT, env={}).targets == []
    assert Notifier(notify_cfg(None), CONTEXT, env={}).targets == []


def _raw(notify: object) -> str:
    return yaml.safe_dump(
        {
            "type": "SD_LORA",
            "base_output_dir": "runs/x",
            "max_train_steps": 1,
            "save_every_n_steps": 1,
            "data_loader": {
                "type": "IMAGE_CAPTION_SD_DATA_LOADER",
                "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "d"},
            },
            "notify": notify,
            "storage": {"bucket": "outputs"},
        }
    )


@pytest.mark.parametrize(
    ("notify", "field", "words"),
    [
        ({"webhooks": [{}]}, "notify.webhooks.0.url", "set exactly one of url / url_secret"),
        ({"webhooks": [{"url": "ftp://x"}]}, "notify.webhooks.0.url", "http(s)://"),
        (
            {"webhooks": [{"url": "https://u:p@h/x"}]},
            "notify.webhooks.0.url",
            "put the URL in url_secret",
        ),
        ({"webhooks": [{"url": "http://h/x", "events": ["done"]}]}, "notify.webhooks.0", "done"),
        ({"webhooks": []}, "notify.webhooks", "at least 1"),
    ],
)
def test_bad_notify_sections_name_the_field(notify: object, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_raw(notify))
    text = str(err.value)
    assert field in text and words in text


def test_secret_references_become_secret_key_refs_in_the_job() -> None:
    from launcher.manifests import build_manifests

    notify = {
        "webhooks": [{"url": "http://h/x"}, {"url_secret": {"name": "hooks", "key": "slack"}}],
        "hmac_secret": {"name": "hooks", "key": "hmac"},
    }
    cfg = parse_config(_raw(notify))
    job = build_manifests(cfg)[-1]
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert refs[url_env(1)] == {"name": "hooks", "key": "slack"}
    assert refs[HMAC_ENV] == {"name": "hooks", "key": "hmac"}
    assert url_env(0) not in refs
