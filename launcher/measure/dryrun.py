"""llama.cpp as a measuring instrument: a memory-only "dry run" of loading a GGUF with given settings.

This is what llama.cpp's own `--fit` does (memory-model.md §6): load the model with `no_alloc = true` and
`load_mode = LLAMA_LOAD_MODE_NONE` (metadata only, no tensor data read, no weights allocated), create a context
with the settings, and read back what llama.cpp *would* allocate. A file whose data region is missing or
all-zero (a sparse copy holding only the real header) measures the same as the real file.

Where the numbers come from (llama-cpp-python 0.3.36, vendored llama.cpp):

- **compute** and **output** buffers: the log lines. `sched_reserve` prints the reserved compute size even
  under no_alloc (`llama-context.cpp` `sched_reserve`, `backend_buf_exp_size`); the output buffer is really
  allocated (`output_reserve`).
- **RS** (recurrent state): the log line; `llama_memory_recurrent` ignores no_alloc and really allocates.
- **model** and **KV**: under no_alloc llama.cpp gives them dummy size-0 buffers and prints `0.00 MiB`
  (`llama-model.cpp` `load_tensors`, `llama-kv-cache.cpp` constructor). Their real sizes are in
  `llama_get_memory_breakdown(ctx)` (`src/llama-ext.h`, what `common/fit.cpp` reads), which sizes each
  buffer with `ggml_backend_alloc_ctx_tensors_from_buft_size`. It is exported from libllama but returns a
  C++ `std::map`; the worker calls it through ctypes (the map is returned in memory, as any large struct, and
  walked as libstdc++ lays it out; checked against the logged compute sizes and skipped if anything is off).
  Breakdown `context` = KV + RS, so KV = context − RS. Without the breakdown (other platforms), KV falls back
  to the KV cache `size = ...` lines (exact up to the printed 2 decimals) and model buffers to
  `llama_model_size` (exact when all weights sit in one host buffer, i.e. CPU-only without extra buffer types).
- `llama_model_size` and `llama_model_n_params`: exact.

A failed load can abort the process (GGML_ASSERT), so measurements run in a worker subprocess
(`python -m launcher.measure.dryrun`, JSON jobs on stdin, one JSON result per line on stdout). The parent restarts a
worker that dies, records an `EngineError` for the job that killed it, and carries on with the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import llamalog
from launcher.errors import EngineError
from launcher.estimate import Settings
from launcher.llamalog import KVCacheLine as KVCacheFigure
from launcher.llamalog import RSCacheLine as RSCacheFigure

__all__ = [
    "BufferFigure",
    "EngineMeasurement",
    "EngineSettings",
    "KVCacheFigure",
    "RSCacheFigure",
    "engine_available",
    "measure",
    "measure_many",
]

MiB = 1024 * 1024

# cache types accepted by llama.cpp's -ctk/-ctv whitelist (common/arg.cpp) -> ggml_type
CACHE_TYPES: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "bf16": 30,
    "q8_0": 8,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "iq4_nl": 20,
}
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type
LOAD_MODE_NONE = 0  # LLAMA_LOAD_MODE_NONE


@dataclass(frozen=True)
class EngineSettings:
    """One context configuration to measure."""

    n_ctx: int
    n_gpu_layers: int = 0  # -1 = all
    type_k: str = "f16"  # f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 iq4_nl
    type_v: str = "f16"
    flash_attn: str = "auto"  # "on" | "off" | "auto"
    n_parallel: int = 1  # n_seq_max
    kv_unified: bool = False
    swa_full: bool = False
    n_batch: int = 2048
    n_ubatch: int = 512
    offload_kqv: bool = True
    n_outputs_max: int = 0  # 0 = n_batch (llama_context_params' default); llama-server: one per slot
    # extra weight buffer types (CPU_REPACK, AMX) depend on the host CPU; off so figures are host-independent
    use_extra_bufts: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineSettings:
        """The dry-run settings that run an estimate's `settings` on llama.cpp (the fields both name alike)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls) if hasattr(settings, f.name)})

    def validate(self) -> None:
        """Raise EngineError for a setting llama.cpp would not accept at all."""
        if self.n_ctx < 0:
            raise EngineError(f"n_ctx must be >= 0 (0 = the model's training context), got {self.n_ctx}")
        for which, t in (("type_k", self.type_k), ("type_v", self.type_v)):
            if t not in CACHE_TYPES:
                raise EngineError(f"{which} {t!r} is not a KV cache type llama.cpp accepts ({', '.join(CACHE_TYPES)})")
        if self.flash_attn not in FLASH_ATTN:
            raise EngineError(f"flash_attn must be 'on', 'off' or 'auto', got {self.flash_attn!r}")
        if self.n_parallel < 1:
            raise EngineError(f"n_parallel must be >= 1, got {self.n_parallel}")
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise EngineError(f"n_batch and n_ubatch must be >= 1, got {self.n_batch}/{self.n_ubatch}")


