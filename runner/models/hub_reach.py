"""Whether the Hugging Face Hub answers, asked once before the ML libraries load. With no
network huggingface_hub retries each file for ~45 s before failing; a run that needs the Hub
and cannot reach it loads from this machine's cache only (``HF_HUB_OFFLINE=1``, which the
libraries read at import), so a cached model loads at once and a missing one fails at once
with kubetune's message. Torch-free."""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import urlsplit

from kubetune.config.paths import HUB_NAME, model_values

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_S = 3.0
_ON = ("1", "ON", "YES", "TRUE")
_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_names(cfg: Any) -> list[str]:
    """`field: name` for each model or dataset the config takes from the Hub."""
    from kubetune.config.data import HFHubImageCaptionDatasetConfig
    from kubetune.dataset.local_check import dataset_locations

    found = model_values(cfg)
    for where, dataset in dataset_locations(cfg):
        if isinstance(dataset, HFHubImageCaptionDatasetConfig):
            found.append((f"{where}.dataset_name", dataset.dataset_name))
    return [
        f"{field}: {value}"
        for field, value in found
        if isinstance(value, str) and HUB_NAME.match(value) and not os.path.exists(value)
    ]


def reachable(endpoint: str, timeout: float = TIMEOUT_S) -> bool:
    """A TCP connection to the endpoint's host opens within `timeout` (name resolved)."""
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def go_offline_if_unreachable(cfg: Any, env: MutableMapping[str, str] = os.environ) -> str | None:
    """Set HF_HUB_OFFLINE=1 in `env` when the config needs the Hub and it does not answer;
    return the line to log (None when nothing changed: no Hub name, the Hub answers,
    HF_HUB_OFFLINE was already chosen, or a proxy is set, which the probe cannot speak for)."""
    if env.get("HF_HUB_OFFLINE", "").upper() in _ON:
        return None
    if any(env.get(name) for name in _PROXIES):  # a direct connection says nothing then
        return None
    names = hub_names(cfg)
    endpoint = env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    if not names or reachable(endpoint):
        return None
    env["HF_HUB_OFFLINE"] = "1"
    return (
        f"the Hugging Face Hub ({endpoint}) cannot be reached: {', '.join(names)} "
        "load from this machine's cache only (HF_HUB_OFFLINE=1)"
    )
