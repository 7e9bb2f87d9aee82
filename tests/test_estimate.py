"""launcher.estimate on small header-only models: every figure computed by hand from llama.cpp's rules.

Paths are in ggml-org/llama.cpp (the build llama-cpp-python 0.3.36 vendors). Pure: no llama.cpp, no files.
"""

from __future__ import annotations

import bisect

import gguf
import pytest
from gguf import GGMLQuantizationType as QT

from launcher.defaults import DEFAULT_CONTEXT
from launcher.errors import EstimateError
from launcher.estimate import (
    GPU,
    KV_CACHE_TYPES,
    RUNTIME_OVERHEAD_BYTES,
    Settings,
    _layer_devices,
    cache_row_bytes,
    default_flash_attn,
    default_kv_unified,
    default_settings,
    estimate,
    kv_caches,
    resolve_flash_attn,
)
from launcher.gguf import parse_header
from launcher.model import ModelFacts, model_facts
from tests.gguf_factory import header_only_gguf

MiB = 1024**2
N_EMBD = 256
N_VOCAB = 1000
# 4 heads of 64, 2 KV heads: n_embd_k_gqa = n_embd_v_gqa = 128 elements per cell and layer
KV_WIDTH = 128


def block_bytes(il: int) -> int:
    """Weights of block il in the models below: one F16 attn_q of 256 x 32*(il+1), so every block differs."""
    return N_EMBD * 32 * (il + 1) * 2


TOKEN_EMBD_BYTES = N_VOCAB * N_EMBD // 32 * 34  # Q8_0: 34 bytes per 32 weights
OUTPUT_BYTES = N_VOCAB * N_EMBD * 2 + N_EMBD * 4  # output.weight F16 + output_norm F32


def facts_of(arch: str, values: dict, tensors: list) -> ModelFacts:
    head, _ = header_only_gguf(arch, values, tensors)
    return model_facts(parse_header(head, source="test.gguf"))


def llama(n_layer: int = 4, *, head_count_kv: int | list[int] = 2, context_length: int = 131072) -> ModelFacts:
    values = {
        "llama.block_count": n_layer,
        "llama.embedding_length": N_EMBD,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": head_count_kv,
        "llama.context_length": context_length,
        "llama.feed_forward_length": 512,
    }
    tensors = [("token_embd.weight", (N_EMBD, N_VOCAB), QT.Q8_0)]
    tensors += [(f"blk.{il}.attn_q.weight", (N_EMBD, 32 * (il + 1)), QT.F16) for il in range(n_layer)]
    tensors += [("output_norm.weight", (N_EMBD,), QT.F32), ("output.weight", (N_EMBD, N_VOCAB), QT.F16)]
    return facts_of("llama", values, tensors)


def gemma3(n_layer: int = 6, sliding_window: int = 512) -> ModelFacts:
    values = {
        "gemma3.block_count": n_layer,
        "gemma3.embedding_length": N_EMBD,
        "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 2,
        "gemma3.context_length": 32768,
        "gemma3.feed_forward_length": 512,
        "gemma3.attention.sliding_window": sliding_window,
    }
    return facts_of("gemma3", values, [("token_embd.weight", (N_EMBD, N_VOCAB), QT.Q8_0)])


# --------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("cache_type", list(KV_CACHE_TYPES))
def test_estimate_cache_row_bytes_are_ggml_row_sizes(cache_type):
    # ggml_row_size(type, n) = n / block_size * type_size; block sizes and type sizes from the gguf package
    block, type_size = gguf.GGML_QUANT_SIZES[QT[cache_type.upper()]]
    assert cache_row_bytes(cache_type, 128) == 128 // block * type_size


def test_estimate_q8_0_row_is_34_bytes_per_32_elements():
    assert cache_row_bytes("q8_0", 128) == 136
    assert cache_row_bytes("q8_0", 32) == 34
    assert cache_row_bytes("f16", 128) == 256
    with pytest.raises(EstimateError, match="multiple of 32"):
        cache_row_bytes("q8_0", 100)


