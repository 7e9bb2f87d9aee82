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
from collections.abc import Sequence
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


def _recurrent_layers(header: GGUFHeader, arch: str, n_layer_main: int, n_layer_all: int,
                      n_head_kv: list[int], n_ff: list[int]) -> list[bool]:  # fmt: skip
    """hparams.is_recr(il), per architecture (src/models/<arch>.cpp)."""
    if arch in _RECURRENT:
        return [il < n_layer_main for il in range(n_layer_all)]
    if arch in ("jamba", "plamo2", "granitehybrid", "lfm2", "lfm2moe"):
        return [il < n_layer_main and n_head_kv[il] == 0 for il in range(n_layer_all)]
    if arch in ("nemotron_h", "nemotron_h_moe"):
        return [il < n_layer_main and n_head_kv[il] == 0 and n_ff[il] == 0 for il in range(n_layer_all)]
    if arch == "falcon-h1":
        return [True] * n_layer_all
    if arch in ("qwen3next", "qwen35", "qwen35moe"):
        explicit = header.get(f"{arch}.attention.recurrent_layers")
        if isinstance(explicit, list) and len(explicit) == n_layer_all:
            return [bool(v) for v in explicit]
        interval = header.get(f"{arch}.full_attention_interval", 4)
        interval = _int(interval, "full_attention_interval", header.source) or 4
        return [il < n_layer_main and (il + 1) % interval != 0 for il in range(n_layer_all)]
    return [False] * n_layer_all


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


