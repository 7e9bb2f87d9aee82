"""fit()'s confirm loop with a fake engine, and largest_true's search.

The fake measurer stands in for llama.cpp's dry runs: for each option it is given it returns bytes per device
keyed by MeasureKey.of(option), here the estimate's own figures changed by a rule the test chooses. No
llama.cpp, no network: header-only ladders (tests/gguf_factory.py llama_gguf) on described machines.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.catalog.types import Candidate, CandidateFile
from launcher.errors import NoFitError
from launcher.fit import fit
from launcher.gguf import parse_header
from launcher.hardware import describe_machine
from launcher.model import model_facts
from launcher.plan import (
    CONTEXT_STEP,
    MeasureKey,
    Measurements,
    Option,
    Policy,
    budgets_for,
    evaluate,
    largest_true,
    make_plan,
)
from tests.gguf_factory import llama_gguf

MiB = 1024**2
GiB = 1024**3
LADDER = {"Q8_0": QT.Q8_0, "Q6_K": QT.Q6_K, "Q4_K_M": QT.Q4_K, "Q3_K_M": QT.Q3_K, "Q2_K": QT.Q2_K}
N_LAYER = 12
ALL = N_LAYER + 1  # n_gpu_layers of a full offload


@pytest.fixture(scope="module")
def ladder() -> list[Candidate]:
    out = []
    for quant, ggml_type in LADDER.items():
        head, size = llama_gguf(ggml_type, n_layer=N_LAYER)
        name = f"model-{quant}.gguf"
        out.append(Candidate("model", "local", quant, (CandidateFile(name, size),), header=parse_header(head)))
    return out


class FakeEngine:
    """A measurer: `figures(option)` gives its bytes per device, or None where it cannot measure it."""

    def __init__(self, figures: Callable[[Option], dict[str, int] | None]) -> None:
        self.figures = figures
        self.calls: list[list[MeasureKey]] = []

    def __call__(self, options: list[Option]) -> Measurements:
        self.calls.append([MeasureKey.of(o) for o in options])
        out = {}
        for option in options:
            needs = self.figures(option)
            if needs is not None:
                out[MeasureKey.of(option)] = needs
        return out

    @property
    def asked(self) -> list[MeasureKey]:
        return [key for call in self.calls for key in call]


def estimate_needs(option: Option) -> dict[str, int]:
    return dict(option.needs)


def scaled(quant: str, factor: float) -> Callable[[Option], dict[str, int]]:
    """The estimate, except that `quant` takes `factor` times as much on every device."""

    def figures(option: Option) -> dict[str, int]:
        f = factor if option.quant == quant else 1.0
        return {name: int(value * f) for name, value in option.needs.items()}

    return figures


def key(quant: str, n_ctx: int, n_gpu_layers: int = ALL) -> MeasureKey:
    return MeasureKey(quant, n_ctx, n_gpu_layers, False)


def gpu_need(ladder: list[Candidate], policy: Policy) -> dict[str, int]:
    """Each quant's estimated need on GPU0 at the policy's context."""
    budgets = budgets_for(describe_machine(vram=[1024 * GiB]).devices, ram_available_bytes=None, reserve_bytes=0)
    return {o.quant: o.needs["GPU0"] for o in make_plan("model", ladder, budgets, policy).candidates}


def machine_with_usable(usable: int, policy: Policy):
    return describe_machine(vram=[usable + policy.reserve_bytes])


def test_fit_engine_figures_move_the_choice_down(ladder):
    policy = Policy(n_ctx=8192, min_quant="Q2_K")
    need = gpu_need(ladder, policy)
    engine = FakeEngine(scaled("Q8_0", 1.3))  # llama.cpp says the best quant takes 30% more
    machine = machine_with_usable(need["Q8_0"] + MiB, policy)  # the estimate says Q8_0 fits
    assert make_plan("model", ladder, budgets_for(machine.devices, ram_available_bytes=None,
                                                  reserve_bytes=policy.reserve_bytes), policy).chosen.quant == "Q8_0"  # fmt: skip
    plan = fit("model", policy, machine=machine, candidates=ladder, measurer=engine)
    assert (plan.mode, plan.chosen.quant, plan.chosen.figures) == ("gpu", "Q6_K", "engine")
    # round 1: the choice and the next quant down; round 2: the new choice's next quant down
    assert engine.calls == [[key("Q8_0", 8192), key("Q6_K", 8192)], [key("Q4_K_M", 8192)]]
    q8 = plan.candidates[0]
    assert (q8.quant, q8.figures, q8.fits) == ("Q8_0", "engine", False)
    assert q8.needs["GPU0"] == int(need["Q8_0"] * 1.3)
    assert plan.chosen.needs["GPU0"] == need["Q6_K"]
    assert any("measured by llama.cpp itself" in note for note in plan.notes)


def test_fit_engine_figures_move_the_choice_up_from_a_near_miss(ladder):
    policy = Policy(n_ctx=8192, min_quant="Q2_K")
    need = gpu_need(ladder, policy)
    # Q8_0 misses by 1 MiB (within the 16 MiB tolerance); llama.cpp says it needs 2 MiB less than estimated
    engine = FakeEngine(lambda o: {n: v - 2 * MiB if o.quant == "Q8_0" else v for n, v in o.needs.items()})
    machine = machine_with_usable(need["Q8_0"] - MiB, policy)
    plan = fit("model", policy, machine=machine, candidates=ladder, measurer=engine)
    # the estimate's choice, the near miss above it, the next quant down: one round, then nothing new to measure
    assert engine.calls == [[key("Q6_K", 8192), key("Q8_0", 8192), key("Q4_K_M", 8192)]]
    assert (plan.mode, plan.chosen.quant, plan.chosen.figures) == ("gpu", "Q8_0", "engine")
    assert plan.chosen.needs["GPU0"] == need["Q8_0"] - 2 * MiB


def test_fit_far_misses_are_not_measured(ladder):
    policy = Policy(n_ctx=8192, min_quant="Q2_K")
    need = gpu_need(ladder, policy)
    engine = FakeEngine(estimate_needs)
    machine = machine_with_usable(need["Q4_K_M"], policy)  # Q6_K misses by tens of MiB
    plan = fit("model", policy, machine=machine, candidates=ladder, measurer=engine)
    assert engine.calls == [[key("Q4_K_M", 8192), key("Q3_K_M", 8192)]]
    assert (plan.chosen.quant, plan.chosen.figures) == ("Q4_K_M", "engine")
    assert [o.figures for o in plan.candidates] == ["estimate", "estimate", "engine", "engine", "estimate"]


def test_fit_measurer_that_measures_nothing_leaves_the_estimates(ladder):
    policy = Policy(n_ctx=8192, min_quant="Q2_K")
    need = gpu_need(ladder, policy)
    engine = FakeEngine(lambda o: None)
    plan = fit("model", policy, machine=machine_with_usable(need["Q6_K"], policy), candidates=ladder, measurer=engine)
    assert (plan.mode, plan.chosen.quant, plan.chosen.figures) == ("gpu", "Q6_K", "estimate")
    assert all(o.figures == "estimate" for o in plan.candidates)
    # asked once: an option the measurer could not measure is not asked again in later rounds
    assert engine.calls == [[key("Q6_K", 8192), key("Q4_K_M", 8192)]]
    assert not any("measured by llama.cpp" in note for note in plan.notes)


def test_fit_without_confirmation_never_measures(ladder):
    policy = Policy(n_ctx=8192, min_quant="Q2_K")
    engine = FakeEngine(estimate_needs)
    plan = fit("model", policy, machine=describe_machine(vram=[24 * GiB]), candidates=ladder, measurer=engine,
               confirm=False)  # fmt: skip
    assert engine.calls == []
    assert plan.chosen.quant == "Q8_0" and plan.chosen.figures == "estimate"
    assert "engine confirmation off: every figure is fitquant's estimate" in plan.notes


def test_fit_raises_no_fit_error_with_the_refused_plan(ladder):
    policy = Policy(n_ctx=32768, min_quant="Q2_K", strict=True)
    need = gpu_need(ladder, policy)
    engine = FakeEngine(estimate_needs)
    with pytest.raises(NoFitError) as refused:
        fit("model", policy, machine=machine_with_usable(need["Q2_K"] - 1, policy), candidates=ladder,
            measurer=engine)  # fmt: skip
    plan = refused.value.plan
    assert (plan.mode, plan.chosen) == ("none", None)
    assert str(refused.value) == plan.reason and plan.reason.endswith("(--strict)")
    assert refused.value.candidates is plan.candidates and len(plan.candidates) == 5
    assert not any(o.fits for o in plan.candidates)
    # nothing chosen: only the near misses are measured (Q2_K, short by one byte)
    assert engine.calls == [[key("Q2_K", 32768)]]
    assert plan.candidates[-1].figures == "engine"


def test_fit_refines_a_reduced_context_with_the_engine_figures(ladder):
    policy = Policy(n_ctx=32768, min_quant="Q2_K")
    need = gpu_need(ladder, policy)
    usable = need["Q2_K"] - 1  # nothing fits at 32k
    machine = machine_with_usable(usable, policy)
    budgets = budgets_for(machine.devices, ram_available_bytes=None, reserve_bytes=policy.reserve_bytes)
    estimated = make_plan("model", ladder, budgets, policy)
    assert (estimated.mode, estimated.chosen.quant, estimated.chosen.n_ctx) == ("reduced-context", "Q8_0", 16384)

    def more_kv(option: Option) -> dict[str, int]:
        # llama.cpp (in this story) takes 1000 bytes per token more on the GPU than the estimate says
        return {n: v + (1000 * option.n_ctx if n == "GPU0" else 0) for n, v in option.needs.items()}

    engine = FakeEngine(more_kv)
    plan = fit("model", policy, machine=machine, candidates=ladder, measurer=engine)
    q8, facts = ladder[0], model_facts(ladder[0].header)

    def fits_engine(n_ctx: int) -> bool:
        option = evaluate(q8, facts, policy, budgets, n_ctx=n_ctx, floor="Q2_K")
        return more_kv(option)["GPU0"] <= usable

    expected = max(n for n in range(CONTEXT_STEP, 32768 + 1, CONTEXT_STEP) if fits_engine(n))
    assert policy.min_context <= expected < 16384
    assert (plan.mode, plan.chosen.quant, plan.chosen.n_ctx, plan.chosen.figures) == (
        "reduced-context", "Q8_0", expected, "engine",
    )  # fmt: skip
    assert plan.chosen.fits and plan.chosen in plan.alternatives
    assert plan.reason.endswith(f"; Q8_0 fits entirely at {expected} tokens")
    assert all(k.n_ctx % CONTEXT_STEP == 0 for k in engine.asked)
    # the boundary itself was measured on both sides
    assert key("Q8_0", expected) in engine.asked and key("Q8_0", expected + CONTEXT_STEP) in engine.asked


def test_fit_reduced_context_moves_to_the_next_quant_when_the_engine_says_too_short(ladder):
    policy = Policy(n_ctx=32768, min_quant="Q2_K")
    need = gpu_need(ladder, policy)
    usable = need["Q2_K"] - 1
    machine = machine_with_usable(usable, policy)
    budgets = budgets_for(machine.devices, ram_available_bytes=None, reserve_bytes=policy.reserve_bytes)
    engine = FakeEngine(lambda o: {n: v + (200 * MiB if o.quant == "Q8_0" and n == "GPU0" else 0)
                                   for n, v in o.needs.items()})  # fmt: skip
    plan = fit("model", policy, machine=machine, candidates=ladder, measurer=engine)
    q6 = ladder[1]
    facts = model_facts(q6.header)
    expected = max(n for n in range(CONTEXT_STEP, 32768 + 1, CONTEXT_STEP)
                   if evaluate(q6, facts, policy, budgets, n_ctx=n, floor="Q2_K").fits)  # fmt: skip
    assert (plan.mode, plan.chosen.quant, plan.chosen.n_ctx, plan.chosen.figures) == (
        "reduced-context", "Q6_K", expected, "engine",
    )  # fmt: skip
    assert expected >= policy.min_context
    assert plan.reason.endswith(f"; Q6_K fits entirely at {expected} tokens")
    assert any(note.endswith(f"to Q6_K at {expected}") and "llama.cpp's own figures moved" in note
               for note in plan.notes)  # fmt: skip
    assert key("Q6_K", expected) in engine.asked and key("Q6_K", expected + CONTEXT_STEP) in engine.asked


# --------------------------------------------------------------------------------------------------------------
# largest_true


def probe_bound(limit: int) -> int:
    return 0 if limit < 1 else int(2 * math.log2(limit) + 3)


def check_largest_true(limit: int, threshold: int, start: int | None) -> None:
    probes: list[int] = []

    def fits(n: int) -> bool:
        probes.append(n)
        return n <= threshold

    assert largest_true(fits, limit, start=start) == threshold
    assert all(1 <= n <= limit for n in probes)
    assert len(probes) <= probe_bound(limit), (limit, threshold, start, probes)


@settings(max_examples=600, deadline=None)
@given(st.integers(0, 300).flatmap(lambda limit: st.tuples(
    st.just(limit), st.integers(0, limit), st.none() | st.integers(1, max(1, limit)))))  # fmt: skip
def test_fit_largest_true_finds_the_boundary(case):
    limit, threshold, start = case
    check_largest_true(limit, threshold, start if limit else None)


def test_fit_largest_true_exhaustive_for_small_limits():
    for limit in range(0, 41):
        for threshold in range(0, limit + 1):
            for start in [None, *range(1, limit + 1)]:
                check_largest_true(limit, threshold, start)


@pytest.mark.parametrize("limit", [1, 2, 127, 128, 300])
def test_fit_largest_true_edges(limit):
    for threshold in (0, 1, limit - 1, limit):
        for start in (None, 1, limit):
            check_largest_true(limit, max(0, threshold), start)
    # a start out of range is clamped into 1..limit
    assert largest_true(lambda n: n <= 1, limit, start=10 * limit) == 1
    assert largest_true(lambda n: True, limit, start=0) == limit
    assert largest_true(lambda n: True, 0) == 0
