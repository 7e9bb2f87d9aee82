"""Real-dimension test models: header-only, sparse GGUFs with the hyperparameters and tensor shapes of real models.

llama.cpp measured under `no_alloc` (launcher/measure/dryrun.py) never reads tensor data, so a GGUF whose data region is a
hole (header written, file extended with `truncate` to its full size) measures exactly like the real file. These
files cost a few MiB of real disk each (the vocabulary dominates) and build in about a second, yet they give the
weights, KV cache and compute buffers of the real models.

Hyperparameters come from each model's public config.json (and, where the conversion adds or renames keys, from
known GGUF metadata of the published conversions). Tensor names, shapes and required keys follow the llama.cpp
sources that llama-cpp-python vendors (`src/models/<arch>.cpp` `load_arch_hparams` / `load_arch_tensors`);
shapes below are in ggml order (`ne0`, the row length, first), exactly as `create_tensor` declares them.

Tensor types imitate llama.cpp's quantizer (`src/llama-quant.cpp` `llama_tensor_get_type_impl`): for "Q4_K_M",
Q4_K for the big matrices, Q6_K for the output (and the tied token embedding) and for `attn_v` / `ffn_down` on the
layers where `use_more_bits` holds, Q5_K for a fused `attn_qkv`, F32 for norms, biases, routers, SSM vectors and
the like, and the quantizer's fallbacks where a row is not a multiple of 256 (Q3_K -> Q4_0, Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0, F16 when not even a multiple of 32). "Q3_K_M" and "Q5_K_M" follow the same function
(a rung below and above, for the step-down ladders of scripts/gpu_check), including its LLM_TYPE_70B rule (a
Q3_K/Q4_K `attn_v` of an 80-layer GQA llama becomes Q5_K). For "MXFP4_MOE" (gpt-oss), MXFP4 for the expert
tensors and Q8_0 for other matrices.

The vocabulary is always a SentencePiece ("llama") one with the full `n_vocab` entries: the control tokens and
256 byte tokens of tests/corpus.py, then short synthetic pieces. The tokenizer model does not change any
buffer llama.cpp sizes; `n_vocab` (the output matrix and the logits buffer) does.

`build_real_corpus(root)` caches by content like tests/corpus.py: `root/real-<hash>/`, manifest written last,
built in a temporary directory and renamed into place. `build_broad_corpus(root)` does the same for the broad
corpus (`root/broad-<hash>/`): fifteen more models chosen for the shapes the first nine lack.

Run `python tests/corpus_real.py [ROOT]` to build (or reuse) the files and print what they hold.
"""

from __future__ import annotations

import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from corpus import CorpusModel, cached_build, default_root, spec_hash
from gguf_factory import VT, gguf_bytes, gstr, kv, tensor_info, u32, u64

BUILDER_VERSION = 1
ALIGNMENT = 32  # GGUF default (general.alignment absent)
MANIFEST = "manifest.json"

# ggml type name -> (ggml_type id, block size, bytes per block); ids and sizes as in gguf.GGML_QUANT_SIZES
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q3_K": (11, 256, 110),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "MXFP4": (39, 32, 17),
}
FILE_TYPES = {"Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17, "MXFP4_MOE": 38}  # general.file_type (llama_ftype)
_FALLBACK = {"Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama-quant.cpp tensor_type_fallback


@dataclass(frozen=True)
class RealModel:
    """One real model's GGUF layout: metadata (vocabulary aside) and (name, ggml shape, type) per tensor."""

    name: str  # family name, e.g. "Llama-3.1-8B"
    arch: str
    quant: str  # type-mix label: "Q4_K_M" or "MXFP4_MOE"
    kv: dict[str, Any]
    tensors: tuple[tuple[str, tuple[int, ...], str], ...]
    n_vocab: int
    source: str = ""

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.arch,
            "quant": self.quant,
            "kv": self.kv,
            "tensors": [[n, list(s), t] for n, s, t in self.tensors],
            "n_vocab": self.n_vocab,
        }

    @property
    def weight_bytes(self) -> int:
        return sum(tensor_nbytes(s, t) for _, s, t in self.tensors)


def tensor_nbytes(shape: tuple[int, ...], type_name: str) -> int:
    _, block, size = GGML_TYPES[type_name]
    assert shape[0] % block == 0, f"row of {shape[0]} is not a multiple of the {type_name} block ({block})"
    n = shape[0] // block * size
    for d in shape[1:]:
        n *= d
    return n


# --------------------------------------------------------------------------------------------------------------
# tensor types


def _use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp: the layers Q4_K_M gives Q6_K for attn_v / ffn_down."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_F32_ENDINGS = (
    "norm.weight",
    ".bias",
    ".ssm_a",
    ".ssm_d",
    "ssm_conv1d.weight",
    "attn_sinks.weight",
    "ffn_gate_inp.weight",
    "rope_freqs.weight",
)


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" else None


def _fit(type_name: str, ne0: int) -> str:
    if ne0 % GGML_TYPES[type_name][1] == 0:
        return type_name
    fb = _FALLBACK.get(type_name, type_name)
    return fb if ne0 % GGML_TYPES[fb][1] == 0 else "F16"


def _k_mix(quant: str, name: str, shape: tuple[int, ...], n_layer: int, tied: bool, llama_70b: bool) -> str:
    """The type llama-quant.cpp gives one tensor in a Q3_K_M, Q4_K_M or Q5_K_M file (without its Falcon and
    8-expert rules: Mixtral-8x7B's copy is therefore a little smaller than the published file, which changes
    nothing llama.cpp sizes besides the weights, and those are compared with the copy itself)."""
    if len(shape) == 1 or name.endswith(_F32_ENDINGS):
        return "F32"
    il = _layer_of(name)
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "Q6_K" if shape[0] % 256 == 0 else "Q8_0"
    base = {"Q3_K_M": "Q3_K", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}[quant]
    more_bits = il is not None and _use_more_bits(il, n_layer)
    want = base
    if name.endswith("attn_qkv.weight"):
        want = {"Q3_K_M": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}[quant]
    elif name.endswith("attn_v.weight") and il is not None:
        if quant == "Q3_K_M":
            want = "Q5_K" if il < 2 else "Q4_K"
        elif more_bits:
            want = "Q6_K"
        if llama_70b and want in ("Q3_K", "Q4_K"):
            want = "Q5_K"
    elif "ffn_down" in name and il is not None:
        if quant == "Q3_K_M":
            want = "Q5_K" if il < n_layer // 16 else "Q4_K"
        elif more_bits:
            want = "Q6_K"
    elif name.endswith("attn_output.weight") and quant == "Q3_K_M":
        want = "Q4_K"
    return _fit(want, shape[0])


def _q3_k_m(name: str, shape: tuple[int, ...], n_layer: int, tied: bool, llama_70b: bool = False) -> str:
    return _k_mix("Q3_K_M", name, shape, n_layer, tied, llama_70b)


def _q4_k_m(name: str, shape: tuple[int, ...], n_layer: int, tied: bool, llama_70b: bool = False) -> str:
    return _k_mix("Q4_K_M", name, shape, n_layer, tied, llama_70b)


def _q5_k_m(name: str, shape: tuple[int, ...], n_layer: int, tied: bool, llama_70b: bool = False) -> str:
    return _k_mix("Q5_K_M", name, shape, n_layer, tied, llama_70b)


def _mxfp4_moe(name: str, shape: tuple[int, ...], n_layer: int, tied: bool, llama_70b: bool = False) -> str:
    if len(shape) == 1 or name.endswith(_F32_ENDINGS):
        return "F32"
    if len(shape) == 3 and "_exps." in name:
        return _fit("MXFP4", shape[0])
    return _fit("Q8_0", shape[0])