@dataclass(frozen=True)
class BufferFigure:
    """One buffer llama.cpp allocates (or would allocate)."""

    name: str  # buffer (type) name as llama.cpp prints it: "CPU", "CPU_Mapped", "CUDA0", "CUDA_Host", ...
    kind: str  # "model" | "KV" | "RS" | "compute" | "output"
    mib: float  # MiB, 2 decimals as llama.cpp prints them
    nbytes: int | None = None  # exact bytes where known (memory breakdown); None when only the log line exists
    source: str = "log"  # "log" | "breakdown" | "kv-lines" | "model-size"

    @property
    def device(self) -> str | None:
        return llamalog.gpu_device(self.name)


@dataclass
class EngineMeasurement:
    """What llama.cpp reports for one model at one setting."""

    settings: EngineSettings
    buffers: list[BufferFigure]
    n_ctx: int | None
    n_ctx_seq: int | None
    flash_attn: bool | None
    kv_caches: list[KVCacheFigure]
    rs_caches: list[RSCacheFigure]
    model_size_bytes: int  # llama_model_size (exact)
    n_params: int  # llama_model_n_params
    offloaded_layers: tuple[int, int] | None
    log: str
    path: str = ""
    kv_unified: bool | None = None
    n_seq_max: int | None = None
    exact: bool = False  # model/KV from llama.cpp's memory breakdown (True) or from fallbacks (False)

    def total_mib(self, kind: str) -> float:
        """Total MiB of one buffer kind over all buffers (exact bytes summed when all are known)."""
        llamalog._check_kind(kind)
        bufs = [b for b in self.buffers if b.kind == kind]
        if bufs and all(b.nbytes is not None for b in bufs):
            return round(sum(b.nbytes for b in bufs) / MiB, 2)  # type: ignore[misc]
        return round(sum(b.mib for b in bufs), 2)

    def total_bytes(self, kind: str) -> int | None:
        """Exact total bytes of one kind, or None if a buffer of that kind is only known from a log line."""
        llamalog._check_kind(kind)
        bufs = [b for b in self.buffers if b.kind == kind]
        if any(b.nbytes is None for b in bufs):
            return None
        return sum(b.nbytes for b in bufs)  # type: ignore[misc]

    def buffer(self, name: str, kind: str) -> BufferFigure | None:
        for b in self.buffers:
            if b.name == name and b.kind == kind:
                return b
        return None

    @property
    def kv_mib(self) -> float:
        """KV size from the per-cache `size =` lines (sum over caches)."""
        return round(sum(c.total_mib for c in self.kv_caches), 2)


def engine_available() -> bool:
    """Whether llama-cpp-python is installed (cheap: does not import it)."""
    try:
        return importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):
        return False


# ==============================================================================================================
# parent side