def test_estimate_kv_bytes_are_layers_times_padded_cells_times_rows():
    facts = llama()
    # llama-context.cpp: n_ctx = GGML_PAD(5000, 256) = 5120 cells
    # llama-kv-cache.cpp: K [n_embd_k_gqa, cells] + V [n_embd_v_gqa, cells] per layer
    est = estimate(facts, Settings(n_ctx=5000, type_k="f16", type_v="f16"))
    assert (est.n_ctx, est.n_ctx_seq) == (5120, 5120)
    (cache,) = est.kv_caches
    assert (cache.kind, cache.cells, cache.n_stream, cache.layers) == ("full", 5120, 1, (0, 1, 2, 3))
    assert cache.k_bytes == cache.v_bytes == 4 * 5120 * KV_WIDTH * 2
    assert est.kv_bytes == 4 * 5120 * (256 + 256) == 10_485_760
    q8 = estimate(facts, Settings(n_ctx=5000, type_k="q8_0", type_v="q8_0", flash_attn="on"))
    # q8_0: 128 elements = 4 blocks of 34 bytes = 136 bytes per row
    assert q8.kv_bytes == 4 * 5120 * (136 + 136) == 5_570_560


def test_estimate_mixed_k_and_v_types():
    est = estimate(llama(), Settings(n_ctx=4096, type_k="q8_0", type_v="f16"))
    assert est.kv_caches[0].k_bytes == 4 * 4096 * 136
    assert est.kv_caches[0].v_bytes == 4 * 4096 * 256


def test_estimate_per_layer_kv_heads_and_transposed_v_padding():
    facts = llama(head_count_kv=[2, 1, 2, 1])  # n_embd_k_gqa per layer: 128, 64, 128, 64
    on = estimate(facts, Settings(n_ctx=4096, flash_attn="on"))
    assert on.kv_caches[0].k_bytes == on.kv_caches[0].v_bytes == 4096 * 2 * (128 + 64 + 128 + 64)
    # without flash attention V is stored transposed and every layer's V is as wide as the widest
    # (llama-kv-cache.cpp: n_embd_v_gqa = !v_trans ? n_embd_v_gqa(il) : n_embd_v_gqa_max())
    off = estimate(facts, Settings(n_ctx=4096, flash_attn="off"))
    assert off.kv_caches[0].k_bytes == 4096 * 2 * 384
    assert off.kv_caches[0].v_bytes == 4096 * 2 * 4 * 128
    assert off.kv_caches[0].layer_bytes == (4096 * 2 * 256, 4096 * 2 * 192, 4096 * 2 * 256, 4096 * 2 * 192)


def test_estimate_per_sequence_streams_versus_unified():
    facts = llama()
    row = 136 + 136  # q8_0 K + V
    # not unified: n_ctx_seq = GGML_PAD(n_ctx / n_seq, 256), one stream of that many cells per sequence
    split = estimate(facts, Settings(n_ctx=8192, type_k="q8_0", type_v="q8_0", flash_attn="on", n_parallel=4))
    assert (split.n_ctx, split.n_ctx_seq) == (8192, 2048)
    assert (split.kv_caches[0].cells, split.kv_caches[0].n_stream) == (2048, 4)
    assert split.kv_bytes == 4 * 2048 * 4 * row
    # 5000 tokens over 3 sequences: pad(5120 / 3, 256) = 1792 cells, n_ctx = 3 x 1792 = 5376
    odd = estimate(facts, Settings(n_ctx=5000, n_parallel=3))
    assert (odd.n_ctx, odd.n_ctx_seq, odd.kv_caches[0].n_stream) == (5376, 1792, 3)
    assert odd.kv_bytes == 4 * 1792 * 3 * (256 + 256)
    # unified: one stream of n_ctx cells shared by every sequence
    unified = estimate(facts, Settings(n_ctx=8192, type_k="q8_0", type_v="q8_0", flash_attn="on", n_parallel=4,
                                       kv_unified=True))  # fmt: skip
    assert (unified.n_ctx, unified.n_ctx_seq) == (8192, 8192)
    assert (unified.kv_caches[0].cells, unified.kv_caches[0].n_stream) == (8192, 1)
    assert unified.kv_bytes == split.kv_bytes == 4 * 8192 * row


