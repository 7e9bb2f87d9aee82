"""Speed: predicted decode and prefill tokens per second of a configuration, from the bytes it puts on each device.

Decode is memory-bound: every weight a token uses is read once, plus the KV cache up to the current depth, and
each token costs a fixed time on top (kernel launches, synchronisation). Per device i (reference/speed.md):

    seconds per token = Σ_i bytes_read_i / (η · bandwidth_i) + t0

with η and t0 per backend, fitted (weighted least squares on the relative error) on the published llama-bench rows
of data/speed.json, never guessed. Bytes read per token: every block weight on the device (MoE routed experts x
used / total), the output layer where it lives, no token embeddings (one row is read), and the KV cache at the
depth (a sliding-window layer reads at most its window).

Prefill is compute-bound: 2 x active parameters FLOPs per token over the device's FLOPS, times a slope, plus a fixed
cost per token (dequantizing, launches), per backend, fitted the same way.

    bytes_per_token(option, depth)          bytes read per decoded token, per device of the estimate (pure)
    predict(option, device_speeds, depth)   Speed(tg_per_s, pp_per_s) (pure)
    machine_speeds(machine)                 DeviceSpeed per plan device name (GPU0.., CPU): a GPU's own figures
                                            (NVML, a profile), then the table by name; the host's bandwidth from a
                                            profile, else measured once (a short multi-threaded copy, cached)
    calibration(machine, backend, version)  the median measured / predicted decode ratio of this machine's record
    parse_bandwidth(text), parse_flops(text)  a profile's "936GB/s", "142TFLOPS"
    measured_speed(reply)                   decode and prefill tokens/s a server reports for one reply (pure)
    fitted(backend)                         a backend's Fit: decode eta and t0, prefill slope and fixed cost
    device_table()                          bandwidth and FLOPS by device name (data/speed.json)
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launcher.chat import ChatReply
    from launcher.hardware.types import HardwareSnapshot
    from launcher.plan import Option

GiB = 1024**3
GB = 1e9


@dataclass(frozen=True)
class DeviceSpeed:
    """What one device offers: memory bandwidth (bytes/s) and dense FP16 FLOPS (None: unknown)."""

    bandwidth_bytes_per_s: float
    flops: float | None = None
    backend: str = "cuda"  # which fitted constants apply: cuda, rocm, metal, vulkan, cpu


@dataclass(frozen=True)
class Speed:
    """Predicted tokens per second: decode (tg) and prefill (pp); None where a figure is unknown."""

    tg_per_s: float | None
    pp_per_s: float | None

    def to_json(self) -> dict[str, float | None]:
        return {
            "tg_per_s": None if self.tg_per_s is None else round(self.tg_per_s, 1),
            "pp_per_s": None if self.pp_per_s is None else round(self.pp_per_s, 1),
        }


@functools.cache
def _data() -> dict[str, Any]:
    text = resources.files("launcher").joinpath("data/speed.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def device_table() -> dict[str, DeviceSpeed]:
    """Bandwidth and FLOPS of known devices by name (data/speed.json): NVIDIA, AMD and Apple by chip and GPU bin."""
    out = {}
    for name, entry in _data()["devices"].items():
        backend = "metal" if name.startswith("Apple") else "rocm" if name.startswith("AMD") else "cuda"
        if entry.get("fp16_tflops") is None and "Intel" in name:
            backend = "cpu"
        flops = entry.get("fp16_tflops")
        out[name] = DeviceSpeed(entry["bandwidth_gbps"] * GB, None if flops is None else flops * 1e12, backend)
    return out


def published_rows() -> list[dict[str, Any]]:
    """The published llama-bench rows the constants are fitted on, each with its bytes read per token."""
    rows = []
    for row in _data()["rows"]:
        read = row["size_gib"] * GiB - row["embd_params"] * row["embd_bytes_per_param"]
        rows.append({**row, "bytes_per_token": read, "active_params": row["params"] - row["embd_params"]})
    return rows


@dataclass(frozen=True)
class Fit:
    """A backend's fitted constants: decode reads at eta x bandwidth with a fixed t0 per token; prefill computes at
    FLOPS / pp_slope with a fixed pp_t0 per token (None: no published prefill row to fit on)."""

    eta: float
    t0_s: float
    pp_slope: float | None
    pp_t0_s: float


@functools.cache
def fitted(backend: str) -> Fit:
    """The constants for `backend`, fitted by weighted least squares on the relative error over its published rows:
    1/tg = bytes / (eta · bandwidth) + t0 and 1/pp = slope · 2 · active params / FLOPS + pp_t0. A backend with fewer
    than two rows of its own takes the slope of every GPU row and fits only its fixed cost on its own rows."""
    table = device_table()
    rows = [r for r in published_rows() if r["device"] in table]

    def fit(points_of: Any, usable: Any) -> tuple[float, float] | None:
        own = [r for r in rows if r["backend"] == backend and usable(r)]
        pool = own if len(own) >= 2 else [r for r in rows if r["backend"] != "cpu" and usable(r)]
        if backend == "cpu" and len(own) < 2:
            pool = own
        if not pool:
            return None
        slope, fixed = _fit_line([points_of(r) for r in pool])
        if own and pool is not own:  # one row of its own: the shared slope, its own fixed cost
            fixed = max(0.0, sum(y - slope * x for x, y in map(points_of, own)) / len(own))
        return slope, fixed

    decode = fit(lambda r: (r["bytes_per_token"] / table[r["device"]].bandwidth_bytes_per_s, 1 / r["tg"]),
                 lambda r: True)  # fmt: skip
    prefill = fit(lambda r: (2 * r["active_params"] / (table[r["device"]].flops or 1), 1 / r["pp"]),
                  lambda r: bool(r.get("pp")) and bool(table[r["device"]].flops))  # fmt: skip
    assert decode is not None, f"no published decode row for {backend}"
    return Fit(1 / decode[0], decode[1], prefill[0] if prefill else None, prefill[1] if prefill else 0.0)


def _fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """y = a·x + b minimising Σ ((a·x + b - y) / y)²: relative error, so a fast row weighs as much as a slow one."""
    sw = sx = sy = sxx = sxy = 0.0
    for x, y in points:
        w = 1 / (y * y)
        sw, sx, sy, sxx, sxy = sw + w, sx + w * x, sy + w * y, sxx + w * x * x, sxy + w * x * y
    det = sw * sxx - sx * sx
    if len(points) < 2 or det <= 0:
        a = sum(y / x for x, y in points) / len(points)
        return a, 0.0
    a = (sw * sxy - sx * sy) / det
    b = (sy - a * sx) / sw
    if b < 0:  # a fixed cost below zero is no cost: fit the slope alone
        a = sxy / sxx
        b = 0.0
    return a, b


def predict_published(row: Mapping[str, Any]) -> Speed:
    """The uncalibrated prediction for one published row (what the accuracy test and bench compare)."""
    device = device_table()[row["device"]]
    fit = fitted(device.backend)
    tg = 1 / (row["bytes_per_token"] / (fit.eta * device.bandwidth_bytes_per_s) + fit.t0_s)
    pp = None
    if fit.pp_slope is not None and device.flops:
        pp = 1 / (fit.pp_slope * 2 * row["active_params"] / device.flops + fit.pp_t0_s)
    return Speed(tg, pp)


def llmfit_published(row: Mapping[str, Any]) -> float:
    """llmfit's formula on a published row (bandwidth / (params x nominal bytes per param) x 0.55): the peer's
    figure printed beside ours, so the gap is measured (reference/speed.md "How others predict")."""
    device = device_table()[row["device"]]
    quant = row["model"].rsplit(" ", 1)[-1]
    nominal = {"Q4_K_M": 0.5, "Q4_0": 0.5, "F16": 2.0}.get(quant, 0.5)
    return device.bandwidth_bytes_per_s / (row["params"] * nominal) * 0.55


# -- a configuration of the plan ----------------------------------------------------------------------------------


def bytes_per_token(option: Option, depth: int) -> dict[str, int]:
    """Bytes read per decoded token on each device of the option's estimate, at `depth` tokens of context. Pure."""
    facts, est = option.facts, option.estimate
    n_layer = facts.n_layer
    share = facts.expert_used_count / facts.expert_count if facts.expert_count else 1.0
    device_of = {i: d.name for d in est.devices for i in d.layers}
    out: dict[str, int] = {d.name: 0 for d in est.devices}
    for layer in facts.layers:
        device = device_of.get(layer.index, "CPU")
        dense = layer.weight_bytes - layer.expert_bytes
        out[device] += dense
        experts_on = "CPU" if option.cpu_moe else device
        out[experts_on] = out.get(experts_on, 0) + round(layer.expert_bytes * share)
    gpus = [d.name for d in est.devices if d.name != "CPU" and d.layers]
    output_device = gpus[-1] if gpus and option.n_gpu_layers > n_layer else "CPU"
    out[output_device] = out.get(output_device, 0) + facts.output_bytes
    for cache in est.kv_caches:
        cells = max(1, cache.cells)
        for il, nbytes in zip(cache.layers, cache.layer_bytes, strict=False):
            per_cell = nbytes / (cells * max(1, cache.n_stream))
            device = device_of.get(il, "CPU")
            out[device] = out.get(device, 0) + round(per_cell * min(depth, cells))
    return out


