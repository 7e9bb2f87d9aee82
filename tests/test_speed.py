"""Speed (launcher/speed.py): the fitted decode and prefill model against the published llama-bench rows it cites,
bytes read per token from the plan's own figures, the server's measured speed, and the slow-load finding."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from statistics import median
from typing import Any

import corpus_real
import pytest
from gguf import GGMLQuantizationType as QT
from test_backend_ollama import make_test_plan, tiny_candidate

from launcher.chat import ChatReply
from launcher.hardware import describe_machine
from launcher.speed import (
    ERA_2024,
    EXPERT_BATCH_FULL,
    PP_TOKENS,
    Calibration,
    DeviceSpeed,
    Times,
    active_params,
    attention_flops,
    bytes_per_token,
    device_table,
    expert_pass_s,
    fitted,
    float_share,
    host_weights_trip_s,
    is_kquant,
    kquant_weights_per_token,
    llmfit_published,
    measured_speed,
    predict,
    predict_published,
    published_rows,
    rates,
    solve_ratios,
    times,
    validation_rows,
)

GiB = 1024**3


@pytest.mark.parametrize("row", published_rows(), ids=lambda r: f"{r['device']} {r['model']}")
def test_published_rows_are_predicted_within_a_quarter(row: dict) -> None:
    """Uncalibrated: decode and prefill, where the row has them, within 25% of the published llama-bench figure (a
    row may measure prefill alone: a PR's table of prompt throughput)."""
    speed = predict_published(row)
    assert row.get("tg") or row.get("pp")
    if row.get("tg"):
        assert speed.tg_per_s is not None and abs(speed.tg_per_s / row["tg"] - 1) <= 0.25, (speed, row)
    if row.get("pp") and speed.pp_per_s is not None and not row.get("prefill_held_out"):
        assert abs(speed.pp_per_s / row["pp"] - 1) <= 0.25, (speed, row)


@pytest.mark.parametrize("row", [r for r in published_rows() if r.get("prefill_held_out")],
                         ids=lambda r: f"{r['device']} {r['model']}")  # fmt: skip
def test_a_row_fitted_for_its_decode_only_has_its_prefill_checked_as_held_out(row: dict) -> None:
    """A row fitted for its decode whose prefill is not fitted on (the A100 SXM's F16 and 70B, May 2024's; today's
    L40S) is still predicted: within a quarter, else missed as its reason says."""
    speed = predict_published(row)
    assert speed.pp_per_s is not None and row.get("pp")
    error = abs(speed.pp_per_s / row["pp"] - 1)
    if row.get("prefill_suspect"):  # a tenth of its own Q4_K_M's prefill: not a run to match
        assert len(row["prefill_suspect"]) > 40 and error > 1
    elif row.get("prefill_miss"):
        assert len(row["prefill_miss"]) > 40 and error > 0.25, error
    else:
        assert error <= 0.25, error


def test_hbm_cards_decode_at_their_own_fitted_efficiency() -> None:
    """Fitted on the A100 SXM's rows with CUDA's fixed cost: about half of the specified bandwidth, where the GDDR
    cards read about 0.9 of theirs; a backend with no HBM row has none (its Instinct cards read at its one eta)."""
    from launcher.speed import device_table

    old, cuda = fitted("cuda", ERA_2024), fitted("cuda")
    assert old.eta_hbm is not None and 0.35 < old.eta_hbm < 0.65 < 0.8 < old.eta
    # today's rows have no HBM card's decode: May 2024's HBM/GDDR ratio applied to today's eta
    assert cuda.eta_hbm is not None and cuda.eta_hbm / cuda.eta == pytest.approx(old.eta_hbm / old.eta)
    assert fitted("rocm").eta_hbm is None and fitted("metal").eta_hbm is None
    table = device_table()
    hbm = {name for name, d in table.items() if d.hbm}
    assert {"NVIDIA A100-SXM4-80GB", "NVIDIA H100 PCIe", "NVIDIA H200", "AMD Instinct MI300X"} <= hbm
    assert not any(n.startswith(("Apple", "NVIDIA GeForce", "AMD Radeon")) for n in hbm)
    assert cuda.eta_of(table["NVIDIA H200"]) == cuda.eta_hbm and cuda.eta_of(table["NVIDIA L40S"]) == cuda.eta
    rocm = fitted("rocm")
    assert rocm.eta_of(table["AMD Instinct MI300X"]) == rocm.eta


@pytest.mark.parametrize("row", [r for r in validation_rows() if not r.get("suspect") and not r.get("miss")],
                         ids=lambda r: f"{r['device']} {r['model']}")  # fmt: skip
def test_held_out_published_rows_are_predicted_within_a_quarter(row: dict) -> None:
    """Rows the constants never saw (data/speed.json `validation`): the same bound as the fitted ones. A row may
    measure one of the two (a PR's table of prefill alone)."""
    speed = predict_published(row)
    assert row.get("tg") or row.get("pp")
    if row.get("tg"):
        assert speed.tg_per_s is not None and abs(speed.tg_per_s / row["tg"] - 1) <= 0.25, (speed, row)
    if not row.get("pp"):
        return
    assert speed.pp_per_s is not None
    assert abs(speed.pp_per_s / row["pp"] - 1) <= 0.25, (speed, row)


@pytest.mark.parametrize("row", [r for r in validation_rows() if r.get("miss")],
                         ids=lambda r: f"{r['device']} {r['model']}")  # fmt: skip
def test_held_out_rows_the_model_misses_say_why_and_do_miss(row: dict) -> None:
    """A held-out row the model is known to miss (`miss`: why, printed by scripts/bench_speed.py) misses it as said:
    every known miss is prefill's (May 2024's build on a card of 300+ TFLOPS: a 70B's prefill, or F16's; Turing's
    int8 kernels today; an MoE on Metal; the DGX Spark's GB10; Strix Halo on ROCm), decode stays within a quarter where the row has it. A change to the model that closes a miss
    fails here, so the marker cannot outlive it."""
    speed = predict_published(row)
    assert speed.pp_per_s is not None and len(row["miss"]) > 40
    assert "prefill" in row["miss"]
    if row.get("tg"):
        assert speed.tg_per_s is not None
        decode = speed.tg_per_s / row["tg"]
        assert abs(decode - 1) <= 0.25, (decode, row["device"], row["model"])
    # its prefill misses: at the row's prompt, or at another length or depth it gives (`deep`)
    prefills = [(speed.pp_per_s, row["pp"])] + [
        (predict_published(row, n_prompt=d["n_prompt"], depth=d.get("depth", 0), n_ubatch=d.get("n_ubatch")).pp_per_s,
         d["t_per_s"])
        for d in row.get("deep", ()) if d["test"] == "pp"
    ]  # fmt: skip
    errors = [(predicted or 0.0) / measured - 1 for predicted, measured in prefills]
    assert max(abs(e) for e in errors) > 0.25, (errors, row["device"], row["model"])


def test_apples_chips_are_listed_by_bin_with_one_figure_per_core_a_generation() -> None:
    """The table's Apple entries (data/speed.json `about`): every chip by GPU bin, as the probe names a Mac's GPU,
    and a bin's FLOPS its cores x the generation's figure per core (the bins of a generation share a core design)."""
    import re

    from launcher.speed import device_table

    apple = {name: speed for name, speed in device_table().items() if name.startswith("Apple ")}
    per_core: dict[str, list[float]] = {}
    for name, speed in apple.items():
        m = re.fullmatch(r"Apple (M\d)(?: (?:Pro|Max|Ultra))? \((\d+)-core GPU\)", name)
        assert m is not None and speed.backend == "metal" and speed.flops, name
        per_core.setdefault(m.group(1), []).append(speed.flops / int(m.group(2)))
    assert sorted(per_core) == ["M1", "M2", "M3", "M4"] and len(apple) == 30
    for generation, figures in per_core.items():
        assert max(figures) / min(figures) < 1.01, generation
    # the bins that differ in memory, not only in cores
    assert apple["Apple M3 Max (30-core GPU)"].bandwidth_bytes_per_s == 300e9
    assert apple["Apple M4 Max (32-core GPU)"].bandwidth_bytes_per_s == 410e9


def test_the_held_out_rows_are_not_fitted_on() -> None:
    """No held-out row is a fitted one's measurement: another device, model, prompt or micro-batch (a PR's sweep of
    micro-batch sizes on one card and model is held out beside its fitted llama-bench default)."""

    def key(r: dict) -> tuple:
        return r["device"], r["model"], r.get("pp_tokens", PP_TOKENS), r.get("n_ubatch", 512)

    fitted_keys = {key(r) for r in published_rows()}
    assert validation_rows() and not fitted_keys & {key(r) for r in validation_rows()}
    assert all(r.get("url", "").startswith("https://github.com/") for r in validation_rows())
    # a row not held to the bound says why (printed by scripts/bench_speed.py beside the others)
    assert all(len(r["suspect"]) > 40 for r in validation_rows() if "suspect" in r)


def test_a_kquant_on_metal_is_priced_by_its_kernels_arithmetic_where_that_is_slower_than_memory() -> None:
    """M1 Max reads Q4_K_M at 153 GB/s where Q4_0 reaches 233: fitted as FLOPs per K-quant weight, on Metal only."""
    metal = fitted("metal")
    assert metal.kquant_ops is not None and 10 < metal.kquant_ops < 100
    assert fitted("cuda").kquant_ops is None and fitted("cpu").kquant_ops is None  # their rows show no such floor
    assert is_kquant("Q4_K") and is_kquant("q6_k") and is_kquant("IQ4_XS") and not is_kquant("Q4_0")
    assert not is_kquant("Q8_0") and not is_kquant("F16")


def test_a_plan_is_predicted_for_todays_llama_cpp_and_may_2024s_rows_by_their_own_constants(tmp_path: Path) -> None:
    """May 2024's CUDA rows (`era`) ran the kernels of then: they fit constants of their own, which predict only them;
    a plan (times) is priced by today's, fitted on today's rows alone."""
    today, old = fitted("cuda"), fitted("cuda", ERA_2024)
    assert today.t0_s < old.t0_s / 2  # decode's fixed cost per token fell to a third
    assert today.pp_t0_s < old.pp_t0_s / 4  # and prefill's, which made May 2024's 70B prefill miss
    rows = published_rows() + validation_rows()
    assert {r.get("era") for r in rows if r["backend"] == "cuda"} == {None, ERA_2024}
    assert all(r.get("era") is None for r in rows if r["backend"] != "cuda")
    option = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)]).chosen
    assert option is not None
    rtx = {"GPU0": DeviceSpeed(1008e9, 330e12, "cuda")}
    parts = times(option, rtx)
    assert parts is not None
    reads = bytes_per_token(option, 0)["GPU0"] / (today.eta * 1008e9)
    assert parts.decode_s == pytest.approx(reads + today.t0_s, rel=1e-9)
    # a row of May 2024 is predicted by its era's constants, the same row of today's by today's
    row = next(r for r in rows if r.get("era") == ERA_2024 and r["device"] == "NVIDIA GeForce RTX 4090" and r["tg"])
    now = dict(row, era=None)
    bandwidth = 1008e9
    assert predict_published(row).tg_per_s == pytest.approx(
        1 / (row["bytes_per_token"] / (old.eta * bandwidth) + old.t0_s)
    )
    assert predict_published(now).tg_per_s == pytest.approx(
        1 / (row["bytes_per_token"] / (today.eta * bandwidth) + today.t0_s)
    )