def measure(
    model_path: str | os.PathLike[str],
    settings: Sequence[EngineSettings] | EngineSettings,
    *,
    timeout_s: float = 120,
) -> list[EngineMeasurement | EngineError]:
    """Measure one model at each setting; one result (measurement or EngineError) per setting, in order."""
    if isinstance(settings, EngineSettings):
        settings = [settings]
    return measure_many([(model_path, s) for s in settings], timeout_s=timeout_s)


def measure_many(
    jobs: Sequence[tuple[str | os.PathLike[str], EngineSettings]],
    *,
    timeout_s: float = 120,
) -> list[EngineMeasurement | EngineError]:
    """Measure many (model, settings) pairs with one worker process; one result per job, in order.

    `timeout_s` bounds each single job. A job that crashes or hangs the worker gets an EngineError and the
    worker is restarted for the remaining jobs.
    """
    results: list[EngineMeasurement | EngineError | None] = [None] * len(jobs)
    todo: list[int] = []
    for i, (path, s) in enumerate(jobs):
        try:
            s.validate()
        except EngineError as exc:
            results[i] = exc
            continue
        if not os.path.isfile(path):
            results[i] = EngineError(f"{path}: no such model file")
            continue
        todo.append(i)
    if todo and not engine_available():
        err = EngineError("llama-cpp-python is not installed (pip install 'fitquant[llamacpp]')")
        for i in todo:
            results[i] = err
        todo = []
    while todo:
        done, failed_at, why = _run_worker([(str(jobs[i][0]), jobs[i][1]) for i in todo], timeout_s)
        for k, rec in enumerate(done):
            i = todo[k]
            results[i] = _from_record(rec, jobs[i][1], str(jobs[i][0]))
        if failed_at is None:
            todo = todo[len(done) :]
            if todo:  # the worker ended early without saying why; should not happen
                for i in todo:
                    results[i] = EngineError(f"llama.cpp worker stopped before measuring {jobs[i][0]}: {why}")
                todo = []
            continue
        if why.startswith(_PYTHON_FAILURE):  # the worker itself cannot run: every remaining job fails alike
            err = EngineError(f"the llama.cpp worker failed to start: {why[len(_PYTHON_FAILURE) :]}")
            for i in todo[failed_at:]:
                results[i] = err
            break
        i = todo[failed_at]
        path, s = jobs[i]
        results[i] = EngineError(f"llama.cpp crashed while measuring {path} with {_describe(s)}: {why}")
        todo = todo[failed_at + 1 :]
    return [r if r is not None else EngineError("not measured") for r in results]


def _describe(s: EngineSettings) -> str:
    return (
        f"n_ctx={s.n_ctx} ngl={s.n_gpu_layers} K={s.type_k} V={s.type_v} fa={s.flash_attn} "
        f"np={s.n_parallel}{' unified' if s.kv_unified else ''}{' swa_full' if s.swa_full else ''}"
    )


PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder holding the launcher package


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE_PARENT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("GGML_NO_BACKTRACE", "1")  # an abort would otherwise run gdb to print a backtrace
    return env


