"""`fitquant serve`'s one endpoint: a Starlette app that routes by the request's `model` to the pool's verified
servers (launcher.service.pool), each on a private 127.0.0.1 port.

    OpenAI    GET /v1/models; POST /v1/chat/completions, /v1/completions, /v1/embeddings (SSE passed through
              untouched and unbuffered: spliced, socket to socket, where the server runs splice.protocol_class())
    Ollama    GET /, /api/version, /api/tags, /api/ps; POST /api/show, /api/chat, /api/generate, /api/embed,
              /api/embeddings (NDJSON streams; keep_alive, 0 unloads); pull/push/create/delete/copy answer 501
    admin     GET /health, /running, /metrics; POST /models/load, /models/unload

Web pages are kept out first (BrowserCheck, launcher.service.browsers): on a loopback `listen` a request must name
the server as this machine does (the DNS rebinding guard), and a page's Origin must be a local one, an app's, or one
of the profile's `origins:` (403 otherwise; an allowed one gets CORS headers). With an API key every route but
/health needs `Authorization: Bearer KEY` or `x-api-key: KEY`. A model this
machine does not serve goes to the profile peer that lists it. Bodies are bounded (router.max_body, 413) and must
arrive within `router.body_timeout` (408). Errors are one line: OpenAI's `{"error": {"message", "type", "code"}}` on its
routes, Ollama's `{"error": "..."}` on its own.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from launcher.service import browsers, ollama_api, splice
from launcher.service.events import log_event
from launcher.service.pool import Lease, Pool, Refused
from launcher.units import shown_value

if TYPE_CHECKING:
    from launcher.service.metrics import RouterMetrics

PEER_HEADER = "x-fitquant-peer"  # set on requests between fitquant routers: never forwarded again
PEER_LIST_TTL_S = 30.0
OLLAMA_API_VERSION = "0.12.0"  # the Ollama API these routes follow (what /api/version answers)
# the model's own server: 5 s to connect, 60 s for a free connection (with the connect), 600 s between reads
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=60.0, sock_connect=5.0, sock_read=600.0)
UPSTREAM_KEEPALIVE_S = 4.0  # idle upstream connections close before cpp-httplib's own 5 s keep-alive does
STALE_RETRIES = 2  # requests sent again after a kept-alive upstream connection turned out closed
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy in between may buffer a stream
OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class HTTPFailure(Exception):
    """A request this router answers with an error: status and one line."""

    def __init__(self, status: int, message: str, *, code: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after_s = status, message, code, retry_after_s


# --------------------------------------------------------------------------------------------------- peers
@dataclass
class Peer:
    url: str
    api_key: str | None = field(default=None, repr=False)

    def headers(self) -> dict[str, str]:
        return {PEER_HEADER: "1", **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}


class Peers:
    """Other fitquant endpoints and the models they serve (their own, not their peers'), cached briefly."""

    def __init__(self, peers: list[Peer], client: httpx.AsyncClient) -> None:
        self.peers = peers
        self.client = client
        self._models: dict[str, tuple[Peer, dict[str, Any]]] = {}
        self._fetched = 0.0
        self._lock = asyncio.Lock()

    async def models(self, *, fresh: bool = False) -> dict[str, tuple[Peer, dict[str, Any]]]:
        if not self.peers:
            return {}
        async with self._lock:
            if fresh or time.monotonic() - self._fetched > PEER_LIST_TTL_S:
                found: dict[str, tuple[Peer, dict[str, Any]]] = {}
                for peer in self.peers:
                    try:
                        r = await self.client.get(f"{peer.url}/v1/models", headers=peer.headers(), timeout=5.0)
                        r.raise_for_status()
                        rows = r.json().get("data", [])
                    except (httpx.HTTPError, ValueError, AttributeError) as exc:
                        log_event("peer-down", peer=peer.url, error=type(exc).__name__, action="skipped")
                        continue
                    for row in rows:
                        if isinstance(row, dict) and isinstance(row.get("id"), str):
                            found.setdefault(row["id"], (peer, row))
                self._models, self._fetched = found, time.monotonic()
            return dict(self._models)

    async def find(self, alias: str) -> Peer | None:
        known = await self.models()
        if alias not in known:
            known = await self.models(fresh=True)
        hit = known.get(alias)
        return hit[0] if hit else None


# --------------------------------------------------------------------------------------------------- auth
class KeyCheck:
    """ASGI middleware: with an API key, every route but /health needs it (Bearer or x-api-key)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None or scope.get("path") == "/health":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        given = headers.get("x-api-key")
        auth = headers.get("authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given, self.key):
            path = str(scope.get("path", ""))
            message = "an API key is required: send Authorization: Bearer KEY or x-api-key: KEY"
            response = _error(path, HTTPFailure(401, message, code="invalid_api_key"))
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


@dataclass
class BrowserRules:
    """What launcher.service.browsers checks, from the profile (a reload replaces them): `loopback`, whether
    `listen` is (the Host check applies then only); the profile's own `origins:` and `hosts:`."""

    listen: str = "127.0.0.1:8080"
    loopback: bool = True
    origins: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()


class BrowserCheck:
    """ASGI middleware, outside KeyCheck: a request whose Host does not name a loopback server (DNS rebinding), or
    whose page's Origin is not allowed, gets 403 naming the fix, before the key or the body is read. An allowed
    page's answers carry CORS headers, and its preflight (OPTIONS, sent without the key) is answered 204. A request
    without Origin (curl, the SDKs, a server) passes as it came."""

    def __init__(self, app: ASGIApp, rules: BrowserRules) -> None:
        self.app = app
        self.rules = rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = origin = preflight = requested = None
        for name, value in scope["headers"]:  # ASGI gives the names lower-case
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value
            elif name == b"access-control-request-method":
                preflight = value
            elif name == b"access-control-request-headers":
                requested = value
        rules, path = self.rules, str(scope.get("path", ""))
        if rules.loopback and not browsers.host_allowed(host, rules.hosts):
            message = (f"Host {browsers.host_name(host or '')!r} does not name this loopback server (the DNS "
                       f"rebinding guard): call it as localhost or 127.0.0.1; a reverse proxy in front must pass "
                       f"Host: {rules.listen}, or list the name under the profile's hosts:")  # fmt: skip
            await _error(path, HTTPFailure(403, message, code="forbidden"))(scope, receive, send)
            return
        if origin is None:
            await self.app(scope, receive, send)
            return
        page = origin.decode("latin-1")
        if not browsers.origin_allowed(page, rules.origins):
            message = (f"a web page of {page} may not use this server; to allow it, list the origin under the "
                       f"profile's origins:")  # fmt: skip
            await _error(path, HTTPFailure(403, message, code="forbidden"))(scope, receive, send)
            return
        cors = [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
        if scope.get("method") == "OPTIONS" and preflight is not None:
            headers = [*cors, (b"access-control-allow-methods", b"GET, HEAD, POST, DELETE, OPTIONS"),
                       (b"access-control-allow-headers", requested or b"authorization, content-type, x-api-key"),
                       (b"access-control-max-age", b"600"), (b"content-length", b"0")]  # fmt: skip
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        cors.append((b"access-control-expose-headers", b"Retry-After"))

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *cors]}
            await send(message)

        await self.app(scope, receive, send_with_cors)