@pytest.mark.parametrize(
    ("n_ctx", "n_parallel", "unified", "n_ubatch", "swa_full", "n_ctx_seq", "streams", "swa_cells"),
    [
        (8192, 1, False, 512, False, 8192, 1, 1024),  # pad(min(8192, 512 + 512), 256)
        (8192, 1, False, 300, False, 8192, 1, 1024),  # pad(min(8192, 512 + 300 = 812), 256)
        (768, 1, False, 512, False, 768, 1, 768),  # pad(min(768, 1024), 256): never more than the context
        (8192, 2, True, 512, False, 8192, 1, 1536),  # unified: pad(min(8192, 512 * 2 + 512), 256)
        (8192, 2, False, 512, False, 4096, 2, 1024),  # per sequence: pad(min(4096, 512 + 512), 256), 2 streams
        (8192, 1, False, 512, True, 8192, 1, 8192),  # --swa-full: the SWA cache is as big as the other
    ],
)
def test_estimate_swa_cache_cells(n_ctx, n_parallel, unified, n_ubatch, swa_full, n_ctx_seq, streams, swa_cells):
    # src/llama-kv-cache-iswa.cpp: size_swa = GGML_PAD(min(size_base, n_swa*(unified ? n_seq : 1) + n_ubatch), 256)
    facts = gemma3()  # 6 layers, pattern 6: layers 0-4 use the 512-token window, layer 5 is global
    settings = Settings(n_ctx=n_ctx, n_parallel=n_parallel, kv_unified=unified, n_ubatch=n_ubatch, swa_full=swa_full)
    caches, _, ctx_seq = kv_caches(facts, settings, flash_attn=True)
    assert ctx_seq == n_ctx_seq
    full, swa = caches
    assert (full.kind, full.layers, full.cells, full.n_stream) == ("non-SWA", (5,), n_ctx_seq, streams)
    assert (swa.kind, swa.layers, swa.cells, swa.n_stream) == ("SWA", (0, 1, 2, 3, 4), swa_cells, streams)
    row = KV_WIDTH * 2  # f16
    assert full.total_bytes == 1 * n_ctx_seq * streams * 2 * row
    assert swa.total_bytes == 5 * swa_cells * streams * 2 * row
    assert estimate(facts, settings).kv_bytes == full.total_bytes + swa.total_bytes


# --------------------------------------------------------------------------------------------------------------
# Placement: which device holds each layer


def test_estimate_without_gpu_offload_everything_is_on_the_cpu():
    facts = llama()
    for gpus in ([], [GPU("GPU0")]):
        est = estimate(facts, Settings(n_ctx=4096, n_gpu_layers=0), gpus=gpus)
        assert [d.name for d in est.devices] == ["CPU"]
        assert est.n_gpu_layers == 0
        cpu = est.device("CPU")
        assert cpu.layers == [0, 1, 2, 3]
        assert cpu.weights_bytes == facts.tensor_bytes_total
        assert cpu.overhead_bytes == 0
    # with no GPU a requested offload is ignored
    assert estimate(facts, Settings(n_ctx=4096, n_gpu_layers=-1)).n_gpu_layers == 0


@pytest.mark.parametrize("ngl", [-1, 5, 99])
def test_estimate_full_offload_keeps_only_the_input_layer_on_the_cpu(ngl):
    facts = llama()
    est = estimate(facts, Settings(n_ctx=4096, n_gpu_layers=ngl), gpus=[GPU("GPU0")])
    assert est.n_gpu_layers == 5  # n_layer + 1: every block and the output layer
    gpu, cpu = est.device("GPU0"), est.device("CPU")
    assert gpu.layers == [0, 1, 2, 3] and cpu.layers == []
    assert gpu.weights_bytes == sum(block_bytes(il) for il in range(4)) + OUTPUT_BYTES
    # llama-model.cpp: dev_input is always the CPU (token_embd)
    assert cpu.weights_bytes == TOKEN_EMBD_BYTES
    assert gpu.kv_bytes == est.kv_bytes and cpu.kv_bytes == 0
    assert not any("partial offload" in note for note in est.notes)


