"""Estimate: the bytes a llama.cpp configuration takes on each device. Pure.

Mirrors the build of llama.cpp that llama-cpp-python 0.3.36 vendors (paths below are in
ggml-org/llama.cpp). Weights, KV cache and recurrent state follow llama.cpp's own arithmetic and
match it exactly; the compute buffer is what `sched_reserve` reserves for the worst-case
prompt-processing graph, found by rebuilding that graph and replaying ggml-alloc on it
(launcher/compute), byte for byte on the CPU backend (see scripts/bench_estimate.py). On GPU
backends the compute figure is labelled an estimate until measured there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from launcher.compute import BUFFER_ALIGNMENT, GraphShape, compute_buffers
from launcher.defaults import DEFAULT_CONTEXT, DEFAULT_KV_TYPE
from launcher.errors import EstimateError
from launcher.model import ModelFacts

MiB = 1024**2

# KV cache types llama.cpp accepts (common/arg.cpp kv_cache_types): ggml block size and bytes per block.
KV_CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "iq4_nl": (32, 18),
}
_FLOAT_CACHE_TYPES = ("f32", "f16", "bf16")

# Runtime memory outside llama.cpp's buffers, per GPU: the CUDA/HIP context and cuBLAS/hipBLAS handles
# (memory-model.md §5: 250 MiB VRAM, gguf-parser-go's --platform-footprint default). Growth beyond what
# llama.cpp reserves (pool fragmentation, FA scratch: 254 MiB measured by llama.cpp's fit-params README)
# is what the per-device reserve (1 GiB by default, like llama.cpp's --fit-target) is for.
RUNTIME_OVERHEAD_BYTES = {"cpu": 0, "rpc": 0, "cuda": 256 * MiB, "rocm": 256 * MiB, "metal": 128 * MiB}


def default_flash_attn(type_v: str) -> str:
    """Flash attention on for a quantized V cache (llama.cpp requires it), else llama.cpp's own "auto"."""
    return "auto" if type_v in _FLOAT_CACHE_TYPES else "on"


def default_kv_unified(n_parallel: int) -> bool:
    """One KV buffer shared by all slots when there are several: llama-server's default."""
    return n_parallel > 1


def default_settings(facts: ModelFacts, *, has_gpu: bool = False, **given: Any) -> Settings:
    """Settings for `facts` with fitquant's defaults for whatever `given` leaves out (or gives as None):
    the model's training context, every layer on the GPU when there is one, a q8_0 KV cache, flash
    attention by default_flash_attn and a unified KV cache by default_kv_unified."""
    values = {name: value for name, value in given.items() if value is not None}
    values.setdefault("n_ctx", facts.n_ctx_train or DEFAULT_CONTEXT)
    values.setdefault("n_gpu_layers", -1 if has_gpu else 0)
    values.setdefault("type_k", DEFAULT_KV_TYPE)
    values.setdefault("type_v", DEFAULT_KV_TYPE)
    values.setdefault("flash_attn", default_flash_attn(values["type_v"]))
    values.setdefault("kv_unified", default_kv_unified(values.get("n_parallel", 1)))
    return Settings(**values)


def _pad(value: int, multiple: int) -> int:
    """GGML_PAD."""
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class Settings:
    """One llama.cpp configuration, named as llama_context_params names it."""

    n_ctx: int
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "auto"  # "on" | "off" | "auto"
    n_gpu_layers: int = 0  # -1: all (n_layer + 1, the output layer included)
    n_parallel: int = 1  # n_seq_max
    kv_unified: bool = False
    swa_full: bool = False
    n_batch: int = 2048
    n_ubatch: int = 512
    n_rs_seq: int = 0  # recurrent-state snapshots per sequence
    cpu_moe: bool = False  # MoE expert tensors stay on the CPU (--cpu-moe / -ot exps=CPU)
    # Logits rows a ubatch may produce (llama_context_params.n_outputs_max; 0 = n_batch, the library's default).
    # llama-server asks for one per slot (tools/server server_output_limits), which shrinks the output graph.
    n_outputs_max: int = 0
    # Host weights the CPU backend repacks into a CPU_REPACK buffer besides the mapped file (llama.cpp's extra
    # buffer types, on by default): (ggml type name, row multiple) pairs this host's CPU repacks (cpu_repack_rules)
    cpu_repack: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        for name in ("type_k", "type_v"):
            value = getattr(self, name)
            if value not in KV_CACHE_TYPES:
                allowed = ", ".join(KV_CACHE_TYPES)
                raise EstimateError(f"unsupported KV cache type {value!r} for {name}; use one of {allowed}")
        if self.flash_attn not in ("on", "off", "auto"):
            raise EstimateError(f"flash_attn must be on, off or auto, got {self.flash_attn!r}")
        if self.n_ctx <= 0:
            raise EstimateError(f"context must be positive, got {self.n_ctx}")
        if self.n_parallel < 1:
            raise EstimateError(f"n_parallel must be at least 1, got {self.n_parallel}")
        if self.n_ubatch < 1 or self.n_batch < 1:
            raise EstimateError("n_batch and n_ubatch must be at least 1")
        if self.n_outputs_max < 0:
            raise EstimateError(f"n_outputs_max must be 0 (= n_batch) or more, got {self.n_outputs_max}")


