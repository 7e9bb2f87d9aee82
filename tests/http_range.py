"""The Range part of the test HTTP servers: one implementation of RFC 9110 single-range replies."""

from __future__ import annotations

import re
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def begin_range_reply(
    h: BaseHTTPRequestHandler, size: int, *, honour_range: bool = True, headers: Mapping[str, str] | None = None
) -> tuple[int, int] | None:
    """Answer a GET for `size` bytes: 206 with Content-Range for `Range: bytes=a-b`, 200 without (or when
    told to ignore Range), 416 past the end. Sends status and headers; returns the (start, end) inclusive
    byte span the caller must write, or None when the reply is already complete (416)."""
    start, end = 0, size - 1
    match = _RANGE.fullmatch(h.headers.get("Range", ""))
    if match and honour_range:
        start = int(match[1])
        end = min(int(match[2]) if match[2] else size - 1, size - 1)
        if start >= size:
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{size}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return None
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
    else:
        h.send_response(200)
    for key, value in (headers or {}).items():
        h.send_header(key, value)
    h.send_header("Content-Length", str(end - start + 1))
    h.send_header("Accept-Ranges", "bytes")
    h.end_headers()
    return start, end
