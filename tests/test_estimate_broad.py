"""The compute buffer on the broad real-dimension corpus (tests/corpus_real.py BROAD_BUILDERS, issue 11).

Pure tests pin figures llama.cpp reported byte for byte (its memory breakdown, launcher/measure/dryrun.py) on
header-only copies of real models, including the two shapes issue 11 found the old model low on: 80 layers of
8192 at 128k with flash attention, and an attention width (32 x 128 = 4096) unlike the embedding width (5120).
The slow test measures a few settings of every broad model with llama.cpp itself; scripts/bench_estimate.py
sweeps them all.
"""

from __future__ import annotations

from pathlib import Path

import corpus_real
import pytest
from accuracy import compare, describe

from launcher.compute import GraphShape, compute_buffers
from launcher.compute.ggml import _Allocator, allocate
from launcher.compute.graph import Builder, Model
from launcher.compute.models import ARCHITECTURES, decoder
from launcher.estimate import GPU, Settings, estimate
from launcher.gguf import read_header
from launcher.measure import dryrun as engine
from launcher.model import ModelFacts, model_facts

MiB = 1024**2


def facts_of(builder, tmp_path: Path) -> ModelFacts:
    model = builder()
    path = tmp_path / f"{model.name}.gguf"
    corpus_real.write_sparse(model, path)
    return model_facts(read_header(path))


# (builder, settings, bytes llama.cpp's CPU backend reserves: llama_get_memory_breakdown's compute)
PINNED = [
    (corpus_real.real_llama31_70b, Settings(n_ctx=131072, flash_attn="on"), 377501696),
    (corpus_real.real_llama31_70b, Settings(n_ctx=131072, flash_attn="on", type_k="q8_0", type_v="q8_0"), 360806400),
    (corpus_real.real_mistral_nemo_12b, Settings(n_ctx=4096, flash_attn="on"), 333461504),
    (
        corpus_real.real_qwen3_235b_a22b,
        Settings(n_ctx=40960, flash_attn="off", n_parallel=4, kv_unified=True),
        5513422848,
    ),
    (
        corpus_real.real_deepseek_v3,
        Settings(n_ctx=32768, flash_attn="on", type_k="q8_0", type_v="q8_0", n_parallel=4, n_outputs_max=4),
        436215840,
    ),
]


@pytest.mark.parametrize(("builder", "settings", "expected"), PINNED, ids=lambda v: getattr(v, "__name__", ""))
def test_compute_buffer_equals_llama_cpp_to_the_byte(builder, settings, expected, tmp_path):
    facts = facts_of(builder, tmp_path)
    assert estimate(facts, settings).compute_bytes == expected


def test_compute_attention_width_comes_from_attn_q_not_n_embd(tmp_path):
    # Mistral-Nemo: 32 heads x 128 = 4096 wide attention on a 5120-wide residual stream
    facts = facts_of(corpus_real.real_mistral_nemo_12b, tmp_path)
    layer = facts.layers[0]
    assert (facts.n_embd, layer.n_head * layer.head_dim_k) == (5120, 4096)
    assert dict((name, shape) for name, shape, _ in layer.tensors)["attn_q.weight"] == (5120, 4096)


def shape_for(facts: ModelFacts, settings: Settings, gpus: list[GPU] | None = None) -> GraphShape:
    """The GraphShape estimate() builds, captured."""
    import launcher.estimate as estimate_module

    captured: list[GraphShape] = []
    real = estimate_module.compute_buffers

    def spy(f: ModelFacts, shape: GraphShape) -> dict[str, int]:
        captured.append(shape)
        return real(f, shape)

    estimate_module.compute_buffers = spy
    try:
        estimate(facts, settings, gpus=gpus)
    finally:
        estimate_module.compute_buffers = real
    return captured[0]


