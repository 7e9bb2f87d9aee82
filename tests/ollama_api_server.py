"""A real HTTP server on 127.0.0.1 shaped like an Ollama server's API (reference/backends.md §2), for backend tests.

Shapes follow Ollama's server/routes.go (v0.33): JSON bodies, NDJSON streams with chunked transfer encoding,
errors as `{"error": "..."}`, streamed errors as an `{"error": ...}` line after a 200.

- `GET|HEAD /` "Ollama is running"; `GET /api/version`; `GET /api/tags`; `GET /api/ps`.
- `POST /api/pull`: "pulling manifest", "pulling <digest[7:19]>" lines with digest/total/completed (completed
  absent on the first line of a layer), "verifying sha256 digest", "writing manifest", "success"; an unknown model
  gets `{"error":"pull model manifest: file does not exist"}` after "pulling manifest".
- `HEAD /api/blobs/sha256:<hex>` 200 / 404; `POST` the same path stores the body after checking its sha256 (201;
  400 "digest mismatch, expected ..., got ..." otherwise; 200 when already present).
- `POST /api/create` with `files` (uploaded blob digests) and `parameters`: "parsing GGUF", layer lines, "writing
  manifest", "success".
- `POST /api/generate`: no prompt loads (`done_reason` "load"), no prompt with `keep_alive` 0 unloads ("unload"),
  a prompt answers (NDJSON unless `"stream": false`). `keep_alive` is parsed as Go's api.Duration is: a number of
  seconds (negative: forever) or a Go duration string ("-1" without a unit is a 400, as in Ollama).
- `POST /api/chat` (empty `messages` loads) and the OpenAI-compatible `POST /v1/chat/completions` (JSON or SSE).

Scenario knobs (attributes, set before the request): `load_size` (bytes, or a function (name, options) -> bytes;
default the model's blob size plus 16 MiB), `size_vram` (bytes) or `vram_fraction` (default 1.0: all on the GPU),
`max_context` (the context is clamped to it), `load_error` / `load_errors[name]` (a 500 with that text on load),
`load_hangup` (the connection closed without an answer), `load_delay_s`, `chat_error` ((status, text): a chat
request refused, as Ollama's 400 for a model without chat),
`unload_delay_s` (unload is an expiry: the model stays in /api/ps that long), `pull_chunks`, `pull_error` (an error
line after the first progress line). Every request is recorded in `requests` as (method, path, JSON body or None).

Run as a program (`python tests/ollama_api_server.py [--port N]`, port default from OLLAMA_HOST, else 11434) it
serves until killed, as `ollama serve` would, keeping blobs and models in $OLLAMA_MODELS across restarts: tests put
it behind a fake `ollama` executable.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MiB = 1024**2
_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_GO_DURATION_RE = re.compile(r"^[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+$")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
FOREVER_S = 292 * 365 * 24 * 3600.0  # Go's time.Duration(math.MaxInt64), about 292 years
ANSWER = ["Hello", " from", " the", " stub", "."]


class KeepAliveError(ValueError):
    pass


def parse_keep_alive(value: Any) -> float | None:
    """Seconds, as Ollama's api.Duration.UnmarshalJSON reads keep_alive (None: absent; inf: forever)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise KeepAliveError(f"Unsupported type: '{type(value).__name__}'")
    if isinstance(value, (int, float)):
        return float("inf") if value < 0 else float(value)
    text = value
    if text in ("0", "+0", "-0"):
        return 0.0
    if not _GO_DURATION_RE.match(text):
        if re.match(r"^[-+]?[\d.]+$", text):
            raise KeepAliveError(f'time: missing unit in duration "{text}"')
        raise KeepAliveError(f'time: invalid duration "{text}"')
    sign = -1.0 if text.startswith("-") else 1.0
    seconds = sum(float(n) * _GO_UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", text))
    return float("inf") if sign < 0 and seconds > 0 else seconds


def normalize(name: str) -> str:
    """Ollama's short display name: `library/` and the default host dropped, `:latest` added when no tag."""
    n = name.strip()
    for prefix in ("registry.ollama.ai/library/", "registry.ollama.ai/", "library/"):
        if n.lower().startswith(prefix):
            n = n[len(prefix) :]
    if ":" not in n.rsplit("/", 1)[-1]:
        n += ":latest"
    return n


def go_time(moment: datetime) -> str:
    """A local time as Go's json encodes time.Time (RFC 3339, fraction without trailing zeros)."""
    text = moment.isoformat(timespec="microseconds")
    head, dot, rest = text.partition(".")
    if not dot:
        return text
    digits = rest[:6].rstrip("0")
    return f"{head}.{digits}{rest[6:]}" if digits else f"{head}{rest[6:]}"


def utc_now() -> str:
    """Now in UTC as Go encodes time.Now().UTC()."""
    return go_time(datetime.now(timezone.utc)).replace("+00:00", "Z")


def valid_name(name: str) -> bool:
    """Ollama's model.ParseName(name).IsValid(), roughly: [host/][namespace/]model[:tag], namespace without dots."""
    last = name.rsplit("/", 1)[-1]
    path, tag = name.rsplit(":", 1) if ":" in last else (name, None)
    parts = path.split("/")
    part = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")
    if not 1 <= len(parts) <= 3 or not part.match(parts[-1]):
        return False
    if len(parts) >= 2 and (not part.match(parts[-2]) or "." in parts[-2]):
        return False
    return tag is None or bool(part.match(tag))


def _details(path: Path | None) -> dict[str, Any]:
    """`details` of a model from its GGUF (architecture and file type), as /api/tags and /api/ps show them."""
    family, level, size = "llama", "", ""
    if path is not None:
        try:
            import gguf

            reader = gguf.GGUFReader(str(path))
            fields = reader.fields
            arch = fields.get("general.architecture")
            if arch is not None:
                family = bytes(arch.parts[arch.data[0]]).decode()
            ft = fields.get("general.file_type")
            if ft is not None:
                level = gguf.LlamaFileType(int(ft.parts[ft.data[0]][0])).name.removeprefix("MOSTLY_")
            count = sum(int(t.n_elements) for t in reader.tensors)
            size = f"{count / 1e6:.2f}M" if count < 1e9 else f"{count / 1e9:.1f}B"
        except Exception:  # not a GGUF the reader takes: the details stay generic
            pass
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": size,
        "quantization_level": level,
    }


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128


