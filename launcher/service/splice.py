"""Streams relayed outside the ASGI send path: a model server's streamed answer goes from its socket to the
client's as each chunk arrives, in the callback that read it, with no task woken and no ASGI message per chunk.

Why: on a machine whose cores the model's server keeps busy, every microsecond the router spends on a streamed chunk
is taken from decoding. Relayed through ASGI (a reader task woken per chunk, Starlette's and uvicorn's `send`) a
chunk costs about 180 µs of CPU on this project's 2-core machine; spliced, about 90, what a bare byte relay costs
(scripts/bench_router.py measures both).

Two halves, both on the loop's thread:
- `protocol_class()`: uvicorn's httptools protocol with one addition, a `Downstream` in each request's ASGI scope
  (`scope["extensions"]["fitquant.splice"]`): that request's own connection, framed as uvicorn frames a body
  (chunked, as uvicorn sends a response that gives no length) and paused by uvicorn's own flow control.
- `Upstream`: one request to a model's private 127.0.0.1 server on a connection of its own, the answer parsed by
  httptools (the C parser uvicorn uses); once the client's response has started, each body chunk is written
  straight to its `Downstream`. A read that is one whole chunk of a chunked answer, at a chunk boundary, to a
  client answered in chunks too (llama-server writes each streamed event as one chunk), is written to the client
  as it came, unparsed and unframed: it is the client's chunk as well. That leaves a streamed token one read and one
  write, as a bare byte relay pays (on this project's 2-core machine, where the router's CPU is taken from
  decoding, scripts/bench_router.py read 125-134 µs a streamed chunk this way against 146 parsed and framed again,
  and 103 for a bare byte relay).

The response's start and end still go through ASGI `send`, so uvicorn keeps its account of the response
(keep-alive, completion, graceful shutdown). A server without this protocol gives no `Downstream`, and the router
relays through ASGI as before.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httptools
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

EXTENSION = "fitquant.splice"
# what a Downstream reads from uvicorn's RequestResponseCycle: checked on each request, so a uvicorn that renames
# one of them turns the splice off (the router relays through ASGI) instead of failing mid-stream
_CYCLE_PARTS = ("scope", "transport", "flow", "disconnected", "chunked_encoding")
_WAKE_S = 30.0  # a long stream's task wakes this often to check the read timeout (no timer is touched per chunk)


class UpstreamFailed(Exception):
    """The model's server failed: `name` is what fitquant calls the failure everywhere (httpx's names)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class Downstream:
    """A client's connection, written as uvicorn writes a response body; from the protocol, one per request."""

    __slots__ = ("_cycle",)

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle

    @property
    def paused(self) -> bool:
        """The client reads slower than the model writes: its buffer is past uvicorn's high-water mark."""
        return bool(self._cycle.flow.write_paused)

    @property
    def chunked(self) -> bool:
        """The response goes out in HTTP/1.1 chunks (uvicorn frames a response that gives no length so)."""
        return bool(self._cycle.chunked_encoding)

    def raw_writer(self) -> tuple[Callable[[bytes], None], Any]:
        """The client's transport's write, unframed, and uvicorn's flow control (its `write_paused`): for bytes that
        are already this response's chunks."""
        return self._cycle.transport.write, self._cycle.flow

    def write(self, data: bytes) -> None:
        cycle = self._cycle
        if not data or cycle.disconnected:
            return
        if cycle.chunked_encoding:
            cycle.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            cycle.transport.write(data)

    async def drain(self) -> None:
        if self._cycle.flow.write_paused and not self._cycle.disconnected:
            await self._cycle.flow.drain()


def downstream(scope: Scope) -> Downstream | None:
    """The request's Downstream where the server is `protocol_class()`'s, else None."""
    found = (scope.get("extensions") or {}).get(EXTENSION)
    return found if isinstance(found, Downstream) else None