def _real_option(tmp_path: Path, model: Any) -> Any:
    """The plan's option for a header-only copy of a real model (tests/corpus_real.py) on a 96 GiB card."""
    from launcher.catalog.types import Candidate, CandidateFile
    from launcher.gguf import read_header

    path = tmp_path / f"{model.name}-{model.quant}.gguf"
    size = corpus_real.write_sparse(model, path)
    candidate = Candidate(model.name, "local", model.quant, (CandidateFile(path.name, size, local_path=str(path)),),
                          header=read_header(path))  # fmt: skip
    option = make_test_plan([candidate], vram=96 * GiB).chosen
    assert option is not None and not option.cpu_moe
    return option


def test_an_moe_is_priced_per_routed_expert_matrix_in_decode_and_per_micro_batch_pass_in_prefill(
    tmp_path: Path,
) -> None:
    """Qwen3-30B-A3B Q4_K_M on an RTX PRO 6000 Blackwell decodes 251.61 t/s where its bytes at the dense efficiency
    say 426, and prefills 7640 where its active parameters at the dense slope say 31956; gpt-oss-20b, whose experts
    are a quarter as many and four times as big, decodes near its bytes' pace. Each routed expert matrix a token
    multiplies by costs a fitted time beyond its bytes; each micro-batch passes over the experts it routes to at a
    fitted share of the bandwidth. The plan (from the real headers' tensors) prices both rows as the rows do."""
    cuda = fitted("cuda")
    assert cuda.expert_matrix_s is not None and 0.5e-6 < cuda.expert_matrix_s < 3e-6
    assert cuda.expert_pass_eff is not None and 0.1 < cuda.expert_pass_eff < 0.3
    for fit in (fitted("cuda", ERA_2024), fitted("rocm"), fitted("cpu")):  # no MoE row: not invented
        assert fit.expert_matrix_s is None and fit.expert_pass_eff is None
    qwen = _real_option(tmp_path, corpus_real.real_qwen3_30b_a3b("Q4_K_M"))
    blackwell = {"GPU0": DeviceSpeed(1792e9, 504e12, "cuda")}
    parts = times(qwen, blackwell)
    assert parts is not None and parts.prefill_s is not None
    total = bytes_per_token(qwen, 0)["GPU0"]
    facts = qwen.facts
    matrices = 48 * 3 * facts.expert_used_count  # gate, up and down in each of 48 layers, 8 experts a token
    assert parts.decode_s == pytest.approx(total / (cuda.eta * 1792e9) + matrices * cuda.expert_matrix_s + cuda.t0_s)
    assert 1 / parts.decode_s == pytest.approx(251.61, rel=0.05)  # the published row, through the plan's own path
    assert (total / (cuda.eta * 1792e9) + cuda.t0_s) ** -1 > 1.5 * 251.61  # what pricing them by bytes alone said
    assert 1 / parts.prefill_s == pytest.approx(7640.08, rel=0.1)
    stored = sum(layer.expert_bytes for layer in facts.layers)
    share = facts.expert_used_count / facts.expert_count
    pass_s = expert_pass_s(stored, share, 512, 1792e9, cuda.eta, cuda.expert_pass_eff)
    assert pass_s / 512 > 0.5 * parts.prefill_s  # the pass, not the FLOPs, sets an MoE's prefill at 32 tokens an expert
    # gpt-oss-20b on an RTX 3090 (the fitted row: PR #20586) and an RTX 5090 (held out: 9898 and 362.6)
    oss = _real_option(tmp_path, corpus_real.real_gpt_oss_20b())
    ampere = times(oss, {"GPU0": DeviceSpeed(936e9, 142e12, "cuda")})
    assert ampere is not None and ampere.prefill_s is not None
    assert 1 / ampere.prefill_s == pytest.approx(4739.2, rel=0.05)
    rtx5090 = times(oss, {"GPU0": DeviceSpeed(1792e9, 419e12, "cuda")})
    assert rtx5090 is not None and rtx5090.prefill_s is not None
    assert 1 / rtx5090.prefill_s == pytest.approx(9897.95, rel=0.1) and 1 / rtx5090.decode_s == pytest.approx(
        362.59, rel=0.2
    )
    # experts kept on the host (--cpu-moe): the batch's copy over the link is added, the pass stays
    linked = {"GPU0": DeviceSpeed(936e9, 142e12, "cuda", link_bytes_per_s=25e9), "CPU": DeviceSpeed(80e9, 1e12, "cpu")}
    on_gpu, on_host = times(oss, linked), times(replace(oss, cpu_moe=True), linked)
    assert on_gpu is not None and on_host is not None and on_gpu.prefill_s and on_host.prefill_s
    trip = host_weights_trip_s(replace(oss, cpu_moe=True), linked["GPU0"], PP_TOKENS)
    assert trip and on_host.prefill_s == pytest.approx(on_gpu.prefill_s + trip)


