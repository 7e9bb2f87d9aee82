"""Speed (launcher/speed.py): the fitted decode and prefill model against the published llama-bench rows it cites,
bytes read per token from the plan's own figures, the server's measured speed, and the slow-load finding."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as QT
from test_backend_ollama import make_test_plan, tiny_candidate

from launcher.chat import ChatReply
from launcher.hardware import describe_machine
from launcher.speed import (
    DeviceSpeed,
    bytes_per_token,
    fitted,
    llmfit_published,
    measured_speed,
    predict,
    predict_published,
    published_rows,
)

GiB = 1024**3


@pytest.mark.parametrize("row", published_rows(), ids=lambda r: f"{r['device']} {r['model']}")
def test_published_rows_are_predicted_within_a_quarter(row: dict) -> None:
    """Uncalibrated: decode (and prefill where the row has it) within 25% of the published llama-bench figure."""
    speed = predict_published(row)
    assert speed.tg_per_s is not None and abs(speed.tg_per_s / row["tg"] - 1) <= 0.25, (speed, row)
    if row.get("pp") and speed.pp_per_s is not None:
        assert abs(speed.pp_per_s / row["pp"] - 1) <= 0.25, (speed, row)


def test_the_fit_beats_llmfits_formula_on_the_same_rows() -> None:
    ours = [abs(predict_published(r).tg_per_s / r["tg"] - 1) for r in published_rows()]  # type: ignore[operator]
    theirs = [abs(llmfit_published(r) / r["tg"] - 1) for r in published_rows()]
    assert sum(ours) < sum(theirs)


def test_the_constants_are_fitted_not_guessed() -> None:
    cuda = fitted("cuda")
    assert 0.5 < cuda.eta <= 1.0 and 0 < cuda.t0_s < 0.01  # a fixed cost per token, a share of the bandwidth
    assert cuda.pp_slope is not None and cuda.pp_slope > 1  # prefill reaches less than the FP16 peak
    assert fitted("cpu").pp_slope is None  # no published CPU prefill row: unknown, not invented


def test_bytes_per_token_are_the_weights_read_and_the_kv_at_depth(tmp_path: Path) -> None:
    plan = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)])
    option = plan.chosen
    assert option is not None and option.fully_offloaded
    empty = bytes_per_token(option, 0)
    facts = option.facts
    blocks = sum(layer.weight_bytes for layer in facts.layers)
    assert empty == {"CPU": 0, "GPU0": blocks + facts.output_bytes}  # no token embeddings: one row per token
    deep = bytes_per_token(option, 1000)
    kv_per_cell = sum(c.total_bytes / (c.cells * c.n_stream) for c in option.estimate.kv_caches)
    assert deep["GPU0"] - empty["GPU0"] == pytest.approx(1000 * kv_per_cell, rel=1e-3)
    assert bytes_per_token(option, 10**7)["GPU0"] == bytes_per_token(option, option.n_ctx)["GPU0"]  # at most n_ctx


def test_a_device_without_figures_makes_the_prediction_unknown(tmp_path: Path) -> None:
    plan = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)])
    assert plan.chosen is not None
    assert predict(plan.chosen, {}, 0).tg_per_s is None
    rtx = DeviceSpeed(1008e9, 330e12, "cuda")
    fast = predict(plan.chosen, {"GPU0": rtx}, 0)
    slow = predict(plan.chosen, {"GPU0": replace(rtx, bandwidth_bytes_per_s=100e9)}, 0)
    assert fast.tg_per_s is not None and slow.tg_per_s is not None and fast.tg_per_s > slow.tg_per_s
    assert fast.pp_per_s is not None and fast.pp_per_s > 0


def test_measured_speed_is_the_servers_own() -> None:
    llama = ChatReply("hi", 12, 9, {"predicted_per_second": 87.5, "prompt_per_second": 412.0, "prompt_n": 12})
    assert measured_speed(llama, ollama=False).tg_per_s == 87.5
    assert measured_speed(llama, ollama=False).pp_per_s == 412.0
    ollama = ChatReply("hi", 100, 20, {"eval_duration": 500_000_000, "prompt_eval_duration": 250_000_000})
    assert measured_speed(ollama, ollama=True).tg_per_s == 40.0
    assert measured_speed(ollama, ollama=True).pp_per_s == 400.0
    assert measured_speed(ChatReply("hi", None, None, {}), ollama=False).tg_per_s is None


def test_a_gpu_load_far_below_its_prediction_is_a_finding(tmp_path: Path) -> None:
    from launcher.backends.base import Instance
    from launcher.run import RunResult, speed_report
    from launcher.verify import DevicePlacement, Placement

    plan = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)])
    assert plan.chosen is not None
    machine = describe_machine(vram=[8 * GiB])
    machine = machine.model_copy(update={"devices": (machine.devices[0].model_copy(
        update={"name": "NVIDIA GeForce RTX 4090"}),)})  # fmt: skip
    placement = Placement("gpu", "", devices=[DevicePlacement("CUDA0", model_bytes=10**8, is_gpu=True)])
    instance = Instance("llamacpp", "llama-server", None, "http://127.0.0.1:1/v1", "m", None)
    result = RunResult(plan, plan.chosen, instance, placement, [], {"measured_tg_per_s": 5.0})
    report = speed_report(result, machine)
    assert report["predicted_tg_per_s"] > 100 and report["tg_ratio"] < 0.6
    assert report["finding"].startswith("slow: decode 5.0 tokens/s") and "probable CPU fallback" in report["finding"]
    fine = speed_report(replace(result, warmup={"measured_tg_per_s": report["predicted_tg_per_s"]}), machine)
    assert fine["finding"] is None


def test_the_plan_carries_each_options_predicted_speed(tmp_path: Path) -> None:
    from launcher.fit import fit
    from launcher.plan import Policy

    candidates = [tiny_candidate(tmp_path, "Q8_0", QT.Q8_0), tiny_candidate(tmp_path, "Q4_K_M", QT.Q4_K)]
    described = describe_machine(vram=[8 * GiB])
    unknown = fit("tiny", Policy(n_ctx=4096), machine=described, candidates=candidates, confirm=False)
    assert unknown.chosen is not None and unknown.chosen.speed is None  # a GPU not in the table: not guessed
    rtx = described.model_copy(update={"devices": (described.devices[0].model_copy(
        update={"name": "NVIDIA GeForce RTX 4090"}),)})  # fmt: skip
    plan = fit("tiny", Policy(n_ctx=4096), machine=rtx, candidates=candidates, confirm=False)
    speeds = {o.quant: o.speed for o in plan.candidates}
    assert all(s is not None and s["tg_per_s"] for s in speeds.values())
    assert speeds["Q4_K_M"]["tg_per_s"] > speeds["Q8_0"]["tg_per_s"]  # fewer bytes per token, faster  # type: ignore[index]
    chosen = plan.to_json()["chosen"]["speed"]
    assert chosen["tg_per_s_at_depth"] < chosen["tg_per_s"] and chosen["pp_per_s"] > chosen["tg_per_s"]


def test_min_speed_takes_the_best_quant_that_is_fast_enough(tmp_path: Path) -> None:
    from launcher.fit import fit
    from launcher.plan import Policy

    candidates = [tiny_candidate(tmp_path, "Q8_0", QT.Q8_0), tiny_candidate(tmp_path, "Q4_K_M", QT.Q4_K)]
    described = describe_machine(vram=[8 * GiB])
    rtx = described.model_copy(update={"devices": (described.devices[0].model_copy(
        update={"name": "NVIDIA GeForce RTX 4090"}),)})  # fmt: skip
    by_memory = fit("tiny", Policy(n_ctx=4096), machine=rtx, candidates=candidates, confirm=False)
    assert by_memory.chosen is not None and by_memory.chosen.quant == "Q8_0"
    speed = {o.quant: o.speed["tg_per_s_at_depth"] for o in by_memory.candidates}  # type: ignore[index]
    between = (speed["Q8_0"] + speed["Q4_K_M"]) / 2
    faster = fit("tiny", Policy(n_ctx=4096, min_tg_per_s=between), machine=rtx, candidates=candidates, confirm=False)
    assert faster.chosen is not None and faster.chosen.quant == "Q4_K_M"
    assert any(n.startswith(f"--min-speed {between:g}: Q8_0 decodes") for n in faster.notes)
    too_fast = fit("tiny", Policy(n_ctx=4096, min_tg_per_s=speed["Q4_K_M"] * 2), machine=rtx, candidates=candidates,
                   confirm=False)  # fmt: skip
    assert too_fast.chosen is not None and too_fast.chosen.quant == "Q8_0"
    assert any("nothing that fits decodes that fast" in n for n in too_fast.notes)
    unknown = fit("tiny", Policy(n_ctx=4096, min_tg_per_s=1.0), machine=described, candidates=candidates, confirm=False)
    assert any("the speed of these devices is unknown" in n for n in unknown.notes)