@functools.cache
def protocol_class() -> type[asyncio.Protocol] | str:
    """uvicorn's `http` protocol for the router: httptools' with a Downstream in every request's scope ("auto",
    uvicorn's own choice, where its httptools protocol cannot be imported)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class SpliceProtocol(HttpToolsProtocol):  # type: ignore[misc]
        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            cycle = getattr(self, "cycle", None)
            # a new cycle for this request (an upgrade makes none), holding what a Downstream reads
            if (
                cycle is not None
                and getattr(cycle, "scope", None) is self.scope
                and all(hasattr(cycle, part) for part in _CYCLE_PARTS)
            ):
                self.scope.setdefault("extensions", {})[EXTENSION] = Downstream(cycle)

    return SpliceProtocol


class Upstream(asyncio.Protocol):
    """One request's answer from a model's server: the status and content type once its head is in; its body held
    until `relay` gives it a Downstream, then written there chunk by chunk as it arrives."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[None] = loop.create_future()  # the status line and headers are in
        self.done: asyncio.Future[None] = loop.create_future()  # the answer ended (or failed: see `failure`)
        self.failure: str | None = None
        self.status = 0
        self.content_type = ""
        self.reads = 0  # body reads so far: the relay's task checks the read timeout by it (no clock read per chunk)
        self._framed = False  # the body has a length or is chunked (else it ends when the server closes)
        self._chunked = False  # the body comes in HTTP/1.1 chunks
        # the client's raw write and its flow control, once whole chunks may pass as they came (`relay`); `_pass` is
        # it while the parser is between chunks, None while it is inside one
        self._raw: Callable[[bytes], None] | None = None
        self._pass: Callable[[bytes], None] | None = None
        self._flow: Any = None
        self._between_chunks = True  # the parser is not inside a chunk (or the body is not chunked)
        self._held = bytearray()
        self._sink: Downstream | None = None
        self._transport: asyncio.Transport | None = None
        self._stalled = False  # reading paused until the client's buffer drains
        self._wake: asyncio.Future[None] | None = None  # the relay's task waits on it (and on `done`)
        self._abandoned = False

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is an asyncio.Transport in all but name

    def data_received(self, data: bytes) -> None:
        write = self._pass
        if write is not None:
            # one whole chunk ("1f\r\n" + 31 bytes + "\r\n"), the parser between chunks: written as it came. A size
            # that is not plain hex (a leading zero, an extension, a sign) and anything else goes to the parser.
            end = data.find(b"\r\n", 0, 10)
            head = data[:end] if end > 0 else b""
            if head.isalnum() and (end == 1 or data[0] != 48):  # 48: "0"
                try:
                    size = int(head, 16)
                except ValueError:
                    size = 0
                if size and len(data) == end + size + 4 and data.endswith(b"\r\n"):
                    self.reads += 1
                    try:
                        write(data)
                    except RuntimeError:  # the client's connection closed under us (it left): hang up
                        self.abandon()
                        return
                    if self._flow.write_paused:
                        self._stall()
                    return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._end("RemoteProtocolError")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abandoned or (self.head.done() and not self._framed and exc is None):
            self._end(None)  # we hung up, or an answer delimited by the close
        else:
            self._end("ReadError" if exc is not None else "RemoteProtocolError")

    # --- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        if key == b"content-type":
            self.content_type = value.decode("latin-1")
        elif key in (b"content-length", b"transfer-encoding"):
            self._framed = True
            self._chunked = self._chunked or (key == b"transfer-encoding" and value.lower() == b"chunked")

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.reads += 1
        sink = self._sink
        if sink is None:
            self._held += body
            return
        sink.write(body)
        if sink.paused:
            self._stall()

    def on_chunk_header(self) -> None:
        self._between_chunks = False
        self._pass = None  # inside a chunk: its rest must be parsed

    def on_chunk_complete(self) -> None:
        self._between_chunks = True
        self._pass = self._raw

    def on_message_complete(self) -> None:
        self._raw = self._pass = None  # nothing more may pass unparsed
        self._end(None)

    def _stall(self) -> None:
        """The client is slower than the model: stop reading until its buffer drains (the relay's task resumes it)."""
        if not self._stalled and self._transport is not None:
            self._transport.pause_reading()
            self._stalled = True
            if self._wake is not None and not self._wake.done():
                self._wake.set_result(None)

    # --- the router's side
    def _end(self, failure: str | None) -> None:
        if self.done.done():
            return
        self.failure = failure
        for future in (self.head, self.done):
            if not future.done():
                future.set_result(None)

    def send(self, request: bytes) -> None:
        assert self._transport is not None
        self._transport.write(request)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abandon(self) -> None:
        """The client left: hang up (the model's server stops generating when its connection closes)."""
        self._raw = self._pass = None
        self._abandoned = True
        self.close()

    async def whole(self, read_timeout_s: float) -> bytes:
        """The rest of an answer that is not a stream."""
        await self._until_done(read_timeout_s)
        return bytes(self._held)

    async def relay(self, sink: Downstream, read_timeout_s: float) -> None:
        """Write the body to `sink` from now on (what came before first); return when the answer has ended."""
        self._sink = sink
        if self._held:
            held, self._held = bytes(self._held), bytearray()
            self.on_body(held)
        if self._chunked and sink.chunked and not self.done.done():
            self._raw, self._flow = sink.raw_writer()
            self._pass = self._raw if self._between_chunks else None
        try:
            await self._until_done(read_timeout_s)
        finally:
            self._raw = self._pass = None

    async def _until_done(self, read_timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        # the read timeout: no read between two wakes for longer than it (a read is counted, not timed, per chunk)
        seen, quiet_since = self.reads, time.monotonic()
        while not self.done.done():
            if not self._stalled:
                self._wake = loop.create_future()
                await asyncio.wait(
                    {self.done, self._wake}, timeout=min(read_timeout_s, _WAKE_S), return_when=asyncio.FIRST_COMPLETED
                )
            if self._stalled and self._sink is not None:
                await self._sink.drain()
                self._stalled = False
                if self._transport is not None and not self.done.done():
                    self._transport.resume_reading()
                seen, quiet_since = self.reads, time.monotonic()
            elif not self.done.done():
                now = time.monotonic()
                if self.reads != seen:
                    seen, quiet_since = self.reads, now
                elif now - quiet_since > read_timeout_s:
                    self._end("ReadTimeout")
                    self.close()
        if self.failure is not None:
            raise UpstreamFailed(self.failure)


async def request(url: str, body: bytes, headers: Mapping[str, str], *, connect_timeout_s: float,
                  read_timeout_s: float) -> Upstream:  # fmt: skip
    """POST `body` (JSON) to `url` on a new connection; the Upstream once the answer's head is in."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    fields = {"Host": f"{host}:{port}", "Content-Type": "application/json", "Content-Length": str(len(body)),
              "Connection": "close", **headers}  # fmt: skip
    if any(c in text for item in fields.items() for text in item for c in "\r\n"):
        raise ValueError("an upstream header holds a line break")
    head = f"POST {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    loop = asyncio.get_running_loop()
    try:
        _, upstream = await asyncio.wait_for(loop.create_connection(Upstream, host, port), connect_timeout_s)
    except asyncio.TimeoutError:
        raise UpstreamFailed("ConnectTimeout") from None
    except OSError:
        raise UpstreamFailed("ConnectError") from None
    upstream.send(head.encode("latin-1") + body)
    try:
        # the head comes once the server starts its answer: it may first wait for a free slot, as long as a read
        await asyncio.wait_for(asyncio.shield(upstream.head), read_timeout_s)
    except asyncio.TimeoutError:
        upstream.close()
        raise UpstreamFailed("ReadTimeout") from None
    except BaseException:
        upstream.close()
        raise
    if upstream.failure is not None:
        upstream.close()
        raise UpstreamFailed(upstream.failure)
    return upstream


class SplicedStream(Response):
    """A streamed answer relayed by `Upstream.relay`: its start and end through ASGI, its body spliced. `relay` is
    the router's: it runs the upstream's relay to its end and accounts for the request however it ends."""

    def __init__(self, relay: Callable[[Downstream], Awaitable[None]], upstream: Upstream, *, status_code: int,
                 media_type: str, headers: Mapping[str, str]) -> None:  # fmt: skip
        self.relay = relay
        self.upstream = upstream
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sink = downstream(scope)
        assert sink is not None, "a SplicedStream is only answered on a server with protocol_class()"
        watcher = asyncio.ensure_future(_hang_up_when_gone(receive, self.upstream))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await self.relay(sink)
        finally:
            watcher.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _hang_up_when_gone(receive: Receive, upstream: Upstream) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    upstream.abandon()
