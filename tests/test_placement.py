"""The placement search over two-device budgets (pure: the real Gemma 3 270M header, no llama.cpp run).

Gemma 3 270M at 4096 tokens needs about 273 MiB on one device, 170 MiB of it the tied output layer, which llama.cpp
places with the last device's layers. The planner must find a placement with every layer on the GPUs whenever one
exists (checked against every layer count in both device orders), else the most layers, then the fewest devices;
and the launch argv (-dev, -ts) must place layers exactly where the estimate does. Figures in the log literals
below are llama.cpp 0c1e570's, from two real ggml-rpc-servers (tests/test_rpc_two.py runs them live).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest

from launcher.backends.llamacpp import python_server_argv, server_argv, with_rpc
from launcher.catalog.types import Candidate
from launcher.errors import BackendError
from launcher.estimate import _layer_devices
from launcher.model import ModelFacts, model_facts
from launcher.plan import (
    Budget,
    MeasureKey,
    Option,
    Plan,
    Policy,
    Split,
    candidate_orders,
    evaluate,
    layer_split,
    llama_device_names,
    make_plan,
)
from launcher.verify import attach_prediction, placement_from_log

MiB = 2**20
SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "plan.schema.json").read_text())
POLICY = Policy(n_ctx=4096, type_k="q8_0", type_v="q8_0", reserve_bytes=0)


@pytest.fixture(scope="module")
def gemma(gemma3_270m_path: Path) -> tuple[Candidate, ModelFacts]:
    from launcher.catalog import list_candidates

    (candidate,) = list_candidates(str(gemma3_270m_path))
    assert candidate.header is not None
    return candidate, model_facts(candidate.header)


def rpc_budgets(*mib: int) -> list[Budget]:
    return [Budget(f"GPU{i}", "rpc", size * MiB, 0) for i, size in enumerate(mib)]


def plan_for(gemma: tuple[Candidate, ModelFacts], *mib: int) -> Plan:
    return make_plan("gemma-3-270m", [gemma[0]], rpc_budgets(*mib), POLICY)


def argv_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


# (budgets in MiB) -> (mode, --device, --tensor-split): the table the issue asks for
TABLE = [
    ((1000, 1000), "gpu", None, "1000,1000"),  # room everywhere: the proportional split
    ((300, 150), "gpu", "RPC0", None),  # the output layer does not fit the small one: the large one alone
    ((150, 300), "gpu", None, "150,300"),  # proportional already puts the output layer on the large one
    ((300, 40), "gpu", "RPC0", None),
    ((40, 300), "gpu", None, "40,300"),
    ((200, 200), "gpu", "RPC0,RPC1", "18,1"),  # neither alone: the layers on one, the output layer on the other
    ((240, 150), "gpu", "RPC1,RPC0", "18,1"),  # reordered: the output layer on the device with room
    ((190, 40), "partial-offload", "RPC1,RPC0", "4,2"),  # no full fit anywhere: the most layers on the GPUs
    ((120, 120), "none", None, None),  # the output layer (offloaded first) fits no device
]


@pytest.mark.parametrize(("mib", "mode", "device", "tensor_split"), TABLE, ids=[f"{a}+{b}" for (a, b), *_ in TABLE])
def test_placement_table(gemma, mib, mode, device, tensor_split) -> None:
    plan = plan_for(gemma, *mib)
    assert plan.mode == mode, plan.reason
    if plan.chosen is None:
        return
    chosen = plan.chosen
    argv = server_argv(plan, chosen)
    assert (argv_value(argv, "-dev"), argv_value(argv, "-ts")) == (device, tensor_split)
    usable = {b.name: b.usable_bytes for b in plan.budgets}
    assert all(chosen.needs[name] <= usable[name] for name in usable if name in chosen.needs)
    jsonschema.validate(plan.to_json(), SCHEMA)
    body = plan.to_json()["chosen"]
    if device is None:
        assert chosen.split is None and body["placement"] is None and not chosen.placement_why
    else:
        # why this placement and not the proportional one: in the notes and the JSON
        assert body["placement"]["devices"] == list(chosen.split.devices)
        assert "proportional split" in body["placement_why"] and body["placement_why"] in plan.notes


@pytest.mark.parametrize("mib", [m for m, mode, *_ in TABLE if mode != "none"])
def test_launch_places_layers_where_the_estimate_does(gemma, mib) -> None:
    """llama.cpp's split of the argv's -dev/-ts (src/llama-model.cpp, by upper_bound on the cumulative shares)
    gives every device the layers the estimate counted on it."""
    plan = plan_for(gemma, *mib)
    assert plan.chosen is not None
    chosen, facts = plan.chosen, gemma[1]
    argv = server_argv(plan, chosen)
    names = llama_device_names(plan.budgets)
    order = [b.name for b in plan.budgets]
    if argv_value(argv, "-dev"):
        by_llama = {v: k for k, v in names.items()}
        order = [by_llama[n] for n in argv_value(argv, "-dev").split(",")]
    weights = [float(w) for w in argv_value(argv, "-ts").split(",")] if argv_value(argv, "-ts") else [1.0]
    from launcher.estimate import GPU

    launched = _layer_devices(
        facts, chosen.n_gpu_layers, [GPU(n, w, "rpc") for n, w in zip(order, weights, strict=True)]
    )
    estimated = {d.name: sorted(d.layers) for d in chosen.estimate.devices}
    for name, layers in estimated.items():
        assert [il for il in range(facts.n_layer) if launched[il] == name] == layers, name
    out_device = launched[facts.n_layer]
    assert chosen.estimate.device(out_device) is not None and chosen.estimate.device(out_device).weights_bytes >= (
        facts.output_bytes
    )


def _every_two_device_placement(gemma, budgets: list[Budget], n_gpu_layers: int) -> list[Option]:
    """Brute force: each device alone and every layer count in both orders."""
    candidate, facts = gemma
    act = min(n_gpu_layers, facts.n_layer + 1)
    splits = [Split((b.name,), (act,), "") for b in budgets]
    for first, last in ((budgets[0].name, budgets[1].name), (budgets[1].name, budgets[0].name)):
        splits += [Split((first, last), (c, act - c), "") for c in range(1, act)]
    return [evaluate(candidate, facts, POLICY, budgets, floor="Q4_K_M", n_gpu_layers=n_gpu_layers, split=s)
            for s in splits]  # fmt: skip


@pytest.mark.parametrize("mib", [(300, 150), (150, 300), (200, 200), (240, 150), (190, 40), (175, 20), (180, 60)])
def test_a_full_offload_is_found_whenever_one_exists_else_the_most_layers(gemma, mib) -> None:
    plan = plan_for(gemma, *mib)
    full = [o for o in _every_two_device_placement(gemma, plan.budgets, gemma[1].n_layer + 1) if o.fits]
    assert (plan.mode == "gpu") == bool(full), plan.reason
    chosen = plan.chosen
    assert chosen is not None
    used = [d for d in chosen.needs if d != "CPU" and chosen.needs[d]]
    if plan.mode == "gpu":
        if chosen.split is not None:  # the proportional split did not fit: the fewest devices that do
            assert len(used) == min(len(o.split.devices) for o in full)
        return
    assert plan.mode == "partial-offload"
    one_more = _every_two_device_placement(gemma, plan.budgets, chosen.n_gpu_layers + 1)
    assert not any(o.fits for o in one_more)  # no placement holds one layer more
    at_best = [o for o in _every_two_device_placement(gemma, plan.budgets, chosen.n_gpu_layers) if o.fits]
    assert len(used) == min(len(o.split.devices) for o in at_best)


def test_every_placement_is_searched_devices_alone_left_out_and_each_last() -> None:
    orders = candidate_orders(rpc_budgets(100, 300, 200))
    assert orders[:3] == [("GPU1",), ("GPU2",), ("GPU0",)]  # alone, largest first
    assert ("GPU0", "GPU2") in orders and ("GPU2", "GPU0") in orders  # GPU1 left out, either device last
    assert {o[-1] for o in orders if len(o) == 3} == {"GPU0", "GPU1", "GPU2"}
    assert candidate_orders(rpc_budgets(300)) == []


def test_two_rpc_devices_count_pipeline_parallel_compute_on_each_and_no_runtime_overhead(gemma) -> None:
    """-ts 150,300 on two RPC servers: llama.cpp enables pipeline parallelism (RPC devices have async compute and
    events) and reserves 43.70 MiB of compute on each; the plan's per-device prediction matches the log exactly."""
    plan = plan_for(gemma, 150, 300)
    chosen = plan.chosen
    assert chosen is not None and chosen.split is None
    assert all(d.overhead_bytes == 0 for d in chosen.estimate.devices)
    placement = placement_from_log(PROPORTIONAL_LOG, token_embd_bytes=gemma[1].input_bytes)
    attach_prediction(placement, chosen.estimate.devices)
    assert [d.name for d in placement.gpu_devices] == ["RPC0", "RPC1"]
    for device in placement.devices:
        assert device.predicted_bytes is not None
        assert abs(device.predicted_bytes - device.measured_bytes) <= 0.1 * MiB, device