def test_a_metal_moe_pays_its_k_quant_kernels_arithmetic_and_then_a_fixed_time_per_routed_expert_matrix(
    tmp_path: Path,
) -> None:
    """Qwen3-30B-A3B Q4_K_M on an M1 Max (ferrum-infer-rs's llama-bench log) decodes 51.03 t/s where its active
    K-quant weights at the Metal kernel's arithmetic say 75: Metal's fixed time per routed expert matrix is fitted on
    that row after the K-quant floor, as CUDA's is on its own rows (the row is a K-quant one and fits none of the
    dense constants: the floor's FLOPs per weight are the dense rows' alone). Metal's rows disagree on the form of an
    MoE's extra prefill time (the M1 Max's and the M2 Ultra's, PR #15616), so none is priced there: its prefill is a
    dense model's of its active parameters, a known miss on that row."""
    metal = fitted("metal")
    assert metal.expert_matrix_s is not None and 2e-6 < metal.expert_matrix_s < 10e-6  # CUDA's is 1.4 µs
    assert metal.expert_pass_eff is None
    dense = [r for r in published_rows() if r["backend"] == "metal" and r["weights"] == "kquant" and r.get("tg")
             and not r.get("experts")]  # fmt: skip
    table = device_table()
    floors = [(1 / r["tg"] - metal.t0_s) * (table[r["device"]].flops or 0) / r["decode_params"] for r in dense]
    assert dense and metal.kquant_ops == pytest.approx(median(floors))
    qwen = _real_option(tmp_path, corpus_real.real_qwen3_30b_a3b("Q4_K_M"))
    m1_max = {"GPU0": DeviceSpeed(400e9, 10.4e12, "metal")}
    parts = times(qwen, m1_max)
    assert parts is not None and parts.prefill_s is not None
    floor = kquant_weights_per_token(qwen)["GPU0"] * metal.kquant_ops / 10.4e12
    assert floor > bytes_per_token(qwen, 0)["GPU0"] / (metal.eta * 400e9)  # the kernel's arithmetic is the slower
    matrices = 48 * 3 * qwen.facts.expert_used_count
    assert parts.decode_s == pytest.approx(floor + matrices * metal.expert_matrix_s + metal.t0_s)
    assert 1 / parts.decode_s == pytest.approx(51.03, rel=0.05)  # the published row, through the plan's own path
    assert (floor + metal.t0_s) ** -1 > 1.3 * 51.03  # what the K-quant floor alone said
    row = next(r for r in published_rows() if r["device"] == "Apple M1 Max (32-core GPU)" and r.get("experts"))
    assert row["prefill_held_out"] and 1 / parts.prefill_s == pytest.approx(predict_published(row).pp_per_s, rel=0.05)


def test_a_micro_batchs_pass_over_the_experts_grows_with_its_tokens_an_expert_to_a_ceiling() -> None:
    """expert_pass_s: the experts a micro-batch routes to (1 - (1 - share)^tokens of them) at the fitted share of the
    bandwidth from EXPERT_BATCH_FULL tokens an expert on, in proportion under it, never faster than their bytes at
    the dense efficiency."""
    nbytes, bandwidth, eta, eff = 10e9, 1e12, 0.8, 0.2
    share = 4 / 32  # gpt-oss-20b
    full = expert_pass_s(nbytes, share, 512, bandwidth, eta, eff)
    assert full == pytest.approx(nbytes * (1 - (1 - share) ** 512) / (bandwidth * eff))
    assert expert_pass_s(nbytes, share, 128, bandwidth, eta, eff) == pytest.approx(full, rel=1e-6)  # 16 an expert
    touched = nbytes * (1 - (1 - share) ** 64)
    assert expert_pass_s(nbytes, share, 64, bandwidth, eta, eff) == pytest.approx(touched / bandwidth * 0.5 / eff)
    assert expert_pass_s(nbytes, share, 8, bandwidth, eta, eff) == pytest.approx(
        nbytes * (1 - (1 - share) ** 8) / (bandwidth * eta)  # 1 an expert: the bytes' read at the dense pace
    )
    assert EXPERT_BATCH_FULL == 16
    seconds_a_token = [expert_pass_s(nbytes, share, u, bandwidth, eta, eff) / u for u in (16, 64, 256, 1024)]
    assert seconds_a_token == sorted(seconds_a_token, reverse=True)  # a bigger micro-batch shares the pass