@pytest.mark.parametrize(
    ("ngl", "gpu_blocks", "output_on_gpu"),
    [(1, [], True), (2, [3], True), (3, [2, 3], True), (4, [1, 2, 3], True)],
)
def test_estimate_partial_offload_takes_the_last_layers(ngl, gpu_blocks, output_on_gpu):
    # llama-model.cpp load_tensors: i_gpu_start = max(n_layer + 1 - ngl, 0); layers il >= i_gpu_start go to
    # the GPU, and layer n_layer is the output layer: ngl = k puts the output layer and the last k - 1 blocks there
    facts = llama()
    est = estimate(facts, Settings(n_ctx=4096, n_gpu_layers=ngl), gpus=[GPU("GPU0")])
    gpu, cpu = est.device("GPU0"), est.device("CPU")
    assert est.n_gpu_layers == ngl
    assert gpu.layers == gpu_blocks
    assert cpu.layers == [il for il in range(4) if il not in gpu_blocks]
    assert gpu.weights_bytes == sum(block_bytes(il) for il in gpu_blocks) + OUTPUT_BYTES
    assert cpu.weights_bytes == sum(block_bytes(il) for il in cpu.layers) + TOKEN_EMBD_BYTES
    per_layer_kv = 4096 * 2 * KV_WIDTH * 2  # f16, flash on: K + V
    assert gpu.kv_bytes == len(gpu_blocks) * per_layer_kv
    assert cpu.kv_bytes == len(cpu.layers) * per_layer_kv
    assert f"partial offload: {ngl} of 5 layers on the GPU" in " ".join(est.notes)


def test_estimate_tied_output_on_the_cpu_is_not_counted_twice():
    values = {"llama.block_count": 2, "llama.embedding_length": N_EMBD, "llama.attention.head_count": 4}
    tensors = [("token_embd.weight", (N_EMBD, N_VOCAB), QT.Q8_0), ("blk.0.attn_q.weight", (N_EMBD, 32), QT.F16),
               ("blk.1.attn_q.weight", (N_EMBD, 32), QT.F16)]  # fmt: skip
    facts = facts_of("llama", values, tensors)
    assert facts.output_tied
    on_cpu = estimate(facts, Settings(n_ctx=256))
    assert on_cpu.weights_bytes == facts.tensor_bytes_total
    on_gpu = estimate(facts, Settings(n_ctx=256, n_gpu_layers=-1), gpus=[GPU("GPU0")])
    # TENSOR_DUPLICATED: token_embd stays on the CPU and a copy becomes the GPU's output layer
    assert on_gpu.weights_bytes == facts.tensor_bytes_total + TOKEN_EMBD_BYTES


def _reference_devices(n_layer: int, ngl: int, weights: list[float]) -> list[int | None]:
    """llama.cpp's rule, written from load_tensors: cumulative splits normalised, std::upper_bound of
    (il - i_gpu_start) / act_gpu_layers; None for the CPU."""
    total = sum(weights)
    splits, acc = [], 0.0
    for w in weights:
        acc += w
        splits.append(acc / total)
    i_gpu_start = max(n_layer + 1 - ngl, 0)
    act = min(ngl, n_layer + 1)
    out: list[int | None] = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or il - i_gpu_start >= act:
            out.append(None)
        else:
            out.append(bisect.bisect_right(splits, (il - i_gpu_start) / act))
    return out


def test_estimate_split_three_to_one_over_two_gpus():
    facts = llama(7)  # layers 0..6 and the output layer 7: 8 positions
    gpus = [GPU("GPU0", split_weight=3), GPU("GPU1", split_weight=1)]
    est = estimate(facts, Settings(n_ctx=4096, n_gpu_layers=-1), gpus=gpus)
    # splits [0.75, 1.0]; il / 8 < 0.75 for il 0..5: 6 blocks on GPU0, block 6 and the output layer on GPU1
    assert est.device("GPU0").layers == [0, 1, 2, 3, 4, 5]
    assert est.device("GPU1").layers == [6]
    assert est.device("GPU1").weights_bytes == block_bytes(6) + OUTPUT_BYTES
    assert est.device("GPU0").weights_bytes == sum(block_bytes(il) for il in range(6))
    assert _layer_devices(facts, 8, gpus) == ["GPU0"] * 6 + ["GPU1"] * 2
    # 1:1 on 4 blocks: il / 5 < 0.5 for il 0..2
    even = estimate(llama(4), Settings(n_ctx=4096, n_gpu_layers=-1), gpus=[GPU("GPU0"), GPU("GPU1")])
    assert (even.device("GPU0").layers, even.device("GPU1").layers) == ([0, 1, 2], [3])
    # partial offload, 3:1: ngl 4 on 7 blocks -> i_gpu_start 4, positions 0, 1/4, 2/4 on GPU0, 3/4 (output) on GPU1
    partial = estimate(facts, Settings(n_ctx=4096, n_gpu_layers=4), gpus=gpus)
    assert partial.device("GPU0").layers == [4, 5, 6]
    assert partial.device("GPU1").layers == []
    assert partial.device("GPU1").weights_bytes == OUTPUT_BYTES
    assert partial.device("CPU").layers == [0, 1, 2, 3]


