"""A real HTTP server on 127.0.0.1 shaped like the Hugging Face Hub, for catalog tests and benchmarks.

Routes (as huggingface.co answers them, see shared/reference/quants-and-catalogs.md section 6):

    GET /api/models/{repo}/tree/{revision}[/{path}]?recursive=&expand=[&cursor=N]
        entries {type, path, size, oid, lfs: {oid (sha256), size, pointerSize}}, `page_size` per page,
        the next page in a `Link: <...>; rel="next"` header
    GET /api/models/{repo}[/revision/{revision}]   model info with `siblings`
    GET /{repo}/resolve/{revision}/{path}           302 to /blobs/{n} on the same server (with `cdn_host`: to
                                                    http://{cdn_host}:{port}/blobs/{n}, another origin, as the
                                                    Hub redirects LFS files to its CDN), with `X-Repo-Commit`,
                                                    `X-Linked-Etag` ("sha256") and `X-Linked-Size`
    GET /blobs/{n}                                  the bytes; honours `Range: bytes=a-b` (206 + Content-Range)

HEAD is answered on every route as GET is, without the body: what `huggingface_hub.hf_hub_download` asks first.
With `cdn_host="localhost"` its HEAD on /resolve stops at the 302 (another origin: the file's metadata is on that
answer) and it downloads from the "CDN" without the token, as from the Hub.

Unknown repositories answer 404 with `X-Error-Code: RepoNotFound`, unknown revisions `RevisionNotFound`, missing
files `EntryNotFound`; a gated repository answers 401 (`X-Error-Code: GatedRepo`) without
`Authorization: Bearer {token}` on its files (`gated="files"`, as the Hub does) or everywhere (`gated="all"`).

Knobs: `latency_s` (sleep before every answer), `fail(pattern, kind, times=...)` (answers to paths matching a
regex: "status" with `status`, "truncate" (half the body, then hang up), "drop" (hang up without answering),
"loop" (redirect to itself)). Counters: `requests` (path, had a token), `methods` (method, path), `served[(repo,
path)]` (blob body bytes actually sent), `max_in_flight`. HTTP/1.1 with keep-alive, so clients can reuse
connections.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from http_range import begin_range_reply
from local_server import start_server, stop_server

_PIECE = 64 * 1024
_POINTER_SIZE = 134


class ServedFile:
    """File content: a path on disk (or bytes) plus an optional suffix that makes copies distinct."""

    _base_hashes: dict[Path, hashlib._Hash] = {}  # noqa: RUF012 - a process-wide memo of file hashes
    _lock = threading.Lock()

    def __init__(self, source: Path | bytes, suffix: bytes = b"") -> None:
        self.source = source
        self.suffix = suffix
        base = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
        self.base_size = base
        self.size = base + len(suffix)
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            if isinstance(self.source, bytes):
                h = hashlib.sha256(self.source)
            else:
                with ServedFile._lock:
                    base = ServedFile._base_hashes.get(self.source)
                    if base is None:
                        base = hashlib.sha256(Path(self.source).read_bytes())
                        ServedFile._base_hashes[self.source] = base
                h = base.copy()
            h.update(self.suffix)
            self._sha256 = h.hexdigest()
        return self._sha256

    @property
    def oid(self) -> str:  # the git blob id of the LFS pointer; any stable sha1 will do here
        return hashlib.sha1(self.sha256.encode()).hexdigest()

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end] (inclusive)."""
        out = b""
        if start < self.base_size:
            stop = min(end + 1, self.base_size)
            if isinstance(self.source, bytes):
                out = self.source[start:stop]
            else:
                with open(self.source, "rb") as f:
                    f.seek(start)
                    out = f.read(stop - start)
        if end >= self.base_size:
            lo = max(start - self.base_size, 0)
            out += self.suffix[lo : end + 1 - self.base_size]
        return out


@dataclass
class Repo:
    files: dict[str, ServedFile]
    gated: str | None = None  # None, "files" or "all"
    revisions: tuple[str, ...] = ("main",)
    sha: str = field(default_factory=lambda: hashlib.sha1(str(time.time_ns()).encode()).hexdigest())


