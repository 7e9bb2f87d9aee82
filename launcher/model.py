"""Model facts: what a GGUF header means for memory, decided the way llama.cpp decides it.

Layered on the raw header (launcher.gguf): per layer, whether it keeps a KV cache or a recurrent
state, its KV heads and head sizes, whether it uses the sliding window, which weights it holds.
Every rule cites the llama.cpp source it mirrors (paths in ggml-org/llama.cpp, the build that
llama-cpp-python 0.3.36 vendors): `src/llama-model.cpp` (load_hparams, create_memory),
`src/llama-hparams.cpp` and the per-architecture `src/models/<arch>.cpp` load_arch_hparams.

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from launcher.errors import ModelError
from launcher.gguf import GGUFHeader, SkippedArray

# Architectures whose memory module is a plain or SWA KV cache with the generic GQA layout.
# (src/llama-model.cpp create_memory, `default:` branch with llama_kv_cache / llama_kv_cache_iswa.)
_PLAIN_ATTENTION = frozenset(
    [
        "llama",
        "llama4",
        "deci",
        "falcon",
        "grok",
        "gpt2",
        "gptj",
        "gptneox",
        "mpt",
        "baichuan",
        "starcoder",
        "refact",
        "bloom",
        "stablelm",
        "qwen",
        "qwen2",
        "qwen2moe",
        "qwen2vl",
        "qwen3",
        "qwen3moe",
        "qwen3vl",
        "qwen3vlmoe",
        "phi2",
        "phi3",
        "phimoe",
        "plamo",
        "plamo3",
        "codeshell",
        "orion",
        "internlm2",
        "minicpm",
        "minicpm3",
        "gemma",
        "gemma2",
        "gemma3",
        "gemma3n",
        "gemma4",
        "starcoder2",
        "xverse",
        "command-r",
        "cohere2",
        "cohere2moe",
        "dbrx",
        "olmo",
        "olmo2",
        "olmoe",
        "muse-glimmer",
        "openelm",
        "arctic",
        "deepseek",
        "deepseek2",
        "chatglm",
        "glm4",
        "glm4moe",
        "bitnet",
        "jais",
        "jais2",
        "nemotron",
        "exaone",
        "exaone4",
        "exaone-moe",
        "granite",
        "granitemoe",
        "granite_swa",
        "chameleon",
        "plm",
        "bailingmoe",
        "bailingmoe2",
        "dots1",
        "arcee",
        "afmoe",
        "laguna",
        "ernie4_5",
        "ernie4_5-moe",
        "hunyuan-moe",
        "hunyuan-dense",
        "hunyuan_vl",
        "hy_v3",
        "smollm3",
        "gpt-oss",
        "smallthinker",
        "seed_oss",
        "grovemoe",
        "apertus",
        "minimax-m2",
        "cogvlm",
        "pangu-embedded",
        "mistral3",
        "mistral4",
        "mimo2",
        "step35",
        "llama-embed",
        "maincoder",
        "mellum",
        "nanbeige",
    ]
)

# Architectures with no memory module at all: encoders and diffusion models (create_memory returns nullptr).
_NO_MEMORY = frozenset(
    [
        "bert",
        "jina-bert-v2",
        "jina-bert-v3",
        "nomic-bert",
        "nomic-bert-moe",
        "neo-bert",
        "eurobert",
        "wavtokenizer-dec",
        "modern-bert",
        "gemma-embedding",
        "dream",
        "llada",
        "llada-moe",
        "rnd1",
    ]
)

# Pure recurrent architectures: every layer has recurrent state, none has KV (llm_arch_is_recurrent).
_RECURRENT = frozenset(["mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"])

# Hybrids fitquant sizes exactly, with the rule that marks a layer recurrent (src/models/<arch>.cpp).
_HYBRID = frozenset(
    [
        "jamba",
        "plamo2",
        "granitehybrid",
        "lfm2",
        "lfm2moe",
        "nemotron_h",
        "nemotron_h_moe",
        "falcon-h1",
        "qwen3next",
        "qwen35",
        "qwen35moe",
    ]
)


@dataclass(frozen=True)
class _SwaRule:
    """How an architecture turns on sliding-window attention (src/models/<arch>.cpp load_arch_hparams)."""

    pattern: int  # default n_pattern for llama_hparams::set_swa_pattern
    when: str  # "always" | "key>0" (only if sliding_window is present and > 0) | "llama4" | "exaone4" | "lfm2"
    dense_first: bool = False
    default_window: int | None = None  # n_swa when the key is absent
    forced_window: int | None = None  # n_swa regardless of the key
    kind: str = "standard"  # llama_swa_type


_SWA_RULES: dict[str, _SwaRule] = {
    "gemma2": _SwaRule(2, "always", default_window=4096),
    "gemma3": _SwaRule(6, "key>0"),
    "gemma3n": _SwaRule(5, "always"),
    "gemma4": _SwaRule(0, "always"),  # the pattern array is required
    "gpt-oss": _SwaRule(2, "always"),
    "cohere2": _SwaRule(4, "always"),
    "cohere2moe": _SwaRule(4, "always", dense_first=True),
    "exaone-moe": _SwaRule(4, "always", default_window=128),
    "exaone4": _SwaRule(4, "exaone4", default_window=4096),
    "afmoe": _SwaRule(4, "key>0"),
    "mellum": _SwaRule(4, "key>0"),
    "olmo2": _SwaRule(4, "key>0"),
    "plamo3": _SwaRule(8, "key>0"),
    "smallthinker": _SwaRule(4, "key>0", dense_first=True, forced_window=4096),
    "laguna": _SwaRule(4, "key>0", dense_first=True),
    "muse-glimmer": _SwaRule(4, "always"),
    "granite_swa": _SwaRule(0, "always"),  # the pattern array is required
    "llama4": _SwaRule(4, "llama4", forced_window=8192, kind="chunked"),
    "lfm2": _SwaRule(0, "lfm2"),
    "lfm2moe": _SwaRule(0, "lfm2"),
}

_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(up|down|gate_up|gate)_(ch|)exps")
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.")
# Tensors of llama.cpp's input layer, always kept on the CPU (LLM_TENSOR_LAYER_INPUT in src/llama-arch.cpp).
_INPUT_TENSORS = ("token_embd.", "position_embd.", "token_types.", "per_layer_token_embd.")
# Tensors of the output layer (LLM_TENSOR_LAYER_OUTPUT): placed on the device of layer n_layer.
# A vision encoder carried inside the model's own GGUF (clip's names: "v.blk.0...", "mm.input_projection..."): what
# Ollama loads as the projector of such a model (backends.md §1 "Extras it loads on its own").
_VISION_TENSORS = ("v.", "mm.")
_OUTPUT_TENSORS = ("output.", "output_norm.", "cls.", "cls_out.", "cls_norm.", "dense_2.", "dense_3.")
LLAMA_MAX_LAYERS = 512  # src/llama-hparams.h


@dataclass(frozen=True)
class LayerFacts:
    """One repeating block, as llama.cpp's hparams see it."""

    index: int
    n_head: int
    n_head_kv: int
    head_dim_k: int  # n_embd_head_k(il): the SWA value on SWA layers
    head_dim_v: int
    swa: bool  # hparams.is_swa(il)
    recurrent: bool  # hparams.is_recr(il): keeps recurrent state
    has_kv: bool  # owns KV cells in the attention cache
    weight_bytes: int  # every blk.<i>.* tensor
    expert_bytes: int  # the MoE expert tensors among them
    ffn_width: int = 0  # dense FFN up-projection output per token (2 x n_ff when gate and up are fused)
    ffn_fused: bool = False  # ffn_up holds gate and up together (phi3)
    expert_width: int = 0  # one expert's FFN width (n_ff_exp)
    shared_expert_width: int = 0  # shared experts' FFN width
    # (name without "blk.<i>.", ggml shape, bytes) of each of the layer's tensors: two layers with the same tensors
    # build the same compute graph (launcher/compute)
    tensors: tuple[tuple[str, tuple[int, ...], int], ...] = field(default=(), repr=False, compare=False)

    @property
    def n_embd_k_gqa(self) -> int:
        return self.head_dim_k * self.n_head_kv

    @property
    def n_embd_v_gqa(self) -> int:
        return self.head_dim_v * self.n_head_kv