def active_params(option: Option) -> float:
    """Parameters a token multiplies by (no embeddings; MoE routed experts x used / total), from the weights'
    bytes and the file's bits per weight."""
    facts = option.facts
    if not facts.tensor_bytes_total:
        return 0.0
    per_param = facts.tensor_bytes_total / max(1, facts.n_params)
    share = facts.expert_used_count / facts.expert_count if facts.expert_count else 1.0
    experts = sum(layer.expert_bytes for layer in facts.layers)
    read = facts.tensor_bytes_total - facts.input_bytes - experts * (1 - share)
    return read / per_param


def predict(option: Option, devices: Mapping[str, DeviceSpeed], depth: int = 0) -> Speed:
    """Decode and prefill tokens/s of `option` at `depth`, with `devices` naming each device of its estimate (CPU
    included). A device without figures makes the prediction unknown (None), never a guess."""
    per_device = bytes_per_token(option, depth)
    seconds = 0.0
    t0 = 0.0
    backends = []
    for name, nbytes in per_device.items():
        if not nbytes:
            continue
        device = devices.get(name)
        if device is None:
            return Speed(None, None)
        fit = fitted(device.backend)
        seconds += nbytes / (fit.eta * device.bandwidth_bytes_per_s)
        t0 = max(t0, fit.t0_s)
        backends.append(device)
    tg = 1 / (seconds + t0) if seconds else None
    # prefill on the device that holds most of the weights (llama.cpp runs host weights' matmuls there too)
    main = max(backends, key=lambda d: d.flops or 0.0, default=None)
    pp = None
    if main is not None and main.flops:
        fit = fitted(main.backend)
        params = active_params(option)
        if fit.pp_slope is not None and params:
            pp = 1 / (fit.pp_slope * 2 * params / main.flops + fit.pp_t0_s)
    return Speed(tg, pp)