_TYPERS: dict[str, Callable[[str, tuple[int, ...], int, bool, bool], str]] = {
    "Q3_K_M": _q3_k_m,
    "Q4_K_M": _q4_k_m,
    "Q5_K_M": _q5_k_m,
    "MXFP4_MOE": _mxfp4_moe,
}


class _T:
    """Collects (name, ggml shape) pairs, then types them."""

    def __init__(self) -> None:
        self.items: list[tuple[str, tuple[int, ...]]] = []

    def __call__(self, name: str, *shape: int) -> None:
        self.items.append((name, tuple(int(s) for s in shape)))

    def typed(
        self, quant: str, n_layer: int, *, llama_70b: bool = False
    ) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        names = [n for n, _ in self.items]
        assert len(names) == len(set(names)), "duplicate tensor name"
        tied = "output.weight" not in names
        typer = _TYPERS[quant]
        return tuple((n, s, typer(n, s, n_layer, tied, llama_70b)) for n, s in self.items)


def _model(
    name: str,
    arch: str,
    quant: str,
    kv: dict[str, Any],
    t: _T,
    *,
    n_vocab: int,
    n_layer: int,
    source: str,
    llama_70b: bool = False,
) -> RealModel:
    full = {"general.name": name, "general.file_type": FILE_TYPES[quant], **kv}
    return RealModel(name, arch, quant, full, t.typed(quant, n_layer, llama_70b=llama_70b), n_vocab, source)


def _embed(t: _T, n_embd: int, n_vocab: int, *, tied: bool) -> None:
    t("token_embd.weight", n_embd, n_vocab)
    t("output_norm.weight", n_embd)
    if not tied:
        t("output.weight", n_embd, n_vocab)


def _attn(t: _T, i: int, n_embd: int, *, n_head: int, n_head_kv: int, head: int, qk_norm: bool = False) -> None:
    t(f"blk.{i}.attn_q.weight", n_embd, n_head * head)
    t(f"blk.{i}.attn_k.weight", n_embd, n_head_kv * head)
    t(f"blk.{i}.attn_v.weight", n_embd, n_head_kv * head)
    t(f"blk.{i}.attn_output.weight", n_head * head, n_embd)
    if qk_norm:
        t(f"blk.{i}.attn_q_norm.weight", head)
        t(f"blk.{i}.attn_k_norm.weight", head)


def _ffn(t: _T, i: int, n_embd: int, n_ff: int) -> None:
    t(f"blk.{i}.ffn_gate.weight", n_embd, n_ff)
    t(f"blk.{i}.ffn_down.weight", n_ff, n_embd)
    t(f"blk.{i}.ffn_up.weight", n_embd, n_ff)


def _experts(t: _T, i: int, n_embd: int, n_ff_exp: int, n_expert: int) -> None:
    t(f"blk.{i}.ffn_gate_inp.weight", n_embd, n_expert)
    t(f"blk.{i}.ffn_gate_exps.weight", n_embd, n_ff_exp, n_expert)
    t(f"blk.{i}.ffn_down_exps.weight", n_ff_exp, n_embd, n_expert)
    t(f"blk.{i}.ffn_up_exps.weight", n_embd, n_ff_exp, n_expert)


def _common(
    arch: str, *, ctx: int, n_embd: int, n_layer: int, n_head: int, n_head_kv: Any, n_ff: int, eps: float, theta: float
) -> dict[str, Any]:
    return {
        f"{arch}.context_length": ctx,
        f"{arch}.embedding_length": n_embd,
        f"{arch}.block_count": n_layer,
        f"{arch}.feed_forward_length": n_ff,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_head_kv,
        f"{arch}.attention.layer_norm_rms_epsilon": eps,
        f"{arch}.rope.freq_base": theta,
    }


# --------------------------------------------------------------------------------------------------------------
# the models