def test_verify_maps_each_rpc_servers_buffers_to_its_own_device_by_endpoint(gemma) -> None:
    # every rpc-server names its device RPC0; `using device RPCn (host:port)` says which device each endpoint is
    placement = placement_from_log(REORDERED_LOG, token_embd_bytes=gemma[1].input_bytes)
    devices = {d.name: d for d in placement.gpu_devices}
    assert list(devices) == ["RPC1", "RPC0"]  # the --device order
    assert devices["RPC1"].model_bytes == round(65.16 * MiB) and devices["RPC0"].model_bytes == round(170.00 * MiB)
    assert devices["RPC1"].kv_bytes == round((6.38 + 7.97) * MiB) and devices["RPC0"].kv_bytes == 0
    assert devices["RPC1"].compute_bytes == round(43.70 * MiB) and devices["RPC0"].compute_bytes == round(1.01 * MiB)
    assert placement.verdict == "gpu"
    # and the plan that launched it predicts each device on its own line
    plan = plan_for(gemma, 240, 150)
    assert plan.chosen is not None
    attach_prediction(placement, plan.chosen.estimate.devices)
    for device in placement.devices:
        assert abs((device.predicted_bytes or 0) - device.measured_bytes) <= 0.1 * MiB, device


def test_a_measurement_of_another_placement_only_counts_as_a_failure(gemma) -> None:
    candidate = gemma[0]
    budgets = rpc_budgets(300, 150)
    first = make_plan("gemma", [candidate], budgets, POLICY)
    chosen = first.chosen
    assert chosen is not None and chosen.split is not None and chosen.split.devices == ("GPU0",)
    key = MeasureKey.of(chosen)
    # a verified run on GPU0 alone, remembered: it must not make the proportional split look as if it fit
    again = make_plan("gemma", [candidate], budgets, POLICY, measured={key: dict(chosen.needs)})
    assert again.chosen is not None and again.chosen.split == chosen.split and again.chosen.figures == "engine"
    # a failed launch (recorded as more than every device has) rules the configuration out on every placement
    failed = {b.name: b.usable_bytes + 1 for b in budgets}
    assert make_plan("gemma", [candidate], budgets, POLICY, measured={key: failed}).mode != "gpu"