# -- this machine ---------------------------------------------------------------------------------------------------


def machine_speeds(machine: HardwareSnapshot) -> dict[str, DeviceSpeed]:
    """What each device of `machine` offers, by the plan's device names. A GPU's own figures first (NVML's clocks
    and bus, or a profile's `bandwidth` / `flops`), then its name in the table, each figure on its own; a GPU with
    no bandwidth from either has no speed (unknown, never guessed). The host: a profile's bandwidth, else the
    measured one (not for a described machine: its host is not this one)."""
    table = device_table()
    out: dict[str, DeviceSpeed] = {}
    for device in machine.devices:
        known = table.get(device.name) or next((v for k, v in table.items() if k.lower() in device.name.lower()), None)
        bandwidth = device.memory_bandwidth_bytes_per_s or (known.bandwidth_bytes_per_s if known else None)
        if not bandwidth:
            continue
        flops = device.fp16_flops or (known.flops if known else None)
        backend = known.backend if known else _BACKEND_OF_KIND.get(device.kind, device.kind)
        out[f"GPU{device.index}"] = DeviceSpeed(bandwidth, flops, backend)
    host = machine.host_bandwidth_bytes_per_s
    if host is None and not machine.described:
        host = host_bandwidth_bytes_per_s()
    if host:
        out["CPU"] = DeviceSpeed(host, None, "cpu")
    return out


_BACKEND_OF_KIND = {"cuda": "cuda", "rocm": "rocm", "metal": "metal"}  # a device kind's fitted constants


# -- a device's figures as a person writes them (a profile's `bandwidth` and `flops`) -------------------------------

