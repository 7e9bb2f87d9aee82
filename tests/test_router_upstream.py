"""The router's client for its model servers (launcher.service.router.Router._send and the relays): a kept-alive
connection the server drops is retried, a dead or failing server gives the router's one error line, and a stream is
relayed chunk by chunk as it comes, spliced (launcher.service.splice, as `fitquant serve` runs it) or through ASGI
(a server without the splicing protocol).

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
from launcher.service import router as router_module
from launcher.service import splice
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
        self.heads: list[bytes] = []  # each request's line and headers, lower-cased
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
                self.heads.append(head.lower())
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


def _with_router(endpoint: str, test: Callable[[str, OneModelPool], Awaitable[None]], *,
                 spliced: bool = True) -> OneModelPool:  # fmt: skip
    """Run `test(router_url, pool)` against a Router serving `smol` from `endpoint`, under uvicorn with the protocol
    `fitquant serve` gives it (spliced streams) or uvicorn's own httptools one (streams through ASGI)."""
    import uvicorn

    pool = OneModelPool(endpoint)

    async def main() -> None:
        router = Router(pool, api_key=None, peers=[], metrics=None, max_body=1 << 20)  # type: ignore[arg-type]
        port = free_port()
        http = splice.protocol_class() if spliced else "httptools"
        config = uvicorn.Config(router.app(), host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                http=http)  # fmt: skip
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
            r = await client.post(f"{url}/v1/chat/completions", json={**BODY, "stream": True})  # spliced
            assert r.status_code == 502
            assert r.json()["error"]["message"] == "smol's server did not answer: ConnectError"

    pool = _with_router(f"http://127.0.0.1:{free_port()}/v1", test)
    assert (pool.released, pool.failures) == (3, 3)


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


@pytest.mark.parametrize("spliced", [True, False], ids=["spliced", "asgi"])
def test_a_stream_is_relayed_chunk_by_chunk_and_one_cut_short_ends_with_the_error_event(spliced: bool) -> None:
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
        pool = _with_router(f"http://127.0.0.1:{upstream.port}/v1", test, spliced=spliced)
    finally:
        upstream.close()
    # spliced: on a connection of its own, closed after it; through ASGI: aiohttp's kept-alive pool
    assert (b"connection: close" in upstream.heads[0]) == spliced
    assert [e["choices"][0]["delta"]["content"] for e in events[:2]] == ["Red", " and blue"]
    assert events[2:] == [{"error": {"message": "smol's server failed mid-stream: RemoteProtocolError",
                                     "type": "server_error"}}]  # fmt: skip
    assert (pool.released, pool.failures) == (1, 1)


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_a_spliced_stream_reaches_the_client_byte_for_byte_with_the_stream_headers() -> None:
    # the model's chunks do not follow event boundaries: half an event, then one and a half, then several at once
    events = [b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": w}}]}).encode() + b"\n\n"
              for w in ["Red", " and", " bl\u00fce", "!"]] + [b"data: [DONE]\n\n"]  # fmt: skip
    body = b"".join(events)
    pieces = [body[:10], body[10:130], body[130:]]

    def answer(conn: socket.socket, _on_conn: int, _body: bytes) -> bool:
        conn.sendall(STREAM_HEAD + b"".join(_chunked(p) for p in pieces) + b"0\r\n\r\n")
        return True

    upstream = RawUpstream(answer)
    got: list[tuple[bytes, httpx.Headers]] = []

    async def test(url: str, _pool: OneModelPool) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(2):  # the client's connection stays usable after a spliced stream
                async with client.stream("POST", f"{url}/v1/chat/completions", json={**BODY, "stream": True}) as r:
                    assert r.status_code == 200
                    got.append((b"".join([c async for c in r.aiter_bytes()]), r.headers))

    try:
        pool = _with_router(f"http://127.0.0.1:{upstream.port}/v1", test)
    finally:
        upstream.close()
    for content, headers in got:
        assert content == body
        assert headers["content-type"] == "text/event-stream; charset=utf-8"
        assert (headers["cache-control"], headers["x-accel-buffering"]) == ("no-cache", "no")
    assert all(b"connection: close" in head for head in upstream.heads)
    assert (pool.released, pool.failures) == (2, 0)


