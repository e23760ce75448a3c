"""Whether the Hugging Face hub can be reached, found in seconds: its clients retry for ~30 s, printing a
line per retry, before they give up."""

from __future__ import annotations

import os
import re
import socket
from functools import cache
from urllib.parse import urlparse

MODELS_OFFLINE = "HF_HUB_OFFLINE"
DATASETS_OFFLINE = "HF_DATASETS_OFFLINE"
_TRUE = ("1", "true", "yes", "on")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def offline_by_choice(*variables: str) -> str | None:
    """``NAME=value`` of the first of ``variables`` (offline switches) that is on, else None."""
    for name in variables:
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return f"{name}={os.environ[name]}"
    return None


@cache
def _connection_failure(timeout: float) -> str | None:
    """Why a TCP connection to the hub fails (None when it opens); skipped behind a proxy, where a direct
    connection says nothing about what the clients can reach."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as exc:
        return f"{url.hostname} unreachable: {exc.strerror or exc}"
    return None


def unreachable(*variables: str, timeout: float = 3.0) -> str | None:
    """Why the hub cannot be used (an offline switch among ``variables``, or no connection); None if it can."""
    return offline_by_choice(*variables) or _connection_failure(timeout)


def data_unreachable() -> str | None:
    """Why a hub data set (calibration, perplexity or zero-shot) cannot be fetched now: either offline switch,
    or no connection; checked before its client would retry for half a minute. None if it can."""
    return unreachable(MODELS_OFFLINE, DATASETS_OFFLINE)


def is_repo_id(spec: str) -> bool:
    """Whether ``spec`` can name a hub repository (``name`` or ``owner/name``)."""
    return bool(_REPO_ID.match(spec)) and ".." not in spec


def cached_config(repo_id: str) -> bool:
    """Whether a model's config.json is in the local hub cache (it loads offline)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