_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z/]+)\s*$")
_BANDWIDTH_UNITS = {"mb/s": 1e6, "gb/s": 1e9, "tb/s": 1e12, "mib/s": 2.0**20, "gib/s": 2.0**30, "tib/s": 2.0**40}
_FLOPS_UNITS = {"gflops": 1e9, "tflops": 1e12, "pflops": 1e15}
MAX_BANDWIDTH = 1e15  # bytes/s: far above any device (an H200 reads 4.8e12)
MAX_FLOPS = 1e18  # far above any device (a B200 is about 2.3e15 dense FP16)


def parse_bandwidth(text: str) -> float:
    """Bytes per second from '936GB/s', '1.5 TB/s' or '400GiB/s'. Raises ValueError (reads after a field's name)."""
    return _parse_rate(text, _BANDWIDTH_UNITS, MAX_BANDWIDTH, "a bandwidth like 936GB/s or 1.5TB/s")


def parse_flops(text: str) -> float:
    """FLOPS from '142TFLOPS', '989 TFLOPS' or '1.2PFLOPS' (dense FP16). Raises ValueError."""
    return _parse_rate(text, _FLOPS_UNITS, MAX_FLOPS, "FLOPS like 142TFLOPS (dense FP16)")


def _parse_rate(text: str, units: Mapping[str, float], limit: float, like: str) -> float:
    from launcher.units import shown_value

    match = _RATE.match(text) if isinstance(text, str) and len(text) <= 40 else None
    scale = units.get(match.group(2).lower()) if match else None
    if match is None or scale is None:
        raise ValueError(f"must be {like}, got {shown_value(text)}")
    value = float(match.group(1)) * scale
    if not 0 < value <= limit:
        raise ValueError(f"must be more than 0 and at most {limit:.0e} per second, got {shown_value(text)}")
    return value


# -- calibration: what this machine measured ------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """The median measured / predicted decode ratio of `runs` verified runs on one machine, backend and build."""

    factor: float
    runs: int

    def note(self) -> str:
        runs = f"{self.runs} verified run{'s' if self.runs != 1 else ''}"
        return f"calibrated by {runs} on this machine: ×{self.factor:.2f}"


def calibration(machine: HardwareSnapshot, backend: str, version: str | None) -> Calibration | None:
    """The median measured / predicted decode ratio of this machine's record (launcher.record.entries) for one
    backend and build; None when it has no such run. A run flagged slow (probable CPU fallback) is left out: it
    measured a fault, and folding it in would hide the next one."""
    from statistics import median

    from launcher.record import entries

    ratios = []
    for entry in entries(machine):
        if entry.get("backend") != backend or entry.get("version") != version:
            continue
        speed = entry.get("speed")
        if not isinstance(speed, dict) or speed.get("finding"):
            continue
        ratio = speed.get("tg_ratio")
        if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio < 100:
            ratios.append(float(ratio))
    return Calibration(median(ratios), len(ratios)) if ratios else None


COPY_BYTES = 64 * 1024**2  # per thread: well past any CPU cache
COPY_SECONDS = 0.4


def host_bandwidth_bytes_per_s(*, refresh: bool = False) -> float | None:
    """The host's memory bandwidth: a short copy on every core at once (read + write bytes over the time), measured
    once per machine and kept in the user's cache folder (a fact of the machine, like the llama.cpp builds beside
    it: not under FITQUANT_HOME); None when it cannot be measured."""
    import platformdirs

    path = Path(platformdirs.user_cache_dir("fitquant")) / "host-bandwidth.json"
    key = _host_key()
    if not refresh:
        try:
            cached = json.loads(path.read_text())
            if cached.get("host") == key and cached.get("bytes_per_s", 0) > 0:
                return float(cached["bytes_per_s"])
        except (OSError, ValueError, AttributeError):
            pass
    measured = measure_copy_bandwidth()
    if measured:
        from launcher.paths import write_private

        write_private(path, json.dumps({"host": key, "bytes_per_s": measured}))
    return measured


def _host_key() -> str:
    import platform

    import psutil

    return f"{platform.machine()} {platform.processor()} {psutil.cpu_count()} cpus {psutil.virtual_memory().total} B"


def measure_copy_bandwidth(threads: int | None = None, seconds: float = COPY_SECONDS) -> float | None:
    """Bytes per second moved by `threads` copies running at once (numpy releases the GIL while copying)."""
    import threading
    import time

    try:
        import numpy as np
    except ImportError:
        return None
    import os

    count = threads or os.cpu_count() or 1
    pairs = [(np.ones(COPY_BYTES, dtype=np.uint8), np.empty(COPY_BYTES, dtype=np.uint8)) for _ in range(count)]
    moved = [0] * count
    deadline = time.perf_counter() + seconds

    def work(i: int) -> None:
        src, dst = pairs[i]
        while time.perf_counter() < deadline:
            np.copyto(dst, src)
            moved[i] += 2 * COPY_BYTES  # read and written

    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    total: int = 0
    for n in moved:
        total += n
    return total / elapsed if elapsed > 0 and total else None


