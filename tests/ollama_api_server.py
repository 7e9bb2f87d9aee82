"""A real HTTP server on 127.0.0.1 that behaves like an Ollama v0.33 server (reference/backends.md §1-§3), for
backend tests. Each behaviour names the Ollama function it mirrors (ollama/ollama fb30760).

Shapes follow server/routes.go: JSON bodies, NDJSON streams with chunked transfer encoding, errors as
`{"error": "..."}` with the request's own status (400 a bad request, 404 an unknown model, 500 a failed load), and
an `{"error": ...}` line (an error event on /v1) once a stream has started.

- `GET|HEAD /` "Ollama is running"; `GET /api/version`; `GET /api/tags`; `GET /api/ps`.
- `POST /api/pull`: "pulling manifest", "pulling <digest[7:19]>" lines with digest/total/completed (completed
  absent on the first line of a layer), "verifying sha256 digest", "writing manifest", "success"; an unknown model
  gets `{"error":"pull model manifest: file does not exist"}` after "pulling manifest".
- `HEAD /api/blobs/sha256:<hex>` 200 / 404; `POST` the same path stores the body after checking its sha256 (201;
  400 "digest mismatch, expected ..., got ..." otherwise; 200 when already present).
- `POST /api/create` (create.go CreateHandler) with `files` (uploaded blob digests; a split set's
  `-NNNNN-of-MMMMM.gguf` shards make one model) or `from` (an existing model: its layers reused, no blob copied),
  and `parameters` over the base's: "parsing GGUF", layer lines, "writing manifest", "success", a new digest.
- Scheduling (routes.go scheduleRunner, modelOptions; sched.go getRunner, needsReload): a request's runner options
  are api.DefaultOptions (num_ctx OLLAMA_CONTEXT_LENGTH else the VRAM tier `default_context`, num_batch 512,
  num_gpu -1) overlaid by the model's parameters, then the request's; an automatic batch is 1024 above a 4096
  total context, 2048 above 32768; any difference from the loaded runner reloads it (automatic on both sides and
  a negative num_gpu do not count); every request resets the expiry to its keep_alive or OLLAMA_KEEP_ALIVE (5m).
  `/v1/chat/completions` sends no runner options and no keep_alive.
- Loading (llm/llama_server.go startLlamaServer, WaitUntilRunning, MemorySize): an emulated llama-server on one
  CUDA device of `gpu_free_bytes`, sized from the model's GGUF (weights per layer, KV cache of the server's
  OLLAMA_KV_CACHE_TYPE for context x OLLAMA_NUM_PARALLEL, compute at the batch). It logs the `starting llama-server`
  line and llama.cpp's load lines; an explicit num_gpu that does not fit fails with 500 and llama-server's
  out-of-memory text (no partial fallback), an automatic one puts fewer layers on the GPU; a quantized cache without
  flash attention fails the load (no fallback to f16); a projector layer is always loaded (--mmproj). /api/ps
  `size` is every buffer, or the GPU's alone at a full offload (== size_vram); `size_vram` 0 at num_gpu 0.
- `POST /api/generate`: no prompt loads (`done_reason` "load"), no prompt with `keep_alive` 0 unloads ("unload"),
  a prompt answers (NDJSON unless `"stream": false`). `keep_alive` is parsed as Go's api.Duration is: a number of
  seconds (negative: forever) or a Go duration string ("-1" without a unit is a 400, as in Ollama).
- `POST /api/chat` (empty `messages` loads) and the OpenAI-compatible `POST /v1/chat/completions` (JSON or SSE).

Scenario knobs (attributes, set before the request): `env` (the server's OLLAMA_* variables; program mode: its
own environment), `default_context`, `gpu_free_bytes`, `load_size` (bytes, or a function (name, options) -> bytes:
replaces the emulated size) with `size_vram` (bytes) or `vram_fraction`, `max_context` (the context is clamped to
it), `load_error` / `load_errors[name]` (a 500 with that text on load, for the model and those derived from it),
`load_hangup` (the connection closed without an answer), `load_delay_s`, `chat_error` ((status, text): a chat
request refused, as Ollama's 400 for a model without chat), `stream_error` (an error after the first streamed
piece), `unload_delay_s` (unload is an expiry: the model stays in /api/ps that long), `pull_chunks`, `pull_error`
(an error line after the first progress line). Records: `requests` (method, path, JSON body or None), `loads`
(every (re)load with its resolved options), `creates`, `log_lines` (what `ollama serve` logged).

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
_PRIVATE = ("options", "ctx_auto", "batch_auto", "keep_alive_s")  # the stub's own bookkeeping, not in /api/ps
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


def keep_alive_json(text: str) -> Any:
    """OLLAMA_KEEP_ALIVE as envconfig.KeepAlive reads it: a Go duration, else a number of seconds."""
    try:
        return float(text)
    except ValueError:
        return text


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


_SPLIT_RE = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


def _first_shard(files: dict[str, str]) -> str:
    """The digest of the file whose header describes the model: shard 1 of a split set (create.go splitGGUFName)."""
    for fname, digest in files.items():
        m = _SPLIT_RE.match(fname)
        if m and int(m[2]) == 1:
            return digest
    return next(iter(files.values()))


# llama.cpp's KV cache types (common/arg.cpp kv_cache_types) and their bytes per element (ggml type traits)
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                 "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}  # fmt: skip


def gguf_facts(path: Path) -> dict[str, Any] | None:
    """What the stub's llama-server needs from a model's GGUF: dimensions and every tensor's bytes."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
    except Exception:  # not a GGUF the reader takes
        return None

    def value(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return default
        part = f.parts[f.data[0]]
        return bytes(part).decode() if f.types and f.types[0] == gguf.GGUFValueType.STRING else part.tolist()[0]

    arch = value("general.architecture", "llama")
    tensors = {t.name: int(t.n_bytes) for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    n_embd = int(value(f"{arch}.embedding_length", 0))
    n_head = int(value(f"{arch}.attention.head_count", 1))
    head_kv = value(f"{arch}.attention.head_count_kv", n_head)
    return {
        "arch": arch,
        "n_layer": int(value(f"{arch}.block_count", 0)),
        "n_embd": n_embd,
        "n_head_kv": int(head_kv),
        "k_len": int(value(f"{arch}.attention.key_length", n_embd // max(1, n_head))),
        "v_len": int(value(f"{arch}.attention.value_length", n_embd // max(1, n_head))),
        "n_ff": int(value(f"{arch}.feed_forward_length", 4 * n_embd)),
        "n_vocab": int(embd.shape[-1]) if embd is not None else 32000,
        "n_ctx_train": int(value(f"{arch}.context_length", 0)) or None,
        "tensors": tensors,
        "kv_count": len(reader.fields),
    }


def _mib(nbytes: float) -> str:
    return f"{nbytes / MiB:8.2f}"


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
        self.default_context = 4096  # the VRAM tier (routes.go Serve): 4096 below 23 GiB of VRAM
        self.env: dict[str, str] = {}  # the server's OLLAMA_* environment (program mode: its own)
        self.gpu_free_bytes = 8 * 1024**3  # the one emulated CUDA device's free memory
        self.log_lines: list[str] = []  # what `ollama serve` logged (program mode: also on stderr)
        self.log_stream: Any = None
        self.creates: list[str] = []  # every model written by /api/create, in order
        self.loads: list[tuple[str, dict[str, Any]]] = []  # every (re)load: name, resolved runner options
        self.load_error: str | None = None
        self.load_errors: dict[str, str] = {}  # per model (normalized name)
        self.load_hangup = False  # close the connection without an answer, as a server that dies mid-load
        self.load_delay_s = 0.0
        self.unload_delay_s = 0.0
        self.pull_chunks = 4
        self.pull_error: str | None = None
        self.stream_error: str | None = None  # an error line once a generate/chat stream has started
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

    # Ollama's api.Runner options: a loaded runner is reused only while these stay the same (sched.go needsReload)
    RUNNER_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "draft_num_predict")

    def server_default_context(self) -> int:
        """api.DefaultOptions().NumCtx: OLLAMA_CONTEXT_LENGTH, else the VRAM tier (routes.go Serve)."""
        return int(self.env.get("OLLAMA_CONTEXT_LENGTH") or 0) or self.default_context

    def _keep_alive_default(self) -> float:
        """envconfig.KeepAlive: OLLAMA_KEEP_ALIVE (Go duration or seconds), else 5m."""
        try:
            value = parse_keep_alive(keep_alive_json(self.env.get("OLLAMA_KEEP_ALIVE") or "5m"))
        except KeepAliveError:
            value = 300.0
        return 300.0 if value is None else value

    def resolve_options(self, name: str, request: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
        """The runner options of a request, with whether num_ctx and num_batch were automatic: api.DefaultOptions
        overlaid by the model's parameters, then by the request's options (routes.go modelOptions,
        usesAutomaticNumCtx, usesAutomaticNumBatch); the context clamped to the training one (sched.go
        effectiveContext); an automatic batch chosen from the context (sched.go generationBatchForContext)."""
        model = self.models[name]
        params = model["parameters"]
        ctx_auto = "num_ctx" not in request and "num_ctx" not in params and not self.env.get("OLLAMA_CONTEXT_LENGTH")
        batch_auto = "num_batch" not in request and "num_batch" not in params
        # draft_num_predict: 4 by default, 0 for a model without a draft (the stub's models have none)
        opts: dict[str, Any] = {"num_ctx": self.server_default_context(), "num_batch": 512, "num_gpu": -1,
                                "draft_num_predict": 0}  # fmt: skip
        opts.update({k: v for k, v in params.items() if k in self.RUNNER_OPTIONS})
        opts.update({k: v for k, v in request.items() if k in self.RUNNER_OPTIONS})
        opts["num_ctx"] = int(opts["num_ctx"])
        if self.max_context is not None:
            opts["num_ctx"] = min(opts["num_ctx"], self.max_context)
        if batch_auto:
            total = opts["num_ctx"] * self.num_parallel
            opts["num_batch"] = 2048 if total > 32768 else 1024 if total > 4096 else 512
        return opts, ctx_auto, batch_auto

    @property
    def num_parallel(self) -> int:
        return max(1, int(self.env.get("OLLAMA_NUM_PARALLEL") or 1))

    @staticmethod
    def needs_reload(loaded: dict[str, Any], opts: dict[str, Any], ctx_auto: bool, batch_auto: bool) -> bool:
        """sched.go runnerRef.needsReload: an automatic context or batch on both sides keeps the loaded one; a
        negative num_gpu does not care; any other difference in the runner options reloads."""
        existing, new = dict(loaded["options"]), dict(opts)
        if loaded["ctx_auto"] and ctx_auto:
            new["num_ctx"] = existing["num_ctx"]
        if loaded["batch_auto"] and batch_auto:
            new["num_batch"] = existing["num_batch"]
        if int(new.get("num_gpu", -1)) < 0:
            existing["num_gpu"] = new["num_gpu"] = -1
        return existing != new

    def schedule(self, name: str, request: dict[str, Any], keep: float | None) -> str | None:
        """Serve a request for `name` (server.go scheduleRunner, sched.go getRunner): reuse the loaded runner unless
        its options differ, else (re)load it; every request resets the expiry to its keep_alive or the server's
        default (OLLAMA_KEEP_ALIVE). Returns the error text of a failed load."""
        opts, ctx_auto, batch_auto = self.resolve_options(name, request)
        seconds = self._keep_alive_default() if keep is None else keep
        expires = go_time(datetime.now().astimezone() + timedelta(seconds=min(seconds, FOREVER_S)))
        with self.lock:
            loaded = self.loaded.get(name)
            if loaded is not None and not self.needs_reload(loaded, opts, ctx_auto, batch_auto):
                loaded["expires_at"] = expires
                loaded["keep_alive_s"] = seconds
                return None
        return self._load(name, opts, ctx_auto, batch_auto, seconds, expires)

    def _load(
        self, name: str, opts: dict[str, Any], ctx_auto: bool, batch_auto: bool, seconds: float, expires: str
    ) -> str | None:
        """Load `name` with the resolved runner options (a llama-server child, emulated); the error text on failure."""
        if self.load_delay_s:
            time.sleep(self.load_delay_s)
        with self.lock:
            self.loads.append((name, dict(opts)))
            self.loaded.pop(name, None)  # a reload replaces the runner, a failed one leaves none
        # a load error of a model is one of the models derived from it too (same blobs)
        error = self.load_errors.get(name) or self.load_errors.get(self.models[name].get("from", "")) or self.load_error
        if error:
            return error
        error, size, vram = self.llama_server(name, opts)
        if error:
            return error
        with self.lock:
            model = self.models[name]
            if self.load_size is not None:  # a scenario's own figures
                size = self.load_size(name, opts) if callable(self.load_size) else self.load_size
                vram = round(size * self.vram_fraction)
            if self.size_vram is not None:
                vram = self.size_vram
            self.loaded[name] = {
                "name": name,
                "model": name,
                "size": int(size),
                "digest": model["digest"].removeprefix("sha256:"),
                "details": model["details"],
                "expires_at": expires,
                "size_vram": int(vram),
                "context_length": opts["num_ctx"],
                "options": dict(opts),
                "ctx_auto": ctx_auto,
                "batch_auto": batch_auto,
                "keep_alive_s": seconds,
            }
        return None

    def _broken(self, pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A stream cut by `stream_error` after its first piece: the status is already 200, so the error is a line
        of its own (routes.go streamResponse writes `{"error": ...}` and stops)."""
        if not self.stream_error:
            return pieces
        return [pieces[0], {"error": self.stream_error}]

    def _log(self, *lines: str) -> None:
        with self.lock:
            self.log_lines.extend(lines)
        if self.log_stream is not None:
            self.log_stream.write("".join(f"{line}\n" for line in lines))
            self.log_stream.flush()

    def _slog(self, msg: str, source: str, **attrs: Any) -> str:
        """A line as Ollama's slog text handler writes it (values with spaces quoted)."""
        stamp = utc_now()
        extra = "".join(f" {k}={json.dumps(str(v)) if ' ' in str(v) or not str(v) else v}" for k, v in attrs.items())
        return f'time={stamp} level=INFO source={source} msg="{msg}"{extra}'

    def llama_server(self, name: str, opts: dict[str, Any]) -> tuple[str | None, int, int]:
        """The llama-server Ollama starts for `name` (llm/llama_server.go startLlamaServer's flags), emulated on one
        CUDA device of `gpu_free_bytes`: logs the launch line and llama.cpp's load lines (the formats of the real
        llama-server's output, figures from the model's GGUF), and returns (error, size, size_vram) as Ollama's
        WaitUntilRunning and MemorySize give them."""
        model = self.models[name]
        first = _first_shard(model["files"]) if model["files"] else None
        blob = self.blob_path(first) if first else None
        facts = gguf_facts(blob) if blob is not None and blob.exists() else None
        n_par = self.num_parallel
        n_ctx = opts["num_ctx"] * n_par
        kv_type = (self.env.get("OLLAMA_KV_CACHE_TYPE") or "").strip().lower()
        fa_env = (self.env.get("OLLAMA_FLASH_ATTENTION") or "").strip().lower()
        # llm/llama_server.go LlamaServerFlashAttention: set -> on/off, unset -> auto
        fa = "on" if fa_env in ("1", "true", "on") else "off" if fa_env in ("0", "false", "off") else "auto"
        batch = int(opts["num_batch"])
        num_gpu = int(opts.get("num_gpu", -1))
        argv = ["/usr/local/lib/ollama/llama-server", "--model", str(blob or f"/stub/{name}"), "--port",
                str(self.port + 1), "--host", "127.0.0.1", "--no-webui", "--offline", "-c", str(n_ctx), "-np",
                str(n_par), "--log-verbosity", "4", "--no-log-prefix", "--no-log-timestamps"]  # fmt: skip
        if kv_type:
            argv += ["--cache-type-k", kv_type, "--cache-type-v", kv_type]
        argv += ["--flash-attn", fa, "-b", str(batch), "-ub", str(batch)]
        if num_gpu >= 0:  # -1 (the default): no -ngl, llama.cpp's fit decides
            argv += ["-ngl", str(num_gpu)]
        # appendMMProjArgs: a projector layer is always loaded (Ollama tells one by its GGUF; the stub by its name)
        projector = next((d for f, d in model["files"].items() if f.lower().startswith("mmproj")), None)
        projector_bytes = self.blobs.get(projector, 0) if projector else 0
        if projector:
            argv[3:3] = ["--mmproj", str(self.blob_path(projector))]
        self._log(self._slog("starting llama-server", "llama_server.go:433", cmd=" ".join(argv)))
        if facts is None:  # nothing to load for real: Ollama's MemorySize falls back to the file size
            size = int(model["size"])
            self._log(self._slog("llama-server started in 0.01 seconds", "llama_server.go:1363"))
            return None, size, size
        if kv_type and kv_type not in KV_TYPE_BYTES:
            # common/arg.cpp refuses the type; no fallback to f16 (Ollama passes OLLAMA_KV_CACHE_TYPE as it is)
            line = f"error: invalid argument: Unsupported cache type: {kv_type}"
            self._log(line)
            return f"llama-server process has terminated: exit status 1: {line}", 0, 0
        if kv_type not in ("", "f16", "f32", "bf16") and fa == "off":
            line = "llama_init_from_model: V cache quantization requires flash_attn"
            self._log(line)
            return f"llama-server process has terminated: exit status 1: {line}", 0, 0
        n_layer = facts["n_layer"]
        t = facts["tensors"]
        per_layer = [sum(b for k, b in t.items() if k.startswith(f"blk.{i}.")) for i in range(n_layer)]
        embd = t.get("token_embd.weight", 0)
        output = t.get("output.weight", embd) + t.get("output_norm.weight", 0)  # tied: a copy of the embeddings
        bpe = KV_TYPE_BYTES[kv_type or "f16"]
        cells = -(-n_ctx // 256) * 256  # llama_kv_cache pads its size to 256
        kv_layer = cells * facts["n_head_kv"] * (facts["k_len"] + facts["v_len"]) * bpe

        def device_bytes(ngl: int) -> tuple[int, int, int, int]:
            """GPU model, GPU KV, CPU model, CPU KV with `ngl` layers offloaded (the last ones first, then the output
            layer: llama_model::load_tensors)."""
            rep = min(ngl, n_layer)
            gpu_model = sum(per_layer[n_layer - rep :]) + (output if ngl > n_layer else 0)
            cpu_model = embd + sum(per_layer[: n_layer - rep]) + (0 if ngl > n_layer else output)
            return gpu_model, round(kv_layer * rep), cpu_model, round(kv_layer * (n_layer - rep))

        # The compute graph at the batch (llama_context::sched_reserve), roughly: the logits (n_vocab x ubatch f32),
        # the KQ mask over every KV cell (f16, llm_graph_input_attn_kv::set_input) and the FFN activations on the
        # device; the graph's inputs (mask, token embeddings) in the host buffer.
        mask = cells * batch * 2
        compute_gpu = batch * 4 * (facts["n_vocab"] + 3 * facts["n_ff"]) + mask
        ngl = n_layer + 1 if num_gpu < 0 else min(num_gpu, n_layer + 1)
        if num_gpu < 0:  # --fit: as many layers as the free memory takes
            while ngl > 0 and sum(device_bytes(ngl)[:2]) + compute_gpu > self.gpu_free_bytes:
                ngl -= 1
        gpu_model, gpu_kv, cpu_model, cpu_kv = device_bytes(ngl)
        gpu_compute = compute_gpu if ngl > 0 else 0
        host_compute = mask + batch * facts["n_embd"] * 4 * (1 if ngl > n_layer else 4)
        output_buf = facts["n_vocab"] * 4 * n_par
        self._log(
            f"llama_model_load_from_file_impl: using device CUDA0 (NVIDIA GeForce RTX 4060) (0000:01:00.0) - "
            f"{self.gpu_free_bytes // MiB} MiB free",
            f"llama_model_loader: loaded meta data with {facts['kv_count']} key-value pairs and {len(t)} tensors "
            f"from {blob} (version GGUF V3 (latest))",
        )
        vram = gpu_model + gpu_kv + gpu_compute + projector_bytes
        if vram > self.gpu_free_bytes:  # an explicit num_gpu is loaded as asked: no partial fallback
            lines = [
                f"ggml_backend_cuda_buffer_type_alloc_buffer: allocating {gpu_model / MiB:.2f} MiB on device 0: "
                "cudaMalloc failed: out of memory",
                f"alloc_tensor_range: failed to allocate CUDA0 buffer of size {gpu_model}",
                "llama_model_load: error loading model: unable to allocate CUDA0 buffer",
                "llama_model_load_from_file_impl: failed to load model",
            ]
            self._log(*lines)
            # what llm/status.go statusErrorLine keeps of those lines
            captured = "\n".join(
                ["cudaMalloc failed: out of memory", lines[1], "error loading model: unable to allocate CUDA0 buffer"]
            )
            return f"llama-server process has terminated: exit status 1: {captured}", 0, 0
        rep = min(ngl, n_layer)
        lines = ["load_tensors: loading model tensors, this can take a while... (mmap = true)"]
        if ngl > n_layer:
            lines.append("load_tensors: offloading output layer to GPU")
        lines += [
            f"load_tensors: offloading {rep} repeating layers to GPU",
            f"load_tensors: offloaded {ngl}/{n_layer + 1} layers to GPU",
            f"load_tensors:   CPU_Mapped model buffer size = {_mib(cpu_model)} MiB",
        ]
        if gpu_model:
            lines.append(f"load_tensors:        CUDA0 model buffer size = {_mib(gpu_model)} MiB")
        lines += [
            "llama_context: constructing llama_context",
            f"llama_context: n_seq_max     = {n_par}",
            f"llama_context: n_ctx         = {n_ctx}",
            f"llama_context: n_ctx_seq     = {n_ctx // n_par}",
            f"llama_context: n_batch       = {batch}",
            f"llama_context: n_ubatch      = {batch}",
            f"llama_context: flash_attn    = {'disabled' if fa == 'off' else 'enabled'}",
            f"llama_context:  CUDA_Host  output buffer size = {_mib(output_buf)} MiB",
        ]
        if gpu_kv:
            lines.append(f"llama_kv_cache:      CUDA0 KV buffer size = {_mib(gpu_kv)} MiB")
        if cpu_kv:
            lines.append(f"llama_kv_cache:        CPU KV buffer size = {_mib(cpu_kv)} MiB")
        kt = kv_type or "f16"
        half = (gpu_kv + cpu_kv) / 2
        lines += [
            f"llama_kv_cache: size = {_mib(gpu_kv + cpu_kv)} MiB ({cells:6d} cells, {n_layer:3d} layers, "
            f"{n_par:2d}/{n_par} seqs), K ({kt}): {_mib(half)} MiB, V ({kt}): {_mib(half)} MiB",
        ]
        if gpu_compute:
            lines.append(f"sched_reserve:      CUDA0 compute buffer size = {_mib(gpu_compute)} MiB")
        lines.append(f"sched_reserve:  CUDA_Host compute buffer size = {_mib(host_compute)} MiB")
        if projector:
            lines += ["clip_ctx: CLIP using CUDA0 backend", f"load_hparams: model size: {_mib(projector_bytes)} MiB"]
        lines.append("srv  llama_server: model loaded")
        self._log(*lines)
        self._log(self._slog("llama-server started in 0.01 seconds", "llama_server.go:1363"))
        # llm/llama_server.go MemorySize: every parsed buffer; all layers on the GPU -> the GPU's alone
        total = vram + cpu_model + cpu_kv + host_compute + output_buf
        return None, (vram if ngl > n_layer else total), vram

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
                        models = [{k: v for k, v in e.items() if k not in _PRIVATE} for e in server.loaded.values()]
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
                """create.go CreateHandler: `files` (uploaded blobs, split GGUFs merged into one model layer) or
                `from` (an existing model: its layers reused, no blob copied), `parameters` over the base's."""
                raw_name = str(body.get("model") or body.get("name") or "")
                if not valid_name(raw_name):
                    return self._error(400, "invalid model name")
                files: dict[str, str] = body.get("files") or {}
                source = str(body.get("from") or "")
                if not files and not source:
                    return self._error(400, "neither 'from' or 'files' was specified")
                for fname, digest in files.items():
                    if fname.startswith("/") or ".." in fname.split("/"):
                        return self._error(400, "file path must be relative")
                    if not digest:
                        return self._error(400, "invalid digest format")
                name = normalize(raw_name)
                base: dict[str, Any] | None = None
                if source and not files:
                    with server.lock:
                        base = server.models.get(normalize(source))
                    if base is None:  # create.go: the base must exist locally (a registry name would be pulled)
                        return self._error(404, f"model '{source}' not found")
                parameters = {**(base["parameters"] if base else {}), **dict(body.get("parameters") or {})}

                def lines() -> Iterator[dict[str, Any]]:
                    layers = dict(files) if base is None else dict(base["files"])
                    if base is None:
                        yield {"status": "parsing GGUF"}
                    for digest in dict.fromkeys(layers.values()):
                        if digest not in server.blobs and base is None:
                            path = server.blob_path(digest)
                            yield {"error": f"open {path}: no such file or directory"}
                            return
                        yield {"status": f"using existing layer {digest}"}
                    if parameters:
                        params = "sha256:" + hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()
                        yield {"status": f"creating new layer {params}"}
                    yield {"status": "writing manifest"}
                    model_files = [d for f, d in layers.items() if not f.lower().startswith("mmproj")]
                    first = _first_shard(layers) if layers else None
                    manifest = json.dumps({"files": layers, "parameters": parameters}, sort_keys=True).encode()
                    details = base["details"] if base else _details(server.blob_path(first) if first else None)
                    with server.lock:
                        server.models[name] = {
                            "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
                            "size": base["size"] if base else sum(server.blobs.get(d, 0) for d in model_files),
                            "details": details,
                            "parameters": parameters,
                            "files": layers,
                            "modified_at": utc_now(),
                            **({"from": normalize(source)} if base is not None else {}),
                        }
                        server.creates.append(name)
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
                if not given:  # routes.go GenerateHandler / ChatHandler: a bad request is the caller's (400)
                    self._error(400, "model is required")
                    return None
                if not isinstance(body.get("options", {}), dict):
                    self._error(400, "json: cannot unmarshal options into Go struct field of type map[string]any")
                    return None
                name = normalize(given)
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
                error = server.schedule(name, dict(body.get("options") or {}), keep)
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
                self._stream(json.dumps(p) + "\n" for p in server._broken(pieces))

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
                error = server.schedule(name, dict(body.get("options") or {}), keep)
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
                self._stream(json.dumps(p) + "\n" for p in server._broken(pieces))

            def _openai_chat(self, body: dict[str, Any]) -> None:
                given = str(body.get("model") or "")
                name = normalize(given) if given else ""
                if name not in server.models:
                    return self._json(404, {"error": {"message": f'model "{given}" not found, try pulling it first',
                                                      "type": "api_error", "param": None, "code": None}})  # fmt: skip
                # the OpenAI middleware sends no runner options and no keep_alive (openai.go fromChatRequest)
                error = server.schedule(name, {}, None)
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
                    for i, piece in enumerate(answer):
                        if i == 1 and server.stream_error:  # openai.go ChatWriter: an error event, then the end
                            error = {"error": {"message": server.stream_error, "type": "api_error", "param": None,
                                               "code": None}}  # fmt: skip
                            yield f"data: {json.dumps(error)}\n\n"
                            return
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
    stub.env = {k: v for k, v in os.environ.items() if k.startswith("OLLAMA_")}
    stub.log_stream = sys.stderr  # the log file fitquant gave `ollama serve`
    print(f"Listening on 127.0.0.1:{stub.port} (version {stub.version})", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        stub.httpd.serve_forever(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