@dataclass(frozen=True)
class GPU:
    """A GPU the estimate places layers on: a name and its share of the layer split (free memory)."""

    name: str
    split_weight: float = 1.0
    backend: str = "cuda"


@dataclass
class DeviceEstimate:
    """Bytes one device will hold, by component."""

    name: str
    backend: str
    weights_bytes: int = 0
    kv_bytes: int = 0
    recurrent_bytes: int = 0
    compute_bytes: int = 0
    output_bytes: int = 0
    overhead_bytes: int = 0
    layers: list[int] = field(default_factory=list)
    repack_bytes: int = 0  # of weights_bytes: host weights copied into a CPU_REPACK buffer (Settings.cpu_repack)

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.kv_bytes
            + self.recurrent_bytes
            + self.compute_bytes
            + self.output_bytes
            + self.overhead_bytes
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "layers": len(self.layers),
            "weights_bytes": self.weights_bytes,
            "kv_bytes": self.kv_bytes,
            "recurrent_bytes": self.recurrent_bytes,
            "compute_bytes": self.compute_bytes,
            "output_bytes": self.output_bytes,
            "overhead_bytes": self.overhead_bytes,
            "total_bytes": self.total_bytes,
        }


@dataclass(frozen=True)
class KVCache:
    """One KV cache as llama.cpp builds it (the iSWA pair is two of these)."""

    kind: str  # "non-SWA" | "SWA" | "full"
    cells: int  # per stream
    n_stream: int
    layers: tuple[int, ...]
    k_bytes: int
    v_bytes: int
    layer_bytes: tuple[int, ...] = ()  # K + V of each layer in `layers`, to place them on their devices

    @property
    def total_bytes(self) -> int:
        return self.k_bytes + self.v_bytes


@dataclass
class MemoryEstimate:
    """The bytes a configuration needs, per device and per component."""

    model: str
    architecture: str
    settings: Settings
    n_ctx: int  # as llama.cpp will set it (padded to 256, a multiple of n_parallel streams)
    n_ctx_seq: int
    flash_attn: bool
    n_gpu_layers: int  # resolved: layers offloaded, output layer included
    devices: list[DeviceEstimate]
    kv_caches: list[KVCache]
    approximate: bool
    notes: list[str]
    compute_source: str  # how the compute figure was found, and whether it was checked on that backend

    def _sum(self, name: str) -> int:
        return sum(getattr(device, name) for device in self.devices)

    @property
    def weights_bytes(self) -> int:
        return self._sum("weights_bytes")

    @property
    def kv_bytes(self) -> int:
        return self._sum("kv_bytes")

    @property
    def recurrent_bytes(self) -> int:
        return self._sum("recurrent_bytes")

    @property
    def compute_bytes(self) -> int:
        return self._sum("compute_bytes")

    @property
    def output_bytes(self) -> int:
        return self._sum("output_bytes")

    @property
    def overhead_bytes(self) -> int:
        return self._sum("overhead_bytes")

    @property
    def total_bytes(self) -> int:
        return self._sum("total_bytes")

    def device(self, name: str) -> DeviceEstimate | None:
        return next((d for d in self.devices if d.name == name), None)

    def to_json(self) -> dict[str, Any]:
        """The `fitquant estimate --json` document (schema_version 1, sizes in bytes)."""
        s = self.settings
        return {
            "schema_version": 1,
            "model": self.model,
            "architecture": self.architecture,
            "n_ctx": self.n_ctx,
            "n_ctx_seq": self.n_ctx_seq,
            "n_parallel": s.n_parallel,
            "kv_unified": s.kv_unified,
            "cache_type_k": s.type_k,
            "cache_type_v": s.type_v,
            "flash_attn": self.flash_attn,
            "swa_full": s.swa_full,
            "n_ubatch": s.n_ubatch,
            "n_gpu_layers": self.n_gpu_layers,
            "approximate": self.approximate,
            "compute_source": self.compute_source,
            "notes": list(self.notes),
            "kv_caches": [
                {
                    "kind": c.kind,
                    "cells": c.cells,
                    "streams": c.n_stream,
                    "layers": len(c.layers),
                    "k_bytes": c.k_bytes,
                    "v_bytes": c.v_bytes,
                }
                for c in self.kv_caches
            ],
            "devices": [device.to_json() for device in self.devices],
            "weights_bytes": self.weights_bytes,
            "kv_bytes": self.kv_bytes,
            "recurrent_bytes": self.recurrent_bytes,
            "compute_bytes": self.compute_bytes,
            "output_bytes": self.output_bytes,
            "overhead_bytes": self.overhead_bytes,
            "total_bytes": self.total_bytes,
        }