@dataclass(frozen=True)
class ModelFacts:
    """What memory depends on, derived from one GGUF header."""

    source: str
    architecture: str
    known: bool  # False: unknown architecture, estimated as generic GQA (approximate)
    notes: tuple[str, ...]
    n_layer: int  # block_count (llama.cpp n_layer_all), including MTP/NextN layers
    n_layer_nextn: int  # trailing MTP layers: weights loaded, no cache in the main context
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    layers: tuple[LayerFacts, ...]
    sliding_window: int  # n_swa; 0 when no layer uses SWA
    swa_type: str  # "none" | "standard" | "chunked" | "symmetric"
    is_mla: bool
    kv_lora_rank: int
    has_memory: bool  # False for encoders: no KV cache at all
    n_embd_r: int  # recurrent conv/shift state per layer (elements)
    n_embd_s: int  # recurrent SSM/WKV state per layer (elements)
    ssm_d_inner: int  # Mamba inner size (0 when not a state-space model)
    expert_count: int
    expert_used_count: int
    n_ff: tuple[int, ...]
    token_embd_bytes: int
    output_bytes: int  # output-layer tensors (output.weight, output_norm...), the tied copy included
    output_tied: bool  # no output.weight: token_embd is duplicated into the output layer
    input_bytes: int  # input-layer tensors kept on the CPU (token_embd and friends)
    other_bytes: int  # tensors outside blocks, input and output (rope factors...)
    n_params: int
    tensor_bytes_total: int
    file_type: int | None
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensor count
    # What the compute graph is built from (launcher/compute): every tensor's ggml shape by name, and the
    # architecture's scalar hyperparameters ("{arch}." stripped, e.g. "expert_weights_norm").
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False, compare=False)
    # every tensor's (ggml type name, bytes): what a CPU repack of host weights copies (estimate.repack_bytes)
    tensor_types_by_name: dict[str, tuple[str, int]] = field(default_factory=dict, repr=False, compare=False)
    inline_vision_bytes: int = 0  # of other_bytes: a vision encoder inside this GGUF (v.*, mm.*), no separate mmproj
    hparams: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_head_kv(self) -> list[int]:
        return [layer.n_head_kv for layer in self.layers]

    @property
    def swa_layers(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.swa]

    @property
    def recurrent_layers(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.recurrent]

    @property
    def head_dim_k(self) -> int:
        return self.layers[0].head_dim_k if self.layers else 0

    @property
    def head_dim_v(self) -> int:
        return self.layers[0].head_dim_v if self.layers else 0

    @property
    def n_embd_v_gqa_max(self) -> int:
        return max((layer.n_embd_v_gqa for layer in self.layers), default=0)

    @property
    def is_recurrent_or_hybrid(self) -> bool:
        return any(layer.recurrent for layer in self.layers)


