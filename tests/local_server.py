"""The start and stop every test HTTP server shares: a threading server on 127.0.0.1, a free port, its own thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog of 5 drops SYNs when 8+ clients connect at once, and a dropped SYN is
    # retried after 1 s: a stall of the test server, not of the code under test
    request_queue_size = 128


def start_server(
    on_get: Callable[[BaseHTTPRequestHandler], None], *, protocol: str = "HTTP/1.0"
) -> ThreadingHTTPServer:
    """Serve GET requests with `on_get(handler)` on 127.0.0.1 at a free port (`httpd.server_address[1]`);
    `protocol` "HTTP/1.1" keeps connections alive, as a real server does."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = protocol
        # headers and body go out in separate writes; with Nagle on, the body waits for the client's
        # delayed ACK (40 ms on Linux): a delay no real server adds, so it must not count as latency
        disable_nagle_algorithm = True

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            on_get(self)

    httpd = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()
    return httpd


def stop_server(httpd: ThreadingHTTPServer) -> None:
    httpd.shutdown()
    httpd.server_close()
