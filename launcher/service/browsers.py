"""Which browser pages and which host names `fitquant serve` answers: pure rules, checked per request by the router
(launcher.service.router.BrowserCheck).

A web page the user opens can send requests to any address the machine reaches, 127.0.0.1 included; llama-server
itself answers every origin. Two checks keep pages out, as Ollama does (its server/routes.go allowedHostsMiddleware
and envconfig.AllowedOrigins, whose defaults these are):

- Host, against DNS rebinding: on a loopback `listen`, a request must name the server as this machine does. A page
  on evil.example whose name the attacker re-points at 127.0.0.1 is same-origin with the server for the browser,
  which then reads every answer; its requests still say `Host: evil.example`. Allowed: no Host, localhost and names
  under .localhost, an IP address (a rebinding page's Host is a name, never an address), this machine's host name,
  names under .local (mDNS, answered on the LAN only) and .internal (reserved for private use, never in public DNS:
  host.docker.internal, a container's name for the host), and the profile's `hosts:`.
- Origin, against cross-site requests: a browser marks a page's request with the page's Origin; curl, the SDKs and
  servers (Open WebUI's backend) send none and pass untouched. Allowed: local pages (http(s)://localhost, 127.0.0.1,
  [::1] or 0.0.0.0, any port), desktop apps (app://, file://, tauri://, vscode-webview://, vscode-file://), browser
  extensions, and the profile's `origins:`. Any other is refused before the key or the body is read; a page
  cannot even start a load.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Iterable

from launcher.defaults import MAX_HOST_NAME_CHARS, MAX_ORIGIN_CHARS

LOCAL_PAGES = ("localhost", "127.0.0.1", "[::1]", "0.0.0.0")
APP_SCHEMES = ("app", "file", "tauri", "vscode-webview", "vscode-file")
EXTENSION_SCHEMES = ("chrome-extension", "moz-extension", "safari-web-extension", "safari-extension",
                     "ms-browser-extension")  # fmt: skip
# names no public DNS answers, so no web page can re-point one at this machine
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
DEFAULT_ORIGINS = (
    *(f"{scheme}://{host}{port}" for host in LOCAL_PAGES for scheme in ("http", "https") for port in ("", ":*")),
    *(f"{scheme}://*" for scheme in APP_SCHEMES + EXTENSION_SCHEMES),
)


@functools.lru_cache(maxsize=64)
def _glob(pattern: str) -> re.Pattern[str]:
    # `*` matches within one part (no `/`); everything else literally, case-insensitively (brackets of [::1] too)
    return re.compile("".join("[^/]*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", pattern)),
                      re.I)  # fmt: skip


def origin_allowed(origin: str, extra: Iterable[str] = ()) -> bool:
    """Whether a page of `origin` (the Origin header) may use the server: a default one or a profile's."""
    if len(origin) > MAX_ORIGIN_CHARS:
        return False
    return any(p == "*" or _glob(p).fullmatch(origin) for p in (*DEFAULT_ORIGINS, *extra))


def host_name(host_header: str) -> str:
    """The name or address of a Host header, without its port or brackets, lower-case: 'Evil.Example.:8080' ->
    'evil.example', '[::1]:8080' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        inside, closed, _ = host[1:].partition("]")
        return inside if closed else host  # no closing bracket: no address, refused as the name it is
    return host.rpartition(":")[0].rstrip(".") if ":" in host else host.rstrip(".")


@functools.lru_cache(maxsize=1)
def _own_names() -> frozenset[str]:
    full = socket.gethostname().lower()
    return frozenset(n for n in (full, full.partition(".")[0]) if n)


def host_allowed(host_header: str | None, extra: Iterable[str] = ()) -> bool:
    """Whether a request to a loopback server names it as this machine does (the DNS rebinding guard)."""
    if not host_header:
        return True  # HTTP/1.0 sends none; a browser always does
    name = host_name(host_header)
    if len(name) > MAX_HOST_NAME_CHARS:
        return False
    if not name or name == "localhost" or name.endswith(LOCAL_SUFFIXES) or name in _own_names():
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return any(p == "*" or _glob(p).fullmatch(name) for p in extra)