def _llama3(
    name: str, *, n_layer: int, n_embd: int, n_head: int, n_ff: int, tied: bool, source: str, quant: str = "Q4_K_M"
) -> RealModel:
    arch, n_head_kv, head, n_vocab = "llama", 8, 128, 128256
    kv = _common(
        arch,
        ctx=131072,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        eps=1e-5,
        theta=500000.0,
    )
    kv[f"{arch}.rope.dimension_count"] = head
    kv[f"{arch}.attention.key_length"] = head
    kv[f"{arch}.attention.value_length"] = head
    kv[f"{arch}.vocab_size"] = n_vocab
    t = _T()
    _embed(t, n_embd, n_vocab, tied=tied)
    t("rope_freqs.weight", head // 2)  # llama3 rope scaling (factor 32 / 8, low 1, high 4) as per-dim factors
    for i in range(n_layer):
        t(f"blk.{i}.attn_norm.weight", n_embd)
        _attn(t, i, n_embd, n_head=n_head, n_head_kv=n_head_kv, head=head)
        t(f"blk.{i}.ffn_norm.weight", n_embd)
        _ffn(t, i, n_embd, n_ff)
    # src/models/llama.cpp: 80 layers with GQA is LLM_TYPE_70B, which llama-quant.cpp gives a larger attn_v
    llama_70b = n_layer == 80 and n_head != n_head_kv
    return _model(name, arch, quant, kv, t, n_vocab=n_vocab, n_layer=n_layer, source=source, llama_70b=llama_70b)


def real_llama31_8b(quant: str = "Q4_K_M") -> RealModel:
    return _llama3(
        "Llama-3.1-8B",
        n_layer=32,
        n_embd=4096,
        n_head=32,
        n_ff=14336,
        tied=False,
        source="meta-llama/Llama-3.1-8B config.json: 32 layers, 4096, 32/8 heads, ff 14336, vocab 128256",
        quant=quant,
    )


def real_llama31_70b(quant: str = "Q4_K_M") -> RealModel:
    return _llama3(
        "Llama-3.1-70B",
        n_layer=80,
        n_embd=8192,
        n_head=64,
        n_ff=28672,
        tied=False,
        source="meta-llama/Llama-3.1-70B config.json: 80 layers, 8192, 64/8 heads x 128, ff 28672, vocab 128256",
        quant=quant,
    )


def real_llama32_3b() -> RealModel:
    return _llama3(
        "Llama-3.2-3B",
        n_layer=28,
        n_embd=3072,
        n_head=24,
        n_ff=8192,
        tied=True,
        source="meta-llama/Llama-3.2-3B config.json: 28 layers, 3072, 24/8 heads x 128, ff 8192, tied embeddings",
    )


def real_smollm2_135m(quant: str = "Q4_K_M") -> RealModel:
    """A small real model (not in the corpus; scripts/gpu_check's CPU subset): its 576-wide rows are not whole
    256-blocks, so the K-quant mixes fall back to 32-block types as llama-quant.cpp does."""
    arch, L, E, H, HKV, D, FF, V = "llama", 30, 576, 9, 3, 64, 1536, 49152
    kv = _common(arch, ctx=8192, n_embd=E, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=FF, eps=1e-5, theta=100000.0)
    kv[f"{arch}.rope.dimension_count"] = D
    kv[f"{arch}.vocab_size"] = V
    t = _T()
    _embed(t, E, V, tied=True)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        _attn(t, i, E, n_head=H, n_head_kv=HKV, head=D)
        t(f"blk.{i}.ffn_norm.weight", E)
        _ffn(t, i, E, FF)
    return _model(
        "SmolLM2-135M",
        arch,
        quant,
        kv,
        t,
        n_vocab=V,
        n_layer=L,
        source="HuggingFaceTB/SmolLM2-135M config.json: 30 layers, 576, 9/3 heads x 64, ff 1536, vocab 49152, tied",
    )


def real_qwen3_8b(quant: str = "Q4_K_M") -> RealModel:
    return _qwen3_dense(
        "Qwen3-8B",
        n_layer=36,
        n_embd=4096,
        n_head=32,
        n_ff=12288,
        quant=quant,
        source="Qwen/Qwen3-8B config.json: 36 layers, 4096, 32/8 heads x 128, ff 12288, vocab 151936, untied",
    )


def real_qwen3_14b(quant: str = "Q4_K_M") -> RealModel:
    return _qwen3_dense(
        "Qwen3-14B",
        n_layer=40,
        n_embd=5120,
        n_head=40,
        n_ff=17408,
        quant=quant,
        source="Qwen/Qwen3-14B config.json: 40 layers, 5120, 40/8 heads x 128, ff 17408, vocab 151936, untied",
    )


def _qwen3_dense(name: str, *, n_layer: int, n_embd: int, n_head: int, n_ff: int, quant: str, source: str) -> RealModel:
    arch, L, E, H, HKV, D, FF, V = "qwen3", n_layer, n_embd, n_head, 8, 128, n_ff, 151936
    kv = _common(arch, ctx=40960, n_embd=E, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=FF, eps=1e-6, theta=1e6)
    kv[f"{arch}.attention.key_length"] = D
    kv[f"{arch}.attention.value_length"] = D
    t = _T()
    _embed(t, E, V, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        _attn(t, i, E, n_head=H, n_head_kv=HKV, head=D, qk_norm=True)
        t(f"blk.{i}.ffn_norm.weight", E)
        _ffn(t, i, E, FF)
    return _model(name, arch, quant, kv, t, n_vocab=V, n_layer=L, source=source)


def real_qwen3_30b_a3b(quant: str = "Q4_K_M") -> RealModel:
    arch, L, E, H, HKV, D, V = "qwen3moe", 48, 2048, 32, 4, 128, 151936
    NE, NU, FF_EXP = 128, 8, 768
    kv = _common(arch, ctx=40960, n_embd=E, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=6144, eps=1e-6, theta=1e6)
    kv[f"{arch}.attention.key_length"] = D
    kv[f"{arch}.attention.value_length"] = D
    kv[f"{arch}.expert_count"] = NE
    kv[f"{arch}.expert_used_count"] = NU
    kv[f"{arch}.expert_feed_forward_length"] = FF_EXP
    t = _T()
    _embed(t, E, V, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        _attn(t, i, E, n_head=H, n_head_kv=HKV, head=D, qk_norm=True)
        t(f"blk.{i}.ffn_norm.weight", E)
        _experts(t, i, E, FF_EXP, NE)
    return _model(
        "Qwen3-30B-A3B",
        arch,
        quant,
        kv,
        t,
        n_vocab=V,
        n_layer=L,
        source="Qwen/Qwen3-30B-A3B config.json: 48 layers, 2048, 32/4 heads x 128, 128 experts (8 used) x 768",
    )


def real_gpt_oss_20b() -> RealModel:
    arch, L, E, H, HKV, D, V = "gpt-oss", 24, 2880, 64, 8, 64, 201088
    NE, NU, FF_EXP = 32, 4, 2880
    kv = _common(arch, ctx=131072, n_embd=E, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=FF_EXP, eps=1e-5, theta=150000.0)
    kv[f"{arch}.attention.key_length"] = D
    kv[f"{arch}.attention.value_length"] = D
    kv[f"{arch}.rope.dimension_count"] = D
    kv[f"{arch}.attention.sliding_window"] = 128  # every other layer (llama.cpp's pattern for gpt-oss)
    kv[f"{arch}.expert_count"] = NE
    kv[f"{arch}.expert_used_count"] = NU
    kv[f"{arch}.expert_feed_forward_length"] = FF_EXP
    kv[f"{arch}.rope.scaling.type"] = "yarn"
    kv[f"{arch}.rope.scaling.factor"] = 32.0
    kv[f"{arch}.rope.scaling.original_context_length"] = 4096
    t = _T()
    _embed(t, E, V, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        t(f"blk.{i}.post_attention_norm.weight", E)
        _attn(t, i, E, n_head=H, n_head_kv=HKV, head=D)
        t(f"blk.{i}.attn_q.bias", H * D)
        t(f"blk.{i}.attn_k.bias", HKV * D)
        t(f"blk.{i}.attn_v.bias", HKV * D)
        t(f"blk.{i}.attn_output.bias", E)
        t(f"blk.{i}.attn_sinks.weight", H)
        _experts(t, i, E, FF_EXP, NE)
        t(f"blk.{i}.ffn_gate_inp.bias", NE)
        t(f"blk.{i}.ffn_gate_exps.bias", FF_EXP, NE)
        t(f"blk.{i}.ffn_down_exps.bias", E, NE)
        t(f"blk.{i}.ffn_up_exps.bias", FF_EXP, NE)
    return _model(
        "gpt-oss-20b",
        arch,
        "MXFP4_MOE",
        kv,
        t,
        n_vocab=V,
        n_layer=L,
        source="openai/gpt-oss-20b config.json: 24 layers, 2880, 64/8 heads x 64, 32 experts (4 used) x 2880, "
        "sliding window 128, vocab 201088; 2880 is not a multiple of 256, so only 32-block types (MXFP4, Q8_0)",
    )


def real_gemma3_12b(quant: str = "Q4_K_M") -> RealModel:
    arch, L, E, H, HKV, D, FF, V = "gemma3", 48, 3840, 16, 8, 256, 15360, 262208
    kv = _common(arch, ctx=131072, n_embd=E, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=FF, eps=1e-6, theta=1e6)
    kv[f"{arch}.attention.key_length"] = D
    kv[f"{arch}.attention.value_length"] = D
    kv[f"{arch}.attention.sliding_window"] = 1024  # llama.cpp's default 5-of-6 pattern
    kv[f"{arch}.rope.freq_base_swa"] = 10000.0
    kv[f"{arch}.rope.scaling.type"] = "linear"
    kv[f"{arch}.rope.scaling.factor"] = 8.0
    t = _T()
    _embed(t, E, V, tied=True)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        _attn(t, i, E, n_head=H, n_head_kv=HKV, head=D, qk_norm=True)
        t(f"blk.{i}.post_attention_norm.weight", E)
        t(f"blk.{i}.ffn_norm.weight", E)
        _ffn(t, i, E, FF)
        t(f"blk.{i}.post_ffw_norm.weight", E)
    return _model(
        "gemma-3-12b",
        arch,
        quant,
        kv,
        t,
        n_vocab=V,
        n_layer=L,
        source="google/gemma-3-12b-it text_config: 48 layers, 3840, 16/8 heads x 256, ff 15360, sliding window "
        "1024 (5 of 6 layers), vocab 262208, tied",
    )


def real_deepseek_v2_lite() -> RealModel:
    arch, L, E, H, FF, V = "deepseek2", 27, 2048, 16, 10944, 102400
    KV_LORA, NOPE, ROPE, VD = 512, 128, 64, 128
    NE, NU, NS, FF_EXP = 64, 6, 2, 1408
    kv = _common(arch, ctx=163840, n_embd=E, n_layer=L, n_head=H, n_head_kv=1, n_ff=FF, eps=1e-6, theta=10000.0)
    kv[f"{arch}.attention.key_length"] = KV_LORA + ROPE  # 576: the MLA K cache row
    kv[f"{arch}.attention.value_length"] = KV_LORA  # 512
    kv[f"{arch}.attention.key_length_mla"] = NOPE + ROPE  # 192
    kv[f"{arch}.attention.value_length_mla"] = VD  # 128
    kv[f"{arch}.attention.kv_lora_rank"] = KV_LORA
    kv[f"{arch}.rope.dimension_count"] = ROPE
    kv[f"{arch}.leading_dense_block_count"] = 1
    kv[f"{arch}.expert_count"] = NE
    kv[f"{arch}.expert_used_count"] = NU
    kv[f"{arch}.expert_shared_count"] = NS
    kv[f"{arch}.expert_feed_forward_length"] = FF_EXP
    kv[f"{arch}.expert_weights_scale"] = 1.0
    kv[f"{arch}.expert_weights_norm"] = False
    kv[f"{arch}.expert_gating_func"] = 1  # softmax
    kv[f"{arch}.rope.scaling.type"] = "yarn"
    kv[f"{arch}.rope.scaling.factor"] = 40.0
    kv[f"{arch}.rope.scaling.original_context_length"] = 4096
    kv[f"{arch}.rope.scaling.yarn_log_multiplier"] = 0.0707
    kv[f"{arch}.vocab_size"] = V
    t = _T()
    _embed(t, E, V, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        t(f"blk.{i}.attn_kv_a_norm.weight", KV_LORA)
        t(f"blk.{i}.attn_q.weight", E, H * (NOPE + ROPE))  # no q_lora in the Lite model
        t(f"blk.{i}.attn_kv_a_mqa.weight", E, KV_LORA + ROPE)
        t(f"blk.{i}.attn_k_b.weight", NOPE, KV_LORA, H)
        t(f"blk.{i}.attn_v_b.weight", KV_LORA, VD, H)
        t(f"blk.{i}.attn_output.weight", H * VD, E)
        t(f"blk.{i}.ffn_norm.weight", E)
        if i == 0:
            _ffn(t, i, E, FF)
        else:
            _experts(t, i, E, FF_EXP, NE)
            t(f"blk.{i}.ffn_gate_shexp.weight", E, FF_EXP * NS)
            t(f"blk.{i}.ffn_down_shexp.weight", FF_EXP * NS, E)
            t(f"blk.{i}.ffn_up_shexp.weight", E, FF_EXP * NS)
    return _model(
        "DeepSeek-V2-Lite",
        arch,
        "Q4_K_M",
        kv,
        t,
        n_vocab=V,
        n_layer=L,
        source="deepseek-ai/DeepSeek-V2-Lite config.json: 27 layers, 2048, 16 heads, kv_lora 512, nope 128 + rope "
        "64, v 128, no q_lora, 64 experts (6 used) x 1408 + 2 shared, 1 dense layer (ff 10944), vocab 102400; "
        "MLA layout of current conversions (head_count_kv 1, key_length 576, split attn_k_b / attn_v_b)",
    )


def real_phi3_mini_4k() -> RealModel:
    arch, L, E, H, FF, V, D = "phi3", 32, 3072, 32, 8192, 32064, 96
    kv = _common(arch, ctx=4096, n_embd=E, n_layer=L, n_head=H, n_head_kv=H, n_ff=FF, eps=1e-5, theta=10000.0)
    kv[f"{arch}.rope.dimension_count"] = D
    kv[f"{arch}.attention.sliding_window"] = 2047  # in the config; llama.cpp disables Phi SWA
    t = _T()
    _embed(t, E, V, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        t(f"blk.{i}.attn_qkv.weight", E, 3 * E)
        t(f"blk.{i}.attn_output.weight", E, E)
        t(f"blk.{i}.ffn_norm.weight", E)
        t(f"blk.{i}.ffn_down.weight", FF, E)
        t(f"blk.{i}.ffn_up.weight", E, 2 * FF)
    return _model(
        "Phi-3-mini-4k",
        arch,
        "Q4_K_M",
        kv,
        t,
        n_vocab=V,
        n_layer=L,
        source="microsoft/Phi-3-mini-4k-instruct config.json: 32 layers, 3072, 32 heads (MHA) x 96, ff 8192, "
        "vocab 32064, fused qkv and gate+up",
    )


GRANITE_H_TINY_ATTN = (5, 15, 25, 35)  # layer_types "attention"; the other 36 are Mamba-2


def _granite4_h(
    name: str, *, ctx: int, E: int, H: int, HKV: int, NE: int, NU: int, FF_EXP: int, FF_SH: int, INNER: int,
    SSM_HEADS: int, logit_scale: float, attn_layers: tuple[int, ...], source: str,
) -> RealModel:  # fmt: skip
    """Granite 4.0 H: Mamba-2 layers with attention at `attn_layers` (NoPE), MoE with a shared expert, tied."""
    arch, L, D, V = "granitehybrid", 40, 128, 100352
    CONV, STATE, GROUPS = 4, 128, 1
    head_kv = [HKV if i in attn_layers else 0 for i in range(L)]  # recurrent iff head_count_kv is 0
    kv = _common(arch, ctx=ctx, n_embd=E, n_layer=L, n_head=H, n_head_kv=head_kv, n_ff=FF_EXP, eps=1e-5, theta=10000.0)
    kv[f"{arch}.rope.dimension_count"] = D
    kv[f"{arch}.rope.scaling.finetuned"] = False  # NoPE
    kv[f"{arch}.attention.scale"] = 0.0078125
    kv[f"{arch}.embedding_scale"] = 12.0
    kv[f"{arch}.residual_scale"] = 0.22
    kv[f"{arch}.logit_scale"] = logit_scale
    kv[f"{arch}.expert_count"] = NE
    kv[f"{arch}.expert_used_count"] = NU
    kv[f"{arch}.expert_shared_feed_forward_length"] = FF_SH
    kv[f"{arch}.ssm.conv_kernel"] = CONV
    kv[f"{arch}.ssm.inner_size"] = INNER
    kv[f"{arch}.ssm.state_size"] = STATE
    kv[f"{arch}.ssm.time_step_rank"] = SSM_HEADS
    kv[f"{arch}.ssm.group_count"] = GROUPS
    kv[f"{arch}.vocab_size"] = V
    conv_dim = INNER + 2 * GROUPS * STATE
    t = _T()
    _embed(t, E, V, tied=True)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        if head_kv[i] == 0:
            t(f"blk.{i}.ssm_in.weight", E, INNER + conv_dim + SSM_HEADS)
            t(f"blk.{i}.ssm_conv1d.weight", CONV, conv_dim)
            t(f"blk.{i}.ssm_conv1d.bias", conv_dim)
            t(f"blk.{i}.ssm_dt.bias", SSM_HEADS)
            t(f"blk.{i}.ssm_a", 1, SSM_HEADS)
            t(f"blk.{i}.ssm_d", 1, SSM_HEADS)
            t(f"blk.{i}.ssm_norm.weight", INNER // GROUPS, GROUPS)
            t(f"blk.{i}.ssm_out.weight", INNER, E)
        else:
            _attn(t, i, E, n_head=H, n_head_kv=HKV, head=D)
        t(f"blk.{i}.ffn_norm.weight", E)
        _experts(t, i, E, FF_EXP, NE)
        t(f"blk.{i}.ffn_gate_shexp.weight", E, FF_SH)
        t(f"blk.{i}.ffn_down_shexp.weight", FF_SH, E)
        t(f"blk.{i}.ffn_up_shexp.weight", E, FF_SH)
    return _model(name, arch, "Q4_K_M", kv, t, n_vocab=V, n_layer=L, source=source)


def real_granite4_h_tiny() -> RealModel:
    return _granite4_h(
        "granite-4.0-h-tiny", ctx=1048576, E=1536, H=12, HKV=4, NE=64, NU=6, FF_EXP=512, FF_SH=1024, INNER=3072,
        SSM_HEADS=48, logit_scale=6.0, attn_layers=GRANITE_H_TINY_ATTN,
        source="ibm-granite/granite-4.0-h-tiny config.json / GGUF metadata: 40 layers (attention at 5, 15, 25, 35, "
        "Mamba-2 elsewhere), 1536, 12/4 heads, NoPE, 64 experts (6 used) x 512 + shared 1024, Mamba-2 48 heads x "
        "64, state 128, 1 group, vocab 100352, tied",
    )  # fmt: skip


REAL_BUILDERS: tuple[Callable[[], RealModel], ...] = (
    real_llama31_8b,
    real_qwen3_8b,
    real_qwen3_30b_a3b,
    real_gpt_oss_20b,
    real_gemma3_12b,
    real_deepseek_v2_lite,
    real_phi3_mini_4k,
    real_granite4_h_tiny,
    real_llama32_3b,
)


def real_models() -> list[RealModel]:
    return [b() for b in REAL_BUILDERS]


# --------------------------------------------------------------------------------------------------------------
# the broad corpus: shapes the nine above lack (issue 11): wide dense models at long contexts, attention width
# unlike the embedding width, GQA 4/8/16, head sizes 64/128/256, vocabularies over 200k, MoE with shared experts,
# hybrid recurrent models. scripts/bench_estimate.py sweeps them fully; tests/test_estimate_broad.py checks a
# couple of settings each.


def _dense(
    name: str,
    arch: str,
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    head: int,
    n_ff: int,
    n_vocab: int,
    ctx: int,
    theta: float,
    eps: float,
    tied: bool,
    source: str,
    qkv_bias: bool = False,
    qk_norm: bool = False,
    post_norms: bool = False,
    rope_freqs: bool = False,
    extra: dict[str, Any] | None = None,
) -> RealModel:
    """A dense decoder (src/models/llama.cpp, qwen2.cpp, gemma2.cpp...) whose attention width n_head x head
    may differ from n_embd: the widths come from attn_q/attn_output, as llama.cpp reads them."""
    kv = _common(
        arch,
        ctx=ctx,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        eps=eps,
        theta=theta,
    )
    kv[f"{arch}.attention.key_length"] = head
    kv[f"{arch}.attention.value_length"] = head
    kv[f"{arch}.rope.dimension_count"] = head
    kv[f"{arch}.vocab_size"] = n_vocab
    kv.update(extra or {})
    t = _T()
    _embed(t, n_embd, n_vocab, tied=tied)
    if rope_freqs:
        t("rope_freqs.weight", head // 2)
    for i in range(n_layer):
        t(f"blk.{i}.attn_norm.weight", n_embd)
        _attn(t, i, n_embd, n_head=n_head, n_head_kv=n_head_kv, head=head, qk_norm=qk_norm)
        if qkv_bias:
            t(f"blk.{i}.attn_q.bias", n_head * head)
            t(f"blk.{i}.attn_k.bias", n_head_kv * head)
            t(f"blk.{i}.attn_v.bias", n_head_kv * head)
        if post_norms:
            t(f"blk.{i}.post_attention_norm.weight", n_embd)
            t(f"blk.{i}.post_ffw_norm.weight", n_embd)
        t(f"blk.{i}.ffn_norm.weight", n_embd)
        _ffn(t, i, n_embd, n_ff)
    return _model(name, arch, "Q4_K_M", kv, t, n_vocab=n_vocab, n_layer=n_layer, source=source)


def real_mistral_nemo_12b() -> RealModel:
    """The issue's second shape: attention width 32 x 128 = 4096 against an embedding width of 5120."""
    return _dense(
        "Mistral-Nemo-12B",
        "llama",
        n_layer=40,
        n_embd=5120,
        n_head=32,
        n_head_kv=8,
        head=128,
        n_ff=14336,
        n_vocab=131072,
        ctx=1024000,
        theta=1e6,
        eps=1e-5,
        tied=False,
        source="mistralai/Mistral-Nemo-Base-2407 config.json: 40 layers, 5120, 32/8 heads x 128 (4096), ff 14336, "
        "vocab 131072, max_position_embeddings 1024000",
    )


def real_llama32_1b() -> RealModel:
    return _dense(
        "Llama-3.2-1B",
        "llama",
        n_layer=16,
        n_embd=2048,
        n_head=32,
        n_head_kv=8,
        head=64,
        n_ff=8192,
        n_vocab=128256,
        ctx=131072,
        theta=500000.0,
        eps=1e-5,
        tied=True,
        rope_freqs=True,
        source="meta-llama/Llama-3.2-1B config.json: 16 layers, 2048, 32/8 heads x 64, ff 8192, vocab 128256, tied",
    )


def real_qwen25_72b() -> RealModel:
    return _dense(
        "Qwen2.5-72B",
        "qwen2",
        n_layer=80,
        n_embd=8192,
        n_head=64,
        n_head_kv=8,
        head=128,
        n_ff=29568,
        n_vocab=152064,
        ctx=32768,
        theta=1e6,
        eps=1e-6,
        tied=False,
        qkv_bias=True,
        source="Qwen/Qwen2.5-72B config.json: 80 layers, 8192, 64/8 heads x 128, ff 29568, vocab 152064, QKV bias, "
        "context 32768",
    )


def real_gemma2_9b() -> RealModel:
    arch = "gemma2"
    extra = {
        f"{arch}.attention.sliding_window": 4096,
        f"{arch}.attn_logit_softcapping": 50.0,
        f"{arch}.final_logit_softcapping": 30.0,
    }
    return _dense(
        "gemma-2-9b",
        arch,
        n_layer=42,
        n_embd=3584,
        n_head=16,
        n_head_kv=8,
        head=256,
        n_ff=14336,
        n_vocab=256000,
        ctx=8192,
        theta=10000.0,
        eps=1e-6,
        tied=True,
        post_norms=True,
        extra=extra,
        source="google/gemma-2-9b config.json: 42 layers, 3584, 16/8 heads x 256 (4096), ff 14336, vocab 256000, "
        "sliding window 4096 on every other layer, soft-capping 50/30, tied",
    )


def real_gemma3_27b() -> RealModel:
    arch = "gemma3"
    extra = {
        f"{arch}.attention.sliding_window": 1024,
        f"{arch}.rope.freq_base_swa": 10000.0,
        f"{arch}.rope.scaling.type": "linear",
        f"{arch}.rope.scaling.factor": 8.0,
    }
    return _dense(
        "gemma-3-27b",
        arch,
        n_layer=62,
        n_embd=5376,
        n_head=32,
        n_head_kv=16,
        head=128,
        n_ff=21504,
        n_vocab=262208,
        ctx=131072,
        theta=1e6,
        eps=1e-6,
        tied=True,
        qk_norm=True,
        post_norms=True,
        extra=extra,
        source="google/gemma-3-27b-it text_config: 62 layers, 5376, 32/16 heads x 128 (4096), ff 21504, sliding "
        "window 1024 (5 of 6 layers), vocab 262208, tied",
    )


def real_phi4() -> RealModel:
    arch, L, E, H, HKV, D, FF, V = "phi3", 40, 5120, 40, 10, 128, 17920, 100352
    kv = _common(arch, ctx=16384, n_embd=E, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=FF, eps=1e-5, theta=250000.0)
    kv[f"{arch}.rope.dimension_count"] = D
    t = _T()
    _embed(t, E, V, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        t(f"blk.{i}.attn_qkv.weight", E, (H + 2 * HKV) * D)
        t(f"blk.{i}.attn_output.weight", H * D, E)
        t(f"blk.{i}.ffn_norm.weight", E)
        t(f"blk.{i}.ffn_down.weight", FF, E)
        t(f"blk.{i}.ffn_up.weight", E, 2 * FF)
    return _model(
        "Phi-4",
        arch,
        "Q4_K_M",
        kv,
        t,
        n_vocab=V,
        n_layer=L,
        source="microsoft/phi-4 config.json: 40 layers, 5120, 40/10 heads x 128, ff 17920, vocab 100352, context "
        "16384, fused qkv and gate+up",
    )


def real_mixtral_8x7b() -> RealModel:
    arch, L, E, H, HKV, D, FF, V, NE, NU = "llama", 32, 4096, 32, 8, 128, 14336, 32000, 8, 2
    kv = _common(arch, ctx=32768, n_embd=E, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=FF, eps=1e-5, theta=1e6)
    kv[f"{arch}.rope.dimension_count"] = D
    kv[f"{arch}.expert_count"] = NE
    kv[f"{arch}.expert_used_count"] = NU
    kv[f"{arch}.vocab_size"] = V
    t = _T()
    _embed(t, E, V, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        _attn(t, i, E, n_head=H, n_head_kv=HKV, head=D)
        t(f"blk.{i}.ffn_norm.weight", E)
        _experts(t, i, E, FF, NE)
    return _model(
        "Mixtral-8x7B",
        arch,
        "Q4_K_M",
        kv,
        t,
        n_vocab=V,
        n_layer=L,
        source="mistralai/Mixtral-8x7B-v0.1 config.json: 32 layers, 4096, 32/8 heads x 128, 8 experts (2 used) x "
        "14336, vocab 32000, context 32768",
    )


def real_qwen3_235b_a22b() -> RealModel:
    """GQA 16 (64/4 heads) and attention width 64 x 128 = 8192 against an embedding width of 4096."""
    arch, L, E, H, HKV, D, V = "qwen3moe", 94, 4096, 64, 4, 128, 151936
    NE, NU, FF_EXP = 128, 8, 1536
    kv = _common(arch, ctx=40960, n_embd=E, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=12288, eps=1e-6, theta=1e6)
    kv[f"{arch}.attention.key_length"] = D
    kv[f"{arch}.attention.value_length"] = D
    kv[f"{arch}.expert_count"] = NE
    kv[f"{arch}.expert_used_count"] = NU
    kv[f"{arch}.expert_feed_forward_length"] = FF_EXP
    t = _T()
    _embed(t, E, V, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        _attn(t, i, E, n_head=H, n_head_kv=HKV, head=D, qk_norm=True)
        t(f"blk.{i}.ffn_norm.weight", E)
        _experts(t, i, E, FF_EXP, NE)
    return _model(
        "Qwen3-235B-A22B",
        arch,
        "Q4_K_M",
        kv,
        t,
        n_vocab=V,
        n_layer=L,
        source="Qwen/Qwen3-235B-A22B config.json: 94 layers, 4096, 64/4 heads x 128 (8192), 128 experts (8 used) x "
        "1536, vocab 151936, context 40960",
    )


def real_qwen2_57b_a14b() -> RealModel:
    """MoE with a shared expert behind a sigmoid gate (src/models/qwen2moe.cpp)."""
    arch, L, E, H, HKV, D, V = "qwen2moe", 28, 3584, 28, 4, 128, 151936
    NE, NU, FF_EXP, FF_SH = 64, 8, 2560, 20480
    kv = _common(arch, ctx=65536, n_embd=E, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=18944, eps=1e-6, theta=1e6)
    kv[f"{arch}.expert_count"] = NE
    kv[f"{arch}.expert_used_count"] = NU
    kv[f"{arch}.expert_feed_forward_length"] = FF_EXP
    kv[f"{arch}.expert_shared_feed_forward_length"] = FF_SH
    t = _T()
    _embed(t, E, V, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        _attn(t, i, E, n_head=H, n_head_kv=HKV, head=D)
        t(f"blk.{i}.attn_q.bias", H * D)
        t(f"blk.{i}.attn_k.bias", HKV * D)
        t(f"blk.{i}.attn_v.bias", HKV * D)
        t(f"blk.{i}.ffn_norm.weight", E)
        _experts(t, i, E, FF_EXP, NE)
        t(f"blk.{i}.ffn_gate_inp_shexp.weight", E)
        t(f"blk.{i}.ffn_gate_shexp.weight", E, FF_SH)
        t(f"blk.{i}.ffn_down_shexp.weight", FF_SH, E)
        t(f"blk.{i}.ffn_up_shexp.weight", E, FF_SH)
    return _model(
        "Qwen2-57B-A14B",
        arch,
        "Q4_K_M",
        kv,
        t,
        n_vocab=V,
        n_layer=L,
        source="Qwen/Qwen2-57B-A14B config.json: 28 layers, 3584, 28/4 heads x 128, 64 experts (8 used) x 2560 + a "
        "gated shared expert of 20480, vocab 151936, QKV bias",
    )


def real_deepseek_v3() -> RealModel:
    """MLA with a Q low-rank (q_a/q_b), 3 dense lead layers, 256 routed experts in 8 groups (4 used) with a
    selection bias and sigmoid gating, and one shared expert."""
    arch, L, E, H, FF, V = "deepseek2", 61, 7168, 128, 18432, 129280
    Q_LORA, KV_LORA, NOPE, ROPE, VD = 1536, 512, 128, 64, 128
    NE, NU, NS, FF_EXP, DENSE = 256, 8, 1, 2048, 3
    kv = _common(arch, ctx=163840, n_embd=E, n_layer=L, n_head=H, n_head_kv=1, n_ff=FF, eps=1e-6, theta=10000.0)
    kv[f"{arch}.attention.key_length"] = KV_LORA + ROPE
    kv[f"{arch}.attention.value_length"] = KV_LORA
    kv[f"{arch}.attention.key_length_mla"] = NOPE + ROPE
    kv[f"{arch}.attention.value_length_mla"] = VD
    kv[f"{arch}.attention.q_lora_rank"] = Q_LORA
    kv[f"{arch}.attention.kv_lora_rank"] = KV_LORA
    kv[f"{arch}.rope.dimension_count"] = ROPE
    kv[f"{arch}.leading_dense_block_count"] = DENSE
    kv[f"{arch}.expert_count"] = NE
    kv[f"{arch}.expert_used_count"] = NU
    kv[f"{arch}.expert_shared_count"] = NS
    kv[f"{arch}.expert_feed_forward_length"] = FF_EXP
    kv[f"{arch}.expert_weights_scale"] = 2.5
    kv[f"{arch}.expert_weights_norm"] = True
    kv[f"{arch}.expert_gating_func"] = 2  # sigmoid
    kv[f"{arch}.expert_group_count"] = 8
    kv[f"{arch}.expert_group_used_count"] = 4
    kv[f"{arch}.rope.scaling.type"] = "yarn"
    kv[f"{arch}.rope.scaling.factor"] = 40.0
    kv[f"{arch}.rope.scaling.original_context_length"] = 4096
    kv[f"{arch}.rope.scaling.yarn_log_multiplier"] = 0.1
    kv[f"{arch}.vocab_size"] = V
    t = _T()
    _embed(t, E, V, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        t(f"blk.{i}.attn_q_a_norm.weight", Q_LORA)
        t(f"blk.{i}.attn_kv_a_norm.weight", KV_LORA)
        t(f"blk.{i}.attn_q_a.weight", E, Q_LORA)
        t(f"blk.{i}.attn_q_b.weight", Q_LORA, H * (NOPE + ROPE))
        t(f"blk.{i}.attn_kv_a_mqa.weight", E, KV_LORA + ROPE)
        t(f"blk.{i}.attn_k_b.weight", NOPE, KV_LORA, H)
        t(f"blk.{i}.attn_v_b.weight", KV_LORA, VD, H)
        t(f"blk.{i}.attn_output.weight", H * VD, E)
        t(f"blk.{i}.ffn_norm.weight", E)
        if i < DENSE:
            _ffn(t, i, E, FF)
        else:
            _experts(t, i, E, FF_EXP, NE)
            t(f"blk.{i}.exp_probs_b.bias", NE)
            t(f"blk.{i}.ffn_gate_shexp.weight", E, FF_EXP * NS)
            t(f"blk.{i}.ffn_down_shexp.weight", FF_EXP * NS, E)
            t(f"blk.{i}.ffn_up_shexp.weight", E, FF_EXP * NS)
    return _model(
        "DeepSeek-V3",
        arch,
        "Q4_K_M",
        kv,
        t,
        n_vocab=V,
        n_layer=L,
        source="deepseek-ai/DeepSeek-V3 config.json: 61 layers, 7168, 128 heads, q_lora 1536, kv_lora 512, nope 128 "
        "+ rope 64, v 128, 3 dense layers (ff 18432), 256 experts (8 used) x 2048 in 8 groups (4 used), sigmoid "
        "gating with a bias, 1 shared expert, vocab 129280 (the MTP layer left out, as conversions do)",
    )


def real_gpt_oss_120b() -> RealModel:
    arch, L, E, H, HKV, D, V = "gpt-oss", 36, 2880, 64, 8, 64, 201088
    NE, NU, FF_EXP = 128, 4, 2880
    kv = _common(arch, ctx=131072, n_embd=E, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=FF_EXP, eps=1e-5, theta=150000.0)
    kv[f"{arch}.attention.key_length"] = D
    kv[f"{arch}.attention.value_length"] = D
    kv[f"{arch}.rope.dimension_count"] = D
    kv[f"{arch}.attention.sliding_window"] = 128
    kv[f"{arch}.expert_count"] = NE
    kv[f"{arch}.expert_used_count"] = NU
    kv[f"{arch}.expert_feed_forward_length"] = FF_EXP
    kv[f"{arch}.rope.scaling.type"] = "yarn"
    kv[f"{arch}.rope.scaling.factor"] = 32.0
    kv[f"{arch}.rope.scaling.original_context_length"] = 4096
    t = _T()
    _embed(t, E, V, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        t(f"blk.{i}.post_attention_norm.weight", E)
        _attn(t, i, E, n_head=H, n_head_kv=HKV, head=D)
        t(f"blk.{i}.attn_q.bias", H * D)
        t(f"blk.{i}.attn_k.bias", HKV * D)
        t(f"blk.{i}.attn_v.bias", HKV * D)
        t(f"blk.{i}.attn_output.bias", E)
        t(f"blk.{i}.attn_sinks.weight", H)
        _experts(t, i, E, FF_EXP, NE)
        t(f"blk.{i}.ffn_gate_inp.bias", NE)
        t(f"blk.{i}.ffn_gate_exps.bias", FF_EXP, NE)
        t(f"blk.{i}.ffn_down_exps.bias", E, NE)
        t(f"blk.{i}.ffn_up_exps.bias", FF_EXP, NE)
    return _model(
        "gpt-oss-120b",
        arch,
        "MXFP4_MOE",
        kv,
        t,
        n_vocab=V,
        n_layer=L,
        source="openai/gpt-oss-120b config.json: 36 layers, 2880, 64/8 heads x 64, 128 experts (4 used) x 2880, "
        "sliding window 128, vocab 201088",
    )


GRANITE_H_SMALL_ATTN = (5, 15, 25, 35)


def real_granite4_h_small() -> RealModel:
    return _granite4_h(
        "granite-4.0-h-small", ctx=131072, E=4096, H=32, HKV=8, NE=72, NU=10, FF_EXP=768, FF_SH=8192, INNER=8192,
        SSM_HEADS=128, logit_scale=16.0, attn_layers=GRANITE_H_SMALL_ATTN,
        source="ibm-granite/granite-4.0-h-small config.json: 40 layers (attention at 5, 15, 25, 35, Mamba-2 "
        "elsewhere), 4096, 32/8 heads, NoPE, 72 experts (10 used) x 768 + shared 8192, Mamba-2 128 heads x 64, "
        "state 128, 1 group, vocab 100352, tied",
    )  # fmt: skip


LFM2_1_2B_ATTN = (2, 5, 8, 10, 12, 14)


def real_lfm2_1_2b() -> RealModel:
    """A hybrid of short convolutions (a recurrent state per layer) and attention (src/models/lfm2.cpp)."""
    arch, L, E, H, HKV, D, FF, V, L_CACHE = "lfm2", 16, 2048, 32, 8, 64, 8192, 65536, 3
    head_kv = [HKV if i in LFM2_1_2B_ATTN else 0 for i in range(L)]
    kv = _common(arch, ctx=128000, n_embd=E, n_layer=L, n_head=H, n_head_kv=head_kv, n_ff=FF, eps=1e-5, theta=1e6)
    kv[f"{arch}.shortconv.l_cache"] = L_CACHE
    kv[f"{arch}.vocab_size"] = V
    t = _T()
    t("token_embd.weight", E, V)
    t("token_embd_norm.weight", E)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        if head_kv[i] == 0:
            t(f"blk.{i}.shortconv.conv.weight", L_CACHE, E)
            t(f"blk.{i}.shortconv.in_proj.weight", E, 3 * E)
            t(f"blk.{i}.shortconv.out_proj.weight", E, E)
        else:
            _attn(t, i, E, n_head=H, n_head_kv=HKV, head=D, qk_norm=True)
        t(f"blk.{i}.ffn_norm.weight", E)
        _ffn(t, i, E, FF)
    return _model(
        "LFM2-1.2B",
        arch,
        "Q4_K_M",
        kv,
        t,
        n_vocab=V,
        n_layer=L,
        source="LiquidAI/LFM2-1.2B config.json: 16 layers (attention at 2, 5, 8, 10, 12, 14, short convolutions "
        "elsewhere, L_cache 3), 2048, 32/8 heads x 64, ff 8192, vocab 65536, tied",
    )


def real_qwen3_next_80b_a3b() -> RealModel:
    """A hybrid of gated delta-net layers (a recurrent state) and gated attention every fourth layer, with MoE
    and a shared expert (src/models/qwen3next.cpp); head size 256."""
    arch, L, E, H, HKV, D, V = "qwen3next", 48, 2048, 16, 2, 256, 151936
    NE, NU, FF_EXP, FF_SH = 512, 10, 512, 512
    K_HEAD, K_HEADS, V_HEADS, CONV = 128, 16, 32, 4
    key_dim, value_dim = K_HEAD * K_HEADS, K_HEAD * V_HEADS
    kv = _common(arch, ctx=262144, n_embd=E, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=5120, eps=1e-6, theta=10000000.0)
    kv[f"{arch}.attention.key_length"] = D
    kv[f"{arch}.attention.value_length"] = D
    kv[f"{arch}.rope.dimension_count"] = D // 4  # partial_rotary_factor 0.25
    kv[f"{arch}.expert_count"] = NE
    kv[f"{arch}.expert_used_count"] = NU
    kv[f"{arch}.expert_feed_forward_length"] = FF_EXP
    kv[f"{arch}.expert_shared_feed_forward_length"] = FF_SH
    kv[f"{arch}.ssm.conv_kernel"] = CONV
    kv[f"{arch}.ssm.inner_size"] = value_dim
    kv[f"{arch}.ssm.state_size"] = K_HEAD
    kv[f"{arch}.ssm.time_step_rank"] = V_HEADS
    kv[f"{arch}.ssm.group_count"] = K_HEADS
    kv[f"{arch}.full_attention_interval"] = 4
    t = _T()
    _embed(t, E, V, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", E)
        t(f"blk.{i}.post_attention_norm.weight", E)
        if (i + 1) % 4 == 0:
            t(f"blk.{i}.attn_q.weight", E, 2 * H * D)  # queries and their gate
            t(f"blk.{i}.attn_k.weight", E, HKV * D)
            t(f"blk.{i}.attn_v.weight", E, HKV * D)
            t(f"blk.{i}.attn_output.weight", H * D, E)
            t(f"blk.{i}.attn_q_norm.weight", D)
            t(f"blk.{i}.attn_k_norm.weight", D)
        else:
            t(f"blk.{i}.attn_qkv.weight", E, 2 * key_dim + value_dim)
            t(f"blk.{i}.attn_gate.weight", E, value_dim)
            t(f"blk.{i}.ssm_conv1d.weight", CONV, 2 * key_dim + value_dim)
            t(f"blk.{i}.ssm_dt.bias", V_HEADS)
            t(f"blk.{i}.ssm_a", V_HEADS)
            t(f"blk.{i}.ssm_ba.weight", E, 2 * V_HEADS)
            t(f"blk.{i}.ssm_norm.weight", K_HEAD)
            t(f"blk.{i}.ssm_out.weight", value_dim, E)
        _experts(t, i, E, FF_EXP, NE)
        t(f"blk.{i}.ffn_gate_inp_shexp.weight", E)
        t(f"blk.{i}.ffn_gate_shexp.weight", E, FF_SH)
        t(f"blk.{i}.ffn_down_shexp.weight", FF_SH, E)
        t(f"blk.{i}.ffn_up_shexp.weight", E, FF_SH)
    return _model(
        "Qwen3-Next-80B-A3B",
        arch,
        "Q4_K_M",
        kv,
        t,
        n_vocab=V,
        n_layer=L,
        source="Qwen/Qwen3-Next-80B-A3B-Instruct config.json: 48 layers (gated attention every 4th, gated delta "
        "net elsewhere: 16 key / 32 value heads x 128, conv 4), 2048, 16/2 heads x 256, 512 experts (10 used) x "
        "512 + a gated shared expert of 512, vocab 151936, context 262144",
    )


BROAD_BUILDERS: tuple[Callable[[], RealModel], ...] = (
    real_llama31_70b,
    real_mistral_nemo_12b,
    real_qwen25_72b,
    real_llama32_1b,
    real_qwen3_235b_a22b,
    real_gemma3_27b,
    real_gemma2_9b,
    real_phi4,
    real_mixtral_8x7b,
    real_qwen2_57b_a14b,
    real_deepseek_v3,
    real_gpt_oss_120b,
    real_granite4_h_small,
    real_lfm2_1_2b,
    real_qwen3_next_80b_a3b,
)


def broad_models() -> list[RealModel]:
    return [b() for b in BROAD_BUILDERS]


# --------------------------------------------------------------------------------------------------------------
# writing


_SPECIALS = ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|end|>")  # as tests/corpus.py


def _vocab_kvs(n_vocab: int, pieces: Sequence[str] = ()) -> list[bytes]:
    """A SentencePiece vocabulary of exactly n_vocab tokens, encoded directly (fast for 262k tokens); `pieces`
    (e.g. "▁hello" and its prefixes, so that a word is one token) come first among the normal tokens."""
    tokens = [s.encode() for s in _SPECIALS] + [f"<0x{b:02X}>".encode() for b in range(256)]
    n_fixed = len(tokens)
    assert n_vocab > n_fixed + len(pieces)
    tokens += [p.encode() for p in pieces]
    tokens += [f"{i:x}".encode() for i in range(len(tokens), n_vocab)]  # unique, short, never "<...>"
    types = np.ones(n_vocab, "<i4")  # NORMAL
    types[0] = 2  # UNKNOWN
    types[1 : len(_SPECIALS)] = 3  # CONTROL
    types[len(_SPECIALS) : n_fixed] = 6  # BYTE
    scores = -np.arange(n_vocab, dtype="<f4")
    scores[: n_fixed + len(pieces)] = 0.0
    pack = struct.Struct("<Q").pack
    blob = b"".join(pack(len(tok)) + tok for tok in tokens)

    def arr(key: str, etype: int, payload: bytes) -> bytes:
        return gstr(key) + u32(VT.ARRAY) + u32(etype) + u64(n_vocab) + payload

    return [
        kv("tokenizer.ggml.model", VT.STRING, "llama"),
        arr("tokenizer.ggml.tokens", VT.STRING, blob),
        arr("tokenizer.ggml.scores", VT.FLOAT32, scores.tobytes()),
        arr("tokenizer.ggml.token_type", VT.INT32, types.tobytes()),
        kv("tokenizer.ggml.bos_token_id", VT.UINT32, 1),
        kv("tokenizer.ggml.eos_token_id", VT.UINT32, 2),
        kv("tokenizer.ggml.unknown_token_id", VT.UINT32, 0),
        kv("tokenizer.ggml.add_bos_token", VT.BOOL, True),
    ]


def _kv_bytes(key: str, val: Any) -> bytes:
    if isinstance(val, bool):
        return kv(key, VT.BOOL, val)
    if isinstance(val, int):
        return kv(key, VT.UINT32 if val >= 0 else VT.INT32, val)
    if isinstance(val, float):
        return kv(key, VT.FLOAT32, val)
    if isinstance(val, str):
        return kv(key, VT.STRING, val)
    if isinstance(val, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in val):
        return kv(key, VT.ARRAY, (VT.INT32, list(val)))
    raise TypeError(f"unsupported metadata value for {key}: {val!r}")


def write_sparse(model: RealModel, path: Path, *, pieces: Sequence[str] = ()) -> int:
    """Write the model's header and extend the file (sparse) to its full size; return that size. `pieces` go
    into the vocabulary (see _vocab_kvs)."""
    kvs = [kv("general.architecture", VT.STRING, model.arch)]
    kvs += [_kv_bytes(k, v) for k, v in model.kv.items()]
    kvs += _vocab_kvs(model.n_vocab, pieces)
    infos, offset = [], 0
    for name, shape, type_name in model.tensors:
        infos.append(tensor_info(name, shape, GGML_TYPES[type_name][0], offset))
        offset += tensor_nbytes(shape, type_name)
        offset += -offset % ALIGNMENT
    head = gguf_bytes(kvs, infos, alignment=ALIGNMENT)
    size = len(head) + offset
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)  # the tensor data is a hole: never written, never read under no_alloc
    return size


# --------------------------------------------------------------------------------------------------------------
# the cache


def build_spec(models: list[RealModel] | None = None) -> dict[str, Any]:
    models = real_models() if models is None else models
    return {"builder": BUILDER_VERSION, "alignment": ALIGNMENT, "models": [m.spec() for m in models]}


def build_real_corpus(root: Path | None = None) -> list[CorpusModel]:
    """Build (or reuse) the real-dimension sparse GGUFs under `root/real-<hash>/`; return them."""
    return _build(root, "real", real_models())


def build_broad_corpus(root: Path | None = None) -> list[CorpusModel]:
    """Build (or reuse) the broad corpus (BROAD_BUILDERS) under `root/broad-<hash>/`; return it."""
    return _build(root, "broad", broad_models())


def _build(root: Path | None, kind: str, models: list[RealModel]) -> list[CorpusModel]:
    root = default_root() if root is None else Path(root)

    def build(tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        records = []
        for m in models:
            fname = f"{m.name}-{m.quant}.gguf"
            size = write_sparse(m, tmp / fname)
            records.append(
                {
                    "family": m.name,
                    "arch": m.arch,
                    "quant": m.quant,
                    "file": fname,
                    "size": size,
                    "weight_bytes": m.weight_bytes,
                    "source": m.source,
                }
            )
        return records, {}

    return cached_build(root, kind, spec_hash(build_spec(models)), build)


if __name__ == "__main__":
    _root = Path(sys.argv[1]) if len(sys.argv) > 1 else default_root()
    _t0 = time.monotonic()
    _models = build_real_corpus(_root) + build_broad_corpus(_root)
    print(f"{len(_models)} models in {time.monotonic() - _t0:.2f} s")
    for _m in _models:
        _st = _m.path.stat()
        print(
            f"  {_m.arch:14s} {_m.name:32s} {_st.st_size / 2**30:7.2f} GiB apparent, {_st.st_blocks * 512:>9d} B on disk"
        )