def model_facts(header: GGUFHeader) -> ModelFacts:
    """Derive ModelFacts from a parsed header. Raises ModelError when something sizing needs is missing."""
    source = header.source
    arch = header.architecture
    if not arch:
        raise ModelError(f"{source}: no 'general.architecture' key; is this a model GGUF?")
    if header.get("general.type") == "mmproj" or arch == "clip":
        raise ModelError(f"{source}: this is a vision projector (mmproj), not a language model")
    notes: list[str] = []
    known = arch in _PLAIN_ATTENTION or arch in _NO_MEMORY or arch in _RECURRENT or arch in _HYBRID
    if not known:
        notes.append(f"architecture '{arch}' is not one fitquant knows: KV cache sized as generic GQA (approximate)")

    def required(name: str) -> int:
        value = header.get(f"{arch}.{name}")
        if value is None:
            raise ModelError(f"{source}: missing '{arch}.{name}'")
        return _int(value, f"{arch}.{name}", source)

    n_layer_all = required("block_count")
    if not 0 < n_layer_all <= LLAMA_MAX_LAYERS:
        raise ModelError(f"{source}: '{arch}.block_count' = {n_layer_all} is outside 1..{LLAMA_MAX_LAYERS}")
    n_layer_nextn = _int(header.get(f"{arch}.nextn_predict_layers", 0), "nextn_predict_layers", source)
    if n_layer_nextn > n_layer_all:
        raise ModelError(f"{source}: nextn_predict_layers {n_layer_nextn} exceeds block_count {n_layer_all}")
    n_layer_main = n_layer_all - n_layer_nextn
    n_embd = required("embedding_length")
    n_ctx_train = _int(header.get(f"{arch}.context_length", 0), "context_length", source)

    # src/llama-model.cpp load_hparams: n_head per layer; n_head_kv defaults to n_head.
    n_head = _per_layer(header, f"{arch}.attention.head_count", n_layer_all, 0) or []
    n_head_kv = _per_layer(header, f"{arch}.attention.head_count_kv", n_layer_all, None) or list(n_head)
    n_ff = _per_layer(header, f"{arch}.feed_forward_length", n_layer_all, 0) or []
    n_head0 = n_head[0] if n_head else 0
    if n_head0 > 0:
        head_k = _int(header.get(f"{arch}.attention.key_length", n_embd // n_head0), "key_length", source)
        head_v = _int(header.get(f"{arch}.attention.value_length", n_embd // n_head0), "value_length", source)
    else:
        head_k = head_v = 0
    head_k_swa = _int(header.get(f"{arch}.attention.key_length_swa", head_k), "key_length_swa", source)
    head_v_swa = _int(header.get(f"{arch}.attention.value_length_swa", head_v), "value_length_swa", source)

    # MLA (deepseek2 and kin): K-only cache of kv_lora_rank + rope dims; V is a view of K.
    is_mla = bool(header.get(f"{arch}.attention.key_length_mla")) and bool(
        header.get(f"{arch}.attention.value_length_mla")
    )
    kv_lora_rank = _int(header.get(f"{arch}.attention.kv_lora_rank", 0), "kv_lora_rank", source)

    recurrent = _recurrent_layers(header, arch, n_layer_main, n_layer_all, n_head_kv, n_ff)
    swa, n_swa, swa_type = _swa_layers(header, arch, n_layer_main, n_layer_all, recurrent)
    n_embd_r, n_embd_s = _recurrent_state_sizes(header, arch, n_embd) if any(recurrent) else (0, 0)
    ssm_d_inner = _int(header.get(f"{arch}.ssm.inner_size", 0), "ssm.inner_size", source)

    # Which layers own KV cells (create_memory's filters and hparams.has_kv).
    has_memory = arch not in _NO_MEMORY
    kv_from_start = n_layer_all
    if arch == "gemma3n":
        kv_from_start = 20  # src/models/gemma3n.cpp: n_layer_kv_from_start = 20
    elif arch == "gemma4":
        shared = _int(header.get(f"{arch}.attention.shared_kv_layers", 0), "shared_kv_layers", source)
        kv_from_start = n_layer_all - shared

    def owns_kv(il: int) -> bool:
        if not has_memory or il >= n_layer_main or il >= kv_from_start:
            return False
        if arch in _RECURRENT:
            return False
        if arch == "falcon-h1":
            return True
        if arch in ("nemotron_h", "nemotron_h_moe"):
            return not recurrent[il] and n_ff[il] == 0
        return not recurrent[il]

    # Activation widths per layer, read from the weight shapes (robust to per-layer and per-arch keys).
    ffn_width, ffn_fused, expert_width, shared_width = (
        [0] * n_layer_all,
        [False] * n_layer_all,
        [0] * n_layer_all,
        [0] * n_layer_all,
    )
    for il in range(n_layer_all):
        up = header.tensor(f"blk.{il}.ffn_up.weight")
        if up is not None and len(up.shape) >= 2:
            ffn_width[il] = up.shape[1]
            ffn_fused[il] = header.tensor(f"blk.{il}.ffn_gate.weight") is None
        exps = header.tensor(f"blk.{il}.ffn_up_exps.weight")
        fused_exps = header.tensor(f"blk.{il}.ffn_gate_up_exps.weight")
        if exps is not None and len(exps.shape) >= 2:
            expert_width[il] = exps.shape[1]
        elif fused_exps is not None and len(fused_exps.shape) >= 2:
            expert_width[il] = fused_exps.shape[1] // 2
        shexp = header.tensor(f"blk.{il}.ffn_up_shexp.weight")
        if shexp is not None and len(shexp.shape) >= 2:
            shared_width[il] = shexp.shape[1]

    # Weights per layer, and the layers' MoE experts.
    layer_bytes = [0] * n_layer_all
    expert_bytes = [0] * n_layer_all
    input_bytes = output_bytes = other_bytes = token_embd_bytes = 0
    tensor_types: dict[str, int] = {}
    for tensor in header.tensors:
        tensor_types[tensor.type_name] = tensor_types.get(tensor.type_name, 0) + 1
        block = _BLOCK_TENSOR.match(tensor.name)
        if block:
            il = int(block.group(1))
            if il >= n_layer_all:
                raise ModelError(f"{source}: tensor '{tensor.name}' is beyond block_count {n_layer_all}")
            layer_bytes[il] += tensor.n_bytes
            if _EXPERT_TENSOR.match(tensor.name):
                expert_bytes[il] += tensor.n_bytes
        elif tensor.name.startswith(_INPUT_TENSORS):
            input_bytes += tensor.n_bytes
            if tensor.name == "token_embd.weight":
                token_embd_bytes = tensor.n_bytes
        elif tensor.name.startswith(_OUTPUT_TENSORS):
            output_bytes += tensor.n_bytes
        else:
            other_bytes += tensor.n_bytes
    # Tied embeddings: llama.cpp creates the output from token_embd with TENSOR_DUPLICATED.
    output_tied = header.tensor("output.weight") is None and token_embd_bytes > 0
    if output_tied:
        output_bytes += token_embd_bytes

    layers = []
    for il in range(n_layer_all):
        layers.append(
            LayerFacts(
                index=il,
                n_head=n_head[il] if n_head else 0,
                n_head_kv=n_head_kv[il],
                head_dim_k=head_k_swa if swa[il] else head_k,
                head_dim_v=head_v_swa if swa[il] else head_v,
                swa=swa[il],
                recurrent=recurrent[il],
                has_kv=owns_kv(il),
                weight_bytes=layer_bytes[il],
                expert_bytes=expert_bytes[il],
                ffn_width=ffn_width[il] or (n_ff[il] if n_ff else 0),
                ffn_fused=ffn_fused[il],
                expert_width=expert_width[il],
                shared_expert_width=shared_width[il],
            )
        )

    expert_used = header.get(f"{arch}.expert_used_count", 0)
    if isinstance(expert_used, list):
        expert_used = max(expert_used, default=0)
    file_type = header.get("general.file_type")
    return ModelFacts(
        source=source,
        architecture=arch,
        known=known,
        notes=tuple(notes),
        n_layer=n_layer_all,
        n_layer_nextn=n_layer_nextn,
        n_embd=n_embd,
        n_vocab=_n_vocab(header),
        n_ctx_train=n_ctx_train,
        layers=tuple(layers),
        sliding_window=n_swa,
        swa_type=swa_type,
        is_mla=is_mla,
        kv_lora_rank=kv_lora_rank,
        has_memory=has_memory,
        n_embd_r=n_embd_r,
        n_embd_s=n_embd_s,
        ssm_d_inner=ssm_d_inner,
        expert_count=_int(header.get(f"{arch}.expert_count", 0), "expert_count", source),
        expert_used_count=_int(expert_used, "expert_used_count", source),
        n_ff=tuple(n_ff),
        token_embd_bytes=token_embd_bytes,
        output_bytes=output_bytes,
        output_tied=output_tied,
        input_bytes=input_bytes,
        other_bytes=other_bytes,
        n_params=header.n_params,
        tensor_bytes_total=header.tensor_bytes_total,
        file_type=file_type if isinstance(file_type, int) else None,
        tensor_types=tensor_types,
    )


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