@pytest.mark.parametrize("spliced", [True, False], ids=["spliced", "asgi"])
def test_a_client_that_leaves_mid_stream_hangs_up_on_the_model_server(spliced: bool) -> None:
    # llama-server stops generating once its connection is gone: the router must close it when the client goes
    hung_up = threading.Event()

    def answer(conn: socket.socket, _on_conn: int, _body: bytes) -> bool:
        conn.sendall(STREAM_HEAD)
        try:
            for _ in range(400):  # an event every 25 ms for 10 s at most, until a write fails
                conn.sendall(_sse_event("Red"))
                threading.Event().wait(0.025)
        except OSError:
            hung_up.set()
        return False

    upstream = RawUpstream(answer)

    async def test(url: str, _pool: OneModelPool) -> None:
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream("POST", f"{url}/v1/chat/completions", json={**BODY, "stream": True}) as r,
        ):
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # and the client closes its connection
        assert await asyncio.to_thread(hung_up.wait, 5), "the model's server was still streaming 5 s after"

    try:
        pool = _with_router(f"http://127.0.0.1:{upstream.port}/v1", test, spliced=spliced)
    finally:
        upstream.close()
    assert (pool.released, pool.failures) == (1, 0)  # a client leaving is not the server's failure


@pytest.mark.parametrize("spliced", [True, False], ids=["spliced", "asgi"])
def test_a_client_that_reads_slowly_holds_back_the_model_servers_stream(spliced: bool) -> None:
    # 64 MiB as fast as the socket takes it; the client stops reading for a while. Read without pause, it would all
    # sit in the router's memory within that while; held back, only the sockets' buffers fill (a few MiB each).
    block, blocks = b"x" * 65536, 1024
    sent = [0]

    def answer(conn: socket.socket, _on_conn: int, _body: bytes) -> bool:
        conn.sendall(STREAM_HEAD)
        for _ in range(blocks):
            conn.sendall(_chunked(block))
            sent[0] += len(block)
        conn.sendall(b"0\r\n\r\n")
        return True

    upstream = RawUpstream(answer)
    seen: dict[str, int] = {}

    async def test(url: str, _pool: OneModelPool) -> None:
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream("POST", f"{url}/v1/chat/completions", json={**BODY, "stream": True}) as r,
        ):
            chunks = r.aiter_raw()
            total = len(await chunks.__anext__())
            await asyncio.sleep(1.5)
            seen["sent_while_paused"] = sent[0]
            async for chunk in chunks:
                total += len(chunk)
            seen["total"] = total

    try:
        pool = _with_router(f"http://127.0.0.1:{upstream.port}/v1", test, spliced=spliced)
    finally:
        upstream.close()
    assert seen["total"] == len(block) * blocks
    assert seen["sent_while_paused"] < 40 * 2**20, seen
    assert (pool.released, pool.failures) == (1, 0)


@pytest.mark.parametrize("spliced", [True, False], ids=["spliced", "asgi"])
def test_a_stream_that_goes_silent_past_the_read_timeout_ends_with_the_error_event(
    spliced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aiohttp

    monkeypatch.setattr(router_module, "UPSTREAM_TIMEOUT", aiohttp.ClientTimeout(sock_connect=5.0, sock_read=0.5))
    release = threading.Event()

    def answer(conn: socket.socket, _on_conn: int, _body: bytes) -> bool:
        conn.sendall(STREAM_HEAD + _sse_event("Red"))
        release.wait(10)  # silent, the connection open
        return False

    upstream = RawUpstream(answer)
    events: list[Any] = []

    async def test(url: str, _pool: OneModelPool) -> None:
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream("POST", f"{url}/v1/chat/completions", json={**BODY, "stream": True}) as r,
        ):
            events.extend([json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: ")])

    try:
        pool = _with_router(f"http://127.0.0.1:{upstream.port}/v1", test, spliced=spliced)
    finally:
        release.set()
        upstream.close()
    assert events[0]["choices"][0]["delta"]["content"] == "Red"
    assert events[1:] == [{"error": {"message": "smol's server failed mid-stream: ReadTimeout",
                                     "type": "server_error"}}]  # fmt: skip
    assert (pool.released, pool.failures) == (1, 1)


def test_a_stream_request_the_model_server_refuses_gets_its_answer_as_it_is() -> None:
    refusal = {"error": {"code": 400, "message": "the request exceeds the available context size", "type": "x"}}

    def answer(conn: socket.socket, _on_conn: int, _body: bytes) -> bool:
        payload = json.dumps(refusal).encode()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json; charset=utf-8\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))  # fmt: skip
        return True

    upstream = RawUpstream(answer)

    async def test(url: str, _pool: OneModelPool) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(f"{url}/v1/chat/completions", json={**BODY, "stream": True})
            assert (r.status_code, r.json()) == (400, refusal)

    try:
        pool = _with_router(f"http://127.0.0.1:{upstream.port}/v1", test)
    finally:
        upstream.close()
    assert b"connection: close" in upstream.heads[0]  # it went the spliced way
    assert (pool.released, pool.failures) == (1, 0)


