"""Which runtimes this machine has: llama-cpp-python's GPU offload, and a local Ollama server.

Both are quick looks, not launches: importing llama_cpp (about 0.2 s for a CPU build) and one
`GET <OLLAMA_HOST>/api/version` with a 0.3 s budget, run side by side. Nothing listening is a result
(None), never an error.
"""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from launcher.hardware.types import BackendSupport, OllamaServer

if TYPE_CHECKING:
    import httpx


def probe_backends(*, env: Mapping[str, str] | None = None, timeout: float = 0.3, client: Any = None) -> BackendSupport:
    """Ask llama_cpp whether it can offload to a GPU and whether Ollama answers, concurrently."""
    import os

    from launcher.errors import BackendError
    from launcher.ollama_host import ollama_base_url

    env = os.environ if env is None else env
    try:
        url = ollama_base_url(env=env)
    except BackendError:  # an OLLAMA_HOST no client can dial finds no Ollama, as when nothing listens
        return BackendSupport(llama_cpp_gpu_offload=llama_cpp_gpu_offload(), ollama=None)
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


def probe_ollama(url: str, *, timeout: float = 0.3, client: httpx.Client | None = None) -> OllamaServer | None:
    """`GET {url}/api/version` within `timeout` seconds; None when nothing (Ollama-like) answers."""
    from launcher.http import HttpFailure, make_client, translate

    local = urllib.parse.urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1", "0.0.0.0")
    try:
        with translate():
            if client is None:
                # A proxy from the environment must not swallow a loopback request.
                with make_client(timeout_s=timeout, connect_timeout_s=timeout, trust_env=not local) as own_client:
                    response = own_client.get(f"{url}/api/version")
            else:
                response = client.get(f"{url}/api/version", timeout=timeout)
            if not response.is_success:
                return None
            body = response.json()
    except (HttpFailure, ValueError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("version"), str):
        return None
    return OllamaServer(url=url, version=body["version"])