def test_float_weights_prefill_at_their_own_slope_on_cuda() -> None:
    """May 2024's CUDA multiplied F16 weights on the tensor cores with no dequantizing: its F16 rows prefill faster
    per FLOP than its quantized ones. Today's CUDA rows have no float row, so today's float weights take the quantized
    slope (MMQ's int8 kernels now do what the dequantizing did), not May 2024's float one."""
    old = fitted("cuda", ERA_2024)
    assert old.pp_slope is not None and old.pp_slope_float is not None and old.pp_slope_float < old.pp_slope
    assert fitted("cuda").pp_slope_float is None
    assert fitted("metal").pp_slope_float is None  # no published float row of its own: not borrowed from CUDA


def test_a_metal_plans_kquant_decode_is_bound_by_the_kernel_and_its_legacy_quant_by_memory(tmp_path: Path) -> None:
    kquant = make_test_plan([tiny_candidate(tmp_path, "Q4_K_M", QT.Q4_K)]).chosen
    legacy = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)]).chosen
    assert kquant is not None and legacy is not None
    weights = kquant_weights_per_token(kquant)
    blocks = sum(math.prod(s) for n, s in kquant.facts.tensor_shapes.items()
                 if n.startswith("blk.") and kquant.facts.tensor_types_by_name[n][0] == "Q4_K")  # fmt: skip
    assert weights["GPU0"] >= blocks > 0 and kquant_weights_per_token(legacy) == {}
    slow_alu = {"GPU0": DeviceSpeed(400e9, 1e12, "metal")}  # memory like an M1 Max's, a tenth of its arithmetic
    k_times, l_times = times(kquant, slow_alu), times(legacy, slow_alu)
    assert k_times is not None and l_times is not None
    fit = fitted("metal")
    assert k_times.decode_s == pytest.approx(weights["GPU0"] * fit.kquant_ops / 1e12 + fit.t0_s, rel=1e-6)
    assert l_times.decode_s < k_times.decode_s  # twice the bytes, but read at memory speed
    cuda = times(kquant, {"GPU0": DeviceSpeed(400e9, 1e12, "cuda")})
    assert cuda is not None and cuda.decode_s < k_times.decode_s  # no floor where the rows show none


