"""launcher.measure.dryrun: llama.cpp (llama-cpp-python) as a memory-measuring instrument, on the tiny-model corpus
and the real Gemma 3 270M."""

from __future__ import annotations

import os
from pathlib import Path

import corpus as corpus_mod
import pytest

from launcher.errors import EngineError
from launcher.measure import dryrun as engine
from launcher.measure.dryrun import EngineMeasurement, EngineSettings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not engine.engine_available(), reason="llama-cpp-python is not installed"),
]

MiB = 1024 * 1024
FAMILIES = {f.name: f for f in corpus_mod.families()}
RECURRENT = {"tiny-mamba2"}  # RS state only, no KV
HYBRID = {"tiny-granitehybrid", "tiny-lfm2", "tiny-qwen3next"}  # KV for attention layers + RS
REQUIRED_ARCHS = {"llama", "qwen2", "qwen3", "gemma3", "gpt-oss", "qwen3moe", "deepseek2", "phi3"}


def _by_name(corpus: list[corpus_mod.CorpusModel]) -> dict[str, corpus_mod.CorpusModel]:
    return {m.name: m for m in corpus}


def _ok(r: EngineMeasurement | EngineError) -> EngineMeasurement:
    if isinstance(r, EngineError):
        pytest.fail(f"unexpected EngineError: {r}")
    return r


@pytest.fixture(scope="session")
def corpus_4096(corpus: list[corpus_mod.CorpusModel]) -> dict[str, EngineMeasurement | EngineError]:
    """Every corpus model measured at n_ctx 4096 (defaults otherwise), with one worker."""
    results = engine.measure_many([(m.path, EngineSettings(n_ctx=4096)) for m in corpus])
    return {m.name: r for m, r in zip(corpus, results, strict=True)}


def _measure1(path: str | os.PathLike[str], s: EngineSettings) -> EngineMeasurement | EngineError:
    [r] = engine.measure(path, [s])
    return r


def test_engine_available() -> None:
    assert engine.engine_available() is True