@pytest.mark.parametrize(
    ("builder", "settings", "gpus"),
    [
        (corpus_real.real_llama31_70b, Settings(n_ctx=32768, flash_attn="off"), None),
        (corpus_real.real_gemma3_27b, Settings(n_ctx=131072, type_k="q8_0", type_v="q8_0", flash_attn="on"), None),
        (corpus_real.real_qwen3_next_80b_a3b, Settings(n_ctx=65536, n_parallel=4, kv_unified=True), None),
        (
            corpus_real.real_deepseek_v3,
            Settings(n_ctx=8192, flash_attn="on", n_gpu_layers=-1),
            [GPU("GPU0"), GPU("GPU1")],
        ),
        (corpus_real.real_qwen25_72b, Settings(n_ctx=16384, flash_attn="on", n_gpu_layers=40), [GPU("GPU0")]),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_compute_folding_repeated_layers_changes_nothing(builder, settings, gpus, tmp_path):
    """Leaving out whole periods of identical layers (launcher.compute.graph.fold_layers) gives the full graph's figures."""
    facts = facts_of(builder, tmp_path)
    shape = shape_for(facts, settings, gpus)
    folded = Builder(Model(facts), shape)
    assert folded.kept is not None and len(folded.kept) < facts.n_layer, "expected a fold on this model"
    full = Builder(Model(facts), shape, fold=False)
    ARCHITECTURES.get(facts.architecture, decoder)(full)
    assert compute_buffers(facts, shape) == allocate(full.g, shape.alignment)[0]


def test_compute_on_gpus_keeps_inputs_on_the_host_and_four_copies_with_pipeline_parallelism(tmp_path):
    """Graph inputs live on the host and each GPU gets copies of those it reads; with two GPUs and every layer
    offloaded llama.cpp turns on pipeline parallelism and keeps four copies of each (ggml_backend_sched)."""
    facts = facts_of(corpus_real.real_llama31_70b, tmp_path)
    settings = Settings(n_ctx=131072, flash_attn="on", n_gpu_layers=-1)
    cpu_only = estimate(facts, Settings(n_ctx=131072, flash_attn="on")).compute_bytes
    one = {d.name: d.compute_bytes for d in estimate(facts, settings, gpus=[GPU("GPU0")]).devices}
    two = {d.name: d.compute_bytes for d in estimate(facts, settings, gpus=[GPU("GPU0"), GPU("GPU1")]).devices}
    mask = 131072 * 512 * 2  # the F16 KQ mask: [n_kv, n_tokens]
    assert mask <= one["CPU"] < cpu_only  # the inputs (and the token rows) stay on the host
    assert one["GPU0"] >= mask  # the GPU reads its own copy of the mask
    assert two["CPU"] >= 4 * mask and min(two["GPU0"], two["GPU1"]) >= 4 * mask


def test_allocator_takes_the_smallest_free_block_that_fits_and_merges_neighbours():
    a = _Allocator(32)
    offsets = [a.alloc(size) for size in (100, 200, 50, 300)]  # 128, 224, 64, 320 after alignment
    assert offsets == [0, 128, 352, 416]
    a.release(0, 100)
    a.release(352, 50)
    # two holes: 128 at 0 and 64 at 352; a 40-byte tensor takes the smaller one
    assert a.alloc(40) == 352
    a.release(352, 40)
    a.release(128, 200)  # merges with the hole at 0 into [0, 352), and with [352, 416)
    assert a.free[0] == [0, 416]
    assert a.alloc(400) == 0
    assert a.max_size == 736


# (model name, settings): two of the shapes, then one or two settings per model that, together, touch
# every axis of the sweep (contexts up to the training context, f16 and q8_0, flash attention on and off, one
# and four slots, unified or not, swa_full, one output per slot)
SUBSET = [
    ("Llama-3.1-70B", Settings(n_ctx=131072, flash_attn="on")),
    ("Llama-3.1-70B", Settings(n_ctx=131072, flash_attn="on", type_k="q8_0", type_v="q8_0")),
    ("Mistral-Nemo-12B", Settings(n_ctx=4096, flash_attn="on")),
    (
        "Mistral-Nemo-12B",
        Settings(
            n_ctx=1024000, type_k="q8_0", type_v="q8_0", flash_attn="on", n_parallel=4, kv_unified=True, n_outputs_max=4
        ),
    ),
    ("Qwen2.5-72B", Settings(n_ctx=32768, flash_attn="off", n_parallel=4, kv_unified=True)),
    ("Llama-3.2-1B", Settings(n_ctx=131072, type_k="q8_0", type_v="q8_0", flash_attn="on", n_parallel=4)),
    ("Qwen3-235B-A22B", Settings(n_ctx=40960, flash_attn="on")),
    ("gemma-3-27b", Settings(n_ctx=131072, type_k="q8_0", type_v="q8_0", flash_attn="on")),
    ("gemma-2-9b", Settings(n_ctx=8192, flash_attn="off", n_parallel=4, kv_unified=True, swa_full=True)),
    ("Phi-4", Settings(n_ctx=16384, type_k="q8_0", type_v="q8_0", flash_attn="on")),
    ("Mixtral-8x7B", Settings(n_ctx=32768, flash_attn="on", n_parallel=4, n_outputs_max=4)),
    ("Qwen2-57B-A14B", Settings(n_ctx=65536, type_k="q8_0", type_v="q8_0", flash_attn="on", n_outputs_max=1)),
    ("DeepSeek-V3", Settings(n_ctx=163840, flash_attn="on")),
    (
        "gpt-oss-120b",
        Settings(
            n_ctx=131072, type_k="q8_0", type_v="q8_0", flash_attn="on", n_parallel=4, kv_unified=True, swa_full=True
        ),
    ),
    ("granite-4.0-h-small", Settings(n_ctx=131072, type_k="q8_0", type_v="q8_0", flash_attn="on")),
    ("LFM2-1.2B", Settings(n_ctx=128000, flash_attn="off", n_parallel=4, kv_unified=True)),
    ("Qwen3-Next-80B-A3B", Settings(n_ctx=262144, type_k="q8_0", type_v="q8_0", flash_attn="on", n_outputs_max=1)),
]


@pytest.mark.slow
@pytest.mark.skipif(not engine.engine_available(), reason="llama-cpp-python is not installed")
def test_broad_corpus_matches_llama_cpp_on_a_subset_of_the_sweep(broad_corpus):
    by_name = {m.family_name: m for m in broad_corpus}
    assert {name for name, _ in SUBSET} == set(by_name) == {b().name for b in corpus_real.BROAD_BUILDERS}
    facts = {name: model_facts(read_header(m.path)) for name, m in by_name.items()}
    jobs = [(by_name[name].path, engine.EngineSettings.from_settings(s)) for name, s in SUBSET]
    failures = []
    for (name, settings), measured in zip(SUBSET, engine.measure_many(jobs, timeout_s=600), strict=True):
        if isinstance(measured, Exception):
            failures.append(f"{name} {describe(settings)}: llama.cpp refused: {measured}")
            continue
        for check in compare(estimate(facts[name], settings), measured):
            if not check.ok:
                failures.append(
                    f"{name} {describe(settings)} {check.component}: predicted {check.predicted_mib:.2f} MiB, "
                    f"llama.cpp {check.measured_mib:.2f} MiB"
                )
    assert failures == []