def test_a_plans_float_share_is_its_float_matmul_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend with a float slope of its own (today none has: May 2024's CUDA constants stand in) prices a plan's
    prefill by its share of float matmul weights."""
    import launcher.speed

    monkeypatch.setattr(launcher.speed, "fitted", lambda backend, era=None: fitted(backend, ERA_2024))
    f16 = make_test_plan([tiny_candidate(tmp_path, "F16", QT.F16)]).chosen
    q8 = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)]).chosen
    assert f16 is not None and q8 is not None
    assert float_share(f16) == pytest.approx(1.0) and float_share(q8) == 0.0
    rtx = {"GPU0": DeviceSpeed(1008e9, 330e12, "cuda")}
    f16_times, q8_times = times(f16, rtx), times(q8, rtx)
    assert f16_times is not None and q8_times is not None and f16_times.prefill_s and q8_times.prefill_s
    assert f16_times.prefill_s < q8_times.prefill_s  # the same parameters, the float slope


def test_the_fit_beats_llmfits_formula_on_the_same_rows() -> None:
    decoded = [r for r in published_rows() if r.get("tg")]
    ours = [abs(predict_published(r).tg_per_s / r["tg"] - 1) for r in decoded]  # type: ignore[operator]
    theirs = [abs(llmfit_published(r) / r["tg"] - 1) for r in decoded]
    assert sum(ours) < sum(theirs)


def test_the_constants_are_fitted_not_guessed() -> None:
    cuda = fitted("cuda")
    assert 0.5 < cuda.eta <= 1.0 and 0 < cuda.t0_s < 0.01  # a fixed cost per token, a share of the bandwidth
    assert cuda.pp_slope is not None and cuda.pp_slope > 1  # prefill reaches less than the FP16 peak
    cpu = fitted("cpu")  # one published CPU row with prefill at two prompt lengths (llama-bench pp512, pp4096)
    assert cpu.pp_slope is not None and cpu.pp_slope > 1 and cpu.attention_eff is not None
    assert 0 < cpu.attention_eff < 1 / cpu.pp_slope  # attention runs slower than the matmuls on a CPU
    assert fitted("cuda").attention_eff is None  # no published GPU row at depth: not invented


@pytest.mark.parametrize("row", [r for r in published_rows() if r.get("deep")], ids=lambda r: r["device"])
def test_published_rows_at_depth_are_predicted_within_a_quarter(row: dict) -> None:
    for deep in row["deep"]:
        speed = predict_published(row, n_prompt=deep["n_prompt"])
        assert speed.pp_per_s is not None and abs(speed.pp_per_s / deep["t_per_s"] - 1) <= 0.25, (speed, deep)


@pytest.mark.parametrize("row", [r for r in validation_rows() if r.get("deep")],
                         ids=lambda r: f"{r['device']} {r['model']}")  # fmt: skip
def test_held_out_rows_at_depth_are_predicted_within_a_quarter(row: dict) -> None:
    """llama-bench's tg and pp @ d (DGX Spark's GB10: ggerganov's tables to depth 32768, DandinPower's at 512 and
    2048; Strix Halo's at 32768): decode at depth reads the cache as well, and stays within a quarter except where a
    known miss says so; prefill at depth and at the row's other prompt lengths too, except on a row whose prefill is
    a known miss (`miss`, checked below)."""
    for deep in row["deep"]:
        if deep["test"] == "tg":
            tg = predict_published(row, depth=deep["depth"], n_ubatch=deep.get("n_ubatch")).tg_per_s
            assert tg is not None
            # a known miss that names decode at depth (Strix Halo's ROCm reading Llama-2's cache) misses it as said
            missed = "decode at depth" in row.get("miss", "")
            assert (abs(tg / deep["t_per_s"] - 1) > 0.25) == missed, (deep, tg)
            continue
        pp = predict_published(row, n_prompt=deep["n_prompt"], depth=deep.get("depth", 0),
                               n_ubatch=deep.get("n_ubatch")).pp_per_s  # fmt: skip
        assert pp is not None
        assert row.get("miss") or abs(pp / deep["t_per_s"] - 1) <= 0.25, (deep, pp)


def test_a_rows_cache_at_depth_is_the_plans(tmp_path: Path) -> None:
    """A published row's KV cache read at depth (`kv_cache`: K+V bytes per layer and position, its sliding-window
    layers capped at their cache) is what the plan counts for the real model at llama-bench's settings (an f16 cache,
    micro-batches of 2048): gpt-oss-20b, half its layers sliding over 128 positions, and Qwen3-30B-A3B."""
    from launcher.catalog.types import Candidate, CandidateFile
    from launcher.gguf import read_header
    from launcher.plan import Policy, budgets_for, make_plan
    from launcher.speed import _row_kv_bytes  # the row's count, checked against the plan's

    budgets = budgets_for(describe_machine(vram=[96 * GiB]).devices, ram_available_bytes=None, reserve_bytes=GiB)
    rows = {r["model"]: r for r in validation_rows() if r["device"] == "NVIDIA GB10"}
    for model, label in ((corpus_real.real_gpt_oss_20b(), "gpt-oss-20b MXFP4"),
                         (corpus_real.real_qwen3_30b_a3b("Q4_K_M"), "Qwen3-Coder-30B-A3B Q8_0")):  # fmt: skip
        path = tmp_path / f"{model.name}-{model.quant}.gguf"
        size = corpus_real.write_sparse(model, path)
        candidate = Candidate(model.name, "local", model.quant, (CandidateFile(path.name, size, local_path=str(path)),),
                              header=read_header(path))  # fmt: skip
        for depth in (1000, 4096, 32768):
            policy = Policy(n_ctx=depth + 32, type_k="f16", type_v="f16", flash_attn="on", n_ubatch=2048)
            option = make_plan("gb10", [candidate], budgets, policy).chosen
            assert option is not None
            kv = bytes_per_token(option, depth)["GPU0"] - bytes_per_token(option, 0)["GPU0"]
            assert _row_kv_bytes(rows[label], depth) == pytest.approx(kv, rel=0.01), (label, depth)


def test_attention_grows_with_depth_and_is_paid_on_the_cpu(tmp_path: Path) -> None:
    plan = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)])
    option = plan.chosen
    assert option is not None
    per_position = sum(2 * layer.n_head * (layer.head_dim_k + layer.head_dim_v) for layer in option.facts.layers)
    assert sum(attention_flops(option, 100).values()) == pytest.approx(100 * per_position)
    assert sum(attention_flops(option, 10**9).values()) == pytest.approx(option.n_ctx * per_position)  # cells
    cpu = {name: DeviceSpeed(30e9, 200e9, "cpu") for name in ("CPU", "GPU0")}
    shallow, deep = times(option, cpu, 0), times(option, cpu, 2048)
    assert shallow is not None and deep is not None
    assert shallow.decode_attention_s == 0 and deep.decode_attention_s > 0
    assert predict(option, cpu, 2048).tg_per_s < predict(option, cpu, 0).tg_per_s  # type: ignore[operator]
    assert predict(option, cpu, 2048).pp_per_s < predict(option, cpu, 0).pp_per_s  # type: ignore[operator]


def test_the_prompts_params_leave_out_embeddings_and_the_output_layer(tmp_path: Path) -> None:
    plan = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)])
    option = plan.chosen
    assert option is not None
    blocks = sum(math.prod(shape) for name, shape in option.facts.tensor_shapes.items() if name.startswith("blk."))
    assert active_params(option) == blocks and blocks < option.facts.n_params


def parts(decode: float, attention: float, prefill: float = 0.0, prefill_attention: float = 0.0) -> Times:
    return Times(decode, attention, prefill or None, prefill_attention)


def test_a_full_warmup_separates_reads_attention_and_prefill() -> None:
    # the machine: reads 20% slower than predicted, attention at half the predicted speed, matmuls 1.5x faster
    read, attention, matmul = 1.25, 2.0, 1 / 1.5
    short, deep, fill = parts(0.010, 0.0001), parts(0.011, 0.008), parts(0, 0, 0.004, 0.003)

    def measured(p: Times, prefill: bool = False) -> float:
        if prefill:
            return 1 / (matmul * (p.prefill_s or 0) + attention * p.prefill_attention_s)
        return 1 / (read * p.decode_s + attention * p.decode_attention_s)

    ratios = solve_ratios((short, measured(short)), (deep, measured(deep)), (fill, measured(fill, prefill=True)))
    assert ratios == {"tg_ratio": pytest.approx(0.8, abs=1e-3), "attention_ratio": pytest.approx(0.5, abs=1e-3),
                      "pp_ratio": pytest.approx(1.5, abs=1e-3), "prefill_attention_ratio": None,
                      "prefill_loop_ratio": None}  # fmt: skip
    # two prefills at different depths (the fill, then a few words after it) separate prefill's attention, which
    # runs on another path than decode's, from its matmuls
    prefill_attention = 4.0
    deep_fill = parts(0, 0, 0.004, 0.009)

    def prefill_rate(p: Times) -> float:
        return 1 / (matmul * (p.prefill_s or 0) + prefill_attention * p.prefill_attention_s)

    both = solve_ratios((short, measured(short)), (deep, measured(deep)), (fill, prefill_rate(fill)),
                        (deep_fill, prefill_rate(deep_fill)))  # fmt: skip
    assert both["pp_ratio"] == pytest.approx(1.5, abs=1e-3) and both["prefill_attention_ratio"] == pytest.approx(0.25)
    only_short = solve_ratios((short, measured(short)))
    assert only_short["attention_ratio"] is None and only_short["pp_ratio"] is None
    assert only_short["tg_ratio"] == pytest.approx(1 / (read * 0.010 + attention * 0.0001) / (1 / 0.0101), abs=1e-3)


def test_a_fill_mostly_attention_gives_no_prefill_ratio() -> None:
    """With one prefill, the matmuls' ratio is what is left of the fill once attention is priced at decode's ratio:
    where attention took most of the fill, that rest is a small difference of two large figures, and is not kept."""
    short, deep = parts(0.010, 0.0001), parts(0.011, 0.008)
    decodes = (short, 1 / (0.010 + 2.0 * 0.0001)), (deep, 1 / (0.011 + 2.0 * 0.008))  # attention ratio 0.5
    fill = Times(0.0, 0.0, 0.001, 0.004, prefill_attention_as_decode=True)  # attention: 0.008 s of the measured
    kept = solve_ratios(*decodes, (fill, 1 / (0.008 + 0.004)))  # the matmuls a third of the measured time
    assert kept["attention_ratio"] == pytest.approx(0.5) and kept["pp_ratio"] == pytest.approx(0.25)
    dropped = solve_ratios(*decodes, (fill, 1 / (0.008 + 0.0015)))  # a sixth of it: noise would swing it wildly
    assert dropped["attention_ratio"] == pytest.approx(0.5) and dropped["pp_ratio"] is None
    # two prefills whose attention shares are alike do not tell matmuls from attention (a noisy 10% either way swings
    # the split): the fill alone prices the prefill, attention at decode's ratio, or all of it by one ratio
    fill = Times(0.0, 0.0, 0.002, 0.004)
    alike = Times(0.0, 0.0, 0.002, 0.005)
    noisy = solve_ratios(*decodes, (fill, 1 / 0.012), (alike, 1 / 0.014 * 1.1))
    assert noisy["prefill_attention_ratio"] is None and noisy["pp_ratio"] == pytest.approx(0.002 / (0.012 - 0.008))
    alone = solve_ratios((short, decodes[0][1]), None, (fill, 1 / 0.012), (alike, 1 / 0.014 * 1.1))
    assert alone["pp_ratio"] == pytest.approx(0.006 / 0.012) and alone["prefill_attention_ratio"] is None


def test_a_shallow_prefill_prices_the_matmuls_where_the_fill_is_mostly_attention() -> None:
    """A prompt at an empty context (`--warmup full` sends one before the fill) is mostly matmuls. Beside the fill
    (mostly attention) it separates prefill's matmuls from its attention, on a quantized cache too, whose prefill
    runs decode's loop; alone, with attention at decode's ratio, it prices the matmuls where the fill cannot."""
    short, deep = parts(0.010, 0.0001), parts(0.011, 0.008)
    decodes = (short, 1 / (0.010 + 2.0 * 0.0001)), (deep, 1 / (0.011 + 2.0 * 0.008))  # attention ratio 0.5
    matmul = 1 / 1.5  # the machine's matmuls 1.5x faster than predicted

    def rate(p: Times, attention: float) -> float:
        return 1 / (matmul * (p.prefill_s or 0.0) + attention * p.prefill_attention_s)

    fill = Times(0.0, 0.0, 0.001, 0.004, prefill_attention_as_decode=True)
    first = Times(0.0, 0.0, 0.001, 0.0004, prefill_attention_as_decode=True)
    assert solve_ratios(*decodes, (fill, rate(fill, 2.0)))["pp_ratio"] is None  # the matmuls a twelfth of the fill
    alone = solve_ratios(*decodes, None, None, (first, rate(first, 2.0)))
    assert alone["pp_ratio"] == pytest.approx(1.5) and alone["prefill_attention_ratio"] is None
    # prefill's attention at a ratio of its own (0.4 here, decode's 0.5): the two prefills tell it
    both = solve_ratios(*decodes, (fill, rate(fill, 2.5)), None, (first, rate(first, 2.5)))
    assert both["pp_ratio"] == pytest.approx(1.5) and both["prefill_loop_ratio"] == pytest.approx(0.4)
    assert both["prefill_attention_ratio"] is None  # the tiled path's (f16 K and V) is another ratio
    assert both["attention_ratio"] == pytest.approx(0.5)
    # f16 K and V: prefill's attention runs tiled (ratio 0.25 here)
    fill, first = Times(0.0, 0.0, 0.001, 0.004), Times(0.0, 0.0, 0.001, 0.0004)
    split = solve_ratios(*decodes, (fill, rate(fill, 4.0)), None, (first, rate(first, 4.0)))
    assert split["pp_ratio"] == pytest.approx(1.5) and split["prefill_attention_ratio"] == pytest.approx(0.25)
    assert split["prefill_loop_ratio"] is None


def test_a_calibration_prices_prefills_attention_by_its_own_ratio_before_decodes() -> None:
    """A quantized cache's prefill runs decode's attention loop: decode's ratio prices it unless a warm-up measured
    prefill's own on that loop, which prices decode's where decode's own is unknown; the tiled path's ratio (f16 K
    and V) is for neither."""
    plain = Times(0.010, 0.002, 0.001, 0.004, prefill_attention_as_decode=True)
    by_decode = rates(plain, Calibration(1.0, 1, 1.0, attention_factor=0.5))
    assert by_decode.pp_per_s == pytest.approx(1 / (0.001 + 0.004 / 0.5))
    tiled = rates(plain, Calibration(1.0, 1, 1.0, attention_factor=0.5, prefill_attention_factor=4.0))
    assert tiled.pp_per_s == by_decode.pp_per_s
    by_own = rates(plain, Calibration(1.0, 1, 1.0, attention_factor=0.5, prefill_loop_factor=0.25))
    assert by_own.pp_per_s == pytest.approx(1 / (0.001 + 0.004 / 0.25))
    assert by_own.tg_per_s == by_decode.tg_per_s == pytest.approx(1 / (0.010 + 0.002 / 0.5))
    # decode's own attention ratio unknown (its two decodes too alike): prefill's on the same loop prices it
    no_decode = rates(plain, Calibration(1.2, 1, 1.0, prefill_loop_factor=0.25))
    assert no_decode.tg_per_s == pytest.approx(1 / (0.010 / 1.2 + 0.002 / 0.25))
    tiled = Times(0.010, 0.002, 0.001, 0.004)  # f16 K and V: prefill's attention on another path than decode's
    assert rates(tiled, Calibration(1.2, 1, 1.0, prefill_loop_factor=0.25)).tg_per_s == pytest.approx(
        1 / (0.010 / 1.2 + 0.002 / 1.2)
    )


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


def test_prefer_speed_takes_the_fastest_quant_above_the_floor(tmp_path: Path) -> None:
    """--prefer speed: the option predicted to decode fastest at the target depth among those that fit above the
    floor (here Q4_K_M over Q8_0: fewer bytes per token), with a note saying what quality was given up for it."""
    from launcher.fit import fit
    from launcher.plan import Policy

    candidates = [tiny_candidate(tmp_path, "Q8_0", QT.Q8_0), tiny_candidate(tmp_path, "Q4_K_M", QT.Q4_K)]
    described = describe_machine(vram=[8 * GiB])
    rtx = described.model_copy(update={"devices": (described.devices[0].model_copy(
        update={"name": "NVIDIA GeForce RTX 4090"}),)})  # fmt: skip
    by_quality = fit("tiny", Policy(n_ctx=4096), machine=rtx, candidates=candidates, confirm=False)
    assert by_quality.chosen is not None and by_quality.chosen.quant == "Q8_0"
    fastest = fit("tiny", Policy(n_ctx=4096, prefer="speed"), machine=rtx, candidates=candidates, confirm=False)
    assert fastest.chosen is not None and fastest.chosen.quant == "Q4_K_M"
    assert "--prefer speed" in fastest.reason
    assert any(n.startswith("--prefer speed: Q4_K_M decodes") and "Q8_0 (the highest quality that fits)" in n
               for n in fastest.notes)  # fmt: skip
    floor = fit("tiny", Policy(n_ctx=4096, prefer="speed", min_quant="Q8_0"), machine=rtx, candidates=candidates,
                confirm=False)  # fmt: skip
    assert floor.chosen is not None and floor.chosen.quant == "Q8_0"  # nothing faster above that floor
    unknown = fit("tiny", Policy(n_ctx=4096, prefer="speed"), machine=described, candidates=candidates, confirm=False)
    assert unknown.chosen is not None and unknown.chosen.quant == "Q8_0"
    assert any("--prefer speed: the speed of these devices is unknown" in n for n in unknown.notes)


# ---------------------------------------------------------------------------------------------- K/V pairs a build runs

SYSTEM_INFO = ("system_info: n_threads = 16 (n_threads_batch = 16) / 32 | CUDA : ARCHS = 900 | "
               "FA_QUANTS = q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | "
               "CPU : SSE3 = 1 | AVX2 = 1 |")  # fmt: skip
CONVERTED = ("ggml_cuda_flash_attn_ext_vec: no FlashAttention vector kernel compiled for K/V types q8_0-f16, converting "
             'K and V to f16 instead (slow). Add "q8_0-f16" to GGML_CUDA_FA_QUANTS to compile it.')  # fmt: skip


def test_fa_quants_parse_and_the_nearest_pair_a_build_runs() -> None:
    from launcher.speed import DEFAULT_CUDA_FA_QUANTS, nearest_kv_pair, parse_fa_quants

    default = parse_fa_quants(DEFAULT_CUDA_FA_QUANTS)
    assert default == {("q4_0", "q4_0"), ("q8_0", "q8_0"), ("f16", "f16"), ("bf16", "bf16")}
    assert parse_fa_quants("q8_0-q4_0; q5_1-q5_1") == {("q8_0", "q4_0"), ("q5_1", "q5_1"), ("f16", "f16")}
    assert len(parse_fa_quants("ALL")) == 49
    with pytest.raises(ValueError, match="not a FlashAttention K-V pair: 'q3_k-q3_k'"):
        parse_fa_quants("q3_k-q3_k")
    cases = {
        ("q8_0", "q8_0"): ("q8_0", "q8_0"),  # compiled: as asked
        ("f32", "f32"): ("f32", "f32"),  # runs as f16
        ("q8_0", "f16"): ("f16", "f16"),  # the smallest pair at least as precise as each
        ("q4_0", "q8_0"): ("q8_0", "q8_0"),
        ("q5_1", "q5_1"): ("q8_0", "q8_0"),
        ("iq4_nl", "iq4_nl"): ("q4_0", "q4_0"),  # nothing at least as precise is smaller
    }
    for asked, runs in cases.items():
        assert nearest_kv_pair(*asked, default) == runs, asked
    assert nearest_kv_pair("q8_0", "f16", parse_fa_quants("all")) == ("q8_0", "f16")


def test_the_log_says_which_pairs_a_build_compiled_and_which_it_converted() -> None:
    from launcher.verify import placement_from_log

    log = f"{SYSTEM_INFO}\nload_tensors: offloaded 29/29 layers to GPU\n{CONVERTED}\n"
    placement = placement_from_log(log)
    assert placement.fa_quants == "q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16"
    assert placement.fa_converted == "q8_0-f16"
    assert placement.to_json()["fa_converted"] == "q8_0-f16"
    assert not any("FlashAttention" in e for e in placement.errors)  # a warning about speed, not a load error
    assert placement_from_log("load_tensors: offloaded 29/29 layers to GPU\n").fa_converted is None


def test_a_kv_pair_the_build_converts_to_f16_is_a_slow_finding(tmp_path: Path) -> None:
    """The warning comes at the first attention the server runs (the warm-up), after the load was verified: the
    speed report reads it from the server's log."""
    from launcher.backends.base import Instance
    from launcher.run import RunResult, speed_report
    from launcher.verify import DevicePlacement, Placement

    plan = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)])
    assert plan.chosen is not None
    log = tmp_path / "server.log"
    log.write_text(f"{SYSTEM_INFO}\nload_tensors: offloaded 5/5 layers to GPU\nsrv  update_slots: all slots are idle\n")
    placement = Placement("gpu", "", devices=[DevicePlacement("CUDA0", model_bytes=10**8, is_gpu=True)],
                          fa_quants="q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16")  # fmt: skip
    instance = Instance("llamacpp", "llama-server", None, "http://127.0.0.1:1/v1", "m", None, log_path=log)
    result = RunResult(plan, plan.chosen, instance, placement, [], {"measured_tg_per_s": None})
    machine = describe_machine(vram=[8 * GiB])
    assert speed_report(result, machine)["finding"] is None
    with open(log, "a") as f:
        f.write(CONVERTED + "\n")
    report = speed_report(result, machine)
    assert report["fa_converted"] == "q8_0-f16"
    assert report["finding"].startswith(
        "slow: no FlashAttention kernel for K/V types q8_0-f16 (this build has q4_0-q4_0"
    )