def test_corpus_covers_the_required_architectures(corpus: list[corpus_mod.CorpusModel]) -> None:
    archs = {m.arch for m in corpus}
    assert archs >= REQUIRED_ARCHS | {"granitehybrid"}
    quants = {m.quant for m in corpus if m.family_name == "tiny-llama"}
    assert quants >= {"F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "Q4_0", "IQ4_XS"}
    assert any(m.quant == "MXFP4_MOE" for m in corpus if m.arch == "gpt-oss")
    for m in corpus:
        assert m.path.is_file() and m.name == f"{m.family_name}-{m.quant}"


def test_corpus_is_reused(corpus: list[corpus_mod.CorpusModel], corpus_root: Path) -> None:
    before = {m.path: m.path.stat().st_mtime_ns for m in corpus}
    again = corpus_mod.build_corpus(corpus_root)
    assert [m.path for m in again] == [m.path for m in corpus]
    assert {m.path: m.path.stat().st_mtime_ns for m in again} == before


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_corpus_model_measures(family: str, corpus: list[corpus_mod.CorpusModel], corpus_4096: dict) -> None:
    models = [m for m in corpus if m.family_name == family]
    assert models, f"no model of {family} was built"
    for m in models:
        r = corpus_4096[m.name]
        assert not isinstance(r, EngineError), f"{m.name}: {r}"
        assert r.n_ctx == 4096 and r.n_ctx_seq == 4096
        assert r.flash_attn is True  # auto resolves to on with the CPU backend
        assert r.exact, f"{m.name}: memory breakdown not read"
        # weights: the allocation llama.cpp would make = llama_model_size plus per-tensor alignment padding
        model_bytes = r.total_bytes("model")
        assert model_bytes is not None and r.model_size_bytes > 0
        assert r.model_size_bytes <= model_bytes <= r.model_size_bytes + 64 * len(FAMILIES[family].tensors)
        assert r.n_params > 0
        assert r.total_mib("compute") > 0
        if family in RECURRENT:
            assert r.total_mib("KV") == 0 and not r.kv_caches
        else:
            assert r.total_mib("KV") > 0
            # the buffer and the per-cache size lines agree
            assert r.total_mib("KV") == pytest.approx(r.kv_mib, abs=0.011)
        if family in RECURRENT | HYBRID:
            assert r.total_mib("RS") > 0 and r.rs_caches
        else:
            assert r.total_mib("RS") == 0 and not r.rs_caches
        assert {b.kind for b in r.buffers} >= {"model", "compute", "output"}
        assert "load_tensors" in r.log and "sched_reserve" in r.log


def test_quants_shrink_the_weights(corpus_4096: dict, corpus: list[corpus_mod.CorpusModel]) -> None:
    sizes = {m.quant: corpus_4096[m.name].model_size_bytes for m in corpus if m.family_name == "tiny-llama"}
    assert sizes["F16"] > sizes["Q8_0"] > sizes["Q6_K"] > sizes["Q5_K_M"] > sizes["Q4_K_M"] > sizes["Q3_K_M"]
    assert sizes["Q3_K_M"] > sizes["Q2_K"]
    # the KV cache does not depend on the weight type
    kv = {corpus_4096[m.name].total_bytes("KV") for m in corpus if m.family_name == "tiny-llama"}
    assert len(kv) == 1


def test_dense_kv_matches_the_formula(corpus: list[corpus_mod.CorpusModel]) -> None:
    m = _by_name(corpus)["tiny-llama-Q4_K_M"]  # 4 layers, 2 KV heads x 64
    s4, s8, q8 = EngineSettings(4096), EngineSettings(8192), EngineSettings(4096, type_k="q8_0", type_v="q8_0")
    np4 = EngineSettings(4096, n_parallel=4)
    r4, r8, rq, rp = (_ok(r) for r in engine.measure(m.path, [s4, s8, q8, np4]))
    per_cell = 4 * 2 * 64 * 2 * 2  # layers x heads x head_dim x (K+V) x f16
    assert r4.total_bytes("KV") == 4096 * per_cell
    assert r8.total_bytes("KV") == 8192 * per_cell
    assert rq.total_bytes("KV") == 4096 * per_cell * 34 // 64  # q8_0: 34 bytes per 32 elements
    assert rq.kv_caches[0].k_type == "q8_0" and rq.flash_attn is True
    # non-unified: 4 streams of pad256(4096 / 4) cells, same total
    [c] = rp.kv_caches
    assert (c.cells, c.seqs, c.streams) == (1024, 4, 4) and rp.n_ctx_seq == 1024
    assert rp.total_bytes("KV") == r4.total_bytes("KV")
    # more context -> more compute (the pp graph grows with n_kv)
    assert r8.total_mib("compute") > r4.total_mib("compute")


def test_gemma3_has_two_kv_caches(corpus: list[corpus_mod.CorpusModel]) -> None:
    m = _by_name(corpus)["tiny-gemma3-Q8_0"]
    n_swa = FAMILIES["tiny-gemma3"].extra["n_swa"]  # 1024, 5 of 6 layers SWA
    settings = [
        EngineSettings(4096),
        EngineSettings(4096, swa_full=True),
        EngineSettings(16384, n_parallel=4, kv_unified=True),
        EngineSettings(4096, n_ubatch=256),
    ]
    base, full, unified, small_ub = (_ok(r) for r in engine.measure(m.path, settings))
    non_swa, swa = base.kv_caches
    assert (non_swa.role, non_swa.cells, non_swa.layers) == ("non-SWA", 4096, 1)
    assert (swa.role, swa.cells, swa.layers) == ("SWA", 1536, 5)  # pad256(n_swa + n_ubatch)
    assert swa.cells == -(-(n_swa + 512) // 256) * 256
    per_cell_layer = 2 * 128 * 2 * 2  # 2 KV heads x 128 x (K+V) x f16
    assert base.total_bytes("KV") == (4096 * 1 + 1536 * 5) * per_cell_layer
    assert [c.cells for c in full.kv_caches] == [4096, 4096]
    # unified with 4 sequences: SWA keeps n_swa per sequence + one ubatch
    assert [c.cells for c in unified.kv_caches] == [16384, 4608]
    assert unified.kv_unified is True and unified.n_ctx_seq == 16384
    assert [c.cells for c in small_ub.kv_caches] == [4096, 1280]


def test_gpt_oss_swa_every_other_layer(corpus: list[corpus_mod.CorpusModel]) -> None:
    r = _ok(_measure1(_by_name(corpus)["tiny-gpt-oss-MXFP4_MOE"].path, EngineSettings(4096)))
    non_swa, swa = r.kv_caches
    assert (non_swa.cells, non_swa.layers) == (4096, 2)
    assert (swa.cells, swa.layers) == (768, 2)  # pad256(128 + 512)


def test_deepseek2_mla_caches_k_only(corpus: list[corpus_mod.CorpusModel]) -> None:
    path = _by_name(corpus)["tiny-deepseek2-Q4_K_M"].path
    f16, q8, mixed = engine.measure(
        path,
        [
            EngineSettings(4096),
            EngineSettings(4096, type_k="q8_0", type_v="q8_0"),
            EngineSettings(4096, type_k="q8_0", type_v="f16"),
        ],
    )
    [c] = _ok(f16).kv_caches
    assert c.v_mib == 0.0 and c.layers == 4
    assert _ok(f16).total_bytes("KV") == 4096 * 4 * FAMILIES["tiny-deepseek2"].extra["mla_k"] * 2
    assert _ok(q8).kv_caches[0].k_type == "q8_0"
    assert isinstance(mixed, EngineError) and "different K (q8_0) and V (f16)" in str(mixed)


def test_quantized_v_without_flash_attention_is_refused(corpus: list[corpus_mod.CorpusModel]) -> None:
    path = _by_name(corpus)["tiny-qwen3-Q4_K_M"].path
    off, auto, k_only = engine.measure(
        path,
        [
            EngineSettings(4096, type_v="q8_0", flash_attn="off"),
            EngineSettings(4096, type_v="q8_0", flash_attn="auto"),
            EngineSettings(4096, type_k="q4_0", flash_attn="off"),
        ],
    )
    assert isinstance(off, EngineError)
    assert "quantized V cache requires flash_attn" in str(off)
    assert _ok(auto).flash_attn is True  # auto is promoted to on
    assert _ok(k_only).flash_attn is False and k_only.kv_caches[0].k_type == "q4_0"


def test_hybrid_state_does_not_grow_with_context(corpus: list[corpus_mod.CorpusModel]) -> None:
    path = _by_name(corpus)["tiny-granitehybrid-Q4_K_M"].path
    a, b, c = (
        _ok(r)
        for r in engine.measure(path, [EngineSettings(4096), EngineSettings(65536), EngineSettings(4096, n_parallel=2)])
    )
    assert a.total_mib("RS") == b.total_mib("RS")
    assert c.total_mib("RS") > a.total_mib("RS")  # one state per sequence
    assert b.total_mib("KV") == pytest.approx(16 * a.total_mib("KV"), abs=0.02)


def test_full_training_context_with_n_ctx_0(corpus: list[corpus_mod.CorpusModel]) -> None:
    r = _ok(_measure1(_by_name(corpus)["tiny-llama-Q2_K"].path, EngineSettings(0)))
    assert r.n_ctx == corpus_mod.CONTEXT_LENGTH


def test_bad_files_give_engine_errors(tmp_path: Path, corpus: list[corpus_mod.CorpusModel]) -> None:
    good = _by_name(corpus)["tiny-llama-Q4_0"].path
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"hello world" * 100)
    bad_version = tmp_path / "version.gguf"
    bad_version.write_bytes(b"GGUF" + b"\xff" * 1000)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:3000])
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    paths = [not_gguf, bad_version, truncated, empty, tmp_path / "missing.gguf", good]
    results = engine.measure_many([(p, EngineSettings(2048)) for p in paths])
    for p, r in zip(paths[:-1], results[:-1], strict=True):
        assert isinstance(r, EngineError), p
        assert str(p) in str(r)
    assert "invalid magic" in str(results[0])
    assert _ok(results[-1]).n_ctx == 2048


