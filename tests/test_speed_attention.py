"""A CPU's attention priced at the host's own flash-attention rate: llama.cpp's CPU kernel (GGML_OP_FLASH_ATTN_EXT)
timed through llama-cpp-python's ggml libraries, once per machine, and used layer by layer by the prediction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as QT
from test_backend_ollama import CTX, GiB, make_test_plan, tiny_candidate

from launcher.hardware import describe_machine
from launcher.measure.attention import AttentionShape, measure_rates, rate_key
from launcher.plan import Option, Policy, budgets_for, make_plan
from launcher.speed import (
    DeviceSpeed,
    _attention_layers,
    _attention_wanted,
    attention_measured,
    fitted,
    host_attention,
    llama_threads,
    machine_speeds,
    times,
)

SHAPE = AttentionShape(4, 2, 64, 64)


def cpu_plan_option(tmp_path: Path, kv: str = "q8_0", flash_attn: str | None = None) -> Option:
    candidate = tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)
    budgets = budgets_for(describe_machine(vram=[]).devices, ram_available_bytes=8 * GiB, reserve_bytes=GiB)
    plan = make_plan("tiny", [candidate], budgets, Policy(n_ctx=CTX, type_k=kv, type_v=kv, flash_attn=flash_attn))
    assert plan.chosen is not None
    return plan.chosen


def test_the_host_times_llama_cpps_own_flash_attention_kernel() -> None:
    big = AttentionShape(128, 8, 128, 128)  # a 405B model's heads: timed on fewer ops and positions, not for long
    wanted = [(kind, t, t, shape) for shape in (SHAPE, big) for t in ("q8_0", "f16") for kind in ("decode", "prefill")]
    bad = [("decode", "q3_k", "q3_k", SHAPE), ("decode", "q8_0", "q8_0", AttentionShape(0, 1, 64, 64)),
           ("sideways", "f16", "f16", SHAPE)]  # fmt: skip
    rates = measure_rates([*wanted, *bad], threads=llama_threads())
    assert set(rates) == {rate_key(*w) for w in wanted}  # the bad ones are left out, not guessed
    # FLOPs per second a CPU reaches on attention: above a megaflop, below a petaflop
    assert all(1e6 < rate < 1e15 for rate in rates.values()), rates
    assert measure_rates(wanted, threads=1, timeout_s=0.001) == {}  # too slow: unknown, and the plan goes on
    # a header's shape whose one graph would hold gigabytes is refused before anything is allocated, and the
    # request's other jobs are still timed
    huge = AttentionShape(1024, 1024, 1024, 1024)
    assert huge.valid()
    rates = measure_rates([("decode", "f32", "f32", huge), ("decode", "q8_0", "q8_0", SHAPE)], threads=1)
    assert set(rates) == {rate_key("decode", "q8_0", "q8_0", SHAPE)}


def test_each_cpu_layers_attention_is_priced_at_the_measured_rate(tmp_path: Path) -> None:
    option = cpu_plan_option(tmp_path)
    shape = _attention_layers(option, 1)[0][1]
    decode_rate, prefill_rate = 2e9, 5e9
    rates = {rate_key("decode", "q8_0", "q8_0", shape): decode_rate,
             rate_key("prefill", "q8_0", "q8_0", shape): prefill_rate}  # fmt: skip
    measured = {"CPU": DeviceSpeed(30e9, 200e9, "cpu", attention_rates=rates)}
    parts = times(option, measured, 1000, 512)
    assert parts is not None
    decode_flops = sum(flops for _, _, flops in _attention_layers(option, 1000))
    prompt_flops = sum(flops for _, _, flops in _attention_layers(option, 1000 + 256))
    assert parts.decode_attention_s == pytest.approx(decode_flops / decode_rate)
    assert parts.prefill_attention_s == pytest.approx(prompt_flops / prefill_rate)
    # without a rate for the layer's shape and types: the fitted figure, as before
    fitted_parts = times(option, {"CPU": DeviceSpeed(30e9, 200e9, "cpu")}, 1000, 512)
    eff = fitted("cpu").attention_eff
    assert eff is not None and fitted_parts is not None
    assert fitted_parts.decode_attention_s == pytest.approx(decode_flops / (eff * 200e9))
    # a rate is flash attention's: without flash attention it prices nothing
    plain = cpu_plan_option(tmp_path, kv="f16", flash_attn="off")
    off = times(plain, measured, 1000, 512)
    assert off is not None and off.decode_attention_s == pytest.approx(decode_flops / (eff * 200e9))


def test_only_what_the_options_attend_with_on_the_cpu_is_measured(tmp_path: Path) -> None:
    on_cpu = cpu_plan_option(tmp_path)
    on_gpu = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)]).chosen
    assert on_gpu is not None
    assert _attention_wanted([on_gpu]) == []  # every layer on the GPU: its flash attention is the GPU's
    shape = AttentionShape(4, 2, 64, 64)
    assert _attention_wanted([on_cpu, on_cpu]) == [
        ("decode", "q8_0", "q8_0", shape),
        ("prefill", "q8_0", "q8_0", shape),
    ]
    assert _attention_wanted([cpu_plan_option(tmp_path, kv="f16", flash_attn="off")]) == []
    # a prediction is this host's where every such layer has its rate, decode and prefill
    rates = {rate_key(kind, "q8_0", "q8_0", shape): 1e10 for kind in ("decode", "prefill")}
    assert attention_measured(on_cpu, {"CPU": DeviceSpeed(30e9, 200e9, "cpu", attention_rates=rates)})
    decode_only = {k: v for k, v in rates.items() if k.startswith("decode")}
    assert not attention_measured(on_cpu, {"CPU": DeviceSpeed(30e9, 200e9, "cpu", attention_rates=decode_only)})
    assert not attention_measured(on_gpu, {"CPU": DeviceSpeed(30e9, 200e9, "cpu", attention_rates=rates)})
    # a described machine's host is not this one: nothing of this host's is measured for it
    described = describe_machine(vram=[]).model_copy(update={"host_bandwidth_bytes_per_s": 30e9, "host_flops": 200e9})
    assert machine_speeds(described, [on_cpu])["CPU"].attention_rates is None


def test_the_hosts_rates_are_measured_once_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    wanted = [("decode", "f16", "f16", SHAPE)]
    first = host_attention(wanted)
    key = rate_key(*wanted[0])
    assert set(first) == {key} and first[key] > 0
    path = tmp_path / "cache" / "fitquant" / "host-attention.json"
    kept = json.loads(path.read_text())
    assert kept["rates"] == first and "threads" in kept["host"]
    kept["rates"][key] = 1234.0  # what the next plan reads, not measures again
    path.write_text(json.dumps(kept))
    assert host_attention(wanted) == {key: 1234.0}
    assert host_attention(wanted, refresh=True)[key] != 1234.0
    path.write_text("{not json")  # a damaged file is measured again, not a failure
    assert host_attention(wanted)[key] > 0


def test_a_cpu_plan_with_a_quantized_cache_says_what_an_f16_cache_would_change() -> None:
    """On a CPU, llama.cpp tiles a prompt's flash attention only for f16 K and V: with this host's measured rates the
    plan says how much faster an f16 cache would prefill and decode at the target depth, and what it costs."""
    import re

    from launcher.embedded import embedded_model_path
    from launcher.fit import KV_SPEEDUP_NOTE, fit
    from launcher.hardware import detect_hardware

    model = str(embedded_model_path())
    machine = detect_hardware().model_copy(update={"devices": ()})  # this host, as if it had no GPU

    def kv_notes(plan_notes: list[str]) -> list[str]:
        return [n for n in plan_notes if n.startswith("K/V ")]

    plan = fit(model, Policy(n_ctx=8192), machine=machine, confirm=False)
    [note] = kv_notes(plan.notes)
    found = re.search(r"^K/V q8_0/q8_0 on this CPU: an f16 cache would prefill ([0-9.]+)x and decode ([0-9.]+)x as fast "
                      r"at 8192 tokens .* for ([0-9.]+ MiB) more memory; it fits: --kv f16$", note)  # fmt: skip
    assert found, note
    assert float(found.group(1)) >= KV_SPEEDUP_NOTE
    # an f16 cache already, or a described machine (nothing of this host's measured): nothing to say
    assert (
        kv_notes(fit(model, Policy(n_ctx=8192, type_k="f16", type_v="f16"), machine=machine, confirm=False).notes) == []
    )
    described = describe_machine(vram=[], ram=16 * GiB)
    assert kv_notes(fit(model, Policy(n_ctx=8192), machine=described, confirm=False).notes) == []
    # RAM that holds the q8_0 cache and not the f16 one: said, without the flag
    assert plan.chosen is not None
    [budget] = plan.budgets
    extra = fit(model, Policy(n_ctx=8192, type_k="f16", type_v="f16"), machine=machine, confirm=False).chosen
    assert extra is not None
    between = budget.reserve_bytes + (plan.chosen.total_bytes + extra.total_bytes) // 2
    tight = machine.model_copy(update={"ram_available_bytes": between})
    [short] = kv_notes(fit(model, Policy(n_ctx=8192), machine=tight, confirm=False).notes)
    assert "it does not fit here (needs" in short and not short.endswith("--kv f16")