def test_the_plan_keeps_to_a_kv_pair_the_cuda_build_runs(tmp_path: Path) -> None:
    """A CUDA build's FA_QUANTS, from fitquant's own build.json or from an earlier load's log kept in the record,
    moves an asked pair it has no kernel for to the nearest one it runs, with a note; anything else is left alone."""
    from processes import built_llama_server

    from launcher import record
    from launcher.backends.builds import Build
    from launcher.backends.llamacpp import LlamaCppBackend
    from launcher.plan import Policy
    from launcher.run import kv_for_build

    assert Build(tmp_path, "0.3.36", "cuda", None, "", ()).fa_quants == "q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16"
    assert Build(tmp_path, "0.3.36", "cuda", None, "", ("-DGGML_CUDA_FA_ALL_QUANTS=ON",)).fa_quants == "all"
    assert Build(tmp_path, "0.3.36", "cuda", None, "", ("-DGGML_CUDA_FA_QUANTS=q8_0-f16;q8_0-q8_0",)).fa_quants \
        == "q8_0-f16,q8_0-q8_0"  # fmt: skip
    assert Build(tmp_path, "0.3.36", "cpu", None, "", ()).fa_quants is None

    backend = LlamaCppBackend(str(built_llama_server()))  # this machine's CPU build: its pairs are not limited
    assert backend.fa_quants() is None
    gpu = describe_machine(vram=[24 * GiB])
    asked = Policy(n_ctx=4096, type_k="q8_0", type_v="f16")
    assert kv_for_build(asked, backend, gpu) == (asked, None)  # nothing known about this build's pairs yet
    record.append(gpu, {"model": "m", "backend": "llamacpp", "version": backend.program.version,
                        "fa_quants": "q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16"})  # fmt: skip
    policy, note = kv_for_build(asked, backend, gpu)
    assert (policy.type_k, policy.type_v) == ("f16", "f16")
    assert note is not None and note.startswith("K/V cache q8_0/f16: this llama-server build has no FlashAttention")
    default = Policy(n_ctx=4096)  # q8_0/q8_0 is compiled
    assert kv_for_build(default, backend, gpu) == (default, None)
    cpu = describe_machine(ram=16 * GiB)
    assert kv_for_build(asked, backend, cpu) == (asked, None)  # no CUDA device: the CPU runs every pair
    no_fa = Policy(n_ctx=4096, type_k="q8_0", type_v="f16", flash_attn="off")
    assert kv_for_build(no_fa, backend, gpu) == (no_fa, None)


