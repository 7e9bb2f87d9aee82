"""The estimator against llama.cpp itself, on every model and setting of the accuracy contract.

llama.cpp measures each configuration with a no_alloc dry run on its CPU backend (launcher.measure.dryrun).
Weights, KV cache and recurrent state must match to the precision llama.cpp prints; the compute
buffer within 10% or 16 MiB, and never more than 2% or 8 MiB below llama.cpp's; the total within 2% or
32 MiB (tests/accuracy.py). tests/test_estimate_broad.py covers fifteen more real-size models.
"""

from __future__ import annotations

import pytest
from accuracy import describe, run_matrix


def _failures(rows) -> list[str]:
    lines = []
    for row in rows:
        if row.error is not None:
            lines.append(f"{row.model} {describe(row.settings)}: llama.cpp refused: {row.error}")
        for check in row.checks:
            if not check.ok:
                lines.append(
                    f"{row.model} {describe(row.settings)} {check.component}: predicted {check.predicted_mib:.2f} MiB,"
                    f" llama.cpp {check.measured_mib:.2f} MiB"
                )
    return lines


@pytest.fixture(scope="module")
def full_matrix_rows(corpus, real_corpus, gemma3_270m_path):
    # tiny models of every family, the real Gemma 3 270M, and header-only copies of real-size models
    models = [(m.name, m.path) for m in corpus if m.quant == "Q4_K_M"]
    models.append(("gemma-3-270m-Q4_K_M", gemma3_270m_path))
    models += [(m.name, m.path) for m in real_corpus]
    return run_matrix(models)


def test_estimate_matches_llama_cpp_for_every_family_and_setting(full_matrix_rows):
    assert len({row.model for row in full_matrix_rows}) >= 20
    # contexts 4k/32k/128k x f16 (flash attention off, on) and q8_0 x 1 slot and 4 (unified, per sequence)
    # x swa_full off/on for SWA models
    assert len(full_matrix_rows) >= 600
    assert _failures(full_matrix_rows) == []


def test_estimate_covers_every_component_kind(full_matrix_rows):
    components = {check.component for row in full_matrix_rows for check in row.checks}
    assert {"weights", "kv", "kv:SWA", "recurrent", "compute", "total"} <= components


def test_estimate_weights_match_on_every_rung_of_every_ladder(corpus):
    rows = run_matrix([(m.name, m.path) for m in corpus], full=False)
    assert len(rows) == len(corpus)
    assert _failures(rows) == []
    weights = [check for row in rows for check in row.checks if check.component == "weights"]
    assert all(check.predicted_mib == check.measured_mib for check in weights)
