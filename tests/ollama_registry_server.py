"""A real HTTP server on 127.0.0.1 shaped like the Ollama registry (registry.ollama.ai), for catalog tests.

- `GET /v2/{ns}/{model}/manifests/{tag}`: the Docker manifest v2 JSON Ollama publishes (config + layers with
  the `application/vnd.ollama.image.*` media types), 404 with a registry error body for unknown tags.
- `GET /v2/{ns}/{model}/blobs/{digest}`: 307 to `/store/{digest}`, as the registry redirects to its blob store.
- `GET /store/{digest}`: the blob; honours `Range: bytes=a-b` with 206 and Content-Range.

Knobs: `latency_s` (sleep before every answer), `ignore_range` (answer 200 with the whole blob to a Range request,
as some servers do), `fault(path, *kinds, forever=False)` with kinds an HTTP status (500, 401, ...), "truncate"
(announce the whole body, send half, hang up), ("cut", n) on a /store/ path (announce the range, send n bytes of
it, hang up), "loop" (307 to itself) or "drop" (hang up without an answer); "truncate" on a /store/ path sends half
of the blob range it announces. Records requests per path (`requests`), request headers (`seen_headers`, the last
per path), every request's (path, Range header or None) in order (`ranges`) and body bytes sent per blob digest
(`served`).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from http_range import begin_range_reply
from local_server import start_server, stop_server

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
MEDIA = "application/vnd.ollama.image."
_PIECE = 64 * 1024


class RegistryServer:
    def __init__(self, *, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.ignore_range = False
        self.ranges: list[tuple[str, str | None]] = []
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], bytes] = {}
        self.requests: Counter[str] = Counter()
        self.seen_headers: dict[str, dict[str, str]] = {}
        self.served: Counter[str] = Counter()
        self.faults: dict[str, list[Any]] = {}
        self.forever: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.httpd = start_server(self._handle)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        stop_server(self.httpd)

    # -- content -----------------------------------------------------------------------------------------------

    def add_blob(self, data: bytes | Path) -> dict[str, Any]:
        """Store a blob; returns its descriptor {digest, size}."""
        body = data.read_bytes() if isinstance(data, Path) else data
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.blobs[digest] = body
        return {"digest": digest, "size": len(body)}

    def add_tag(
        self,
        repo: str,
        tag: str,
        model: Path | bytes | None,
        *,
        file_type: str | None = None,
        model_type: str = "1.0B",
        family: str = "llama",
        projector: Path | None = None,
        config: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Publish `repo:tag` (repo = "library/tiny") with a model layer, its config blob and the small layers."""
        cfg: dict[str, Any] = {
            "model_format": "gguf",
            "model_family": family,
            "model_families": [family],
            "model_type": model_type,
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
        }
        if file_type is not None:
            cfg["file_type"] = file_type
        cfg.update(config or {})
        config_desc = self.add_blob(json.dumps(cfg).encode())
        layers = []
        if model is not None:
            layers.append({"mediaType": MEDIA + "model", **self.add_blob(model)})
        if projector is not None:
            layers.append({"mediaType": MEDIA + "projector", **self.add_blob(projector)})
        layers.append({"mediaType": MEDIA + "license", **self.add_blob(b"MIT License, for tests")})
        layers.append({"mediaType": MEDIA + "template", **self.add_blob(b"{{ .Prompt }}")})
        layers.append({"mediaType": MEDIA + "params", **self.add_blob(b'{"stop":["</s>"]}')})
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_V2,
            "config": {"mediaType": CONFIG_V1, **config_desc},
            "layers": layers,
        }
        self.manifests[(repo, tag)] = json.dumps(manifest).encode()
        return manifest

    def alias(self, repo: str, tag: str, target: str) -> None:
        """`repo:tag` serves the very manifest of `repo:target` (as `qwen3:14b` and `qwen3:14b-q4_K_M` do)."""
        self.manifests[(repo, tag)] = self.manifests[(repo, target)]

    def manifest_path(self, repo: str, tag: str) -> str:
        return f"/v2/{repo}/manifests/{tag}"

    def fault(self, path: str, *kinds: Any, forever: bool = False) -> None:
        """Answer the next requests of `path` with `kinds` (one each), or every request with kinds[0]."""
        with self.lock:
            if forever:
                self.forever[path] = kinds[0]
            else:
                self.faults.setdefault(path, []).extend(kinds)

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()
            self.ranges.clear()
            self.served.clear()

    def manifest_requests(self, repo: str) -> Counter[str]:
        """Tag -> number of manifest requests for `repo`."""
        prefix = f"/v2/{repo}/manifests/"
        return Counter({p[len(prefix) :]: n for p, n in self.requests.items() if p.startswith(prefix)})

    # -- serving -----------------------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        with self.lock:
            self.requests[path] += 1
            self.seen_headers[path] = dict(h.headers)
            self.ranges.append((path, h.headers.get("Range")))
            queue = self.faults.get(path)
            fault = queue.pop(0) if queue else self.forever.get(path)
        if self.latency_s:
            time.sleep(self.latency_s)
        if fault is not None:
            self._fault(h, path, fault)
            return
        m = re.fullmatch(r"/v2/([^/]+/[^/]+)/manifests/([^/]+)", path)
        if m:
            body = self.manifests.get((m[1], m[2]))
            if body is None:
                self._json(h, 404, {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]})
            else:
                self._send(h, 200, body, MANIFEST_V2)
            return
        m = re.fullmatch(r"/v2/([^/]+/[^/]+)/blobs/(sha256:[0-9a-f]{64})", path)
        if m:
            if m[2] in self.blobs:
                self._reply(h, 307, {"Location": f"/store/{m[2]}"})
            else:
                self._json(h, 404, {"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown to registry"}]})
            return
        m = re.fullmatch(r"/store/(sha256:[0-9a-f]{64})", path)
        if m and m[1] in self.blobs:
            self._blob(h, m[1])
            return
        self._json(h, 404, {"errors": [{"code": "NAME_UNKNOWN", "message": "repository name not known"}]})

    def _fault(self, h: BaseHTTPRequestHandler, path: str, kind: Any) -> None:
        if isinstance(kind, int):
            headers = {}
            if kind == 401:
                headers["WWW-Authenticate"] = 'Bearer realm="https://ollama.com/token",service="ollama.com"'
            self._json(h, kind, {"errors": [{"code": "FAULT", "message": f"injected {kind}"}]}, headers)
        elif kind == "loop":
            self._reply(h, 307, {"Location": path})
        elif kind == "drop":
            h.close_connection = True
        elif kind == "truncate" and path.startswith("/store/"):
            self._blob(h, path[len("/store/") :], truncate=True)
        elif isinstance(kind, tuple) and kind[0] == "cut" and path.startswith("/store/"):
            self._blob(h, path[len("/store/") :], cut_after=int(kind[1]))
        elif kind == "truncate":
            body = b'{"schemaVersion":2,' + b" " * 4000 + b"}"
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
        else:
            raise ValueError(f"unknown fault {kind!r}")

    def _blob(
        self, h: BaseHTTPRequestHandler, digest: str, *, truncate: bool = False, cut_after: int | None = None
    ) -> None:
        data = self.blobs[digest]
        span = begin_range_reply(
            h, len(data), honour_range=not self.ignore_range, headers={"Content-Type": "application/octet-stream"}
        )
        if span is None:
            return
        start, end = span
        if truncate:  # half of what was announced, then hang up
            end = start + (end - start + 1) // 2 - 1
        if cut_after is not None:  # n bytes of what was announced, then hang up
            end = min(end, start + cut_after - 1)
        pos = start
        while pos <= end:
            piece = data[pos : min(pos + _PIECE, end + 1)]
            with self.lock:  # counted before it is sent: a client that has its bytes finds them counted
                self.served[digest] += len(piece)
            try:
                h.wfile.write(piece)
                h.wfile.flush()
            except OSError:  # the client hung up: it has what it needed, not this piece
                with self.lock:
                    self.served[digest] -= len(piece)
                break
            pos += len(piece)
        h.close_connection = True

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def _json(self, h: BaseHTTPRequestHandler, status: int, doc: Any, headers: dict | None = None) -> None:
        self._send(h, status, json.dumps(doc).encode(), "application/json", headers)

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str]) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", "0")
        h.end_headers()