@pytest.mark.parametrize("weights", [[1, 1], [3, 1], [1, 3], [5, 2], [23552, 11264], [2, 1, 1], [1, 1, 1], [7, 0.5]])
def test_estimate_split_follows_llama_cpp_upper_bound_rule(weights):
    facts = llama(9)
    gpus = [GPU(f"GPU{i}", split_weight=w) for i, w in enumerate(weights)]
    for ngl in range(11):
        expected = ["CPU" if i is None else f"GPU{i}" for i in _reference_devices(9, ngl, weights)]
        assert _layer_devices(facts, ngl, gpus) == expected, ngl
        est = estimate(facts, Settings(n_ctx=256, n_gpu_layers=ngl), gpus=gpus)
        for device in est.devices:
            assert device.layers == [il for il in range(9) if expected[il] == device.name]
    # the bigger share never gets fewer layers
    full = _layer_devices(facts, 10, gpus)
    counts = [full.count(f"GPU{i}") for i in range(len(weights))]
    assert sum(counts) == 10
    for i in range(len(weights)):
        for j in range(len(weights)):
            if weights[i] > weights[j]:
                assert counts[i] >= counts[j] - 1


# --------------------------------------------------------------------------------------------------------------
# Overhead, output buffer, errors


@pytest.mark.parametrize(("backend", "overhead"), [("cuda", 256 * MiB), ("rocm", 256 * MiB), ("metal", 128 * MiB)])
def test_estimate_runtime_overhead_per_gpu_backend(backend, overhead):
    assert RUNTIME_OVERHEAD_BYTES[backend] == overhead
    est = estimate(llama(7), Settings(n_ctx=4096, n_gpu_layers=-1),
                   gpus=[GPU("GPU0", backend=backend), GPU("GPU1", backend=backend)])  # fmt: skip
    assert est.device("GPU0").overhead_bytes == est.device("GPU1").overhead_bytes == overhead
    assert est.device("CPU").overhead_bytes == 0
    assert est.overhead_bytes == 2 * overhead
    assert backend in est.compute_source


def test_estimate_no_overhead_without_gpu_and_none_for_an_unused_gpu():
    assert RUNTIME_OVERHEAD_BYTES["cpu"] == 0
    assert estimate(llama(), Settings(n_ctx=4096)).overhead_bytes == 0
    # ngl 2 on 4 blocks with two GPUs 1:1 -> positions 0 and 1/2: block 3 on GPU0, the output layer on GPU1
    est = estimate(llama(), Settings(n_ctx=4096, n_gpu_layers=2), gpus=[GPU("GPU0"), GPU("GPU1", backend="metal")])
    assert [d.name for d in est.devices] == ["CPU", "GPU0", "GPU1"]
    assert (est.device("GPU0").overhead_bytes, est.device("GPU1").overhead_bytes) == (256 * MiB, 128 * MiB)
    one = estimate(llama(), Settings(n_ctx=4096, n_gpu_layers=1), gpus=[GPU("GPU0"), GPU("GPU1")])
    assert [d.name for d in one.devices] == ["CPU", "GPU0"]  # GPU1 holds nothing: not listed, no overhead


def test_estimate_output_buffer_is_logits_of_each_sequence_on_the_host():
    # llama_context::output_reserve: n_vocab floats per output, n_seq outputs
    for n_parallel in (1, 4):
        est = estimate(llama(), Settings(n_ctx=4096, n_parallel=n_parallel, n_gpu_layers=-1), gpus=[GPU("GPU0")])
        assert est.device("CPU").output_bytes == N_VOCAB * 4 * n_parallel
        assert est.device("GPU0").output_bytes == 0


