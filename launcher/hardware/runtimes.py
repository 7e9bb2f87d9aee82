"""Which runtimes this machine has: llama-cpp-python's GPU offload, and a local Ollama server.

Both are quick looks, not launches: importing llama_cpp (about 0.2 s for a CPU build) and one
`GET <OLLAMA_HOST>/api/version` with a 0.3 s budget, run side by side. Nothing listening is a result
(None), never an error.
"""

from __future__ import annotations

import contextlib
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

from launcher.hardware.types import BackendSupport, OllamaServer

OLLAMA_DEFAULT_PORT = 11434


def probe_backends(*, env: Mapping[str, str] | None = None, timeout: float = 0.3, client: Any = None) -> BackendSupport:
    """Ask llama_cpp whether it can offload to a GPU and whether Ollama answers, concurrently."""
    import os

    env = os.environ if env is None else env
    url = ollama_url(env.get("OLLAMA_HOST"))
    found: list[OllamaServer | None] = [None]
    thread = threading.Thread(
        target=lambda: found.__setitem__(0, probe_ollama(url, timeout=timeout, client=client)), daemon=True
    )
    thread.start()
    offload = llama_cpp_gpu_offload()
    thread.join(timeout + 0.5)
    return BackendSupport(llama_cpp_gpu_offload=offload, ollama=found[0])


def llama_cpp_gpu_offload() -> bool | None:
    """`llama_cpp.llama_supports_gpu_offload()`, or None when llama-cpp-python is absent or will not load."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # a broken install (missing .so, wrong CPU) means "unknown", not a crash
        return None


def ollama_url(host: str | None) -> str:
    """OLLAMA_HOST as the Ollama client reads it: '0.0.0.0', ':11434', 'host:port', 'https://host'."""
    host = (host or "").strip()
    scheme, sep, hostport = host.partition("://")
    port = OLLAMA_DEFAULT_PORT
    if not sep:
        scheme, hostport = "http", host
    elif scheme in ("http", "https"):
        port = 80 if scheme == "http" else 443
    split = urllib.parse.urlsplit(f"{scheme}://{hostport}")
    with contextlib.suppress(ValueError):  # a port that is not a number: keep the default
        port = split.port or port
    hostname = split.hostname or "127.0.0.1"
    if ":" in hostname:
        hostname = f"[{hostname}]"
    path = split.path.rstrip("/")
    return f"{scheme}://{hostname}:{port}{path}"


def probe_ollama(url: str, *, timeout: float = 0.3, client: Any = None) -> OllamaServer | None:
    """`GET {url}/api/version` within `timeout` seconds; None when nothing (Ollama-like) answers."""
    import httpx

    local = urllib.parse.urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1", "0.0.0.0")
    try:
        if client is None:
            # A proxy from the environment must not swallow a loopback request.
            with httpx.Client(timeout=timeout, trust_env=not local) as own_client:
                response = own_client.get(f"{url}/api/version")
        else:
            response = client.get(f"{url}/api/version", timeout=timeout)
        response.raise_for_status()
        body = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("version"), str):
        return None
    return OllamaServer(url=url, version=body["version"])