class OllamaApiServer:
    """The stub server; `url` is its base URL. `close()` stops it."""

    def __init__(self, *, version: str = "0.33.0", port: int = 0, models_dir: Path | None = None) -> None:
        """`models_dir` (like OLLAMA_MODELS) keeps blobs and the model list across restarts; default a temporary
        directory."""
        self.version = version
        self.models_dir = Path(models_dir) if models_dir is not None else Path(tempfile.mkdtemp(prefix="ollama-stub-"))
        self.blob_dir = self.models_dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, Any]] = []
        self.registry: dict[str, list[tuple[str, int]]] = {}  # pullable name -> layers (digest, size)
        self.models: dict[str, dict[str, Any]] = {}  # name -> {digest, size, details, parameters, files}
        self.blobs: dict[str, int] = {}  # digest -> size
        self.loaded: dict[str, dict[str, Any]] = {}
        for blob in self.blob_dir.glob("sha256-*"):
            self.blobs[blob.name.replace("-", ":", 1)] = blob.stat().st_size
        saved = self.models_dir / "models.json"
        if saved.exists():
            self.models = json.loads(saved.read_text())
        # scenario knobs
        self.load_size: int | Callable[[str, dict[str, Any]], int] | None = None
        self.size_vram: int | None = None
        self.vram_fraction = 1.0
        self.max_context: int | None = None
        self.default_context = 4096
        self.load_error: str | None = None
        self.load_errors: dict[str, str] = {}  # per model (normalized name)
        self.load_hangup = False  # close the connection without an answer, as a server that dies mid-load
        self.load_delay_s = 0.0
        self.unload_delay_s = 0.0
        self.pull_chunks = 4
        self.pull_error: str | None = None
        self.chat_error: tuple[int, str] | None = None  # (status, text): how Ollama refuses a chat request
        self.httpd = _HTTPServer(("127.0.0.1", port), self._handler())
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> OllamaApiServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- content and records -----------------------------------------------------------------------------------

    def add_registry_model(self, name: str, layer_sizes: tuple[int, ...] = (3 * MiB, 1024)) -> list[str]:
        """Make `name` pullable with layers of these sizes; returns their digests."""
        layers = []
        for i, size in enumerate(layer_sizes):
            digest = "sha256:" + hashlib.sha256(f"{name}/{i}".encode()).hexdigest()
            layers.append((digest, size))
        self.registry[normalize(name)] = layers
        return [d for d, _ in layers]

    def add_model(self, name: str, *, size: int = 100 * MiB) -> None:
        """A model the server already has (as if pulled earlier)."""
        digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        with self.lock:
            self.models[normalize(name)] = {"digest": digest, "size": size, "details": _details(None),
                                            "parameters": {}, "files": {}, "modified_at": utc_now()}  # fmt: skip

    def _save(self) -> None:
        """Keep the model list beside the blobs (call with the lock held)."""
        (self.models_dir / "models.json").write_text(json.dumps(self.models))

    def bodies(self, path: str, method: str = "POST") -> list[Any]:
        """The JSON bodies of every `method` request to `path`, in order."""
        with self.lock:
            return [body for m, p, body in self.requests if m == method and p == path]

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / digest.replace(":", "-")

    # -- behaviour ---------------------------------------------------------------------------------------------

    def _load(self, name: str, options: dict[str, Any], keep: float | None) -> str | None:
        """Load `name` with `options`; the error text on failure."""
        if self.load_delay_s:
            time.sleep(self.load_delay_s)
        error = self.load_errors.get(name) or self.load_error
        if error:
            return error
        with self.lock:
            model = self.models[name]
            size = self.load_size(name, options) if callable(self.load_size) else self.load_size
            size = int(size if size is not None else model["size"] + 16 * MiB)
            vram = self.size_vram if self.size_vram is not None else round(size * self.vram_fraction)
            merged = {**model["parameters"], **options}
            ctx = int(merged.get("num_ctx") or self.default_context)
            if self.max_context is not None:
                ctx = min(ctx, self.max_context)
            seconds = 300.0 if keep is None else keep
            expires = datetime.now().astimezone() + timedelta(seconds=min(seconds, FOREVER_S))
            self.loaded[name] = {
                "name": name,
                "model": name,
                "size": size,
                "digest": model["digest"].removeprefix("sha256:"),
                "details": model["details"],
                "expires_at": go_time(expires),
                "size_vram": int(vram),
                "context_length": ctx,
                "options": dict(options),
            }
        return None

    def _unload(self, name: str) -> None:
        def drop() -> None:
            with self.lock:
                self.loaded.pop(name, None)

        if self.unload_delay_s:
            threading.Timer(self.unload_delay_s, drop).start()
        else:
            drop()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except (BrokenPipeError, ConnectionResetError):  # the client left (a timeout, a test's hang-up)
                    self.close_connection = True

            # -- plumbing ----------------------------------------------------------------------------------

            def _chunks_in(self) -> Iterator[bytes]:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return
                        yield self.rfile.read(size)
                        self.rfile.readline()
                left = int(self.headers.get("Content-Length") or 0)
                while left > 0:
                    piece = self.rfile.read(min(left, 1024 * 1024))
                    if not piece:
                        return
                    left -= len(piece)
                    yield piece

            def _json_body(self) -> Any:
                raw = b"".join(self._chunks_in())
                try:
                    return json.loads(raw) if raw else None
                except ValueError:
                    return raw.decode("utf-8", "replace")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, status: int, value: Any) -> None:
                self._send(status, json.dumps(value, separators=(",", ":")).encode(), "application/json; charset=utf-8")

            def _error(self, status: int, text: str) -> None:
                self._json(status, {"error": text})

            def _stream(self, lines: Iterator[str], content_type: str = "application/x-ndjson") -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for line in lines:
                    data = line.encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def _hang_up(self) -> None:
                """Close the connection without an answer (a server that died mid-request)."""
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(2)

            def _record(self, body: Any) -> None:
                with server.lock:
                    server.requests.append((self.command, self.path, body))

            # -- routes ------------------------------------------------------------------------------------

            def do_HEAD(self) -> None:
                self._record(None)
                if self.path == "/":
                    self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
                elif self.path.startswith("/api/blobs/"):
                    digest = self.path.removeprefix("/api/blobs/")
                    if not _DIGEST_RE.match(digest):
                        self._error(400, "invalid digest format")
                    elif digest in server.blobs:
                        self._send(200, b"", "text/plain; charset=utf-8")
                    else:
                        self._error(404, f'blob "{digest}" not found')
                else:
                    self._send(404, b"404 page not found", "text/plain")

            def do_GET(self) -> None:
                self._record(None)
                if self.path == "/":
                    self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
                elif self.path == "/api/version":
                    self._json(200, {"version": server.version})
                elif self.path == "/api/tags":
                    with server.lock:
                        models = [
                            {"name": n, "model": n, "modified_at": m["modified_at"], "size": m["size"],
                             "digest": m["digest"].removeprefix("sha256:"), "details": m["details"]}
                            for n, m in server.models.items()
                        ]  # fmt: skip
                    self._json(200, {"models": models})
                elif self.path == "/api/ps":
                    with server.lock:
                        models = [{k: v for k, v in e.items() if k != "options"} for e in server.loaded.values()]
                    models.sort(key=lambda e: e["expires_at"], reverse=True)
                    self._json(200, {"models": models})
                else:
                    self._send(404, b"404 page not found", "text/plain")

            def do_POST(self) -> None:
                if self.path.startswith("/api/blobs/"):
                    self._record(None)
                    return self._blob(self.path.removeprefix("/api/blobs/"))
                body = self._json_body()
                self._record(body)
                if not isinstance(body, dict):
                    return self._error(400, "missing request body" if body is None else "invalid JSON body")
                routes: dict[str, Callable[[dict[str, Any]], None]] = {
                    "/api/pull": self._pull,
                    "/api/create": self._create,
                    "/api/generate": self._generate,
                    "/api/chat": self._chat,
                    "/v1/chat/completions": self._openai_chat,
                }
                route = routes.get(self.path)
                if route is None:
                    return self._send(404, b"404 page not found", "text/plain")
                route(body)

            def _blob(self, digest: str) -> None:
                if not _DIGEST_RE.match(digest):
                    for _ in self._chunks_in():
                        pass
                    return self._error(400, "invalid digest format")
                if digest in server.blobs:
                    for _ in self._chunks_in():
                        pass
                    return self._send(200, b"", "text/plain; charset=utf-8")
                sha, size = hashlib.sha256(), 0
                tmp = server.blob_dir / f"partial-{threading.get_ident()}"
                with open(tmp, "wb") as out:
                    for piece in self._chunks_in():
                        sha.update(piece)
                        size += len(piece)
                        out.write(piece)
                got = "sha256:" + sha.hexdigest()
                if got != digest:
                    tmp.unlink()
                    return self._error(400, f'digest mismatch, expected "{digest}", got "{got}"')
                tmp.replace(server.blob_path(digest))
                with server.lock:
                    server.blobs[digest] = size
                self._send(201, b"", "text/plain; charset=utf-8")

            def _pull(self, body: dict[str, Any]) -> None:
                name = normalize(str(body.get("model") or body.get("name") or ""))
                layers = server.registry.get(name)

                def lines() -> Iterator[dict[str, Any]]:
                    yield {"status": "pulling manifest"}
                    if layers is None:
                        yield {"error": "pull model manifest: file does not exist"}
                        return
                    for digest, size in layers:
                        yield {"status": f"pulling {digest[7:19]}", "digest": digest, "total": size}
                        for i in range(1, server.pull_chunks + 1):
                            if server.pull_error:
                                yield {"error": server.pull_error}
                                return
                            done = size * i // server.pull_chunks
                            yield {"status": f"pulling {digest[7:19]}", "digest": digest, "total": size,
                                   "completed": done}  # fmt: skip
                    yield {"status": "verifying sha256 digest"}
                    yield {"status": "writing manifest"}
                    with server.lock:
                        server.models[name] = {
                            "digest": "sha256:" + hashlib.sha256(name.encode()).hexdigest(),
                            "size": sum(s for _, s in layers),
                            "details": _details(None),
                            "parameters": {},
                            "files": {},
                            "modified_at": utc_now(),
                        }
                        server._save()
                    yield {"status": "success"}

                self._progress(lines(), stream=body.get("stream", True) is not False)

            def _progress(self, parts: Iterator[dict[str, Any]], *, stream: bool) -> None:
                """Ollama's streamResponse / waitForStream: NDJSON lines, or the last one (an error as a 500)."""
                if stream:
                    return self._stream(json.dumps(p, separators=(",", ":")) + "\n" for p in parts)
                last: dict[str, Any] = {}
                for part in parts:
                    if "error" in part:
                        return self._error(500, part["error"])
                    last = part
                self._json(200, last)

            def _create(self, body: dict[str, Any]) -> None:
                raw_name = str(body.get("model") or body.get("name") or "")
                if not valid_name(raw_name):
                    return self._error(400, "invalid model name")
                files: dict[str, str] = body.get("files") or {}
                if not files and not body.get("from"):
                    return self._error(400, "neither 'from' or 'files' was specified")
                for fname, digest in files.items():
                    if fname.startswith("/") or ".." in fname.split("/"):
                        return self._error(400, "file path must be relative")
                    if not digest:
                        return self._error(400, "invalid digest format")
                name = normalize(raw_name)
                parameters = dict(body.get("parameters") or {})

                def lines() -> Iterator[dict[str, Any]]:
                    yield {"status": "parsing GGUF"}
                    for digest in files.values():
                        if digest not in server.blobs:
                            path = server.blob_path(digest)
                            yield {"error": f"open {path}: no such file or directory"}
                            return
                        yield {"status": f"using existing layer {digest}"}
                    if parameters:
                        params = "sha256:" + hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()
                        yield {"status": f"creating new layer {params}"}
                    yield {"status": "writing manifest"}
                    first = next(iter(files.values()), None)
                    manifest = json.dumps({"files": files, "parameters": parameters}, sort_keys=True).encode()
                    with server.lock:
                        server.models[name] = {
                            "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
                            "size": sum(server.blobs.get(d, 0) for d in files.values()),
                            "details": _details(server.blob_path(first) if first else None),
                            "parameters": parameters,
                            "files": dict(files),
                            "modified_at": utc_now(),
                        }
                        server._save()
                    yield {"status": "success"}

                self._progress(lines(), stream=body.get("stream", True) is not False)

            def _begin(self, body: dict[str, Any]) -> tuple[str, float | None] | None:
                """The model name and keep_alive of a generate/chat request; None after answering an error."""
                given = str(body.get("model") or "")
                try:
                    keep = parse_keep_alive(body.get("keep_alive"))
                except KeepAliveError as exc:
                    self._error(400, str(exc))
                    return None
                name = normalize(given) if given else ""
                if name not in server.models:
                    self._error(404, f"model '{given}' not found")
                    return None
                return name, keep

            def _generate(self, body: dict[str, Any]) -> None:
                begun = self._begin(body)
                if begun is None:
                    return
                name, keep = begun
                prompt = body.get("prompt") or ""
                base = {"model": body["model"], "created_at": utc_now()}
                if not prompt and keep == 0:
                    server._unload(name)
                    return self._json(200, {**base, "response": "", "done": True, "done_reason": "unload"})
                if server.load_hangup:
                    return self._hang_up()
                error = server._load(name, dict(body.get("options") or {}), keep)
                if error is not None:
                    return self._error(500, error)
                if not prompt:
                    return self._json(200, {**base, "response": "", "done": True, "done_reason": "load"})
                stats = {"total_duration": 1_000_000, "load_duration": 10_000, "prompt_eval_count": len(prompt.split()),
                         "prompt_eval_duration": 100_000, "eval_count": len(ANSWER), "eval_duration": 500_000}  # fmt: skip
                if body.get("stream", True) is False:
                    return self._json(200, {**base, "response": "".join(ANSWER), "done": True, "done_reason": "stop",
                                            **stats})  # fmt: skip
                pieces = [{**base, "response": p, "done": False} for p in ANSWER]
                pieces.append({**base, "response": "", "done": True, "done_reason": "stop", **stats})
                self._stream(json.dumps(p) + "\n" for p in pieces)

            def _chat(self, body: dict[str, Any]) -> None:
                begun = self._begin(body)
                if begun is None:
                    return
                name, keep = begun
                messages = body.get("messages") or []
                base = {"model": body["model"], "created_at": utc_now()}
                if not messages and keep == 0:
                    server._unload(name)
                    return self._json(200, {**base, "message": {"role": "assistant", "content": ""}, "done": True,
                                            "done_reason": "unload"})  # fmt: skip
                error = server._load(name, dict(body.get("options") or {}), keep)
                if error is not None:
                    return self._error(500, error)
                if not messages:
                    return self._json(200, {**base, "message": {"role": "assistant", "content": ""}, "done": True,
                                            "done_reason": "load"})  # fmt: skip
                if server.chat_error is not None:  # e.g. 400 '"nomic-embed-text" does not support chat'
                    return self._error(*server.chat_error)
                limit = (body.get("options") or {}).get("num_predict")
                answer = ANSWER[: int(limit)] if isinstance(limit, int) and limit > 0 else ANSWER
                if body.get("stream", True) is False:
                    prompt_tokens = sum(len(str(m.get("content", "")).split()) + 4 for m in messages)
                    return self._json(200, {**base, "message": {"role": "assistant", "content": "".join(answer)},
                                            "done": True, "done_reason": "stop", "prompt_eval_count": prompt_tokens,
                                            "eval_count": len(answer)})  # fmt: skip
                pieces = [{**base, "message": {"role": "assistant", "content": p}, "done": False} for p in answer]
                pieces.append({**base, "message": {"role": "assistant", "content": ""}, "done": True,
                               "done_reason": "stop", "eval_count": len(answer)})  # fmt: skip
                self._stream(json.dumps(p) + "\n" for p in pieces)

            def _openai_chat(self, body: dict[str, Any]) -> None:
                given = str(body.get("model") or "")
                name = normalize(given) if given else ""
                if name not in server.models:
                    return self._json(404, {"error": {"message": f'model "{given}" not found, try pulling it first',
                                                      "type": "api_error", "param": None, "code": None}})  # fmt: skip
                if name not in server.loaded:
                    error = server._load(name, {}, None)
                    if error is not None:
                        return self._json(500, {"error": {"message": error, "type": "api_error", "param": None,
                                                          "code": None}})  # fmt: skip
                limit = body.get("max_tokens")
                answer = ANSWER[: int(limit)] if isinstance(limit, int) and limit > 0 else ANSWER
                head = {"id": "chatcmpl-42", "created": int(time.time()), "model": given,
                        "system_fingerprint": "fp_ollama"}  # fmt: skip
                if not body.get("stream"):
                    n_prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])
                    return self._json(200, {
                        **head, "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(answer)},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(answer),
                                  "total_tokens": n_prompt + len(answer)},
                    })  # fmt: skip

                def events() -> Iterator[str]:
                    for piece in answer:
                        chunk = {**head, "object": "chat.completion.chunk",
                                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece},
                                              "finish_reason": None}]}  # fmt: skip
                        yield f"data: {json.dumps(chunk)}\n\n"
                    last = {**head, "object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": "stop"}]}  # fmt: skip
                    yield f"data: {json.dumps(last)}\n\n"
                    yield "data: [DONE]\n\n"

                self._stream(events(), "text/event-stream")

        return Handler


def main(argv: list[str] | None = None) -> int:
    """Serve until killed, like `ollama serve` (the port from --port, else OLLAMA_HOST, else 11434)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--version", default="0.33.0")
    args = parser.parse_args(argv)
    port = args.port
    if port is None:
        host = os.environ.get("OLLAMA_HOST", "")
        tail = host.rsplit(":", 1)[-1] if ":" in host else ""
        port = int(tail) if tail.isdigit() else 11434
    models = os.environ.get("OLLAMA_MODELS")
    stub = OllamaApiServer(version=args.version, port=port, models_dir=Path(models) if models else None)
    print(f"Listening on 127.0.0.1:{stub.port} (version {stub.version})", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        stub.httpd.serve_forever(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
