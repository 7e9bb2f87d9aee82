"""The router's client for its model servers (launcher.service.router.Router._send and the relays): a kept-alive
connection the server drops is retried, a dead or failing server gives the router's one error line, and a stream is
relayed chunk by chunk as it comes.

The router runs in this process under uvicorn on a free 127.0.0.1 port; its model server is a raw HTTP/1.1 socket
server (RawUpstream) whose every answer and close the test decides. The pool is a one-model stand-in with the four
methods the router calls on a loaded model (get, try_lease, release, note_failure): loading is not under test here.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from router_fixtures import free_port

from launcher.backends.base import Instance
from launcher.service.pool import Lease
from launcher.service.router import Router

ANSWER = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Red"}, "finish_reason": "stop"}]}
BODY = {"model": "smol", "messages": [{"role": "user", "content": "Name one colour."}], "max_tokens": 1}


@dataclass
class _Loaded:
    state: str = "ready"


@dataclass
class OneModelPool:
    """`smol` loaded at `endpoint`; counts what the router gives back."""

    endpoint: str
    models: dict[str, _Loaded] = field(default_factory=lambda: {"smol": _Loaded()})
    released: int = 0
    failures: int = 0

    def get(self, alias: str) -> _Loaded | None:
        return self.models.get(alias)

    def try_lease(self, alias: str, **_: Any) -> Lease:
        instance = Instance(backend="llamacpp", server="llama-server", version=None, endpoint=self.endpoint,
                            model_name=alias, pid=None)  # fmt: skip
        return Lease(alias, instance, 1)

    def release(self, lease: Lease) -> None:
        if not lease.released:
            lease.released = True
            self.released += 1

    def note_failure(self, _lease: Lease) -> None:
        self.failures += 1


class RawUpstream:
    """An HTTP/1.1 server on 127.0.0.1 that hands each request (connection number, request number on it, raw
    request) to `answer(conn, sock, n_on_conn)`; the answer writes what it likes and returns False to drop the
    connection without a word."""

    def __init__(self, answer: Callable[[socket.socket, int, bytes], bool]) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[tuple[int, int]] = []  # (connection, request on it) for every request that arrived
        self._connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._connections += 1
            threading.Thread(target=self._serve, args=(conn, self._connections), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffered, on_conn = b"", 0
        with conn:
            while True:
                while b"\r\n\r\n" not in buffered:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                while len(buffered) < length:
                    buffered += conn.recv(65536)
                body, buffered = buffered[:length], buffered[length:]
                on_conn += 1
                self.requests.append((number, on_conn))
                if not self.answer(conn, on_conn, body):
                    return

    def close(self) -> None:
        self.listener.close()


def _json_answer(conn: socket.socket) -> None:
    payload = json.dumps(ANSWER).encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(payload), payload))  # fmt: skip


def _sse_event(text: str) -> bytes:
    event = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _with_router(endpoint: str, test: Callable[[str, OneModelPool], Awaitable[None]]) -> OneModelPool:
    """Run `test(router_url, pool)` against a Router serving `smol` from `endpoint`, under uvicorn."""
    import uvicorn

    pool = OneModelPool(endpoint)

    async def main() -> None:
        router = Router(pool, api_key=None, peers=[], metrics=None, max_body=1 << 20)  # type: ignore[arg-type]
        port = free_port()
        config = uvicorn.Config(router.app(), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            await test(f"http://127.0.0.1:{port}", pool)
        finally:
            server.should_exit = True
            await serving
            await router.aclose()

    asyncio.run(main())
    return pool


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_kept_alive_upstream_connection_dropped_as_a_request_arrives_is_sent_again_on_a_new_one(reset: bool) -> None:
    # llama-server (cpp-httplib) may close a kept-alive connection unannounced: the second request on each
    # connection is dropped unanswered here, as it is when the close races the request; the router sees a clean
    # close, or a reset (RST, "Connection reset by peer": a 502 "did not answer: ReadError" before it was retried)
    def answer(conn: socket.socket, on_conn: int, _body: bytes) -> bool:
        if on_conn > 1:
            if reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        _json_answer(conn)
        return True

    upstream = RawUpstream(answer)

    async def test(url: str, _pool: OneModelPool) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(3):
                r = await client.post(f"{url}/v1/chat/completions", json=BODY)
                assert r.status_code == 200, r.text
                assert r.json() == ANSWER

    try:
        pool = _with_router(f"http://127.0.0.1:{upstream.port}/v1", test)
    finally:
        upstream.close()
    # the router reused its kept-alive connection (a request 2 arrived on connection 1), was dropped, sent again
    assert (1, 2) in upstream.requests and len({c for c, _ in upstream.requests}) >= 3
    assert (pool.released, pool.failures) == (3, 0)


def test_a_dead_model_server_gives_the_routes_502_line_and_is_reported_to_the_pool() -> None:
    async def test(url: str, _pool: OneModelPool) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(f"{url}/v1/chat/completions", json=BODY)
            assert r.status_code == 502
            assert r.json() == {"error": {"message": "smol's server did not answer: ConnectError",
                                          "type": "server_error", "code": None}}  # fmt: skip
            r = await client.post(f"{url}/api/chat", json={**BODY, "stream": False})
            assert (r.status_code, r.json()) == (502, {"error": "smol's server did not answer: ConnectError"})

    pool = _with_router(f"http://127.0.0.1:{free_port()}/v1", test)
    assert (pool.released, pool.failures) == (2, 2)


def test_a_model_server_that_dies_mid_answer_gives_the_mid_answer_line() -> None:
    def answer(conn: socket.socket, _on_conn: int, _body: bytes) -> bool:
        conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"choi')
        return False

    upstream = RawUpstream(answer)

    async def test(url: str, _pool: OneModelPool) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(f"{url}/v1/chat/completions", json=BODY)
            assert r.status_code == 502
            assert r.json()["error"]["message"] == "smol's server failed mid-answer: RemoteProtocolError"

    try:
        pool = _with_router(f"http://127.0.0.1:{upstream.port}/v1", test)
    finally:
        upstream.close()
    assert (pool.released, pool.failures) == (1, 1)


def test_a_stream_is_relayed_chunk_by_chunk_and_one_cut_short_ends_with_the_error_event() -> None:
    # the second event is sent only once the client has read the first through the router: a router that
    # buffered the stream would never deliver it, and the test would time out
    first_seen = threading.Event()

    def answer(conn: socket.socket, _on_conn: int, _body: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.sendall(_sse_event("Red"))
        if not first_seen.wait(10):
            return False
        conn.sendall(_sse_event(" and blue"))
        return False  # dies mid-stream: no last chunk

    upstream = RawUpstream(answer)
    events: list[Any] = []

    async def test(url: str, _pool: OneModelPool) -> None:
        url += "/v1/chat/completions"
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream("POST", url, json={**BODY, "stream": True}) as r,
        ):
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    first_seen.set()

    try:
        pool = _with_router(f"http://127.0.0.1:{upstream.port}/v1", test)
    finally:
        upstream.close()
    assert [e["choices"][0]["delta"]["content"] for e in events[:2]] == ["Red", " and blue"]
    assert events[2:] == [{"error": {"message": "smol's server failed mid-stream: RemoteProtocolError",
                                     "type": "server_error"}}]  # fmt: skip
    assert (pool.released, pool.failures) == (1, 1)