def test_estimate_totals_add_up():
    est = estimate(llama(7), Settings(n_ctx=4096, n_gpu_layers=5), gpus=[GPU("GPU0", split_weight=2), GPU("GPU1")])
    for d in est.devices:
        parts = (d.weights_bytes, d.kv_bytes, d.recurrent_bytes, d.compute_bytes, d.output_bytes, d.overhead_bytes)
        assert d.total_bytes == sum(parts)
        assert d.to_json()["layers"] == len(d.layers)
    assert est.total_bytes == sum(d.total_bytes for d in est.devices)
    assert est.weights_bytes == est.to_json()["weights_bytes"] == llama(7).tensor_bytes_total


def test_estimate_quantized_v_cache_without_flash_attention_is_an_error():
    facts = llama()
    with pytest.raises(EstimateError, match="requires flash attention"):
        estimate(facts, Settings(n_ctx=4096, type_k="f16", type_v="q8_0", flash_attn="off"))
    # a quantized K alone is fine without flash attention
    assert not estimate(facts, Settings(n_ctx=4096, type_k="q8_0", type_v="f16", flash_attn="off")).flash_attn


@pytest.mark.parametrize("field", ["type_k", "type_v"])
def test_estimate_unknown_kv_type_is_an_error(field):
    with pytest.raises(EstimateError, match=f"unsupported KV cache type 'q3_k' for {field}"):
        Settings(n_ctx=4096, **{field: "q3_k"})


def test_estimate_quantized_k_with_flash_needs_head_size_divisible_by_32():
    values = {"llama.block_count": 1, "llama.embedding_length": 160, "llama.attention.head_count": 4}
    facts = facts_of("llama", values, [])  # head size 40
    with pytest.raises(EstimateError, match="head size divisible by 32, not 40"):
        estimate(facts, Settings(n_ctx=256, type_k="q8_0", type_v="q8_0", flash_attn="on"))


def test_estimate_flash_attention_resolution():
    facts = llama()
    assert resolve_flash_attn(facts, Settings(n_ctx=256, flash_attn="auto")) is True
    assert resolve_flash_attn(facts, Settings(n_ctx=256, flash_attn="on")) is True
    assert resolve_flash_attn(facts, Settings(n_ctx=256, flash_attn="off")) is False


# --------------------------------------------------------------------------------------------------------------
# Defaults


def test_estimate_default_settings():
    facts = llama(context_length=131072)
    s = default_settings(facts)
    assert (s.n_ctx, s.type_k, s.type_v, s.flash_attn) == (131072, "q8_0", "q8_0", "on")
    assert (s.n_gpu_layers, s.n_parallel, s.kv_unified) == (0, 1, False)
    assert default_settings(facts, has_gpu=True).n_gpu_layers == -1
    # None means "the default", so a CLI can pass its options straight through
    given = default_settings(facts, has_gpu=True, n_ctx=None, n_gpu_layers=None, type_v=None, n_parallel=4)
    assert (given.n_ctx, given.n_gpu_layers, given.type_v, given.kv_unified) == (131072, -1, "q8_0", True)
    f16 = default_settings(facts, type_k="f16", type_v="f16")
    assert f16.flash_attn == "auto"
    assert default_settings(facts, type_v="q4_0").flash_attn == "on"
    assert default_settings(facts, n_parallel=4, kv_unified=False).kv_unified is False
    assert default_settings(facts, n_ctx=8192, n_gpu_layers=3).n_ctx == 8192
    # no training context in the header: DEFAULT_CONTEXT
    assert default_settings(llama(context_length=0)).n_ctx == DEFAULT_CONTEXT == 4096


def test_estimate_default_helpers():
    assert [default_flash_attn(t) for t in ("f32", "f16", "bf16")] == ["auto"] * 3
    assert [default_flash_attn(t) for t in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")] == ["on"] * 6
    assert (default_kv_unified(1), default_kv_unified(2), default_kv_unified(8)) == (False, True, True)