def cache_row_bytes(cache_type: str, n_elements: int) -> int:
    """ggml_row_size: bytes of one row of n_elements in a cache type (must fill whole blocks)."""
    block, block_bytes = KV_CACHE_TYPES[cache_type]
    if n_elements % block:
        raise EstimateError(
            f"KV cache type {cache_type} needs rows that are a multiple of {block} elements, "
            f"this model has {n_elements}; use f16"
        )
    return n_elements // block * block_bytes


def resolve_flash_attn(facts: ModelFacts, settings: Settings) -> bool:
    """llama_init_from_model's flash-attention rules (src/llama-context.cpp)."""
    quantized_v = settings.type_v not in _FLOAT_CACHE_TYPES
    if facts.architecture == "grok":
        if quantized_v:
            raise EstimateError("grok runs without flash attention, so its V cache cannot be quantized")
        return False
    if settings.flash_attn == "off":
        if quantized_v:
            raise EstimateError(
                f"a quantized V cache ({settings.type_v}) requires flash attention; use --flash-attn on "
                "or an f16 V cache"
            )
        return False
    # "auto" resolves to on wherever the backend runs flash attention (CPU, CUDA, Metal, Vulkan all do).
    return True


def _check_types(facts: ModelFacts, settings: Settings, flash_attn: bool) -> None:
    if facts.is_mla and settings.type_k != settings.type_v:
        raise EstimateError("MLA models (deepseek2 and kin) need the same K and V cache type")
    if flash_attn and settings.type_k not in _FLOAT_CACHE_TYPES:
        head = facts.head_dim_k
        if head % 32:
            raise EstimateError(f"quantized K cache with flash attention needs a head size divisible by 32, not {head}")


def swa_cache_cells(n_ctx_seq: int, window: int, n_ubatch: int) -> int:
    """Cells of a sliding-window layer's cache (src/llama-kv-cache-iswa.cpp): its window (times the sequences it
    holds) plus a micro-batch, padded to 256, at most the context's."""
    return _pad(min(n_ctx_seq, window + n_ubatch), 256)