def _write_crasher(path: Path) -> None:
    """A llama GGUF with block_count 0: llama.cpp aborts on GGML_ASSERT(n_layer_all > 0)."""
    import gguf
    import numpy as np

    fam = corpus_mod.fam_llama()
    w = gguf.GGUFWriter(str(path), fam.arch)
    for k, v in fam.kv.items():
        corpus_mod._add_kv(w, k, 0 if k == "llama.block_count" else v)
    w.add_tensor("token_embd.weight", np.zeros((corpus_mod.N_VOCAB, corpus_mod.N_EMBD), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_worker_crash_is_contained(tmp_path: Path, corpus: list[corpus_mod.CorpusModel]) -> None:
    crasher = tmp_path / "crash.gguf"
    _write_crasher(crasher)
    good = _by_name(corpus)["tiny-qwen2-Q4_K_M"].path
    jobs = [
        (good, EngineSettings(4096)),
        (crasher, EngineSettings(4096)),
        (crasher, EngineSettings(8192)),
        (good, EngineSettings(8192)),
    ]
    first, crash1, crash2, last = engine.measure_many(jobs)
    assert _ok(first).n_ctx == 4096
    for r in (crash1, crash2):
        assert isinstance(r, EngineError)
        assert "crashed" in str(r) and "GGML_ASSERT" in str(r) and str(crasher) in str(r)
    assert _ok(last).n_ctx == 8192


def test_timeout_gives_engine_error(corpus: list[corpus_mod.CorpusModel]) -> None:
    good = _by_name(corpus)["tiny-llama-Q4_0"].path
    results = engine.measure_many([(good, EngineSettings(4096))] * 2, timeout_s=0.01)
    assert all(isinstance(r, EngineError) and "timed out" in str(r) for r in results)


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        (EngineSettings(4096, type_k="q3_k"), "type_k"),
        (EngineSettings(4096, type_v="fp8"), "type_v"),
        (EngineSettings(4096, flash_attn="yes"), "flash_attn"),
        (EngineSettings(4096, n_parallel=0), "n_parallel"),
        (EngineSettings(-1), "n_ctx"),
    ],
)
def test_invalid_settings_are_refused_up_front(settings: EngineSettings, fragment: str, tmp_path: Path) -> None:
    dummy = tmp_path / "m.gguf"
    dummy.write_bytes(b"GGUF")
    [r] = engine.measure(dummy, [settings])
    assert isinstance(r, EngineError) and fragment in str(r)