def test_a_partial_offload_pays_the_host_weights_trip_over_pcie(tmp_path: Path) -> None:
    """llama.cpp's CUDA backend copies host weights to the GPU for every micro-batch of 32 tokens or more: a prompt
    token pays the host layers' bytes over the link / the micro-batch's tokens; an unknown link leaves it unknown."""
    from launcher.plan import Policy, budgets_for, evaluate
    from launcher.speed import host_weights_trip_s

    candidate = tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)
    plan = make_test_plan([candidate])
    assert plan.chosen is not None
    facts = plan.chosen.facts
    budgets = budgets_for(describe_machine(vram=[8 * GiB]).devices, ram_available_bytes=None, reserve_bytes=GiB)
    half = evaluate(candidate, facts, Policy(n_ctx=4096), budgets, n_gpu_layers=facts.n_layer // 2, floor="Q2_K")
    on_gpu = {i for d in half.estimate.devices if d.name != "CPU" for i in d.layers}
    host = sum(layer.weight_bytes for layer in facts.layers if layer.index not in on_gpu)
    assert 0 < host < sum(layer.weight_bytes for layer in facts.layers)
    gpu = DeviceSpeed(1008e9, 330e12, "cuda", 31.5e9)
    assert host_weights_trip_s(half, gpu, 512) == pytest.approx(host / (31.5e9 * 512))
    assert host_weights_trip_s(half, gpu, 16) == 0  # a batch under 32: the CPU computes its own layers
    assert host_weights_trip_s(plan.chosen, gpu, 512) == 0  # every block on the GPU
    devices = {"GPU0": gpu, "CPU": DeviceSpeed(50e9, 1e12, "cpu")}
    full = times(half, {**devices, "GPU0": replace(gpu, link_bytes_per_s=1e15)}, 0)
    slow = times(half, devices, 0)
    assert full is not None and slow is not None and slow.prefill_s > full.prefill_s  # type: ignore[operator]
    assert predict(half, {**devices, "GPU0": replace(gpu, link_bytes_per_s=None)}, 0).pp_per_s is None


def test_a_quantized_cache_runs_prefills_attention_on_decodes_path_on_a_cpu(tmp_path: Path) -> None:
    """llama.cpp's CPU flash attention tiles a prompt's queries only for f16 K and V: with q8_0 the prompt runs
    decode's per-query loop, so decode's measured attention ratio prices it."""
    from launcher.speed import Calibration

    cpu = {name: DeviceSpeed(30e9, 200e9, "cpu") for name in ("CPU", "GPU0")}
    quantized = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)], kv="q8_0").chosen
    plain = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)], kv="f16").chosen
    assert quantized is not None and plain is not None
    q_parts, f_parts = times(quantized, cpu, 1024), times(plain, cpu, 1024)
    assert q_parts is not None and q_parts.prefill_attention_as_decode
    assert f_parts is not None and not f_parts.prefill_attention_as_decode
    factors = Calibration(1.0, 1, 1.0, attention_factor=0.25, prefill_attention_factor=2.0)
    assert predict(quantized, cpu, 1024, calibration=factors).pp_per_s == pytest.approx(
        1 / (q_parts.prefill_s + q_parts.prefill_attention_s / 0.25)
    )  # type: ignore[operator]
    assert predict(plain, cpu, 1024, calibration=factors).pp_per_s == pytest.approx(
        1 / (f_parts.prefill_s + f_parts.prefill_attention_s / 2.0)
    )  # type: ignore[operator]
    gpu = {"GPU0": DeviceSpeed(1008e9, 330e12, "cuda"), "CPU": DeviceSpeed(30e9, 200e9, "cpu")}
    on_gpu = times(quantized, gpu, 1024)  # a GPU's flash attention is a matmul: no part of its own
    assert on_gpu is not None and on_gpu.prefill_attention_s == 0 and not on_gpu.prefill_attention_as_decode


