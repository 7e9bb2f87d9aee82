"""The real-dimension corpus (tests/corpus_real.py): header-only sparse GGUFs that llama.cpp measures like the
real files."""

from __future__ import annotations

import corpus as corpus_mod
import corpus_real
import pytest

from launcher.measure import dryrun as engine
from launcher.measure.dryrun import EngineMeasurement, EngineSettings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not engine.engine_available(), reason="llama-cpp-python is not installed"),
]


def test_every_real_model_loads_and_reports_a_compute_buffer(real_corpus: list[corpus_mod.CorpusModel]) -> None:
    specs = {m.name: m for m in corpus_real.real_models()}
    assert {m.family_name for m in real_corpus} == set(specs)
    results = engine.measure_many([(m.path, EngineSettings(n_ctx=4096)) for m in real_corpus])
    failures = []
    for m, r in zip(real_corpus, results, strict=True):
        if not isinstance(r, EngineMeasurement):
            failures.append(f"{m.name}: {r}")
            continue
        assert r.n_ctx == 4096, m.name
        assert r.total_mib("compute") > 0, m.name
        # llama_model_size is the sum of the tensors' sizes: the header describes the real weights exactly
        assert r.model_size_bytes == specs[m.family_name].weight_bytes, m.name
        assert m.path.stat().st_blocks * 512 < 64 * 2**20, f"{m.name} is not sparse"
    assert not failures, "\n".join(failures)