def test_a_spliced_request_refuses_a_header_with_a_line_break() -> None:
    async def send() -> None:
        await splice.request("http://127.0.0.1:9/v1/chat/completions", b"{}", {"Authorization": "Bearer a\r\nX: y"},
                             connect_timeout_s=1, read_timeout_s=1)  # fmt: skip

    with pytest.raises(ValueError, match="line break"):
        asyncio.run(send())


def _read_chunked_wire(sock: socket.socket) -> tuple[bytes, bytes]:
    """A raw HTTP/1.1 answer read off `sock` up to its last chunk: (head, the body as it came on the wire, framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, wire = data.partition(b"\r\n\r\n")
    while not wire.endswith(b"\r\n0\r\n\r\n"):
        more = sock.recv(65536)
        assert more, wire
        wire += more
    return head, wire


def test_a_whole_chunk_passes_to_the_client_as_it_came_and_any_other_read_is_parsed_and_framed_again() -> None:
    """Each streamed event of llama-server is one chunk, read whole: written to the client unparsed (its own
    framing kept, an upper-case size included). A chunk split across reads, a size with a leading zero or with an
    extension, or chunks that come together go through the parser and are framed again; whole chunks after them
    pass as they came again; the body the client decodes is the model's, byte for byte, and the connection stays
    usable for the next request."""
    events = [b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": w}}]}).encode() + b"\n\n"
              for w in ["Red as a cherry", " and", " blue as the sky", ",", " green", "!", " done"]]  # fmt: skip
    assert not f"{len(events[0]):X}".isdigit() and not f"{len(events[2]):X}".isdigit()  # 4C, 4D: a letter in each
    reads = [
        b"%X\r\n%s\r\n" % (len(events[0]), events[0]),  # whole, upper-case hex: passes as it came
        _chunked(events[1])[:20],  # split: the parser's, framed again
        _chunked(events[1])[20:],
        b"%X\r\n%s\r\n" % (len(events[2]), events[2]),  # whole again, after the split: passes
        b"0%x\r\n%s\r\n" % (len(events[3]), events[3]),  # a leading zero: parsed
        b"%x;note=1\r\n%s\r\n" % (len(events[4]), events[4]),  # an extension: parsed
        _chunked(events[5]) + _chunked(events[6]),  # two at once: parsed
        b"0\r\n\r\n",
    ]

    def answer(conn: socket.socket, _on_conn: int, _body: bytes) -> bool:
        conn.sendall(STREAM_HEAD)
        for piece in reads:
            threading.Event().wait(0.05)  # each its own read at the router
            conn.sendall(piece)
        return True

    upstream = RawUpstream(answer)
    wires: list[bytes] = []

    async def test(url: str, _pool: OneModelPool) -> None:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({**BODY, "stream": True}).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(10)
            for _ in range(2):  # kept alive: the second request on the same connection
                await asyncio.to_thread(sock.sendall, request)
                head, wire = await asyncio.to_thread(_read_chunked_wire, sock)
                assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
                wires.append(wire)

    try:
        pool = _with_router(f"http://127.0.0.1:{upstream.port}/v1", test)
    finally:
        upstream.close()
    for wire in wires:
        # whole chunks exactly as the model's server framed them
        assert wire.startswith(reads[0])
        assert reads[3] in wire
        # the others framed again by the router (its lower-case size, no zero, no extension), their bytes unchanged
        first = 20 - len(b"%x\r\n" % len(events[1]))  # the split's first read: its size line and this much data
        assert _chunked(events[1][:first]) + _chunked(events[1][first:]) in wire
        assert _chunked(events[3]) + _chunked(events[4]) + _chunked(events[5]) + _chunked(events[6]) in wire
        decoded, rest = b"", wire
        while rest != b"0\r\n\r\n":
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        assert decoded == b"".join(events)
    assert (pool.released, pool.failures) == (2, 0)