def test_real_gemma3_270m(gemma3_270m_path: Path) -> None:
    r = _ok(_measure1(gemma3_270m_path, EngineSettings(4096)))
    assert r.n_params == 268_098_176
    assert r.total_bytes("model") == r.model_size_bytes == 246_587_904
    non_swa, swa = r.kv_caches
    assert (non_swa.cells, non_swa.layers, swa.cells, swa.layers) == (4096, 3, 1024, 15)  # n_swa 512
    assert r.total_mib("KV") == 27.0
    assert r.total_mib("compute") == 514.50  # logits: 262144 x 512 x 4 B + activations
    assert r.total_mib("output") == 1.00


def _sparse_copy(real: Path, dst: Path) -> None:
    """The real header followed by an all-zero (sparse) data region of the real size."""
    from launcher.gguf import read_header

    header_len = read_header(str(real)).data_offset
    with real.open("rb") as f:
        header = f.read(header_len)
    with dst.open("wb") as f:
        f.write(header)
        f.truncate(real.stat().st_size)


def test_sparse_copy_measures_like_the_real_file(gemma3_270m_path: Path, tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.gguf"
    _sparse_copy(gemma3_270m_path, sparse)
    assert sparse.stat().st_size == gemma3_270m_path.stat().st_size
    settings = [
        EngineSettings(4096),
        EngineSettings(32768, type_k="q8_0", type_v="q8_0", n_parallel=4, kv_unified=True),
        EngineSettings(8192, flash_attn="off", n_ubatch=256),
    ]
    real = engine.measure(gemma3_270m_path, settings)
    fake = engine.measure(sparse, settings)
    for a, b in zip(real, fake, strict=True):
        a, b = _ok(a), _ok(b)
        assert a.buffers == b.buffers
        assert a.kv_caches == b.kv_caches and a.rs_caches == b.rs_caches
        assert (a.model_size_bytes, a.n_params, a.n_ctx, a.n_ctx_seq, a.flash_attn) == (
            b.model_size_bytes,
            b.n_params,
            b.n_ctx,
            b.n_ctx_seq,
            b.flash_attn,
        )


def test_a_worker_that_cannot_start_fails_every_job_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corpus: list[corpus_mod.CorpusModel]
) -> None:
    broken = tmp_path / "shadow" / "llama_cpp"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('broken llama_cpp for the test')\n")
    monkeypatch.setenv("PYTHONPATH", str(broken.parent))
    good = _by_name(corpus)["tiny-llama-Q4_0"].path
    results = engine.measure_many([(good, EngineSettings(4096))] * 3)
    for r in results:
        assert isinstance(r, EngineError)
        assert "failed to start" in str(r) and "broken llama_cpp for the test" in str(r)


