"""Where the Ollama server is: OLLAMA_HOST read as the official Python client reads it.

`ollama_base_url(value)` follows ollama-python's `ollama/_client.py:_parse_host`: `[scheme://]host[:port][/path]`,
scheme http unless given, port 11434 unless given (80 / 443 after an explicit http:// / https://), host 127.0.0.1
unless given, an IPv6 address in brackets, a path kept without its slashes at either end. Like that client, the
address is dialled as written: `0.0.0.0` and `[::]` stay as they are (Linux and macOS route them to this machine).

Two deliberate differences: a scheme other than http / https (any case) and a port that is not a number are a
`BackendError` naming OLLAMA_HOST and the fix, where the official client builds an unusable URL or raises a bare
ValueError; and the value is stripped of surrounding blanks first.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from launcher.errors import BackendError

__all__ = ["DEFAULT_PORT", "DEFAULT_URL", "ollama_base_url"]

DEFAULT_PORT = 11434
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
_SCHEME_PORTS = {"http": 80, "https": 443}
_EXAMPLE = f"e.g. OLLAMA_HOST={DEFAULT_URL}"


def ollama_base_url(value: str | None = None, *, env: Mapping[str, str] | None = None) -> str:
    """The Ollama server's base URL from `value`, else OLLAMA_HOST (`env`, default os.environ), else the default.

    ':11434' -> 'http://127.0.0.1:11434', 'host' -> 'http://host:11434', 'https://h/p/' -> 'https://h:443/p'.
    Raises BackendError for a scheme other than http(s) or a port that is not a number.
    """
    if value is None:
        value = (os.environ if env is None else env).get("OLLAMA_HOST")
    text = (value or "").strip()
    scheme, sep, hostport = text.partition("://")
    port = DEFAULT_PORT
    if not sep:
        scheme, hostport = "http", text
    else:
        scheme = scheme.lower()
        if scheme not in _SCHEME_PORTS:
            raise BackendError(f"OLLAMA_HOST {text!r} has scheme {scheme!r}; use http:// or https:// ({_EXAMPLE})")
        port = _SCHEME_PORTS[scheme]
    try:
        split = urlsplit(f"{scheme}://{hostport}")
        port = split.port or port
    except ValueError:
        raise BackendError(f"OLLAMA_HOST {text!r} is not [scheme://]host[:port][/path] ({_EXAMPLE})") from None
    host = split.hostname or "127.0.0.1"
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            host = f"[{host}]"  # urlsplit drops the brackets a URL needs
    except ValueError:
        pass  # a name, not an address
    path = split.path.strip("/")
    return f"{scheme}://{host}:{port}/{path}" if path else f"{scheme}://{host}:{port}"