def measured_speed(reply: ChatReply, *, ollama: bool) -> Speed:
    """Decode and prefill tokens/s as the server measured them for one reply: llama-server's `timings`
    (predicted_per_second, prompt_per_second), Ollama's token counts over its durations (nanoseconds). Pure."""
    timings = reply.timings
    if ollama:
        tg_ns, pp_ns = timings.get("eval_duration"), timings.get("prompt_eval_duration")
        tg = reply.completion_tokens / (tg_ns / 1e9) if reply.completion_tokens and tg_ns else None
        pp = reply.prompt_tokens / (pp_ns / 1e9) if reply.prompt_tokens and pp_ns else None
        return Speed(tg, pp)
    tg, pp = timings.get("predicted_per_second"), timings.get("prompt_per_second")
    return Speed(tg if tg and tg > 0 else None, pp if pp and pp > 0 else None)


# ---------------------------------------------------------------------------------------------------------
# K/V cache types a CUDA build runs flash attention for on the GPU

# A CUDA build compiles FlashAttention vector kernels only for the K-V type pairs of GGML_CUDA_FA_QUANTS (default
# "q4_0-q4_0;q8_0-q8_0;f16-f16;bf16-bf16", f16-f16 always; "all" for every pair of these types). Any other pair is
# converted to f16 on every step ("no FlashAttention vector kernel compiled for K/V types ..., converting K and V to
# f16 instead (slow)"): see ggml/CMakeLists.txt, ggml/cmake/common.cmake ggml_cuda_fattn_vec_instances and
# ggml/src/ggml-cuda/fattn.cu ggml_cuda_flash_attn_ext_vec at llama.cpp 0c1e570. The build prints its set in the
# system info line (`CUDA : ARCHS = ... | FA_QUANTS = q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16 | ...`).
CUDA_FA_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "bf16", "f16")
DEFAULT_CUDA_FA_QUANTS = "q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16"
_KV_BITS = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q5_1": 6.0, "q5_0": 5.5, "q4_1": 5.0, "q4_0": 4.5,
            "iq4_nl": 4.5}  # fmt: skip


def parse_fa_quants(text: str) -> frozenset[tuple[str, str]]:
    """The K-V pairs of a build's FA_QUANTS ("all", or "q8_0-q8_0,f16-f16" / ';'-separated); f16-f16 is always
    compiled. ValueError for a pair of types llama.cpp does not know."""
    value = text.strip().lower()
    if value == "all":
        return frozenset((k, v) for k in CUDA_FA_TYPES for v in CUDA_FA_TYPES)
    pairs = {("f16", "f16")}
    for item in re.split(r"[,;]", value):
        item = item.strip()
        if not item:
            continue
        k, sep, v = item.partition("-")
        if not sep or k not in CUDA_FA_TYPES or v not in CUDA_FA_TYPES:
            raise ValueError(f"not a FlashAttention K-V pair: {item!r} (types: {', '.join(CUDA_FA_TYPES)})")
        pairs.add((k, v))
    return frozenset(pairs)


def nearest_kv_pair(type_k: str, type_v: str, compiled: frozenset[tuple[str, str]]) -> tuple[str, str]:
    """The pair the build runs on the GPU closest to (type_k, type_v): the asked pair when compiled (f32 runs as
    f16); else the smallest compiled pair at least as precise as each of them; else the one that loses the least
    precision."""
    asked = (type_k, type_v)
    as_run = tuple("f16" if t == "f32" else t for t in asked)
    if as_run in compiled:
        return asked

    def key(pair: tuple[str, str]) -> tuple[float, float, bool]:
        loss = sum(max(0.0, _KV_BITS.get(a, 16.0) - _KV_BITS.get(p, 16.0)) for a, p in zip(asked, pair, strict=True))
        size = sum(_KV_BITS.get(p, 16.0) for p in pair)
        return (loss, size, pair != ("f16", "f16"))  # ties: f16 over bf16 (every GPU runs it)

    return min(compiled, key=key)