def kv_caches(facts: ModelFacts, settings: Settings, *, flash_attn: bool) -> tuple[list[KVCache], int, int]:
    """The KV caches llama.cpp creates, and (n_ctx, n_ctx_seq) as llama_context sets them.

    src/llama-context.cpp: n_ctx = GGML_PAD(n_ctx, 256); per-sequence streams when not unified.
    src/llama-kv-cache-iswa.cpp: SWA cells = GGML_PAD(min(size, n_swa*(unified ? n_seq : 1) + n_ubatch), 256).
    src/llama-kv-cache.cpp: K [n_embd_k_gqa, cells, n_stream]; V likewise (padded to the largest layer
    when transposed, i.e. without flash attention); MLA keeps no V.
    """
    np_ = settings.n_parallel
    n_ctx = _pad(settings.n_ctx, 256)
    if settings.kv_unified:
        n_ctx_seq = n_ctx
        n_stream = 1
    else:
        n_ctx_seq = _pad(n_ctx // np_, 256)
        n_ctx = n_ctx_seq * np_
        n_stream = np_
    if not facts.has_memory:
        return [], n_ctx, n_ctx_seq
    n_batch = min(n_ctx, settings.n_batch)
    n_ubatch = min(n_batch, settings.n_ubatch)
    kv_layers = [layer for layer in facts.layers if layer.has_kv]
    if not kv_layers:
        return [], n_ctx, n_ctx_seq
    v_trans = not flash_attn
    v_width_max = facts.n_embd_v_gqa_max

    def build(kind: str, layers: list, cells: int) -> KVCache:
        k_bytes = v_bytes = 0
        per_layer = []
        for layer in layers:
            k = cache_row_bytes(settings.type_k, layer.n_embd_k_gqa) * cells * n_stream
            v = 0
            if not facts.is_mla:
                width = v_width_max if v_trans else layer.n_embd_v_gqa
                v = cache_row_bytes(settings.type_v, width) * cells * n_stream
            k_bytes, v_bytes = k_bytes + k, v_bytes + v
            per_layer.append(k + v)
        indices = tuple(layer.index for layer in layers)
        return KVCache(kind, cells, n_stream, indices, k_bytes, v_bytes, tuple(per_layer))

    if facts.swa_type == "none":
        return [build("full", kv_layers, n_ctx_seq)], n_ctx, n_ctx_seq
    size_swa = n_ctx_seq
    if not settings.swa_full:
        size_swa = swa_cache_cells(n_ctx_seq, facts.sliding_window * (np_ if settings.kv_unified else 1), n_ubatch)
    caches = [
        build("non-SWA", [layer for layer in kv_layers if not layer.swa], n_ctx_seq),
        build("SWA", [layer for layer in kv_layers if layer.swa], size_swa),
    ]
    return caches, n_ctx, n_ctx_seq


def recurrent_state_bytes_per_layer(facts: ModelFacts, settings: Settings) -> int:
    """src/llama-memory-recurrent.cpp: F32 rows of n_embd_r + n_embd_s; max(1, n_seq) x (1 + n_rs_seq)."""
    rows = max(1, settings.n_parallel) * (1 + settings.n_rs_seq)
    return (facts.n_embd_r + facts.n_embd_s) * 4 * rows


def _layer_devices(facts: ModelFacts, n_gpu_layers: int, gpus: list[GPU]) -> list[str]:
    """Device of each layer 0..n_layer (the last is the output layer): src/llama-model.cpp load_tensors.

    i_gpu_start = max(n_layer + 1 - ngl, 0); GPU layers split by cumulative share of free memory.
    """
    n_layer = facts.n_layer
    if not gpus:
        return ["CPU"] * (n_layer + 1)
    total = sum(g.split_weight for g in gpus) or 1.0
    bounds, acc = [], 0.0
    for g in gpus:
        acc += g.split_weight
        bounds.append(acc / total)
    i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0)
    act = min(n_gpu_layers, n_layer + 1)
    result = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or il - i_gpu_start >= act:
            result.append("CPU")
            continue
        position = (il - i_gpu_start) / act
        index = next((i for i, b in enumerate(bounds) if position < b), len(gpus) - 1)
        result.append(gpus[index].name)
    return result


def _compute_bytes_by_device(
    facts: ModelFacts,
    settings: Settings,
    caches: list[KVCache],
    layer_device: list[str],
    *,
    n_ctx: int,
    flash_attn: bool,
    backend_of: dict[str, str],
) -> dict[str, int]:
    """The compute buffer `sched_reserve` reserves on each backend (src/llama-context.cpp), by rebuilding the
    worst-case prompt-processing graph and replaying ggml-alloc on it (launcher/compute).

    The ubatch: n_tokens = min(n_ctx, n_batch, n_ubatch), rounded up to a multiple of the n_seq_max sequences
    (llama_context::graph_reserve); n_outputs = min(n_tokens, n_outputs_max or n_batch): every token for the
    library's default, one per slot for llama-server (tools/server server_output_limits). The KV mask has each
    cache's cells per stream; the recurrent state rows are n_seq_max x (1 + n_rs_seq).
    """
    n_batch = min(n_ctx, settings.n_batch)
    n_tokens = min(n_batch, settings.n_ubatch)
    n_seq = settings.n_parallel
    n_outputs = min(n_tokens, settings.n_outputs_max or n_batch)
    if n_tokens % n_seq:
        n_tokens = _pad(n_tokens, n_seq)
    cells: dict[str, int] = {}
    layer_cache: dict[int, str] = {}
    for cache in caches:
        kind = "swa" if cache.kind == "SWA" else "base"
        cells[kind] = cache.cells
        layer_cache.update(dict.fromkeys(cache.layers, kind))
    shape = GraphShape(
        n_tokens=n_tokens,
        n_seqs=n_seq,
        n_outputs=n_outputs,
        n_stream=1 if settings.kv_unified else n_seq,
        flash_attn=flash_attn,
        type_k=settings.type_k,
        type_v=settings.type_v,
        cells=cells,
        layer_cache=layer_cache,
        n_rs=max(1, n_seq) * (1 + settings.n_rs_seq),
        layer_device=layer_device,
        alignment={name: BUFFER_ALIGNMENT.get(backend, 32) for name, backend in backend_of.items()},
        cpu_moe=settings.cpu_moe,
        n_copies=PIPELINE_COPIES if _pipeline_parallel(settings, layer_device, backend_of) else 1,
    )
    return compute_buffers(facts, shape)


