"""The planner on header-only ladders: five quants of one model whose tensors really have those types.

No llama.cpp, no network: the headers are made with tests/gguf_factory.py (llama_gguf), the machines with
describe_machine, and every budget is placed from the plan's own figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as QT

from launcher.backends import launch_forms
from launcher.backends.llamacpp import server_argv
from launcher.catalog.types import Candidate, CandidateFile
from launcher.cli import main
from launcher.estimate import GPU
from launcher.gguf import parse_header, read_header
from launcher.hardware import describe_machine
from launcher.model import model_facts
from launcher.plan import (
    CONTEXT_STEP,
    Budget,
    Plan,
    Policy,
    budgets_for,
    evaluate,
    layer_split,
    make_plan,
)
from tests.gguf_factory import llama_gguf, write_header_only

MiB = 1024**2
GiB = 1024**3
RESERVE = GiB
# best first; each label's matrices have the ggml type its name says (Q4_K_M -> Q4_K ...)
LADDER = {"Q8_0": QT.Q8_0, "Q6_K": QT.Q6_K, "Q4_K_M": QT.Q4_K, "Q3_K_M": QT.Q3_K, "Q2_K": QT.Q2_K}
N_LAYER = 12


def candidate(quant: str, *, folder: Path | None = None) -> Candidate:
    head, size = llama_gguf(LADDER[quant], n_layer=N_LAYER)
    name = f"model-{quant}.gguf"
    if folder is None:
        header, local = parse_header(head, source=name), None
    else:
        local = str(write_header_only(folder / name, head, size))
        header = read_header(local)
    return Candidate("model", "local", quant, (CandidateFile(name, size, local_path=local),), header=header)


@pytest.fixture(scope="module")
def ladder() -> list[Candidate]:
    return [candidate(q) for q in LADDER]


def gpu_budgets(*free: int, reserve: int = RESERVE) -> list[Budget]:
    return budgets_for(describe_machine(vram=list(free)).devices, ram_available_bytes=None, reserve_bytes=reserve)


def needs_on_gpu0(ladder: list[Candidate], policy: Policy) -> dict[str, int]:
    """What each quant needs on GPU0 at the policy's context: the figures of a roomy plan."""
    roomy = make_plan("model", ladder, gpu_budgets(1024 * GiB), policy)
    assert all(o.fits for o in roomy.candidates)
    return {o.quant: o.needs["GPU0"] for o in roomy.candidates}


def plan_with_usable(ladder: list[Candidate], policy: Policy, usable: int) -> Plan:
    return make_plan("model", ladder, gpu_budgets(usable + policy.reserve_bytes), policy)


def test_plan_ladder_headers_really_differ(ladder):
    sizes = [c.size_bytes for c in ladder]
    bpw = [c.bits_per_weight for c in ladder]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 5
    assert bpw == sorted(bpw, reverse=True)
    facts = [model_facts(c.header) for c in ladder]
    assert [sorted(f.tensor_types) for f in facts] == [sorted(["F32", t.name]) for t in LADDER.values()]
    needs = needs_on_gpu0(ladder, Policy(n_ctx=8192, min_quant="Q2_K"))
    assert list(needs.values()) == sorted(needs.values(), reverse=True)