# --------------------------------------------------------------------------------------------------- errors
def _ollama_route(path: str) -> bool:
    return path.startswith("/api/") or path == "/"


def _error(path: str, failure: HTTPFailure) -> JSONResponse:
    headers = {"Retry-After": str(int(max(1, failure.retry_after_s)))} if failure.retry_after_s else None
    if _ollama_route(path):
        body: dict[str, Any] = ollama_api.error_body(failure.message)
    else:
        kind = "invalid_request_error" if failure.status < 500 else "server_error"
        body = {"error": {"message": failure.message, "type": kind, "code": failure.code}}
    return JSONResponse(body, status_code=failure.status, headers=headers)


def _refused(exc: Refused) -> HTTPFailure:
    code = "model_not_found" if exc.status == 404 else "unavailable"
    return HTTPFailure(exc.status, str(exc), code=code, retry_after_s=exc.retry_after_s)


# --------------------------------------------------------------------------------------------------- the app
class Router:
    def __init__(self, pool: Pool, *, api_key: str | None, peers: list[Peer], metrics: RouterMetrics | None,
                 max_body: int, body_timeout_s: float = 30.0, ready: Callable[[], bool] = lambda: True,
                 browser_rules: BrowserRules | None = None) -> None:  # fmt: skip
        self.pool = pool
        self.api_key = api_key
        self.browser_rules = browser_rules or BrowserRules()
        self._key_check: KeyCheck | None = None
        self.metrics = metrics
        self.max_body = max_body
        self.body_timeout_s = body_timeout_s
        self.ready = ready
        # peers: httpx (few requests, its errors as Peers reports them); the model servers: aiohttp, made in the loop
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=60.0),
                                        limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
                                        trust_env=False)  # fmt: skip
        self._session: aiohttp.ClientSession | None = None
        self.peers = Peers(peers, self.client)

    def app(self) -> ASGIApp:
        post, get = ["POST"], ["GET"]
        routes = [  # the model routes first: Starlette tries each route's pattern in turn, on every request
            *(Route(path, self._openai(path), methods=post) for path in OPENAI_ROUTES),
            Route("/api/chat", self.ollama_chat, methods=post),
            Route("/api/generate", self.ollama_generate, methods=post),
            Route("/health", self.health, methods=get),
            Route("/running", self.running, methods=get),
            Route("/metrics", self.metrics_text, methods=get),
            Route("/models/load", self.admin_load, methods=post),
            Route("/models/unload", self.admin_unload, methods=post),
            Route("/v1/models", self.v1_models, methods=get),
            Route("/", self.ollama_root, methods=["GET", "HEAD"]),
            Route("/api/version", self.ollama_version, methods=get),
            Route("/api/tags", self.ollama_tags, methods=get),
            Route("/api/ps", self.ollama_ps, methods=get),
            Route("/api/show", self.ollama_show, methods=post),
            Route("/api/embed", self.ollama_embed, methods=post),
            Route("/api/embeddings", self.ollama_embeddings, methods=post),
        ]
        for verb in ollama_api.NOT_IMPLEMENTED:
            routes.append(Route(f"/api/{verb}", self.ollama_not_implemented, methods=["POST", "DELETE"]))
        app = Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed})
        self._key_check = KeyCheck(app, self.api_key)
        return BrowserCheck(self._key_check, self.browser_rules)

    def set_api_key(self, api_key: str | None) -> None:
        """A reload's key (None: none); the next request is checked against it."""
        self.api_key = api_key
        if self._key_check is not None:
            self._key_check.key = api_key.encode() if api_key else None

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._session is not None:
            await self._session.close()

    async def _not_found(self, request: Request, _exc: Exception) -> Response:
        return _error(request.url.path, HTTPFailure(404, f"no route {request.url.path}"))

    async def _not_allowed(self, request: Request, _exc: Exception) -> Response:
        return _error(request.url.path, HTTPFailure(405, f"{request.method} is not allowed on {request.url.path}"))

    # --- request helpers -------------------------------------------------------------------------------------
    async def _body(self, request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            raise HTTPFailure(413, f"the request body is larger than {self.max_body} bytes (router.max_body)")
        data = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                data.extend(chunk)
                if len(data) > self.max_body:
                    raise HTTPFailure(413, f"the request body is larger than {self.max_body} bytes (router.max_body)")

        try:
            with anyio.fail_after(self.body_timeout_s):  # a cancel scope: cheaper than a task per request
                await read()
        except TimeoutError:
            raise HTTPFailure(408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                                   "(router.body_timeout)") from None  # fmt: skip
        except ClientDisconnect:
            raise HTTPFailure(400, "the client disconnected before sending its body") from None
        try:
            body = json.loads(bytes(data)) if data else None
        except ValueError:
            raise HTTPFailure(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise HTTPFailure(400, "the request body must be a JSON object")
        request.scope["fitquant_raw"] = bytes(data)  # sent upstream as is when nothing in it changes
        return body

    def _alias(self, body: Mapping[str, Any], *keys: str) -> str:
        for key in keys or ("model",):
            value = body.get(key)
            if isinstance(value, str) and value:
                # Ollama clients name an untagged model NAME:latest (as Ollama lists its own)
                bare = value.removesuffix(":latest")
                if self.pool.get(value) is None and bare != value and self.pool.get(bare) is not None:
                    return bare
                return value
        raise HTTPFailure(
            400, f"the request names no model: give '{(keys or ('model',))[0]}' (GET /v1/models lists them)"
        )

    async def _guarded(self, request: Request, route: str, handler: Callable[[], Awaitable[Response]]) -> Response:
        """Run a handler, turning failures into the route's error shape and counting the request."""
        started = time.monotonic()
        model = "unknown"
        try:
            response = await handler()
        except HTTPFailure as failure:
            response = _error(request.url.path, failure)
        except Refused as exc:
            response = _error(request.url.path, _refused(exc))
        except Exception as exc:  # a bug must cost one request, not the service: one line in the log and a 500
            log_event("error", route=route, error=f"{type(exc).__name__}: {exc}")
            bug = HTTPFailure(500, f"fitquant failed on this request: {type(exc).__name__}")
            response = _error(request.url.path, bug)
        model = request.scope.get("fitquant_model", model)
        # a request that held a lease was counted when it ended (_finish), streamed or not
        leased = request.scope.get("fitquant_leased", False)
        if self.metrics is not None and not leased and not isinstance(response, StreamingResponse):
            self.metrics.request(model, route, response.status_code, time.monotonic() - started)
        return response

    def _served_alias(self, request: Request, alias: str) -> None:
        if self.pool.get(alias) is not None:
            request.scope["fitquant_model"] = alias  # a label the metrics may use: only the profile's aliases

    async def _acquire(self, request: Request, alias: str, **kwargs: Any) -> Lease:
        """The pool's lease, given up when the client disconnects while it waits."""
        lease = self.pool.try_lease(alias, **kwargs)  # a loaded model: no task, no wait
        if lease is not None:
            request.scope["fitquant_leased"] = True
            return lease
        waiter = asyncio.ensure_future(self.pool.acquire(alias, **kwargs))
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=0.25)
            if done:
                lease = waiter.result()
                request.scope["fitquant_leased"] = True
                return lease
            if await request.is_disconnected():
                waiter.cancel()
                raise HTTPFailure(499, "the client disconnected while its model was loading")

    # --- upstream ----------------------------------------------------------------------------------------------
    def _upstream(self) -> aiohttp.ClientSession:
        """The model servers' client: aiohttp (a C HTTP parser and a plain keep-alive pool), whose cost per request
        and per streamed chunk is a fraction of httpx's; on 2 cores that time is taken from the model's server."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=512, limit_per_host=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S,
                                             use_dns_cache=False)  # fmt: skip
            # no Accept-Encoding: answers come uncompressed and are relayed as they come
            self._session = aiohttp.ClientSession(connector=connector, timeout=UPSTREAM_TIMEOUT, trust_env=False,
                                                  skip_auto_headers=("Accept-Encoding",))  # fmt: skip
        return self._session

    async def _send(self, lease: Lease, path: str, body: Mapping[str, Any] | bytes) -> aiohttp.ClientResponse:
        """POST to the model's private server, the answer left to stream."""
        url = lease.base_url + path
        headers = {"Content-Type": "application/json", **lease.instance.headers()}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        session = self._upstream()
        try:
            for _ in range(STALE_RETRIES):
                try:
                    return await session.post(url, data=content, headers=headers)
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    # a kept-alive connection the server had just closed (llama-server may close one right after a
                    # streamed answer, unannounced), seen as a disconnect or as a reset: nothing was answered on it;
                    # the next idle one, or a new one
                    continue
            return await session.post(url, data=content, headers=headers)
        except UPSTREAM_ERRORS as exc:
            self.pool.note_failure(lease)
            self.pool.release(lease)
            raise HTTPFailure(502, f"{lease.alias}'s server did not answer: {_failure_name(exc)}") from None

    async def _whole(self, lease: Lease, route: str, upstream: aiohttp.ClientResponse, started: float) -> bytes:
        """A whole (not streamed) answer; the lease goes back and the request is counted either way."""
        try:
            content = await upstream.read()
        except UPSTREAM_ERRORS as exc:
            raise self._failed_mid_answer(lease, route, started, _failure_name(exc)) from None
        finally:
            upstream.release()
        self._finish(lease, route, upstream.status, started)
        return content

    def _failed_mid_answer(self, lease: Lease, route: str, started: float, failure: str) -> HTTPFailure:
        self.pool.note_failure(lease)
        self._finish(lease, route, 502, started)
        return HTTPFailure(502, f"{lease.alias}'s server failed mid-answer: {failure}")

    def _stream_failed(self, lease: Lease, failure: str) -> str:
        """The one line a client gets when the model's server fails mid-stream (logged; a dead server is seen)."""
        self.pool.note_failure(lease)
        message = f"{lease.alias}'s server failed mid-stream: {failure}"
        log_event("stream-failed", model=lease.alias, error=message)
        return message

    def _finish(self, lease: Lease, route: str, status: int, started: float) -> None:
        self.pool.release(lease)
        if self.metrics is not None:
            self.metrics.request(lease.alias, route, status, time.monotonic() - started)

    async def _passthrough(self, lease: Lease, route: str, path: str, body: Mapping[str, Any] | bytes,
                           rename: str | None = None) -> Response:  # fmt: skip
        """Send to the model's server; a stream comes back chunk by chunk as it arrives, untouched."""
        started = time.monotonic()
        upstream = await self._send(lease, path, body)
        kind = upstream.headers.get("content-type", "application/json")
        if "text/event-stream" not in kind and "ndjson" not in kind:
            content = await self._whole(lease, route, upstream, started)
            if rename is not None:
                content = _renamed(content, rename)
            return Response(content, status_code=upstream.status, media_type=kind.split(";")[0])

        async def relay() -> AsyncIterator[bytes]:
            pending = b""  # renaming: the part of a line not yet ended (a line may be split across chunks)
            try:
                async for chunk in upstream.content.iter_any():
                    if rename is None:
                        yield chunk
                        continue
                    whole, cut, pending = (pending + chunk).rpartition(b"\n")
                    if cut:
                        yield _renamed_lines(whole, rename) + b"\n"
                if pending:
                    yield _renamed_lines(pending, rename or "")
            except UPSTREAM_ERRORS as exc:
                yield _stream_error(kind, self._stream_failed(lease, _failure_name(exc)))
            finally:
                self._finish(lease, route, upstream.status, started)
                _let_go(upstream)

        return StreamingResponse(relay(), status_code=upstream.status, media_type=kind.split(";")[0],
                                 headers=STREAM_HEADERS)  # fmt: skip

    async def _spliced(self, lease: Lease, route: str, path: str, body: bytes) -> Response:
        """`_passthrough` for a stream on a server that splices (launcher.service.splice): the answer on a
        connection of its own, its body written to the client's socket as each chunk arrives."""
        started = time.monotonic()
        read_timeout_s = float(UPSTREAM_TIMEOUT.sock_read or 600.0)
        try:
            upstream = await splice.request(lease.base_url + path, body, lease.instance.headers(),
                                            connect_timeout_s=float(UPSTREAM_TIMEOUT.sock_connect or 5.0),
                                            read_timeout_s=read_timeout_s)  # fmt: skip
        except splice.UpstreamFailed as exc:
            self.pool.note_failure(lease)
            self.pool.release(lease)
            raise HTTPFailure(502, f"{lease.alias}'s server did not answer: {exc.name}") from None
        except BaseException:
            self.pool.release(lease)
            raise
        kind = upstream.content_type or "application/json"
        if "text/event-stream" not in kind and "ndjson" not in kind:  # an error, or a server that did not stream
            try:
                content = await upstream.whole(read_timeout_s)
            except splice.UpstreamFailed as exc:
                raise self._failed_mid_answer(lease, route, started, exc.name) from None
            finally:
                upstream.close()
            self._finish(lease, route, upstream.status, started)
            return Response(content, status_code=upstream.status, media_type=kind.split(";")[0])

        async def relay(sink: splice.Downstream) -> None:
            try:
                await upstream.relay(sink, read_timeout_s)
            except splice.UpstreamFailed as exc:
                sink.write(_stream_error(kind, self._stream_failed(lease, exc.name)))
            finally:
                upstream.close()
                self._finish(lease, route, upstream.status, started)

        return splice.SplicedStream(relay, upstream, status_code=upstream.status, media_type=kind.split(";")[0],
                                    headers=STREAM_HEADERS)  # fmt: skip

    async def _to_peer(self, request: Request, alias: str, body: Mapping[str, Any], route: str) -> Response:
        if request.headers.get(PEER_HEADER):
            raise HTTPFailure(404, f"model {shown_value(alias)} is not served here", code="model_not_found")
        peer = await self.peers.find(alias)
        if peer is None:
            raise HTTPFailure(404, f"model {shown_value(alias)} is not served here; GET /v1/models lists the models",
                              code="model_not_found")  # fmt: skip
        headers = {"Content-Type": "application/json", **peer.headers()}
        upstream_request = self.client.build_request("POST", f"{peer.url}{request.url.path}",
                                                     content=json.dumps(body).encode(), headers=headers)  # fmt: skip
        try:
            upstream = await self.client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            raise HTTPFailure(502, f"peer {peer.url} serving {alias} did not answer: {type(exc).__name__}") from None
        kind = upstream.headers.get("content-type", "application/json")

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except httpx.HTTPError:
                pass  # the client sees the stream end early
            finally:
                with anyio.CancelScope(shield=True):
                    await upstream.aclose()

        log_event("forwarded", model=alias, peer=peer.url, route=route)
        return StreamingResponse(relay(), status_code=upstream.status_code, media_type=kind.split(";")[0],
                                 headers=STREAM_HEADERS)  # fmt: skip

    # --- OpenAI ------------------------------------------------------------------------------------------------
    def _openai(self, path: str) -> Callable[[Request], Awaitable[Response]]:
        route = path.removeprefix("/v1/")

        async def handle(request: Request) -> Response:
            async def work() -> Response:
                body = await self._body(request)
                alias = self._alias(body)
                if self.pool.get(alias) is None:
                    return await self._to_peer(request, alias, body, route)
                self._served_alias(request, alias)
                lease = await self._acquire(request, alias)
                if lease.instance.backend == "ollama":
                    upstream = {**body, "model": lease.instance.model_name}
                    return await self._passthrough(lease, route, path, upstream, rename=alias)
                if body.get("stream") is True and splice.downstream(request.scope) is not None:
                    return await self._spliced(lease, route, path, request.scope["fitquant_raw"])
                return await self._passthrough(lease, route, path, request.scope["fitquant_raw"])

            return await self._guarded(request, route, work)

        return handle

    async def v1_models(self, request: Request) -> Response:
        created = int(time.time())
        rows = []
        for m in self.pool.models.values():
            rows.append({"id": m.alias, "object": "model", "created": created, "owned_by": "fitquant",
                         "fitquant": {"state": m.state, "quant": m.plan.chosen.quant if m.plan.chosen else None,
                                      "n_ctx": m.plan.chosen.n_ctx if m.plan.chosen else None}})  # fmt: skip
        if not request.headers.get(PEER_HEADER):
            local = {r["id"] for r in rows}
            for alias, (peer, row) in (await self.peers.models()).items():
                if alias not in local:
                    rows.append({**row, "id": alias, "owned_by": f"peer {peer.url}"})
        return JSONResponse({"object": "list", "data": rows})

    # --- Ollama ------------------------------------------------------------------------------------------------
    async def ollama_root(self, _request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def ollama_version(self, _request: Request) -> Response:
        return JSONResponse(ollama_api.version_response(OLLAMA_API_VERSION))

    def _infos(self, *, loaded_only: bool) -> list[Any]:
        out = []
        now_wall, now = time.time(), time.monotonic()
        for m in self.pool.models.values():
            if m.info is None:
                continue
            if m.state == "ready" and m.result is not None:
                held = sum(m.cost.values())
                vram = sum(n for b, n in m.cost.items() if b != "CPU")
                expires = None if m.expires_at is None else int(now_wall + (m.expires_at - now))
                loaded = ollama_api.Loaded(size_bytes=held, vram_bytes=vram, expires_at=expires,
                                           context_length=m.result.option.n_ctx)  # fmt: skip
                out.append(replace(m.info, loaded=loaded))
            elif not loaded_only:
                out.append(m.info)
        return out

    async def ollama_tags(self, _request: Request) -> Response:
        return JSONResponse(ollama_api.tags_response(self._infos(loaded_only=False)))

    async def ollama_ps(self, _request: Request) -> Response:
        return JSONResponse(ollama_api.ps_response(self._infos(loaded_only=True)))

    async def ollama_show(self, request: Request) -> Response:
        async def work() -> Response:
            body = await self._body(request)
            alias = self._alias(body, "model", "name")
            self._served_alias(request, alias)
            infos = {i.name: i for i in self._infos(loaded_only=False)}
            if alias not in infos:
                raise HTTPFailure(404, f"model {shown_value(alias)} not found")
            return JSONResponse(ollama_api.show_response(infos[alias], verbose=bool(body.get("verbose"))))

        return await self._guarded(request, "show", work)

    async def ollama_not_implemented(self, request: Request) -> Response:
        status, body = ollama_api.not_implemented(request.url.path)
        return JSONResponse(body, status_code=status)

    @staticmethod
    def _keep_alive(body: Mapping[str, Any]) -> dict[str, Any]:
        if "keep_alive" not in body or body["keep_alive"] is None:
            return {}
        from launcher.units import parse_keep_alive

        try:
            seconds = parse_keep_alive(body["keep_alive"])
        except ValueError as exc:
            raise HTTPFailure(400, f"keep_alive: {exc}") from None
        return {"keep_alive_s": math.inf if seconds is None else seconds}  # negative: loaded for ever

    async def ollama_chat(self, request: Request) -> Response:
        return await self._ollama(request, "chat")

    async def ollama_generate(self, request: Request) -> Response:
        return await self._ollama(request, "generate")

    async def ollama_embed(self, request: Request) -> Response:
        return await self._ollama(request, "embed")

    async def ollama_embeddings(self, request: Request) -> Response:
        return await self._ollama(request, "embeddings")

    async def _ollama(self, request: Request, verb: str) -> Response:
        async def work() -> Response:
            body = await self._body(request)
            alias = self._alias(body)
            if self.pool.get(alias) is None:
                return await self._to_peer(request, alias, body, verb)
            self._served_alias(request, alias)
            keep = self._keep_alive(body)
            try:
                upstream = _translate(verb, body)
            except ValueError as exc:
                raise HTTPFailure(400, str(exc)) from None
            if upstream is None:  # an empty generate/chat: load (or, with keep_alive 0, unload) only
                return await self._load_only(alias, keep.get("keep_alive_s", "unset"), verb)
            lease = await self._acquire(request, alias, **keep)
            if lease.instance.backend == "ollama":  # an Ollama server speaks its own API: only the name changes
                native = {**body, "model": lease.instance.model_name}
                return await self._passthrough(lease, verb, request.url.path, native, rename=alias)
            return await self._translated(lease, verb, upstream, stream=_streams(verb, body))

        return await self._guarded(request, verb, work)

    async def _load_only(self, alias: str, keep_alive_s: Any, verb: str) -> Response:
        if keep_alive_s == 0:
            await self.pool.unload(alias, "keep_alive 0")
            return JSONResponse(ollama_api.load_response(alias, unloaded=True, now_ns=time.time_ns()))
        lease = await self.pool.acquire(alias, keep_alive_s=keep_alive_s)
        self.pool.release(lease)
        return JSONResponse(ollama_api.load_response(alias, unloaded=False, now_ns=time.time_ns()))

    async def _translated(self, lease: Lease, verb: str, up: Any, *, stream: bool) -> Response:
        """An Ollama request answered by a llama.cpp server: OpenAI shapes upstream, Ollama's back."""
        started, started_ns = time.monotonic(), time.time_ns()
        alias = lease.alias
        upstream = await self._send(lease, up.path, up.body)
        if not stream or upstream.status != 200:
            raw = await self._whole(lease, verb, upstream, started)
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = None
            if upstream.status != 200 or not isinstance(answer, dict):
                message = _upstream_message(answer) or f"{alias}'s server answered {upstream.status}"
                raise HTTPFailure(upstream.status if upstream.status >= 400 else 502, message)
            try:
                out = _translate_answer(verb, up.path, answer, alias, started_ns)
            except ValueError as exc:  # an answer not of the shape llama.cpp's server gives
                raise HTTPFailure(502, f"{alias}'s server answered in an unexpected shape: {exc}") from None
            return JSONResponse(out)

        converter = (ollama_api.ChatStream if verb == "chat" else ollama_api.GenerateStream)(
            alias, started_ns=started_ns
        )

        async def relay() -> AsyncIterator[bytes]:
            rest = b""
            status = 200
            failed = False
            try:
                async for chunk in upstream.content.iter_any():
                    payloads, rest = ollama_api.parse_sse(rest + chunk)
                    lines = []
                    for payload in payloads:
                        if payload == "[DONE]" or not isinstance(payload, dict) or failed:
                            continue
                        if payload.get("error"):
                            failed, status = True, 502
                            lines.append(ollama_api.error_body(_upstream_message(payload) or "upstream error"))
                            continue
                        try:
                            lines.extend(converter.feed(payload))
                        except ValueError as exc:
                            failed, status = True, 502
                            lines.append(ollama_api.error_body(f"{alias}'s server streamed an unexpected chunk: {exc}"))
                    if lines:
                        yield b"".join(json.dumps(line).encode() + b"\n" for line in lines)
                if not failed:
                    yield json.dumps(converter.finish(time.time_ns())).encode() + b"\n"
            except UPSTREAM_ERRORS as exc:
                status = 502
                yield _stream_error("ndjson", self._stream_failed(lease, _failure_name(exc)))
            finally:
                self._finish(lease, verb, status, started)
                _let_go(upstream)

        return StreamingResponse(relay(), media_type="application/x-ndjson",
                                 headers=STREAM_HEADERS)  # fmt: skip

    # --- admin -------------------------------------------------------------------------------------------------
    async def health(self, _request: Request) -> Response:
        if not self.ready():
            return JSONResponse({"status": "starting"}, status_code=503)
        loaded = sum(1 for m in self.pool.models.values() if m.state == "ready")
        return JSONResponse({"status": "ok", "models": len(self.pool.models), "loaded": loaded})

    async def running(self, _request: Request) -> Response:
        return JSONResponse(self.pool.running())

    async def metrics_text(self, _request: Request) -> Response:
        if self.metrics is None:
            return PlainTextResponse("", status_code=204)
        body, kind = self.metrics.render()
        return Response(body, media_type=kind)

    async def admin_load(self, request: Request) -> Response:
        async def work() -> Response:
            alias = self._alias(await self._body(request))
            self._served_alias(request, alias)
            await self.pool.load(alias)
            return JSONResponse(next(r for r in self.pool.running()["models"] if r["model"] == alias))

        return await self._guarded(request, "load", work)

    async def admin_unload(self, request: Request) -> Response:
        async def work() -> Response:
            alias = self._alias(await self._body(request))
            self._served_alias(request, alias)
            stopped = await self.pool.unload(alias, "asked (POST /models/unload)")
            return JSONResponse({"model": alias, "unloaded": stopped})

        return await self._guarded(request, "unload", work)


# --------------------------------------------------------------------------------------------------- helpers
def _streams(verb: str, body: Mapping[str, Any]) -> bool:
    # Ollama streams chat and generate unless told not to; embeddings never stream
    return verb in ("chat", "generate") and body.get("stream", True) is not False


def _translate(verb: str, body: Mapping[str, Any]) -> Any:
    if verb == "chat":
        if not body.get("messages"):
            return None  # Ollama's "load the model" chat call
        return ollama_api.chat_request(dict(body))
    if verb == "generate":
        return ollama_api.generate_request(dict(body))
    if verb == "embed":
        return ollama_api.embed_request(dict(body))
    return ollama_api.embeddings_request(dict(body))


def _translate_answer(verb: str, path: str, answer: dict[str, Any], alias: str, started_ns: int) -> dict[str, Any]:
    now_ns = time.time_ns()
    if verb == "chat":
        return ollama_api.chat_response(answer, model=alias, started_ns=started_ns, now_ns=now_ns)
    if verb == "generate":
        return ollama_api.generate_response(answer, model=alias, started_ns=started_ns, now_ns=now_ns)
    if verb == "embed":
        return ollama_api.embed_response(answer, model=alias, started_ns=started_ns, now_ns=now_ns)
    return ollama_api.embeddings_response(answer, model=alias)


def _let_go(upstream: aiohttp.ClientResponse) -> None:
    # an answer read to its end gives its connection back to the pool; one cut short closes it (it cannot be reused)
    if upstream.content.is_eof():
        upstream.release()
    else:
        upstream.close()


UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)  # what the model servers' client raises


def _failure_name(exc: BaseException) -> str:
    """An upstream failure by the name fitquant gives HTTP failures everywhere (httpx's), whatever client saw it."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "ConnectTimeout"
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return "ReadTimeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "ConnectError"
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return "RemoteProtocolError"  # closed before or in the middle of an answer
    if isinstance(exc, aiohttp.ClientOSError):
        return "ReadError"
    return type(exc).__name__


def _stream_error(kind: str, message: str) -> bytes:
    """A failure's line at the end of a stream, in the stream's own shape (NDJSON or SSE)."""
    if "ndjson" in kind:
        return json.dumps(ollama_api.error_body(message)).encode() + b"\n"
    return b"data: " + json.dumps({"error": {"message": message, "type": "server_error"}}).encode() + b"\n\n"


def _upstream_message(answer: Any) -> str | None:
    if isinstance(answer, dict):
        error = answer.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return None


def _renamed(content: bytes, alias: str) -> bytes:
    try:
        value = json.loads(content)
    except ValueError:
        return content
    if isinstance(value, dict) and "model" in value:
        value["model"] = alias
        return json.dumps(value).encode()
    return content


def _renamed_lines(chunk: bytes, alias: str) -> bytes:
    # whole NDJSON or SSE `data:` lines from an Ollama server, each naming the model
    return b"\n".join(b"data: " + _renamed(line[6:], alias) if line.startswith(b"data: ") else
                      _renamed(line, alias) if line.strip() else line for line in chunk.split(b"\n"))  # fmt: skip