# ggml_backend_sched_new(..., parallel = true) keeps GGML_SCHED_MAX_COPIES copies of every input (ggml-backend.cpp)
PIPELINE_COPIES = 4


def _pipeline_parallel(settings: Settings, layer_device: list[str], backend_of: dict[str, str]) -> bool:
    """llama_context's pipeline parallelism (src/llama-context.cpp): several devices, every layer offloaded
    (the output layer included), no tensor overrides, and GPUs with async compute and events (CUDA, HIP, and RPC
    devices: ggml-rpc reports both; measured on two ggml-rpc-servers, 43.70 MiB of compute each for Gemma 3 270M
    at 4096 tokens against 22.05 MiB on one)."""
    gpus = {d for d in layer_device if d != "CPU"}
    return (
        len(gpus) > 1
        and "CPU" not in layer_device
        and not settings.cpu_moe
        and all(backend_of.get(d) in ("cuda", "rocm", "rpc") for d in gpus)
    )


def cpu_repack_rules(features: frozenset[str], machine: str) -> tuple[tuple[str, int], ...]:
    """The weight types llama.cpp's CPU backend repacks on a CPU with `features` (as /proc/cpuinfo names them:
    avx2, avx512f; asimddp = dotprod, i8mm), and the row multiple each needs: (type, rows) pairs.

    see ggml/src/ggml-cpu/repack.cpp ggml_repack_get_optimal_repack_type (llama-cpp-python 0.3.36's llama.cpp)
    """
    rules: dict[str, int] = {}
    if machine in ("x86_64", "amd64", "AMD64", "i686"):
        if "avx2" in features:
            rules.update({"Q4_0": 8, "Q4_K": 8, "IQ4_NL": 8, "MXFP4": 8})
        if "avx512f" in features:
            rules["Q2_K"] = 8
    elif machine in ("aarch64", "arm64"):
        dotprod = "asimddp" in features or "dotprod" in features
        i8mm = "i8mm" in features
        if i8mm:
            rules.update({"Q4_0": 4, "Q4_K": 8, "Q5_K": 8, "Q6_K": 8, "Q8_0": 4})
        if dotprod:
            for name, rows in (("Q4_0", 4), ("Q4_K", 8), ("Q5_K", 8), ("Q6_K", 8), ("IQ4_NL", 4), ("MXFP4", 4),
                               ("Q8_0", 4)):  # fmt: skip
                rules.setdefault(name, rows)
    return tuple(sorted(rules.items()))


def repack_bytes(facts: ModelFacts, settings: Settings, layer_device: list[str]) -> int:
    """Bytes the CPU backend copies into its CPU_REPACK buffer: every host-resident matrix of a repackable type
    that a matmul reads (2-D MUL_MAT weights, 3-D MUL_MAT_ID experts) with rows in the type's multiple. Token
    embeddings are read by GET_ROWS and stay mapped only.

    see ggml/src/ggml-cpu/repack.cpp extra_buffer_type::supports_op, src/llama-model.cpp make_cpu_buft_list
    """
    rules = dict(settings.cpu_repack)
    n_layer = facts.n_layer
    total = 0
    for name, (type_name, nbytes) in facts.tensor_types_by_name.items():
        rows_multiple = rules.get(type_name)
        shape = facts.tensor_shapes.get(name, ())
        if rows_multiple is None or len(shape) < 2 or shape[1] % rows_multiple:
            continue
        expert = "_exps" in name
        if len(shape) != (3 if expert else 2):
            continue
        block = _BLOCK.match(name)
        if block is not None:
            device = layer_device[int(block[1])] if int(block[1]) < n_layer else "CPU"
            on_host = device == "CPU" or (expert and settings.cpu_moe)
        elif name.startswith("output."):
            on_host = layer_device[n_layer] == "CPU"
        else:
            on_host = False  # input-layer embeddings (GET_ROWS) and small non-block tensors
        if on_host:
            total += nbytes
    return total


