"""A CPU's speed priced at the host's own kernels: llama.cpp's flash attention (GGML_OP_FLASH_ATTN_EXT) and matrix
products (GGML_OP_MUL_MAT) timed through llama-cpp-python's ggml libraries, once per machine, and used by the
prediction layer by layer and weight by weight."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as QT
from test_backend_ollama import CTX, GiB, make_test_plan, tiny_candidate

from launcher.hardware import describe_machine
from launcher.measure.kernels import AttentionShape, WeightSet, measure_rates, rate_key, weight_key
from launcher.plan import Option, Policy, budgets_for, make_plan
from launcher.speed import (
    DeviceSpeed,
    _attention_layers,
    _attention_wanted,
    _kv_bytes_per_token,
    _matrices,
    _weight_sets,
    _weights_wanted,
    active_params,
    attention_measured,
    bytes_per_token,
    fitted,
    host_kernels,
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


def test_the_host_times_llama_cpps_own_matrix_products_by_weight_set() -> None:
    sets = [
        ("decode", WeightSet("q8_0", ((256, 256, 2), (256, 512, 2), (512, 256, 1)))),
        ("prefill", WeightSet("q4_k", ((256, 256, 2), (512, 256, 1)))),
        ("decode", WeightSet("f16", ((8192, 28672, 1),))),  # a 70B model's 448 MiB matrix: rows cut to fit a graph
        ("prefill", WeightSet("iq4_xs", ((14336, 4096, 1), (4096, 4096, 2)))),  # 60 GFLOPs a token: cut too
    ]
    bad = [
        ("decode", WeightSet("q4_k", ((576, 576, 1),))),  # 576 weights are no whole number of Q4_K's 256-blocks
        ("decode", WeightSet("q9_9", ((256, 256, 1),))),
        ("sideways", WeightSet("q8_0", ((256, 256, 1),))),
        ("decode", WeightSet("q8_0", ((256, 256, 0),))),
        ("prefill", WeightSet("f32", tuple((256 * i, 256, 1) for i in range(1, 40)))),  # more shapes than a set holds
        # a hostile header's largest shape, 64 of it: a graph of gigabytes even with its rows cut, refused before
        # anything is allocated
        ("decode", WeightSet("f32", ((2**17, 2**24, 64),))),
        ("prefill", WeightSet("f32", ((2**17, 2**24, 64),))),
    ]
    rates = measure_rates([], weights=[*sets, *bad], threads=llama_threads())
    assert set(rates) == {weight_key(*w) for w in sets}  # the bad ones are left out, not guessed
    assert all(1e6 < rate < 1e15 for rate in rates.values()), rates
    # attention and weights in one request, each by its own key
    both = measure_rates([("decode", "q8_0", "q8_0", SHAPE)], weights=sets[:1], threads=1)
    assert set(both) == {rate_key("decode", "q8_0", "q8_0", SHAPE), weight_key(*sets[0])}


def test_a_weight_is_timed_in_the_buffer_llama_cpp_would_load_it_into() -> None:
    """llama.cpp's loader puts a weight in the CPU backend's repacking buffer where the device says it runs the
    weight's product from there (ggml_backend_dev_supports_op); the timing asks the same question."""
    import platform

    from launcher.measure.kernels import _libraries, _Repack

    base, cpu = _libraries()
    repack = _Repack(base, cpu)
    names = {base.ggml_backend_buft_name(b).decode() for b in repack.bufts}
    for type_name in ("Q4_0", "Q4_K", "Q6_K", "Q8_0", "F16"):
        for n in (1, 512):
            chosen = repack.buffer_type(int(QT[type_name]), 1536, 576, n)
            assert chosen is None or base.ggml_backend_buft_name(chosen).decode() in names
    if platform.machine() in ("x86_64", "AMD64") and cpu.ggml_cpu_has_avx2():
        # ggml-cpu's repack.cpp on AVX2: Q4_0 and Q4_K in 8x8 interleaved blocks; F16 never
        assert "CPU_REPACK" in names
        for type_name in ("Q4_0", "Q4_K"):
            chosen = repack.buffer_type(int(QT[type_name]), 1536, 576, 1)
            assert chosen is not None and base.ggml_backend_buft_name(chosen) == b"CPU_REPACK"
        assert repack.buffer_type(int(QT.F16), 1536, 576, 1) is None
        assert repack.buffer_type(int(QT.Q4_0), 1536, 575, 1) is None  # rows not in whole groups of 8: plain