def test_fallback_without_the_memory_breakdown(
    monkeypatch: pytest.MonkeyPatch, corpus: list[corpus_mod.CorpusModel], corpus_4096: dict
) -> None:
    """Where llama_get_memory_breakdown cannot be called, model and KV come from exact fallbacks."""
    monkeypatch.setenv("FITQUANT_ENGINE_NO_BREAKDOWN", "1")
    for name in ("tiny-gemma3-Q8_0", "tiny-granitehybrid-Q4_K_M"):
        exact = _ok(corpus_4096[name])
        r = _ok(_measure1(_by_name(corpus)[name].path, EngineSettings(4096)))
        assert not r.exact
        assert r.total_bytes("model") == r.model_size_bytes == exact.model_size_bytes
        assert {b.source for b in r.buffers if b.kind == "model"} == {"model-size"}
        assert r.total_mib("KV") == pytest.approx(exact.total_mib("KV"), abs=0.011)
        for kind in ("compute", "RS", "output"):
            assert r.total_mib(kind) == pytest.approx(exact.total_mib(kind), abs=0.011)


def test_engine_interrupt_ends_the_worker(
    corpus: list[corpus_mod.CorpusModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while llama.cpp measures: the worker (in its own session, out of the terminal's reach) is ended."""
    import queue
    import subprocess

    from launcher.measure import dryrun as engine

    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        return proc

    class InterruptedQueue(queue.Queue):
        def get(self, *args, **kwargs):
            super().get(*args, **kwargs)
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C once the first answer came

    monkeypatch.setattr(engine.subprocess, "Popen", recording_popen)
    monkeypatch.setattr(engine.queue, "Queue", InterruptedQueue)
    model = next(m for m in corpus if m.quant == "F16")
    with pytest.raises(KeyboardInterrupt):
        engine.measure_many([(model.path, engine.EngineSettings(n_ctx=4096))] * 50)
    assert started
    assert started[0].wait(timeout=10) < 0  # ended by a signal from us, not left to run its 50 jobs