@pytest.mark.parametrize("index", [1, 2, 3, 4])
def test_plan_picks_the_best_quant_that_fits(ladder, index):
    policy = Policy(n_ctx=8192, min_quant="Q2_K")
    needs = needs_on_gpu0(ladder, policy)
    quants = list(LADDER)
    better, wanted = needs[quants[index - 1]], needs[quants[index]]
    plan = plan_with_usable(ladder, policy, (better + wanted) // 2)
    assert (plan.mode, plan.chosen.quant, plan.chosen.n_ctx) == ("gpu", quants[index], 8192)
    assert plan.fits_on_gpu and plan.chosen.fully_offloaded and plan.chosen.n_gpu_layers == N_LAYER + 1
    assert [o.quant for o in plan.candidates] == quants  # best quality first
    assert [o.fits for o in plan.candidates] == [i >= index for i in range(5)]
    assert f"({quants[index - 1]} needs" in plan.reason


def test_plan_fit_boundary_is_inclusive(ladder):
    # "fits" = needs + reserve <= free: exactly the need fits, one byte less does not
    policy = Policy(n_ctx=8192, min_quant="Q2_K")
    needs = needs_on_gpu0(ladder, policy)
    assert plan_with_usable(ladder, policy, needs["Q6_K"]).chosen.quant == "Q6_K"
    assert plan_with_usable(ladder, policy, needs["Q6_K"] - 1).chosen.quant == "Q4_K_M"


def test_plan_strict_refuses_when_nothing_fits_at_the_target(ladder):
    policy = Policy(n_ctx=32768, min_quant="Q2_K", strict=True)
    needs = needs_on_gpu0(ladder, policy)
    plan = plan_with_usable(ladder, policy, needs["Q2_K"] - 1)
    assert plan.mode == "none" and plan.chosen is None and not plan.fits_on_gpu
    assert plan.reason.endswith("(--strict)")
    assert not any(o.fits for o in plan.candidates)
    assert plan.alternatives  # the alternatives are still offered, with numbers
    with pytest.raises(ValueError, match="no chosen configuration"):
        server_argv(plan)


def test_plan_reduced_context_is_the_largest_multiple_of_256_that_fits(ladder):
    policy = Policy(n_ctx=32768, min_quant="Q2_K")
    needs = needs_on_gpu0(ladder, policy)
    plan = plan_with_usable(ladder, policy, needs["Q2_K"] - 1)  # nothing fits at 32k
    assert plan.mode == "reduced-context" and plan.fits_on_gpu
    chosen = plan.chosen
    assert chosen.fits and chosen.fully_offloaded and plan.alternatives[0] is chosen
    assert chosen.n_ctx % CONTEXT_STEP == 0 and policy.min_context <= chosen.n_ctx < 32768

    def fits(c: Candidate, n_ctx: int) -> bool:
        return evaluate(c, model_facts(c.header), policy, plan.budgets, n_ctx=n_ctx, floor=plan.floor).fits

    assert fits(chosen.candidate, chosen.n_ctx)
    assert not fits(chosen.candidate, chosen.n_ctx + CONTEXT_STEP)
    # the best quant that reaches the smallest context worth proposing: nothing better does
    rank = [c.quant for c in ladder].index(chosen.quant)
    assert all(not fits(c, policy.min_context) for c in ladder[:rank])
    assert chosen.quant == "Q8_0"  # on this ladder the best quant still reaches 4096 tokens


def test_plan_partial_offload_when_no_context_worth_proposing_fits(ladder):
    policy = Policy(n_ctx=32768, min_quant="Q2_K", min_context=32768)
    needs = needs_on_gpu0(ladder, policy)
    plan = plan_with_usable(ladder, policy, needs["Q2_K"] - 1)
    assert plan.mode == "partial-offload" and not plan.fits_on_gpu
    chosen = plan.chosen
    assert chosen.quant == "Q8_0"  # the best quant above the floor, part of it on the CPU
    assert 0 < chosen.n_gpu_layers < N_LAYER + 1 and not chosen.fully_offloaded
    assert chosen.n_ctx == 32768 and chosen.fits
    assert f"with {chosen.n_gpu_layers} of {N_LAYER + 1} layers on the GPU" in plan.reason
    facts = model_facts(chosen.candidate.header)
    more = evaluate(chosen.candidate, facts, policy, plan.budgets, n_gpu_layers=chosen.n_gpu_layers + 1,
                    floor=plan.floor)  # fmt: skip
    assert not more.fits  # the most layers that fit
    gpu = chosen.estimate.device("GPU0")
    assert gpu.layers == list(range(N_LAYER + 1 - chosen.n_gpu_layers, N_LAYER))
    assert chosen in plan.alternatives


def test_plan_never_goes_below_the_quality_floor(ladder):
    policy = Policy(n_ctx=4096)  # ~0.2B parameters: floor Q4_K_M
    needs = needs_on_gpu0(ladder, Policy(n_ctx=4096, min_quant="Q2_K"))
    usable = needs["Q3_K_M"]  # Q3_K_M and Q2_K fit, Q4_K_M and better do not
    plan = plan_with_usable(ladder, policy, usable)
    assert plan.floor == "Q4_K_M"
    assert {o.quant: (o.fits, o.above_floor) for o in plan.candidates} == {
        "Q8_0": (False, True),
        "Q6_K": (False, True),
        "Q4_K_M": (False, True),
        "Q3_K_M": (True, False),
        "Q2_K": (True, False),
    }
    # nothing above the floor reaches 4096 tokens entirely on the GPU: the best quant, partly offloaded
    assert (plan.mode, plan.chosen.quant) == ("partial-offload", "Q8_0")
    assert plan.chosen.above_floor
    assert all(o.above_floor for o in plan.alternatives)
    assert any("Q3_K_M would fit but is below the quality floor Q4_K_M" in note for note in plan.notes)
    strict = plan_with_usable(ladder, Policy(n_ctx=4096, strict=True), usable)
    assert strict.mode == "none" and strict.chosen is None
    # the same budget with the floor lowered takes Q3_K_M
    assert plan_with_usable(ladder, Policy(n_ctx=4096, min_quant="Q3_K_M"), usable).chosen.quant == "Q3_K_M"


def test_plan_with_only_below_floor_candidates_refuses(ladder):
    plan = make_plan("model", ladder[3:], gpu_budgets(80 * GiB), Policy(n_ctx=4096))
    assert (plan.mode, plan.chosen) == ("none", None)
    assert plan.reason == "no candidate reaches the quality floor Q4_K_M"


def test_plan_without_gpu_plans_for_system_ram(ladder):
    policy = Policy(n_ctx=8192, min_quant="Q2_K")
    machine = describe_machine(ram=64 * GiB)
    budgets = budgets_for(machine.devices, ram_available_bytes=machine.ram_available_bytes, reserve_bytes=RESERVE)
    assert [b.name for b in budgets] == ["CPU"]
    plan = make_plan("model", ladder, budgets, policy)
    assert (plan.mode, plan.chosen.quant, plan.chosen.n_gpu_layers) == ("cpu", "Q8_0", 0)
    assert [d.name for d in plan.chosen.estimate.devices] == ["CPU"]
    assert server_argv(plan)[server_argv(plan).index("-ngl") + 1] == "0"


# --------------------------------------------------------------------------------------------------------------
# The split rule on two unequal GPUs


def test_plan_split_on_two_unequal_gpus_matches_the_argv_and_the_estimate_command(tmp_path):
    ladder = [candidate(q, folder=tmp_path) for q in LADDER]
    policy = Policy(n_ctx=8192, min_quant="Q2_K", reserve_bytes=GiB)
    budgets = gpu_budgets(24 * GiB, 12 * GiB, reserve=GiB)
    # each GPU weighted by its memory less the reserve, in MiB
    gpus = layer_split(budgets)
    assert gpus == [GPU("GPU0", split_weight=23 * 1024, backend="cuda"), GPU("GPU1", split_weight=11 * 1024)]
    plan = make_plan("model", ladder, budgets, policy)
    assert (plan.mode, plan.chosen.quant) == ("gpu", "Q8_0")
    est = plan.chosen.estimate
    # src/llama-model.cpp: splits [23552/34816, 1] = [0.676.., 1]; layer il of 13 (12 blocks + output) goes to
    # upper_bound(il / 13): il 0..8 (8/13 = 0.615) on GPU0, 9..11 and the output layer (9/13 = 0.692 on) on GPU1
    assert est.device("GPU0").layers == list(range(9))
    assert est.device("GPU1").layers == [9, 10, 11]
    facts = model_facts(plan.chosen.candidate.header)
    output = facts.output_bytes
    assert est.device("GPU1").weights_bytes == sum(layer.weight_bytes for layer in facts.layers[9:]) + output
    argv = server_argv(plan)
    assert argv[argv.index("-ts") + 1] == "23552,11264"
    assert argv[argv.index("-ngl") + 1] == str(N_LAYER + 1)
    assert argv[argv.index("-c") + 1] == "8192"
    assert argv[argv.index("-m") + 1] == str(tmp_path / "model-Q8_0.gguf")
    assert plan.to_json(launch_forms=launch_forms(plan))["llama_server_argv"] == argv

    # `fitquant estimate` on the same file, machine and reserve places the same layers on each GPU
    path = str(tmp_path / "model-Q8_0.gguf")
    args = ["estimate", "--vram", "24GiB,12GiB", "--reserve", "1GiB", "--ctx", str(plan.chosen.n_ctx), "--json", path]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    by_name = {d["name"]: d for d in data["devices"]}
    assert (by_name["GPU0"]["layers"], by_name["GPU1"]["layers"]) == (9, 3)
    assert data["devices"] == [d.to_json() for d in est.devices]
    assert data["n_gpu_layers"] == plan.chosen.n_gpu_layers and data["n_ctx"] == plan.chosen.n_ctx


def test_plan_single_gpu_passes_no_tensor_split(ladder):
    plan = make_plan("model", ladder, gpu_budgets(24 * GiB), Policy(n_ctx=8192, min_quant="Q2_K"))
    assert "-ts" not in server_argv(plan)
    assert layer_split(plan.budgets) == [GPU("GPU0", split_weight=23 * 1024)]


def test_plan_split_weight_is_at_least_one_mib():
    budgets = [Budget("GPU0", "cuda", 24 * GiB, GiB), Budget("GPU1", "cuda", GiB // 2, GiB)]
    assert [g.split_weight for g in layer_split(budgets)] == [23 * 1024, 1]
    assert layer_split([Budget("CPU", "cpu", 64 * GiB, GiB)]) == []
