"""Is the Hugging Face hub reachable? Asked once, quickly, before a download is attempted.

Without network, ``huggingface_hub`` retries each request with back-off (about 25 s and a page of log lines per
file) before failing. vitscope asks the operating system for one TCP connection first (a few seconds at most),
so an offline user gets the one-line error at once, and a model already in the local cache loads with
``local_files_only=True`` instead of waiting for the retries.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

#: Seconds to wait for the hub's host to accept a connection.
CONNECT_TIMEOUT = 3.0


def offline_reason(timeout: float = CONNECT_TIMEOUT) -> str | None:
    """``None`` when the hub accepts a connection, else why not.

    Asks ``huggingface_hub`` itself (its offline switch ``HF_HUB_OFFLINE`` and endpoint ``HF_ENDPOINT``, as it read
    them), so the probe tests exactly the host the download would contact.
    """
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    return unreachable(constants.ENDPOINT or "https://huggingface.co", timeout)


def unreachable(address: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """``None`` when the host of ``address`` (a URL) accepts a connection, else why not (torchvision's weights
    come from download.pytorch.org, not the hub)."""
    url = urlparse(address)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot reach {host}:{port} ({exc.strerror or type(exc).__name__})"
    return None


def cached_file(repo_id: str, filename: str, cache_dir: str | os.PathLike[str] | None = None) -> str | None:
    """Path of ``filename`` of ``repo_id`` in the local Hugging Face cache (or ``cache_dir``), or ``None``."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers and timm both depend on huggingface_hub
        return None
    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=None if cache_dir is None else os.fspath(cache_dir))
    except Exception:  # an invalid repo id: let the real loader report it
        return None
    return found if isinstance(found, str) else None