def test_a_models_weights_are_timed_as_one_set_per_type_in_proportion(tmp_path: Path) -> None:
    option = cpu_plan_option(tmp_path)  # 4 layers of Q8_0 (n_embd 256, n_ff 512, K/V 128 wide), output Q8_0
    matrices = _matrices(option)
    assert {m.device for m in matrices} == {"CPU"} and sum(m.output for m in matrices) == 1
    sets = _weight_sets(matrices)
    blocks = WeightSet("q8_0", ((256, 128, 2), (256, 256, 2), (256, 512, 2), (512, 256, 1)))  # k v, q o, gate up, down
    output = WeightSet("q8_0", ((256, 2048, 1),))
    assert set(sets) == {blocks, output}
    # each set stands for the FLOPs a token multiplies by: 2 x every weight it uses
    per_layer = 2 * 256 * 256 + 2 * 256 * 128 + 2 * 256 * 512 + 512 * 256
    assert sets[blocks] == 2 * 4 * per_layer
    assert sets[blocks] == pytest.approx(2 * active_params(option), rel=1e-3)  # the blocks' weights less the norms
    assert sets[output] == 2 * 256 * 2048
    # on the CPU alone the host computes the prompt too (no output layer: logits for the last token only)
    assert _weights_wanted([option, option]) == [("decode", blocks), ("decode", output), ("prefill", blocks)]
    on_gpu = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)]).chosen
    assert on_gpu is not None and _weights_wanted([on_gpu]) == []  # the GPU's weights are the GPU's


def test_each_cpu_weight_is_priced_at_its_sets_measured_rate(tmp_path: Path) -> None:
    option = cpu_plan_option(tmp_path)
    decode_sets = _weight_sets(_matrices(option))
    prefill_sets = _weight_sets([m for m in _matrices(option) if not m.output])
    rates = {weight_key("decode", w): 1e10 for w in decode_sets} | {
        weight_key("prefill", w): 5e10 for w in prefill_sets
    }
    cpu = DeviceSpeed(30e9, 200e9, "cpu", kernel_rates=rates)
    fit = fitted("cpu")
    parts = times(option, {"CPU": cpu}, 0, 512)
    assert parts is not None
    assert parts.decode_s == pytest.approx(sum(decode_sets.values()) / 1e10 + fit.t0_s)  # no cache read at depth 0
    assert parts.prefill_s == pytest.approx(sum(prefill_sets.values()) / 5e10 + fit.pp_t0_s)
    # at depth the cache is read at memory speed beside the timed weights
    deep = times(option, {"CPU": cpu}, 1000, 512)
    kv = _kv_bytes_per_token(option, 1000)["CPU"]
    assert deep is not None and kv > 0
    assert deep.decode_s == pytest.approx(sum(decode_sets.values()) / 1e10 + kv / (fit.eta * 30e9) + fit.t0_s)
    # a set without its rate: the fitted figures price that device's reads, as without any
    partial = {k: v for k, v in rates.items() if not k.startswith("decode q8_0 256x2048")}
    fallback = times(option, {"CPU": DeviceSpeed(30e9, 200e9, "cpu", kernel_rates=partial)}, 1000, 512)
    assert fallback is not None
    assert fallback.decode_s == pytest.approx(bytes_per_token(option, 1000)["CPU"] / (fit.eta * 30e9) + fit.t0_s)
    assert fallback.prefill_s == parts.prefill_s  # the prompt's sets all have theirs