_BLOCK = re.compile(r"^blk\.(\d+)\.")


def estimate(
    facts: ModelFacts,
    settings: Settings,
    *,
    gpus: list[GPU] | None = None,
) -> MemoryEstimate:
    """Bytes per device for one configuration. Without GPUs, or with n_gpu_layers 0, all on the CPU.

    A little over 80 lines on purpose: it walks the components in the order llama.cpp allocates them
    (weights, KV cache, recurrent state, compute, output, runtime), a few lines each, on one device map.
    """
    gpus = list(gpus or [])
    flash_attn = resolve_flash_attn(facts, settings)
    _check_types(facts, settings, flash_attn)
    n_layer = facts.n_layer
    ngl = n_layer + 1 if settings.n_gpu_layers < 0 else min(settings.n_gpu_layers, n_layer + 1)
    if not gpus:
        ngl = 0
    layer_device = _layer_devices(facts, ngl, gpus)
    backend_of = {g.name: g.backend for g in gpus}
    names = ["CPU"] + [g.name for g in gpus if g.name in layer_device]
    devices = {name: DeviceEstimate(name, backend_of.get(name, "cpu")) for name in names}

    # Weights: blocks on their layer's device, input layer on the CPU, output layer on layer n_layer's.
    out_device = layer_device[n_layer]
    for layer in facts.layers:
        device = devices[layer_device[layer.index]]
        device.weights_bytes += layer.weight_bytes
        device.layers.append(layer.index)
        if settings.cpu_moe and device.name != "CPU" and layer.expert_bytes:
            # tensor overrides keep the experts in host memory; attention and KV stay on the GPU
            device.weights_bytes -= layer.expert_bytes
            devices["CPU"].weights_bytes += layer.expert_bytes
    devices["CPU"].weights_bytes += facts.input_bytes + facts.other_bytes
    output_weights = facts.output_bytes
    if facts.output_tied and out_device == "CPU":
        # The tied output is token_embd itself; on the host both views share one copy.
        output_weights -= facts.token_embd_bytes
    devices[out_device].weights_bytes += output_weights

    if settings.cpu_repack:
        devices["CPU"].repack_bytes = repack_bytes(facts, settings, layer_device)
        devices["CPU"].weights_bytes += devices["CPU"].repack_bytes

    caches, n_ctx, n_ctx_seq = kv_caches(facts, settings, flash_attn=flash_attn)
    for cache in caches:
        for il, nbytes in zip(cache.layers, cache.layer_bytes, strict=True):
            devices[layer_device[il]].kv_bytes += nbytes

    rs_per_layer = recurrent_state_bytes_per_layer(facts, settings)
    for layer in facts.layers[: n_layer - facts.n_layer_nextn]:
        if layer.recurrent:
            devices[layer_device[layer.index]].recurrent_bytes += rs_per_layer

    for name, value in _compute_bytes_by_device(
        facts,
        settings,
        caches,
        layer_device,
        n_ctx=n_ctx,
        flash_attn=flash_attn,
        backend_of={"CPU": "cpu", **backend_of},
    ).items():
        devices[name].compute_bytes += value

    # Output buffer: logits for n_seq outputs on the host (llama_context::output_reserve).
    devices["CPU"].output_bytes = facts.n_vocab * 4 * settings.n_parallel
    for device in devices.values():
        device.overhead_bytes = RUNTIME_OVERHEAD_BYTES.get(device.backend, 0)

    notes = list(facts.notes)
    if settings.n_ctx > facts.n_ctx_train > 0:
        notes.append(f"context {settings.n_ctx} exceeds the model's training context {facts.n_ctx_train}")
    if gpus and 0 < ngl < n_layer + 1:
        notes.append(f"partial offload: {ngl} of {n_layer + 1} layers on the GPU, the rest on the CPU")
    gpu_backends = {g.backend for g in gpus if g.name in layer_device}
    compute_source = (
        "estimate for " + "/".join(sorted(gpu_backends)) + " (llama.cpp's graph replayed, checked on the CPU backend)"
        if gpu_backends
        else "llama.cpp's graph replayed (exact on the CPU backend)"
    )
    return MemoryEstimate(
        model=facts.source,
        architecture=facts.architecture,
        settings=settings,
        n_ctx=n_ctx,
        n_ctx_seq=n_ctx_seq,
        flash_attn=flash_attn,
        n_gpu_layers=ngl,
        devices=list(devices.values()),
        kv_caches=caches,
        approximate=not facts.known,
        notes=notes,
        compute_source=compute_source,
    )
