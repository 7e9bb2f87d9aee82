"""Telling systemd how the service is doing (sd_notify(3)), written directly: one datagram to $NOTIFY_SOCKET.

    ready("3 models verified")   READY=1: the unit of Type=notify is started (systemd waits for this)
    status("loading qwen3:14b")  STATUS=...: the line `systemctl status` shows
    reloading()                  RELOADING=1 (with MONOTONIC_USEC): a SIGHUP reload began; send ready() after it
    stopping()                   STOPPING=1: shutdown began
    watchdog()                   WATCHDOG=1: still alive (for units with WatchdogSec=)
    extend_timeout(600)          EXTEND_TIMEOUT_USEC=...: starting takes longer (a download), do not time out yet

Every function is a no-op returning False when NOTIFY_SOCKET is unset (not started by systemd), and True when the
datagram was sent. The socket is a path or, when it starts with '@', an abstract socket. A socket that is set but
cannot be reached raises ServiceError: a READY=1 that never arrives makes systemd stop the service at
TimeoutStartSec, so the caller should log it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from launcher.errors import ServiceError

__all__ = ["extend_timeout", "notify", "ready", "reloading", "status", "stopping", "watchdog"]

SEND_TIMEOUT_S = 5.0


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `fields` ("READY=1", "STATUS=...") as one newline-separated datagram to $NOTIFY_SOCKET."""
    env = os.environ if environ is None else environ
    target = env.get("NOTIFY_SOCKET", "")
    if not target:
        return False
    for item in fields:
        if "\n" in item or "=" not in item:
            raise ServiceError(f"not a notification field (KEY=value on one line): {item!r}")
    if target.startswith("@"):
        address = "\0" + target[1:]  # abstract namespace
    elif target.startswith("/"):
        address = target
    else:
        raise ServiceError(f"NOTIFY_SOCKET is neither a path nor an abstract socket: {target!r}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.sendto("\n".join(fields).encode("utf-8"), address)
    except OSError as exc:
        raise ServiceError(f"cannot notify systemd at {target}: {exc.strerror or exc}") from exc
    return True


def ready(text: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    return notify("READY=1", *_status(text), environ=environ)


def status(text: str, *, environ: Mapping[str, str] | None = None) -> bool:
    return notify(*_status(text), environ=environ)


def reloading(text: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    # systemd ≥ 253 matches RELOADING=1 with the monotonic time it was sent; older versions ignore the field
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(text), environ=environ)


def stopping(text: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    return notify("STOPPING=1", *_status(text), environ=environ)


def watchdog(*, environ: Mapping[str, str] | None = None) -> bool:
    return notify("WATCHDOG=1", environ=environ)


def extend_timeout(seconds: float, *, environ: Mapping[str, str] | None = None) -> bool:
    """Ask for `seconds` more than now before the start (or stop) times out; repeat while progress continues."""
    if seconds <= 0:
        raise ValueError("extend_timeout needs a positive number of seconds")
    return notify(f"EXTEND_TIMEOUT_USEC={round(seconds * 1_000_000)}", environ=environ)


def _status(text: str | None) -> list[str]:
    # STATUS= is one line: a newline would end the field and start a bogus one
    return [] if text is None else [f"STATUS={' '.join(text.split())}"]