def test_llama_cpps_fixed_cost_per_block_tensor_is_measured_on_the_embedded_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small model's decode is set as much by llama.cpp's fixed cost per op as by its weights: measured once per
    host by decoding the embedded model with llama.cpp itself, less its products, per block tensor."""
    from launcher.embedded import embedded_model_path
    from launcher.measure.kernels import measure_tensor_overhead
    from launcher.speed import OVERHEAD_KEY, host_tensor_overhead

    per_tensor = measure_tensor_overhead(embedded_model_path(), threads=llama_threads())
    assert per_tensor is not None and 0 <= per_tensor < 1e-3  # microseconds, not milliseconds
    assert measure_tensor_overhead(tmp_path / "missing.gguf", threads=1) is None
    assert measure_tensor_overhead(embedded_model_path(), threads=1, timeout_s=0.001) is None
    # kept beside the kernels' rates, and read from there by the next plan
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = host_tensor_overhead()
    assert first is not None
    path = tmp_path / "cache" / "fitquant" / "host-kernels.json"
    kept = json.loads(path.read_text())
    kept["rates"][OVERHEAD_KEY] = 4e-6
    path.write_text(json.dumps(kept))
    assert host_tensor_overhead() == 4e-6
    # priced per block tensor on the CPU: 4 layers of 9 tensors (2 norms, 7 matrices)
    option = cpu_plan_option(tmp_path)
    cpu = DeviceSpeed(30e9, 200e9, "cpu")
    plain, with_cost = times(option, {"CPU": cpu}, 0), times(option, {"CPU": replace(cpu, tensor_overhead_s=4e-6)}, 0)
    assert plain is not None and with_cost is not None
    assert with_cost.decode_s - plain.decode_s == pytest.approx(4 * 9 * 4e-6)
    assert with_cost.prefill_s == plain.prefill_s  # a prompt's batch spreads it over its tokens


def test_each_cpu_layers_attention_is_priced_at_the_measured_rate(tmp_path: Path) -> None:
    option = cpu_plan_option(tmp_path)
    shape = _attention_layers(option, 1)[0][1]
    decode_rate, prefill_rate = 2e9, 5e9
    rates = {rate_key("decode", "q8_0", "q8_0", shape): decode_rate,
             rate_key("prefill", "q8_0", "q8_0", shape): prefill_rate}  # fmt: skip
    measured = {"CPU": DeviceSpeed(30e9, 200e9, "cpu", kernel_rates=rates)}
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
    assert attention_measured(on_cpu, {"CPU": DeviceSpeed(30e9, 200e9, "cpu", kernel_rates=rates)})
    decode_only = {k: v for k, v in rates.items() if k.startswith("decode")}
    assert not attention_measured(on_cpu, {"CPU": DeviceSpeed(30e9, 200e9, "cpu", kernel_rates=decode_only)})
    assert not attention_measured(on_gpu, {"CPU": DeviceSpeed(30e9, 200e9, "cpu", kernel_rates=rates)})
    # a described machine's host is not this one: nothing of this host's is measured for it
    described = describe_machine(vram=[]).model_copy(update={"host_bandwidth_bytes_per_s": 30e9, "host_flops": 200e9})
    assert machine_speeds(described, [on_cpu])["CPU"].kernel_rates is None


def test_the_hosts_rates_are_measured_once_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    wanted = [("decode", "f16", "f16", SHAPE)]
    first = host_kernels(wanted)
    key = rate_key(*wanted[0])
    assert set(first) == {key} and first[key] > 0
    path = tmp_path / "cache" / "fitquant" / "host-kernels.json"
    kept = json.loads(path.read_text())
    assert kept["rates"] == first and "threads" in kept["host"]
    kept["rates"][key] = 1234.0  # what the next plan reads, not measures again
    path.write_text(json.dumps(kept))
    assert host_kernels(wanted) == {key: 1234.0}
    assert host_kernels(wanted, refresh=True)[key] != 1234.0
    path.write_text("{not json")  # a damaged file is measured again, not a failure
    assert host_kernels(wanted)[key] > 0


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