def test_the_run_line_sets_each_measurement_beside_the_prediction_for_it() -> None:
    from launcher.cli.run import _speed_line

    short = {"measured_tg_per_s": 110.9, "predicted_tg_per_s": 177.6, "predicted_pp_per_s": 451.6,
             "measured_pp_per_s": None, "finding": None}  # fmt: skip
    assert _speed_line(short) == ("speed: decode 110.9 measured, 177.6 predicted tokens/s; prefill 451.6 predicted "
                                  "(--warmup full measures it)")  # fmt: skip
    full = {**short, "measured_pp_per_s": 119.6, "predicted_pp_per_s_fill": 315.4, "measured_tg_per_s_at_fill": 45.8,
            "predicted_tg_per_s_at_fill": 76.6, "finding": "slow: decode"}  # fmt: skip
    assert _speed_line(full, 1982) == (
        "speed: decode 110.9 measured, 177.6 predicted tokens/s; after the 1,982-token fill: decode 45.8 measured, "
        "76.6 predicted; the fill's prefill 119.6 measured, 315.4 predicted — slow: decode"
    )


def test_the_run_line_shows_the_plans_calibrated_prediction_with_the_models_own_beside_it() -> None:
    """A plan calibrated by this machine's earlier runs predicted the calibrated figure: the line says that one."""
    from launcher.cli.run import _speed_line

    speed = {"measured_tg_per_s": 110.9, "predicted_tg_per_s": 177.6, "calibrated_tg_per_s": 112.0,
             "predicted_pp_per_s": 451.6, "calibrated_pp_per_s": 380.2, "measured_pp_per_s": None}  # fmt: skip
    assert _speed_line(speed) == ("speed: decode 110.9 measured, 112.0 predicted (177.6 uncalibrated) tokens/s; "
                                  "prefill 380.2 predicted (--warmup full measures it)")  # fmt: skip
    full = {**speed, "measured_pp_per_s": 119.6, "predicted_pp_per_s_fill": 315.4, "calibrated_pp_per_s_fill": 125.0,
            "measured_tg_per_s_at_fill": 45.8, "predicted_tg_per_s_at_fill": 76.6}  # fmt: skip
    assert _speed_line(full, 1982) == (
        "speed: decode 110.9 measured, 112.0 predicted (177.6 uncalibrated) tokens/s; after the 1,982-token fill: "
        "decode 45.8 measured, 76.6 predicted; the fill's prefill 119.6 measured, 125.0 predicted (315.4 uncalibrated)"
    )