@dataclass
class _Failure:
    pattern: re.Pattern[str]
    kind: str
    status: int
    times: int | None


class HFServer:
    """The server; `endpoint` is its base URL. Use as a context manager or call `close()`."""

    token = "hf_test_secret_token_123"

    def __init__(self, *, page_size: int = 4, latency_s: float = 0.0, cdn_host: str | None = None) -> None:
        self.page_size = page_size
        self.latency_s = latency_s
        self.cdn_host = cdn_host
        self.repos: dict[str, Repo] = {}
        self.failures: list[_Failure] = []
        self.requests: list[tuple[str, bool]] = []
        self.methods: list[tuple[str, str]] = []
        self.served: Counter[tuple[str, str]] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self._blobs: list[tuple[str, str]] = []  # blob number -> (repo, path)
        self._blob_ids: dict[tuple[str, str], int] = {}
        self.httpd = start_server(self._handle, protocol="HTTP/1.1")
        # HEAD: the same answers without bodies (`_json` and `_blob` leave them out for HEAD)
        self.httpd.RequestHandlerClass.do_HEAD = lambda h: self._handle(h)  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    # -- setup ----------------------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, Path | bytes | ServedFile],
        *,
        gated: str | None = None,
        revisions: Sequence[str] = ("main",),
    ) -> Repo:
        served = {p: f if isinstance(f, ServedFile) else ServedFile(f) for p, f in files.items()}
        repo = Repo(served, gated, tuple(revisions))
        self.repos[repo_id] = repo
        return repo

    def fail(self, pattern: str, kind: str, *, status: int = 503, times: int | None = None) -> None:
        """Misbehave on request paths matching `pattern` (a regex searched in the path and query)."""
        assert kind in ("status", "truncate", "drop", "loop"), kind
        self.failures.append(_Failure(re.compile(pattern), kind, status, times))

    def reset_counters(self) -> None:
        with self.lock:
            self.requests.clear()
            self.methods.clear()
            self.served.clear()
            self.max_in_flight = 0

    def paths(self, prefix: str = "") -> list[str]:
        return [p for p, _ in self.requests if p.startswith(prefix)]

    @property
    def blob_bytes(self) -> int:
        return sum(self.served.values())

    def close(self) -> None:
        stop_server(self.httpd)

    def __enter__(self) -> HFServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- answers --------------------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        authorized = h.headers.get("Authorization", "") == f"Bearer {self.token}"
        with self.lock:
            self.requests.append((h.path, "Authorization" in h.headers))
            self.methods.append((h.command, h.path))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency_s:
                time.sleep(self.latency_s)
            failure = self._failure(h.path)
            if failure is not None and failure.kind in ("status", "drop", "loop"):
                if failure.kind == "status":
                    self._json(h, failure.status, {"error": "injected failure"})
                elif failure.kind == "loop":
                    self._reply(h, 302, {"Location": h.path})
                else:
                    h.close_connection = True
                return
            self._route(h, authorized, truncate=failure is not None)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _failure(self, path: str) -> _Failure | None:
        with self.lock:
            for f in self.failures:
                if f.times == 0 or not f.pattern.search(path):
                    continue
                if f.times is not None:
                    f.times -= 1
                return f
        return None

    def _route(self, h: BaseHTTPRequestHandler, authorized: bool, *, truncate: bool) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        if path.startswith("/blobs/"):
            self._blob(h, path[len("/blobs/") :], truncate)
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", url.path)
        if m:
            self._tree(h, unquote(m[1]), unquote(m[2]), unquote(m[3] or ""), query, authorized, truncate)
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", url.path)
        if m:
            self._info(h, unquote(m[1]), unquote(m[2] or "main"), authorized)
            return
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path)
        if m:
            self._resolve(h, unquote(m[1]), unquote(m[2]), unquote(m[3]), authorized)
            return
        self._json(h, 404, {"error": "not found"})

    def _repo(
        self, h: BaseHTTPRequestHandler, repo_id: str, revision: str, authorized: bool, files: bool
    ) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._json(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return None
        if repo.gated and not authorized and (files or repo.gated == "all"):
            message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            self._json(h, 401, {"error": message}, {"X-Error-Code": "GatedRepo"})
            return None
        if revision not in repo.revisions:
            self._json(h, 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
            return None
        return repo

    def _entries(self, repo: Repo, under: str, recursive: bool) -> list[dict]:
        prefix = f"{under.strip('/')}/" if under.strip("/") else ""
        dirs: set[str] = set()
        out: list[dict] = []
        for p in sorted(repo.files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                if recursive or i == 1:
                    dirs.add(prefix + "/".join(parts[:i]))
            if not recursive and len(parts) > 1:
                continue
            f = repo.files[p]
            entry: dict = {"type": "file", "oid": f.oid, "size": f.size, "path": p}
            if p.endswith(".gguf") or f.size >= 1024:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": _POINTER_SIZE}
            out.append(entry)
        for d in sorted(dirs):
            out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
        out.sort(key=lambda e: e["path"])
        return out

    def _tree(
        self, h: BaseHTTPRequestHandler, repo_id: str, revision: str, under: str, query: dict, authorized: bool,
        truncate: bool,
    ) -> None:  # fmt: skip
        repo = self._repo(h, repo_id, revision, authorized, files=False)
        if repo is None:
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries = self._entries(repo, under, recursive)
        cursor = int(query.get("cursor", ["0"])[0])
        page = entries[cursor : cursor + self.page_size]
        headers = {}
        if cursor + self.page_size < len(entries):
            base = f"{self.endpoint}/api/models/{repo_id}/tree/{quote(revision, safe='')}"
            if under:
                base += "/" + quote(under)
            expand = query.get("expand", ["false"])[0]
            nxt = f"{base}?recursive={str(recursive).lower()}&expand={expand}&cursor={cursor + self.page_size}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._json(h, 200, page, headers, truncate=truncate)

    def _info(self, h: BaseHTTPRequestHandler, repo_id: str, revision: str, authorized: bool) -> None:
        repo = self._repo(h, repo_id, revision, authorized, files=False)
        if repo is None:
            return
        siblings = [{"rfilename": p} for p in sorted(repo.files)]
        self._json(h, 200, {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "gated": repo.gated or False,
                            "private": False, "siblings": siblings})  # fmt: skip

    def _resolve(self, h: BaseHTTPRequestHandler, repo_id: str, revision: str, path: str, authorized: bool) -> None:
        repo = self._repo(h, repo_id, revision, authorized, files=True)
        if repo is None:
            return
        f = repo.files.get(path)
        if f is None:
            self._json(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            return
        key = (repo_id, path)
        with self.lock:
            n = self._blob_ids.get(key)
            if n is None:
                n = self._blob_ids[key] = len(self._blobs)
                self._blobs.append(key)
        location = f"/blobs/{n}" if self.cdn_host is None else f"http://{self.cdn_host}:{self.port}/blobs/{n}"
        headers = {
            "Location": location,
            "X-Linked-Size": str(f.size),
            "X-Linked-Etag": f'"{f.sha256}"',
            "X-Repo-Commit": repo.sha,
        }
        self._reply(h, 302, headers)

    def _blob(self, h: BaseHTTPRequestHandler, number: str, truncate: bool) -> None:
        try:
            repo_id, path = self._blobs[int(number)]
            f = self.repos[repo_id].files[path]
        except (ValueError, IndexError, KeyError):
            self._json(h, 404, {"error": "no such blob"})
            return
        span = begin_range_reply(h, f.size, headers={"ETag": f'"{f.sha256}"'})
        if span is None or h.command == "HEAD":
            return
        start, end = span
        length = end - start + 1
        if truncate:
            length //= 2
            h.close_connection = True
        pos = start
        while length > 0:
            piece = f.read(pos, pos + min(_PIECE, length) - 1)
            # counted before it is sent: a client that has its bytes must find them counted (a test asserts on the
            # counter as soon as its read returns, while this thread may not have run on)
            with self.lock:
                self.served[(repo_id, path)] += len(piece)
            try:
                h.wfile.write(piece)
                h.wfile.flush()
            except OSError:  # the client hung up: what it did not get was not served
                with self.lock:
                    self.served[(repo_id, path)] -= len(piece)
                h.close_connection = True
                return
            pos += len(piece)
            length -= len(piece)

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, headers: Mapping[str, str] | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", "0")
        h.end_headers()

    @staticmethod
    def _json(
        h: BaseHTTPRequestHandler, status: int, data: object, headers: Mapping[str, str] | None = None,
        *, truncate: bool = False,
    ) -> None:  # fmt: skip
        body = json.dumps(data).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command == "HEAD":
            return
        if truncate:
            body = body[: len(body) // 2]
            h.close_connection = True
        try:
            h.wfile.write(body)
        except OSError:
            h.close_connection = True


def refused_endpoint() -> str:
    """An http://127.0.0.1:PORT endpoint where nothing listens (connection refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------------------------------------------------------
# Repositories made of corpus files

# a realistic ladder: each label is served from the corpus file of the nearest quant (the name is what counts)
LADDER_24: tuple[str, ...] = (
    "BF16", "F16", "Q8_0", "UD-Q8_K_XL", "Q6_K", "UD-Q6_K_XL", "Q5_K_M", "Q5_K_S", "Q5_0", "UD-Q5_K_XL",
    "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS", "UD-Q4_K_XL", "Q3_K_L", "Q3_K_M", "Q3_K_S",
    "IQ3_XXS", "Q2_K", "UD-Q2_K_XL", "IQ2_M",
)  # fmt: skip
LADDER_12: tuple[str, ...] = (
    "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_XS", "Q3_K_M", "Q2_K", "UD-Q4_K_XL",
)  # fmt: skip
_NEAREST = {
    "BF16": "F16", "F16": "F16", "Q8_0": "Q8_0", "UD-Q8_K_XL": "Q8_0", "Q6_K": "Q6_K", "UD-Q6_K_XL": "Q6_K",
    "Q5_K_M": "Q5_K_M", "Q5_K_S": "Q5_K_M", "Q5_0": "Q5_K_M", "UD-Q5_K_XL": "Q5_K_M", "Q4_K_M": "Q4_K_M",
    "Q4_K_S": "Q4_K_M", "Q4_0": "Q4_0", "Q4_1": "Q4_0", "IQ4_NL": "IQ4_XS", "IQ4_XS": "IQ4_XS",
    "UD-Q4_K_XL": "Q4_K_M", "Q3_K_L": "Q3_K_M", "Q3_K_M": "Q3_K_M", "Q3_K_S": "Q3_K_M", "IQ3_XXS": "Q3_K_M",
    "Q2_K": "Q2_K", "UD-Q2_K_XL": "Q2_K", "IQ2_M": "Q2_K",
}  # fmt: skip


def ladder_files(models: Sequence, labels: Sequence[str], *, family: str = "tiny-llama", stem: str = "Tiny-Llama"
                 ) -> dict[str, ServedFile]:  # fmt: skip
    """`{stem}-{label}.gguf` for each label, served from `family`'s corpus file of the nearest quant.

    Each copy gets a distinct 32-byte suffix after its tensor data, so every file has its own sha256.
    """
    by_quant = {m.quant: Path(m.path) for m in models if m.family_name == family}
    out = {}
    for label in labels:
        source = by_quant[_NEAREST.get(label, label)]
        out[f"{stem}-{label}.gguf"] = ServedFile(source, hashlib.sha256(label.encode()).digest())
    return out


def isolate_hub(monkeypatch, tmp_path: Path) -> None:
    """No token, endpoint or saved login of the developer's leaks into a test; retries wait ~nothing."""
    import huggingface_hub.constants

    from launcher import http

    monkeypatch.setattr(http, "RETRY_WAIT_S", 0.001)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-hf-token"))