def _int(value: Any, what: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(f"{source}: '{what}' must be an integer, got {value!r}")
    if value < 0:
        raise ModelError(f"{source}: '{what}' must not be negative, got {value}")
    return value


def _per_layer(header: GGUFHeader, key: str, n_layer: int, default: int | None) -> list[int] | None:
    """llama_model_loader::get_key_or_arr: a scalar broadcast to every layer, or one value per layer."""
    value = header.get(key)
    if value is None:
        return None if default is None else [default] * n_layer
    if isinstance(value, SkippedArray):
        raise ModelError(f"{header.source}: '{key}' has {value.count} entries, expected {n_layer}")
    if isinstance(value, list):
        if len(value) != n_layer:
            raise ModelError(f"{header.source}: '{key}' has {len(value)} entries, expected one per layer ({n_layer})")
        return [_int(v, key, header.source) for v in value]
    return [_int(value, key, header.source)] * n_layer


def _swa_pattern(n_layer_main: int, n_layer_all: int, n_pattern: int, dense_first: bool) -> list[bool]:
    """llama_hparams::set_swa_pattern (src/llama-hparams.cpp): which layers use the sliding window."""
    flags = []
    for il in range(n_layer_all):
        if il >= n_layer_main:
            flags.append(False)
        elif dense_first:
            flags.append(n_pattern == 0 or il % n_pattern != 0)
        else:
            flags.append(n_pattern == 0 or il % n_pattern < n_pattern - 1)
    return flags


def _swa_layers(
    header: GGUFHeader, arch: str, n_layer_main: int, n_layer_all: int, recurrent: list[bool]
) -> tuple[list[bool], int, str]:
    """Decide, per layer, whether it uses SWA, and the window; the way each architecture's loader does."""
    rule = _SWA_RULES.get(arch)
    none = ([False] * n_layer_all, 0, "none")
    if rule is None:
        return none
    window_key = header.get(f"{arch}.attention.sliding_window")
    window = _int(window_key, f"{arch}.attention.sliding_window", header.source) if window_key is not None else None
    if rule.when == "key>0" and not window:
        return none
    if rule.when == "llama4" and window_key is not None and window == 0:
        return none
    if rule.when == "exaone4" and n_layer_main != 64:
        # exaone4 turns SWA on only for the 32B (64 layers); smaller ones read the key but stay dense.
        return none
    if rule.when == "lfm2":
        if not window:
            return none
        return [not r if il < n_layer_main else False for il, r in enumerate(recurrent)], window, "standard"
    if rule.forced_window is not None:
        window = rule.forced_window
    elif window is None:
        window = rule.default_window
    if window is None:
        raise ModelError(f"{header.source}: '{arch}.attention.sliding_window' is required for {arch}")
    # llama_model_base::load_swa_pattern: an array gives every layer's flag; an integer overrides the period.
    pattern = header.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        flags = [bool(v) for v in pattern][:n_layer_all]
        flags += [False] * (n_layer_all - len(flags))
    else:
        n_pattern = rule.pattern if pattern is None else _int(pattern, "sliding_window_pattern", header.source)
        flags = _swa_pattern(n_layer_main, n_layer_all, n_pattern, rule.dense_first)
    if not any(flags):
        return none
    return flags, window, rule.kind


@dataclass(frozen=True)
class _Hparams:
    """What every per-architecture rule reads (src/llama-model.cpp load_hparams); lists hold one value per layer."""

    header: GGUFHeader
    arch: str
    n_layer_all: int  # block_count, MTP/NextN layers included
    n_layer_nextn: int
    n_embd: int
    n_ctx_train: int
    n_head: list[int]
    n_head_kv: list[int]
    n_ff: list[int]
    head_k: int
    head_v: int
    head_k_swa: int
    head_v_swa: int

    @property
    def n_layer_main(self) -> int:
        return self.n_layer_all - self.n_layer_nextn

    def opt(self, name: str, what: str, default: int = 0) -> int:
        """The integer `{arch}.{name}`, `default` when absent; `what` names it in the error."""
        return _int(self.header.get(f"{self.arch}.{name}", default), what, self.header.source)


def _architecture(header: GGUFHeader) -> tuple[str, bool, list[str]]:
    """(architecture, known to fitquant, notes); raises ModelError for a header that is no language model."""
    arch = header.architecture
    if not arch:
        raise ModelError(f"{header.source}: no 'general.architecture' key; is this a model GGUF?")
    if header.get("general.type") == "mmproj" or arch == "clip":
        raise ModelError(f"{header.source}: this is a vision projector (mmproj), not a language model")
    if arch in _PLAIN_ATTENTION or arch in _NO_MEMORY or arch in _RECURRENT or arch in _HYBRID:
        return arch, True, []
    note = f"architecture '{arch}' is not one fitquant knows: KV cache sized as generic GQA (approximate)"
    return arch, False, [note]


def _hparams(header: GGUFHeader, arch: str) -> _Hparams:
    """Layer counts, widths, heads and head sizes, checked in the order llama.cpp's load_hparams reads them."""
    source = header.source

    def required(name: str) -> int:
        value = header.get(f"{arch}.{name}")
        if value is None:
            raise ModelError(f"{source}: missing '{arch}.{name}'")
        return _int(value, f"{arch}.{name}", source)

    def optional(name: str, what: str, default: int) -> int:
        return _int(header.get(f"{arch}.{name}", default), what, source)

    n_layer_all = required("block_count")
    if not 0 < n_layer_all <= LLAMA_MAX_LAYERS:
        raise ModelError(f"{source}: '{arch}.block_count' = {n_layer_all} is outside 1..{LLAMA_MAX_LAYERS}")
    n_layer_nextn = optional("nextn_predict_layers", "nextn_predict_layers", 0)
    if n_layer_nextn > n_layer_all:
        raise ModelError(f"{source}: nextn_predict_layers {n_layer_nextn} exceeds block_count {n_layer_all}")
    n_embd = required("embedding_length")
    n_ctx_train = optional("context_length", "context_length", 0)

    # n_head per layer; n_head_kv defaults to n_head.
    n_head = _per_layer(header, f"{arch}.attention.head_count", n_layer_all, 0) or []
    n_head_kv = _per_layer(header, f"{arch}.attention.head_count_kv", n_layer_all, None) or list(n_head)
    n_ff = _per_layer(header, f"{arch}.feed_forward_length", n_layer_all, 0) or []
    n_head0 = n_head[0] if n_head else 0
    head_k = optional("attention.key_length", "key_length", n_embd // n_head0) if n_head0 > 0 else 0
    head_v = optional("attention.value_length", "value_length", n_embd // n_head0) if n_head0 > 0 else 0
    return _Hparams(
        header=header,
        arch=arch,
        n_layer_all=n_layer_all,
        n_layer_nextn=n_layer_nextn,
        n_embd=n_embd,
        n_ctx_train=n_ctx_train,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        head_k=head_k,
        head_v=head_v,
        head_k_swa=optional("attention.key_length_swa", "key_length_swa", head_k),
        head_v_swa=optional("attention.value_length_swa", "value_length_swa", head_v),
    )


# hparams.is_recr(il), per architecture (src/models/<arch>.cpp): which layers keep a recurrent state.


def _recurrent_main_layers(hp: _Hparams) -> list[bool]:
    """Pure recurrent models (llm_arch_is_recurrent): every layer but the MTP ones."""
    return [il < hp.n_layer_main for il in range(hp.n_layer_all)]


def _recurrent_without_kv_heads(hp: _Hparams) -> list[bool]:
    """jamba, plamo2, granitehybrid, lfm2: a layer with no KV heads is a recurrent one."""
    return [il < hp.n_layer_main and hp.n_head_kv[il] == 0 for il in range(hp.n_layer_all)]


def _recurrent_without_kv_heads_or_ffn(hp: _Hparams) -> list[bool]:
    """nemotron_h: a layer with neither KV heads nor an FFN is a Mamba2 layer."""
    return [il < hp.n_layer_main and hp.n_head_kv[il] == 0 and hp.n_ff[il] == 0 for il in range(hp.n_layer_all)]


def _recurrent_every_layer(hp: _Hparams) -> list[bool]:
    """falcon-h1: attention and SSM side by side in every layer, so every layer keeps state."""
    return [True] * hp.n_layer_all


def _recurrent_but_every_interval(hp: _Hparams) -> list[bool]:
    """qwen3next, qwen35: the recurrent_layers array, else all but every full_attention_interval-th layer."""
    explicit = hp.header.get(f"{hp.arch}.attention.recurrent_layers")
    if isinstance(explicit, list) and len(explicit) == hp.n_layer_all:
        return [bool(v) for v in explicit]
    interval = hp.opt("full_attention_interval", "full_attention_interval", 4) or 4
    return [il < hp.n_layer_main and (il + 1) % interval != 0 for il in range(hp.n_layer_all)]


_RECURRENCE: dict[str, Callable[[_Hparams], list[bool]]] = {
    **dict.fromkeys(_RECURRENT, _recurrent_main_layers),
    **dict.fromkeys(("jamba", "plamo2", "granitehybrid", "lfm2", "lfm2moe"), _recurrent_without_kv_heads),
    **dict.fromkeys(("nemotron_h", "nemotron_h_moe"), _recurrent_without_kv_heads_or_ffn),
    "falcon-h1": _recurrent_every_layer,
    **dict.fromkeys(("qwen3next", "qwen35", "qwen35moe"), _recurrent_but_every_interval),
}


def _recurrent_layers(hp: _Hparams) -> list[bool]:
    """hparams.is_recr(il) by the architecture's rule (_RECURRENCE); no layer for the others."""
    rule = _RECURRENCE.get(hp.arch)
    return rule(hp) if rule is not None else [False] * hp.n_layer_all


def _recurrent_state_sizes(header: GGUFHeader, arch: str, n_embd: int) -> tuple[int, int]:
    """llama_hparams::n_embd_r and n_embd_s (src/llama-hparams.cpp): elements of state per layer."""

    def key(name: str, default: int = 0) -> int:
        value = header.get(f"{arch}.{name}", default)
        return _int(value, f"{arch}.{name}", header.source)

    wkv_head_size = key("wkv.head_size")
    if wkv_head_size:  # RWKV: token shift and WKV state
        return key("token_shift_count", 2) * n_embd, n_embd * wkv_head_size
    l_cache = key("shortconv.l_cache")
    d_conv, d_inner, d_state, n_group = (
        key("ssm.conv_kernel"), key("ssm.inner_size"), key("ssm.state_size"), key("ssm.group_count"),
    )  # fmt: skip
    n_embd_s = d_state * d_inner
    if l_cache:  # LFM2 short convolutions
        return n_embd * (l_cache - 1), n_embd_s
    n_conv = (d_conv - 1 if d_conv > 0 else 0) * (d_inner + 2 * n_group * d_state)
    return n_conv, n_embd_s


def _n_vocab(header: GGUFHeader) -> int:
    arch = header.architecture
    explicit = header.get(f"{arch}.vocab_size")
    if explicit is not None:
        return _int(explicit, f"{arch}.vocab_size", header.source)
    tokens = header.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens)
    embd = header.tensor("token_embd.weight") or header.tensor("output.weight")
    if embd is not None and len(embd.shape) >= 2:
        return embd.shape[1]
    return 0


# Which layers own KV cells: create_memory's filters and hparams.has_kv (src/llama-model.cpp).
# A layer at or past the architecture's "from start" count reuses an earlier layer's cache.
_KV_FROM_START: dict[str, Callable[[_Hparams], int]] = {
    "gemma3n": lambda hp: 20,  # src/models/gemma3n.cpp: n_layer_kv_from_start = 20
    "gemma4": lambda hp: hp.n_layer_all - hp.opt("attention.shared_kv_layers", "shared_kv_layers"),
}


def _kv_unless_recurrent(hp: _Hparams, recurrent: list[bool], il: int) -> bool:
    return not recurrent[il]


def _kv_never(hp: _Hparams, recurrent: list[bool], il: int) -> bool:
    return False


def _kv_always(hp: _Hparams, recurrent: list[bool], il: int) -> bool:
    return True  # falcon-h1: attention beside the SSM in every layer


def _kv_on_attention_layers(hp: _Hparams, recurrent: list[bool], il: int) -> bool:
    return not recurrent[il] and hp.n_ff[il] == 0  # nemotron_h: attention layers have no FFN


_KV_OWNER: dict[str, Callable[[_Hparams, list[bool], int], bool]] = {
    **dict.fromkeys(_NO_MEMORY, _kv_never),
    **dict.fromkeys(_RECURRENT, _kv_never),
    "falcon-h1": _kv_always,
    **dict.fromkeys(("nemotron_h", "nemotron_h_moe"), _kv_on_attention_layers),
}


def _kv_layers(hp: _Hparams, recurrent: list[bool]) -> list[bool]:
    """Per layer, whether it owns KV cells: a main layer before the shared ones, by the architecture's rule."""
    from_start = _KV_FROM_START[hp.arch](hp) if hp.arch in _KV_FROM_START else hp.n_layer_all
    owns = _KV_OWNER.get(hp.arch, _kv_unless_recurrent)
    return [il < hp.n_layer_main and il < from_start and owns(hp, recurrent, il) for il in range(hp.n_layer_all)]


@dataclass(frozen=True)
class _FfnWidths:
    """Activation widths per layer, read from the weight shapes (robust to per-layer and per-arch keys)."""

    dense: list[int]  # ffn_up's output width
    fused: list[bool]  # ffn_up without ffn_gate: gate and up in one tensor
    expert: list[int]  # one expert's width
    shared: list[int]  # the shared experts' width


def _ffn_widths(header: GGUFHeader, n_layer: int) -> _FfnWidths:
    widths = _FfnWidths([0] * n_layer, [False] * n_layer, [0] * n_layer, [0] * n_layer)
    for il in range(n_layer):
        up = header.tensor(f"blk.{il}.ffn_up.weight")
        if up is not None and len(up.shape) >= 2:
            widths.dense[il] = up.shape[1]
            widths.fused[il] = header.tensor(f"blk.{il}.ffn_gate.weight") is None
        exps = header.tensor(f"blk.{il}.ffn_up_exps.weight")
        fused_exps = header.tensor(f"blk.{il}.ffn_gate_up_exps.weight")
        if exps is not None and len(exps.shape) >= 2:
            widths.expert[il] = exps.shape[1]
        elif fused_exps is not None and len(fused_exps.shape) >= 2:
            widths.expert[il] = fused_exps.shape[1] // 2
        shexp = header.tensor(f"blk.{il}.ffn_up_shexp.weight")
        if shexp is not None and len(shexp.shape) >= 2:
            widths.shared[il] = shexp.shape[1]
    return widths


@dataclass
class _Weights:
    """Tensor bytes by where llama.cpp places them: per layer (and its MoE experts), input, output, other."""

    layer: list[int]
    expert: list[int]
    input: int = 0
    output: int = 0
    other: int = 0
    inline_vision: int = 0
    token_embd: int = 0
    output_tied: bool = False
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensor count
    layer_tensors: list[tuple[tuple[str, tuple[int, ...], int], ...]] = field(default_factory=list)


def _weights(header: GGUFHeader, n_layer: int) -> _Weights:
    w = _Weights([0] * n_layer, [0] * n_layer)
    per_layer: list[list[tuple[str, tuple[int, ...], int]]] = [[] for _ in range(n_layer)]
    for tensor in header.tensors:
        w.tensor_types[tensor.type_name] = w.tensor_types.get(tensor.type_name, 0) + 1
        block = _BLOCK_TENSOR.match(tensor.name)
        if block:
            il = int(block.group(1))
            if il >= n_layer:
                raise ModelError(f"{header.source}: tensor '{tensor.name}' is beyond block_count {n_layer}")
            w.layer[il] += tensor.n_bytes
            per_layer[il].append((tensor.name[block.end() :], tensor.shape, tensor.n_bytes))
            if _EXPERT_TENSOR.match(tensor.name):
                w.expert[il] += tensor.n_bytes
        elif tensor.name.startswith(_INPUT_TENSORS):
            w.input += tensor.n_bytes
            if tensor.name == "token_embd.weight":
                w.token_embd = tensor.n_bytes
        elif tensor.name.startswith(_OUTPUT_TENSORS):
            w.output += tensor.n_bytes
        else:
            w.other += tensor.n_bytes
            if tensor.name.startswith(_VISION_TENSORS):
                w.inline_vision += tensor.n_bytes
    # Tied embeddings: llama.cpp creates the output from token_embd with TENSOR_DUPLICATED.
    w.layer_tensors = [tuple(sorted(tensors)) for tensors in per_layer]
    w.output_tied = header.tensor("output.weight") is None and w.token_embd > 0
    if w.output_tied:
        w.output += w.token_embd
    return w


def _layer_facts(
    hp: _Hparams, swa: list[bool], recurrent: list[bool], has_kv: list[bool], widths: _FfnWidths, weights: _Weights
) -> tuple[LayerFacts, ...]:
    return tuple(
        LayerFacts(
            index=il,
            n_head=hp.n_head[il] if hp.n_head else 0,
            n_head_kv=hp.n_head_kv[il],
            head_dim_k=hp.head_k_swa if swa[il] else hp.head_k,
            head_dim_v=hp.head_v_swa if swa[il] else hp.head_v,
            swa=swa[il],
            recurrent=recurrent[il],
            has_kv=has_kv[il],
            weight_bytes=weights.layer[il],
            expert_bytes=weights.expert[il],
            ffn_width=widths.dense[il] or (hp.n_ff[il] if hp.n_ff else 0),
            ffn_fused=widths.fused[il],
            expert_width=widths.expert[il],
            shared_expert_width=widths.shared[il],
            tensors=weights.layer_tensors[il],
        )
        for il in range(hp.n_layer_all)
    )


def model_facts(header: GGUFHeader) -> ModelFacts:
    """Derive ModelFacts from a parsed header. Raises ModelError when something sizing needs is missing."""
    arch, known, notes = _architecture(header)
    hp = _hparams(header, arch)
    source = header.source
    # MLA (deepseek2 and kin): K-only cache of kv_lora_rank + rope dims; V is a view of K.
    is_mla = bool(header.get(f"{arch}.attention.key_length_mla")) and bool(
        header.get(f"{arch}.attention.value_length_mla")
    )
    kv_lora_rank = hp.opt("attention.kv_lora_rank", "kv_lora_rank")
    recurrent = _recurrent_layers(hp)
    swa, n_swa, swa_type = _swa_layers(header, arch, hp.n_layer_main, hp.n_layer_all, recurrent)
    n_embd_r, n_embd_s = _recurrent_state_sizes(header, arch, hp.n_embd) if any(recurrent) else (0, 0)
    ssm_d_inner = hp.opt("ssm.inner_size", "ssm.inner_size")
    has_kv = _kv_layers(hp, recurrent)
    widths = _ffn_widths(header, hp.n_layer_all)
    weights = _weights(header, hp.n_layer_all)
    expert_used = header.get(f"{arch}.expert_used_count", 0)
    if isinstance(expert_used, list):
        expert_used = max(expert_used, default=0)
    file_type = header.get("general.file_type")
    return ModelFacts(
        source=source,
        architecture=arch,
        known=known,
        notes=tuple(notes),
        n_layer=hp.n_layer_all,
        n_layer_nextn=hp.n_layer_nextn,
        n_embd=hp.n_embd,
        n_vocab=_n_vocab(header),
        n_ctx_train=hp.n_ctx_train,
        layers=_layer_facts(hp, swa, recurrent, has_kv, widths, weights),
        sliding_window=n_swa,
        swa_type=swa_type,
        is_mla=is_mla,
        kv_lora_rank=kv_lora_rank,
        has_memory=arch not in _NO_MEMORY,
        n_embd_r=n_embd_r,
        n_embd_s=n_embd_s,
        ssm_d_inner=ssm_d_inner,
        expert_count=hp.opt("expert_count", "expert_count"),
        expert_used_count=_int(expert_used, "expert_used_count", source),
        n_ff=tuple(hp.n_ff),
        token_embd_bytes=weights.token_embd,
        output_bytes=weights.output,
        output_tied=weights.output_tied,
        input_bytes=weights.input,
        other_bytes=weights.other,
        inline_vision_bytes=weights.inline_vision,
        n_params=header.n_params,
        tensor_bytes_total=header.tensor_bytes_total,
        file_type=file_type if isinstance(file_type, int) else None,
        tensor_types=weights.tensor_types,
        tensor_shapes={tensor.name: tensor.shape for tensor in header.tensors},
        tensor_types_by_name={tensor.name: (tensor.type_name, tensor.n_bytes) for tensor in header.tensors},
        hparams=_scalar_hparams(header, arch),
    )


def _scalar_hparams(header: GGUFHeader, arch: str) -> dict[str, Any]:
    """The `{arch}.*` keys whose values are scalars or short integer lists, without the prefix."""
    prefix = arch + "."
    return {
        key[len(prefix) :]: value
        for key, value in header.metadata.items()
        if key.startswith(prefix) and isinstance(value, (bool, int, float, str, list))
    }


def facts_to_json(facts: ModelFacts, *, sizes: Sequence[int] = ()) -> dict[str, Any]:
    """The `fitquant inspect --json` document (sizes in bytes)."""
    from launcher.quants import file_type_name

    return {
        "schema_version": 1,
        "model": facts.source,
        "architecture": facts.architecture,
        "known_architecture": facts.known,
        "notes": list(facts.notes),
        "n_layer": facts.n_layer,
        "n_layer_nextn": facts.n_layer_nextn,
        "n_embd": facts.n_embd,
        "n_vocab": facts.n_vocab,
        "n_head": [layer.n_head for layer in facts.layers],
        "n_head_kv": facts.n_head_kv,
        "head_dim_k": facts.head_dim_k,
        "head_dim_v": facts.head_dim_v,
        "context_length": facts.n_ctx_train,
        "sliding_window": facts.sliding_window,
        "swa_type": facts.swa_type,
        "swa_layers": facts.swa_layers,
        "recurrent_layers": facts.recurrent_layers,
        "kv_layers": [layer.index for layer in facts.layers if layer.has_kv],
        "is_mla": facts.is_mla,
        "kv_lora_rank": facts.kv_lora_rank,
        "n_embd_r": facts.n_embd_r,
        "n_embd_s": facts.n_embd_s,
        "expert_count": facts.expert_count,
        "expert_used_count": facts.expert_used_count,
        "file_type": file_type_name(facts.file_type),
        "n_params": facts.n_params,
        "tensor_bytes_total": facts.tensor_bytes_total,
        "token_embd_bytes": facts.token_embd_bytes,
        "output_bytes": facts.output_bytes,
        "output_tied": facts.output_tied,
        "layer_weight_bytes": [layer.weight_bytes for layer in facts.layers],
        "layer_expert_bytes": [layer.expert_bytes for layer in facts.layers],
        "tensor_types": facts.tensor_types,
    }
