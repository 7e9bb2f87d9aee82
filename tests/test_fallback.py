"""Compute that silently ran on the CPU with every weight on the GPU (issue 21, "a second kind of spill"): the load
log's graph splits (`sched_reserve: graph: nodes = N, splits = S`) against what a full offload gives, which is one
split per GPU device holding weights plus one on the host for the input.

The slow tests run the real llama-server over real ggml-rpc-servers (tests/rpc_device.py) with the real Gemma 3
270M. Measured with llama.cpp 0c1e570 at -c 2048: splits = 1 on the CPU (-ngl 0), 2 with every layer on one RPC
device, 3 on two (also with -np 4, pipeline parallelism), 2 and 3 for a partial offload (-ngl 10) on one and two;
with the KV cache kept on the host (-nkvo) 38 on one device and 39 on two (attention runs on the CPU in each of
the 19 layers: two more splits per layer)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
from gguf import GGMLQuantizationType as QT
from rpc_device import built_binaries, rpc_server
from test_backend_ollama import make_test_plan, tiny_candidate

from launcher import llamalog
from launcher.backends.base import Instance, LaunchRequest
from launcher.backends.llamacpp import LlamaCppBackend
from launcher.hardware import describe_machine
from launcher.plan import Option, Plan, Policy
from launcher.run import RunResult, RunSpec, plan_runs, run_machine, speed_report, start_planned, stop
from launcher.verify import DevicePlacement, Placement, full_offload_splits, placement_from_log, splits_finding

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "run.schema.json").read_text())
GiB = 1024**3

# the lines as llama.cpp prints them: current builds (llama-server -lv 4), 2025 builds, 2024 builds
RESERVE_LINE = "0.01.591.194 I sched_reserve: graph: nodes = 727, splits = 38, input objects = 4, input tensors = 9"
CONTEXT_LINE = "llama_context: graph splits = 3 (with bs=512), 1 (with bs=1)"
OLD_LINE = "llama_new_context_with_model: graph splits = 2"


@pytest.mark.parametrize(("line", "splits"), [(RESERVE_LINE, 38), (CONTEXT_LINE, 3), (OLD_LINE, 2)])
def test_graph_splits_are_read_from_every_format(line: str, splits: int) -> None:
    assert llamalog.parse(line).graph_splits == splits
    assert llamalog.parse("llama_new_context_with_model: graph nodes  = 1030").graph_splits is None
    placement = placement_from_log(f"{line}\n")
    assert placement.graph_splits == splits
    assert placement.to_json()["graph_splits"] == splits


def test_the_last_reserve_of_the_last_load_counts() -> None:
    # a reserve retried (without pipeline parallelism) prints again; a later model load starts afresh
    first = "llama_model_loader: loaded meta data with 30 key-value pairs\n" + RESERVE_LINE + "\n" + OLD_LINE + "\n"
    assert llamalog.parse(first).graph_splits == 2
    again = first + "llama_model_loader: loaded meta data with 30 key-value pairs\n"
    assert llamalog.parse(again).graph_splits is None


def _placement(verdict: str, splits: int | None, *gpus: int) -> Placement:
    devices = [DevicePlacement(f"CUDA{i}", model_bytes=n, is_gpu=True) for i, n in enumerate(gpus)]
    return Placement(verdict, "", devices=[*devices, DevicePlacement("CPU", model_bytes=10)],  # type: ignore[arg-type]
                     graph_splits=splits)  # fmt: skip


def test_a_full_offload_needs_one_split_per_gpu_holding_weights_and_one_for_the_input() -> None:
    assert full_offload_splits(_placement("gpu", 2, 100)) == 2
    assert full_offload_splits(_placement("gpu", 3, 100, 100)) == 3
    assert full_offload_splits(_placement("gpu", 2, 100, 0)) == 2  # a device holding no weights adds no split
    # a partial offload or a CPU load: the count depends on whether host weights are copied per batch, no rule
    assert full_offload_splits(_placement("spill", 5, 100)) is None
    assert full_offload_splits(_placement("cpu-only", 1)) is None
    assert splits_finding(_placement("gpu", 2, 100)) is None
    assert splits_finding(_placement("gpu", None, 100)) is None
    assert splits_finding(_placement("spill", 40, 100)) is None
    assert splits_finding(_placement("gpu", 38, 100)) == (
        "slow: 38 graph splits, a full offload needs 2: compute probably ran on the CPU"
    )


def test_speed_report_flags_extra_splits_whatever_the_decode_speed(tmp_path: Path) -> None:
    plan = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)])
    assert plan.chosen is not None
    machine = describe_machine(vram=[8 * GiB])
    machine = machine.model_copy(update={"devices": (machine.devices[0].model_copy(
        update={"name": "NVIDIA GeForce RTX 4090"}),)})  # fmt: skip
    instance = Instance("llamacpp", "llama-server", None, "http://127.0.0.1:1/v1", "m", None)
    placement = _placement("gpu", 38, 10**8)
    predicted = speed_report(RunResult(plan, plan.chosen, instance, placement, []), machine)["predicted_tg_per_s"]
    assert predicted
    # decoding at its prediction: the speed ratio passes, the splits do not
    fast = RunResult(plan, plan.chosen, instance, placement, [], {"measured_tg_per_s": predicted})
    report = speed_report(fast, machine)
    assert report["tg_ratio"] >= 0.6
    assert (report["graph_splits"], report["full_offload_splits"]) == (38, 2)
    assert report["finding"] == "slow: 38 graph splits, a full offload needs 2: compute probably ran on the CPU"
    # both findings, joined
    slow = speed_report(replace(fast, warmup={"measured_tg_per_s": 1.0}), machine)
    assert slow["finding"].startswith("slow: decode 1.0 tokens/s") and "; slow: 38 graph splits" in slow["finding"]
    # the splits a full offload gives: no finding
    fine = speed_report(replace(fast, placement=_placement("gpu", 2, 10**8)), machine)
    assert fine["finding"] is None and fine["graph_splits"] == 2


class _HostKVBackend(LlamaCppBackend):
    """The real llama-server with the plan's own command line plus -nkvo: the KV cache stays in host memory, so
    attention runs on the CPU in every layer while every weight is on the device."""

    def argv(self, plan: Plan, option: Option, request: LaunchRequest, port: int) -> list[str]:
        return [*super().argv(plan, option, request, port), "-nkvo"]


def _run(model: Path, backend: LlamaCppBackend, addresses: tuple[str, ...]) -> RunResult:
    machine, _ = run_machine(backend, vram=[2 * GiB] * len(addresses), rpc=addresses)
    request = LaunchRequest(rpc=addresses, ready_timeout_s=120)
    spec = RunSpec(str(model), Policy(n_ctx=2048), request=request, max_attempts=1)
    plan = plan_runs([spec], backend=backend, machine=machine)[0]
    result = start_planned(spec, plan, backend=backend, machine=machine)
    try:
        jsonschema.validate(result.to_json(), SCHEMA)
    finally:
        stop(result, backend)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("n_devices", [1, 2])
def test_a_full_offload_on_rpc_devices_gives_the_splits_the_rule_says(gemma3_270m_path: Path, n_devices: int) -> None:
    server, _ = built_binaries()
    with rpc_server(None) as first, rpc_server(None) as second:
        addresses = (first.address, second.address)[:n_devices]
        result = _run(gemma3_270m_path, LlamaCppBackend(str(server)), addresses)
    placement = result.placement
    assert placement.verdict == "gpu", placement.reason
    holding = [d.name for d in placement.gpu_devices if d.model_bytes > 0]
    assert len(holding) == n_devices, placement.devices
    assert placement.graph_splits == full_offload_splits(placement) == n_devices + 1
    assert result.speed["graph_splits"] == n_devices + 1
    assert "graph splits" not in (result.speed["finding"] or "")


@pytest.mark.slow
def test_a_kv_cache_kept_on_the_host_is_flagged_as_compute_on_the_cpu(gemma3_270m_path: Path) -> None:
    server, _ = built_binaries()
    with rpc_server(None) as rpc:
        result = _run(gemma3_270m_path, _HostKVBackend(str(server)), (rpc.address,))
    placement = result.placement
    # every weight on the device: the memory verdict alone calls it a success
    assert placement.verdict == "gpu" and placement.layers_on_gpu == placement.layers_total == 19
    assert placement.graph_splits == 38  # two more per layer: attention on the CPU in each of the 19
    speed = result.speed
    assert (speed["graph_splits"], speed["full_offload_splits"]) == (38, 2)
    assert "slow: 38 graph splits, a full offload needs 2: compute probably ran on the CPU" in speed["finding"]
    assert result.to_json()["speed"]["finding"] == speed["finding"]