def test_argv_names_rpc_servers_before_devices_and_llama_cpp_python_cannot_reorder(gemma) -> None:
    plan = plan_for(gemma, 240, 150)
    assert plan.chosen is not None
    argv = with_rpc(server_argv(plan, plan.chosen), ["127.0.0.1:1", "127.0.0.1:2"])
    assert argv.index("--rpc") + 2 == argv.index("-dev")
    from launcher.backends.llamacpp import ServerProgram

    program = ServerProgram("llama-cpp-python", ("python", "-m", "llama_cpp.server"), "0.3.36")
    chosen = replace(plan.chosen, candidate=_local(plan.chosen.candidate))
    with pytest.raises(BackendError, match="cannot order the devices"):
        python_server_argv(plan, chosen, program, host="127.0.0.1", port=1)
    alone = plan_for(gemma, 300, 150)
    assert alone.chosen is not None
    argv = python_server_argv(alone, replace(alone.chosen, candidate=_local(alone.chosen.candidate)), program,
                              host="127.0.0.1", port=1)  # fmt: skip
    assert argv[argv.index("--tensor_split") + 1 :][:2] == ["19", "0"]  # the small device left out by a zero share


def _local(candidate: Candidate) -> Candidate:
    assert candidate.files and candidate.files[0].local_path
    return candidate