def _run_worker(
    jobs: list[tuple[str, EngineSettings]], timeout_s: float
) -> tuple[list[dict[str, Any]], int | None, str]:
    """Run one worker over `jobs`. Returns (records received, index of the job that killed it or None, why)."""
    payload = json.dumps({"jobs": [{"path": p, "settings": dataclasses.asdict(s)} for p, s in jobs]})
    with tempfile.TemporaryFile(mode="w+b") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher.measure.dryrun"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err_file,
            env=worker_env(),
            cwd=PACKAGE_PARENT,  # `-m` puts the working folder first on sys.path: make it this package's
            start_new_session=True,
        )
        lines: queue.Queue[bytes | None] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                lines.put(raw)
            lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            assert proc.stdin is not None
            proc.stdin.write(payload.encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        records: list[dict[str, Any]] = []
        failed: int | None = None
        why = ""
        try:
            while len(records) < len(jobs):
                try:
                    raw = lines.get(timeout=timeout_s)
                except queue.Empty:
                    failed, why = len(records), f"timed out after {timeout_s:g} s"
                    _kill(proc)
                    break
                if raw is None:  # EOF: the worker died
                    failed = len(records)
                    break
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(rec, dict) and "ok" in rec:
                    records.append(rec)
        except BaseException:
            # Ctrl-C or any error here: the worker runs in its own session, so end it ourselves.
            _kill(proc)
            raise
        _stop(proc)
        reader.join(timeout=5)
        if failed is not None and not why:
            err_file.seek(0)
            code = proc.returncode
            sig = ""
            if code is not None and code < 0:
                with contextlib.suppress(ValueError):
                    sig = f" ({signal.Signals(-code).name})"
            stderr = err_file.read().decode("utf-8", "replace")
            if not records and "Traceback (most recent call last)" in stderr:
                last = [ln.strip() for ln in stderr.splitlines() if ln.strip()][-1]
                why = _PYTHON_FAILURE + last
            else:
                why = f"worker exited with code {code}{sig}"
                reason = _crash_reason(stderr)
                if reason:
                    why += ": " + reason
    return records, failed, why


_PYTHON_FAILURE = "python: "
_CRASH_HINTS = ("GGML_ASSERT", "GGML_ABORT", "error", "Error", "failed", "terminate called", "what():")


def _crash_reason(stderr: str) -> str:
    """The lines of a dead worker's stderr that say why: assertion/error lines, else the last few lines."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("WARNING: ")]
    hits = [ln for ln in lines if any(h in ln for h in _CRASH_HINTS)]
    picked = list(dict.fromkeys(hits))[-4:] if hits else lines[-4:]
    return " | ".join(ln[:400] for ln in picked)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill the worker (its own session/process group) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill(proc)
    if proc.stdout is not None:
        with contextlib.suppress(OSError):
            proc.stdout.close()


def _from_record(rec: dict[str, Any], settings: EngineSettings, path: str) -> EngineMeasurement | EngineError:
    if not rec.get("ok"):
        return EngineError(rec.get("error") or f"llama.cpp could not measure {path}")
    m = rec["measurement"]
    return EngineMeasurement(
        settings=settings,
        buffers=[BufferFigure(**b) for b in m["buffers"]],
        n_ctx=m["n_ctx"],
        n_ctx_seq=m["n_ctx_seq"],
        flash_attn=m["flash_attn"],
        kv_caches=[KVCacheFigure(**c) for c in m["kv_caches"]],
        rs_caches=[RSCacheFigure(**c) for c in m["rs_caches"]],
        model_size_bytes=m["model_size_bytes"],
        n_params=m["n_params"],
        offloaded_layers=tuple(m["offloaded_layers"]) if m["offloaded_layers"] else None,  # type: ignore[arg-type]
        log=m["log"],
        path=path,
        kv_unified=m["kv_unified"],
        n_seq_max=m["n_seq_max"],
        exact=m["exact"],
    )


# ==============================================================================================================
# worker side (runs in the subprocess; imports llama_cpp)


class _Worker:
    def __init__(self) -> None:
        import ctypes

        import llama_cpp

        self.ctypes = ctypes
        self.L = llama_cpp
        self.sink: list[tuple[int, str]] = []
        # keep a reference: llama.cpp calls it for the whole life of the process
        self._cb = llama_cpp.llama_log_callback(self._on_log)
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        self.model: Any = None
        self.model_key: tuple[Any, ...] | None = None
        self.model_log = ""
        self.breakdown_fn = _breakdown_fn(llama_cpp, ctypes)

    def _on_log(self, level: int, text: bytes, user_data: Any) -> None:
        try:
            line = text.decode("utf-8", "replace")
            self.sink.append((int(level), line))
            if level == 4:  # ERROR: also to stderr, where the parent finds it if llama.cpp aborts next
                sys.stderr.write(line)
        except Exception:  # never let an exception cross the C boundary
            pass

    def _take_log(self) -> tuple[str, list[str]]:
        text = "".join(t for _, t in self.sink)
        errors = [t.strip() for lvl, t in self.sink if lvl == 4 and t.strip()]  # GGML_LOG_LEVEL_ERROR
        self.sink = []
        return text, errors

    def _free_model(self) -> None:
        if self.model is not None:
            self.L.llama_model_free(self.model)
        self.model, self.model_key, self.model_log = None, None, ""

    def run(self, path: str, s: dict[str, Any]) -> dict[str, Any]:
        L = self.L
        key = (path, s["n_gpu_layers"], s["use_extra_bufts"])
        if key != self.model_key:
            self._free_model()
            self._take_log()
            mp = L.llama_model_default_params()
            mp.n_gpu_layers = int(s["n_gpu_layers"])
            mp.no_alloc = True
            mp.load_mode = LOAD_MODE_NONE
            mp.use_extra_bufts = bool(s["use_extra_bufts"])
            mp.check_tensors = False
            model = L.llama_model_load_from_file(path.encode(), mp)
            text, errors = self._take_log()
            if not model:
                why = _first_reason(errors, text) or "unknown error"
                return {"ok": False, "error": f"llama.cpp could not load {path}: {why}"}
            self.model, self.model_key, self.model_log = model, key, text

        cp = L.llama_context_default_params()
        cp.n_ctx = int(s["n_ctx"])
        cp.n_batch = int(s["n_batch"])
        cp.n_ubatch = int(s["n_ubatch"])
        cp.n_seq_max = int(s["n_parallel"])
        cp.n_outputs_max = int(s.get("n_outputs_max", 0))
        cp.type_k = CACHE_TYPES[s["type_k"]]
        cp.type_v = CACHE_TYPES[s["type_v"]]
        cp.flash_attn_type = FLASH_ATTN[s["flash_attn"]]
        cp.kv_unified = bool(s["kv_unified"])
        cp.swa_full = bool(s["swa_full"])
        cp.offload_kqv = bool(s["offload_kqv"])
        cp.n_threads = 1
        cp.n_threads_batch = 1
        cp.no_perf = True
        ctx = L.llama_init_from_model(self.model, cp)
        ctx_text, errors = self._take_log()
        log_text = self.model_log + ctx_text
        if not ctx:
            why = _first_reason(errors, ctx_text) or "unknown error"
            return {"ok": False, "error": f"llama.cpp refused the context for {path} ({why})", "log": log_text}
        try:
            breakdown = _read_breakdown(self.breakdown_fn, ctx, self.ctypes)
            extra_text, _ = self._take_log()
            rec = _assemble(
                log_text + extra_text,
                breakdown,
                model_size=int(L.llama_model_size(self.model)),
                n_params=int(L.llama_model_n_params(self.model)),
            )
        finally:
            L.llama_free(ctx)
            self._take_log()
        return {"ok": True, "measurement": rec}

    def close(self) -> None:
        self._free_model()


def _first_reason(errors: list[str], text: str) -> str:
    """The most telling error line: llama.cpp's own ERROR lines, else the log's last error-looking line."""
    useful = [e for e in errors if "failed to load model" not in e and "failed to initialize the context" not in e]
    pick = useful or errors
    if pick:
        return "; ".join(dict.fromkeys(_strip_func(e) for e in pick))
    parsed = llamalog.parse(text)
    return _strip_func(parsed.errors[-1]) if parsed.errors else ""


def _strip_func(line: str) -> str:
    head, sep, tail = line.partition(": ")
    return tail.strip() if sep and head.isidentifier() else line.strip()


# -------- llama_get_memory_breakdown through ctypes (libstdc++ std::map layout)


def _breakdown_fn(L: Any, ctypes: Any) -> Any:
    """The exported C++ `llama_get_memory_breakdown(const llama_context *)`, typed for ctypes; or None."""
    if os.environ.get("FITQUANT_ENGINE_NO_BREAKDOWN") or not sys.platform.startswith("linux"):
        return None
    try:
        lib = L.llama_cpp._lib
        fn = lib["_Z26llama_get_memory_breakdownPK13llama_context"]
        base = ctypes.CDLL(os.path.join(os.path.dirname(lib._name), "libggml-base.so"))
        name_fn = base.ggml_backend_buft_name
    except (AttributeError, OSError, KeyError):
        return None
    name_fn.restype = ctypes.c_char_p
    name_fn.argtypes = [ctypes.c_void_p]

    class _Header(ctypes.Structure):  # std::_Rb_tree_impl: comparator (padded), header node, node count
        _fields_ = (
            ("cmp", ctypes.c_size_t),
            ("color", ctypes.c_int),
            ("root", ctypes.c_void_p),
            ("leftmost", ctypes.c_void_p),
            ("rightmost", ctypes.c_void_p),
            ("count", ctypes.c_size_t),
        )

    class _Node(ctypes.Structure):  # _Rb_tree_node<pair<buft const, llama_memory_breakdown_data>>
        _fields_ = (
            ("color", ctypes.c_int),
            ("parent", ctypes.c_void_p),
            ("left", ctypes.c_void_p),
            ("right", ctypes.c_void_p),
            ("buft", ctypes.c_void_p),
            ("model", ctypes.c_size_t),
            ("context", ctypes.c_size_t),
            ("compute", ctypes.c_size_t),
        )

    fn.restype = _Header  # > 16 bytes: returned through a hidden pointer, as the C++ ABI does for std::map
    fn.argtypes = [ctypes.c_void_p]
    return (fn, name_fn, _Node)


def _read_breakdown(handle: Any, ctx: Any, ctypes: Any) -> list[tuple[str, int, int, int]] | None:
    """[(buffer type name, model, context, compute bytes)] or None. The returned map's nodes are leaked."""
    if handle is None:
        return None
    fn, name_fn, node_t = handle
    try:
        hdr = fn(ctx)
        count = int(hdr.count)
        if count > 64:
            return None
        out: list[tuple[str, int, int, int]] = []
        stack: list[int] = []
        p = hdr.root
        while stack or p:  # in-order walk from the root; leaves have null children
            while p:
                stack.append(p)
                p = node_t.from_address(p).left
                if len(stack) > 64:
                    return None
            p = stack.pop()
            node = node_t.from_address(p)
            name = name_fn(node.buft)
            if not name:
                return None
            out.append((name.decode("ascii", "replace"), int(node.model), int(node.context), int(node.compute)))
            p = node.right
            if len(out) > count:
                return None
        return out if len(out) == count else None
    except (ValueError, OSError):
        return None


Breakdown = list[tuple[str, int, int, int]]  # (buffer type name, model, context, compute) bytes
_Add = Callable[[str, str, int | None, float | None, str], None]


def _consistent(breakdown: Breakdown | None, lines: list[llamalog.BufferLine]) -> Breakdown | None:
    """The breakdown, when its compute sizes match the printed compute lines (else it was misread: None)."""
    if breakdown is None:
        return None
    printed = {b.name: b.mib for b in lines if b.kind == "compute"}
    read = {n: c for n, _, _, c in breakdown if c > MiB // 100}
    if any(name in read and abs(read[name] / MiB - mib) > 0.011 for name, mib in printed.items()):
        return None
    return breakdown


def _model_and_kv_from_breakdown(breakdown: Breakdown, rs_by_name: dict[str, float], add: _Add) -> None:
    for name, model, _ctx, _comp in breakdown:
        if model:
            add(name, "model", model, None, "breakdown")
    for name, _model, context, _comp in breakdown:
        if name not in rs_by_name:
            if context:
                add(name, "KV", context, None, "breakdown")
            continue
        # hybrid/recurrent: context = KV + RS, and RS is only known to the printed 2 decimals
        kv = context - round(rs_by_name[name] * MiB)
        if kv > 0.006 * MiB:
            add(name, "KV", None, round(kv / MiB, 2), "breakdown")


def _model_and_kv_from_log(parsed: llamalog.LlamaLog, model_size: int, add: _Add) -> None:
    lines = parsed.buffers
    model_lines = [b for b in lines if b.kind == "model"]
    if any(b.mib > 0 for b in model_lines):
        for b in model_lines:
            add(b.name, "model", None, b.mib, "log")
    else:
        # no_alloc prints 0.00; llama_model_size is the sum of all weight tensors
        name = model_lines[-1].name if model_lines else "CPU"
        add(name, "model", model_size, None, "model-size")
    kv_lines = [b for b in lines if b.kind == "KV"]
    if any(b.mib > 0 for b in kv_lines):
        for b in kv_lines:
            add(b.name, "KV", None, b.mib, "log")
    elif parsed.kv_caches:
        name = kv_lines[-1].name if kv_lines else "CPU"
        add(name, "KV", None, parsed.kv_mib, "kv-lines")


def _assemble(log_text: str, breakdown: Breakdown | None, *, model_size: int, n_params: int) -> dict[str, Any]:
    parsed = llamalog.parse(log_text)
    lines = parsed.buffers
    breakdown = _consistent(breakdown, lines)
    buffers: list[dict[str, Any]] = []

    def add(name: str, kind: str, nbytes: int | None, mib: float | None, source: str) -> None:
        if mib is None:
            mib = round((nbytes or 0) / MiB, 2)
        buffers.append({"name": name, "kind": kind, "mib": round(mib, 2), "nbytes": nbytes, "source": source})

    if breakdown is not None:
        _model_and_kv_from_breakdown(breakdown, {b.name: b.mib for b in lines if b.kind == "RS"}, add)
    else:
        _model_and_kv_from_log(parsed, model_size, add)
    for b in lines:
        if b.kind == "RS":
            add(b.name, "RS", None, b.mib, "log")
    if breakdown is not None:
        for name, _model, _ctx, comp in breakdown:
            if comp:
                add(name, "compute", comp, None, "breakdown")
    else:
        for b in lines:
            if b.kind == "compute":
                add(b.name, "compute", None, b.mib, "log")
    for b in lines:
        if b.kind == "output":
            add(b.name, "output", None, b.mib, "log")

    return {
        "buffers": buffers,
        "n_ctx": parsed.n_ctx,
        "n_ctx_seq": parsed.n_ctx_seq,
        "n_seq_max": parsed.n_seq_max,
        "flash_attn": parsed.flash_attn,
        "kv_unified": parsed.kv_unified,
        "kv_caches": [dataclasses.asdict(c) for c in parsed.kv_caches],
        "rs_caches": [dataclasses.asdict(c) for c in parsed.rs_caches],
        "model_size_bytes": model_size,
        "n_params": n_params,
        "offloaded_layers": list(parsed.offloaded_layers) if parsed.offloaded_layers else None,
        "log": log_text,
        "exact": breakdown is not None,
    }


def _worker_main() -> int:
    # keep stdout for results only: anything C code prints to fd 1 goes to stderr instead
    out_fd = os.dup(1)
    os.dup2(2, 1)
    out = os.fdopen(out_fd, "w", buffering=1, encoding="utf-8")
    try:
        jobs = json.loads(sys.stdin.read() or "{}").get("jobs", [])
    except ValueError as exc:
        print(json.dumps({"ok": False, "error": f"bad job list: {exc}"}), file=out, flush=True)
        return 2
    worker = _Worker()
    for job in jobs:
        try:
            rec = worker.run(job["path"], job["settings"])
        except Exception as exc:  # a Python-side failure is a result, not a crash
            rec = {"ok": False, "error": f"measuring {job.get('path')} failed: {type(exc).__name__}: {exc}"}
        rec.pop("log", None)
        out.write(json.dumps(rec) + "\n")
        out.flush()
    worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