def test_layer_split_without_a_placement_is_proportional_to_usable_memory() -> None:
    gpus = layer_split(rpc_budgets(300, 150))
    assert [(g.name, g.split_weight, g.backend) for g in gpus] == [("GPU0", 300, "rpc"), ("GPU1", 150, "rpc")]


# llama-server 0c1e570 --rpc A,B -ts 150,300 (fitquant's plan for 150 + 300 MiB), Gemma 3 270M Q4_K_M, 4096 tokens
PROPORTIONAL_LOG = """\
llama_model_loader: loaded meta data with 33 key-value pairs and 236 tensors from gemma-3-270m-q4_k_m.gguf
llama_prepare_model_devices: using device RPC0 (127.0.0.1:50201) (unknown id) - 24105 MiB free
llama_prepare_model_devices: using device RPC1 (127.0.0.1:50202) (unknown id) - 24105 MiB free
load_tensors: offloading output layer to GPU
load_tensors: offloading 17 repeating layers to GPU
load_tensors: offloaded 19/19 layers to GPU
load_tensors:   CPU_Mapped model buffer size =   170.00 MiB
load_tensors: RPC0[127.0.0.1:50201] model buffer size =    25.15 MiB
load_tensors: RPC0[127.0.0.1:50202] model buffer size =   210.01 MiB
llama_context: n_ctx                 = 4096
llama_context: flash_attn            = enabled
llama_context: kv_unified            = false
llama_context:        CPU  output buffer size =     1.00 MiB
llama_kv_cache: RPC0[127.0.0.1:50201] KV buffer size =     2.12 MiB
llama_kv_cache: RPC0[127.0.0.1:50202] KV buffer size =     4.25 MiB
llama_kv_cache: RPC0[127.0.0.1:50201] KV buffer size =     3.19 MiB
llama_kv_cache: RPC0[127.0.0.1:50202] KV buffer size =     4.78 MiB
llama_context: pipeline parallelism enabled
sched_reserve: RPC0[127.0.0.1:50201] compute buffer size =    43.70 MiB
sched_reserve: RPC0[127.0.0.1:50202] compute buffer size =    43.70 MiB
sched_reserve:        CPU compute buffer size =    28.45 MiB
"""

# the plan for 240 + 150 MiB: -dev RPC1,RPC0 -ts 18,1 (the output layer alone on RPC0, the device with room)
REORDERED_LOG = """\
llama_model_loader: loaded meta data with 33 key-value pairs and 236 tensors from gemma-3-270m-q4_k_m.gguf
llama_prepare_model_devices: using device RPC1 (127.0.0.1:50202) (unknown id) - 24105 MiB free
llama_prepare_model_devices: using device RPC0 (127.0.0.1:50201) (unknown id) - 24105 MiB free
load_tensors: offloading output layer to GPU
load_tensors: offloading 17 repeating layers to GPU
load_tensors: offloaded 19/19 layers to GPU
load_tensors:   CPU_Mapped model buffer size =   170.00 MiB
load_tensors: RPC0[127.0.0.1:50201] model buffer size =   170.00 MiB
load_tensors: RPC0[127.0.0.1:50202] model buffer size =    65.16 MiB
llama_context: n_ctx                 = 4096
llama_context: flash_attn            = enabled
llama_context: kv_unified            = false
llama_context:        CPU  output buffer size =     1.00 MiB
llama_kv_cache: RPC0[127.0.0.1:50202] KV buffer size =     6.38 MiB
llama_kv_cache: RPC0[127.0.0.1:50202] KV buffer size =     7.97 MiB
llama_context: pipeline parallelism enabled
sched_reserve: RPC0[127.0.0.1:50202] compute buffer size =    43.70 MiB
sched_reserve: RPC0[127.0.0.1:50201] compute buffer size =     1.01 MiB
sched_reserve:        CPU compute buffer size =    28.45 MiB
"""
