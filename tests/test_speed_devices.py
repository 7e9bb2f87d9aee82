"""Device speed figures (issue 21): NVIDIA's own from NVML (memory clock x bus width, SMs x boost clock x the
architecture's FP16 tensor rate), a profile's `bandwidth` / `flops`, the order launcher.speed.machine_speeds takes
them in, and the calibration from this machine's record of verified runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes_hardware import RTX_3090, FakeGpu, FakeNvml
from gguf import GGMLQuantizationType as QT
from test_backend_ollama import make_test_plan, tiny_candidate

from launcher import record
from launcher.errors import ProfileError
from launcher.hardware import describe_machine
from launcher.hardware.nvml import (
    NvmlGpuReading,
    nvidia_devices,
    nvml_bandwidth_bytes_per_s,
    nvml_fp16_flops,
    pcie_bytes_per_s,
    read_nvml,
)
from launcher.hardware.types import HardwareSnapshot
from launcher.profiles import parse_profile, profile_hardware
from launcher.speed import (
    MODEL_VERSION,
    Calibration,
    calibration,
    device_table,
    machine_speeds,
    parse_bandwidth,
    parse_flops,
)

GiB = 1024**3
GB = 1e9
TFLOPS = 1e12

# What NVML reports for these cards (nvidia-smi -q: "Max Clocks" Memory, "Memory Bus Width"; the boost clock and
# SM count of the architecture whitepapers).
RTX_4090 = dict(name="NVIDIA GeForce RTX 4090", uuid="GPU-00000000-0000-4000-8000-000000004090",
                pci_bus_id="00000000:01:00.0", total_bytes=24 * GiB, used_bytes=512 * 2**20, compute_capability=(8, 9),
                max_memory_clock_mhz=10501, memory_bus_width_bits=384, boost_sm_clock_mhz=2520, max_sm_clock_mhz=3120,
                gpu_cores=16384, pcie_generation=4, pcie_width=16)  # fmt: skip
H100_SXM = dict(name="NVIDIA H100 80GB HBM3", uuid="GPU-00000000-0000-4000-8000-000000000100",
                pci_bus_id="00000000:02:00.0", total_bytes=80 * GiB, used_bytes=512 * 2**20, compute_capability=(9, 0),
                max_memory_clock_mhz=2619, memory_bus_width_bits=5120, max_sm_clock_mhz=1830,
                multiprocessor_count=132)  # fmt: skip


def nvml_devices(*gpus: FakeGpu, ram: int | None = None):
    devices, _notes = nvidia_devices(read_nvml(FakeNvml(gpus)), env={}, ram_total_bytes=ram, ram_available_bytes=ram)
    return devices


# --- NVIDIA from NVML ---------------------------------------------------------------------------------------------


def test_nvml_bandwidth_is_the_memory_clock_times_the_bus_width() -> None:
    assert nvml_bandwidth_bytes_per_s(10501, 384) == pytest.approx(1008.1 * GB, rel=1e-4)  # RTX 4090
    assert nvml_bandwidth_bytes_per_s(2619, 5120) == pytest.approx(3352.3 * GB, rel=1e-4)  # H100 SXM
    assert nvml_bandwidth_bytes_per_s(None, 384) is None and nvml_bandwidth_bytes_per_s(10501, None) is None


def test_nvml_flops_are_sms_times_boost_clock_times_the_architectures_rate() -> None:
    ada = NvmlGpuReading(0, compute_capability="8.9", boost_sm_clock_mhz=2520, gpu_cores=16384)
    assert nvml_fp16_flops(ada) == pytest.approx(128 * 2520e6 * 1024)  # 128 SMs from 16384 cores / 128 per SM
    hopper = NvmlGpuReading(0, compute_capability="9.0", boost_sm_clock_mhz=1830, multiprocessor_count=132)
    assert nvml_fp16_flops(hopper) == pytest.approx(989.4 * TFLOPS, rel=1e-3)  # the H100 whitepaper's figure
    unknown_arch = NvmlGpuReading(0, compute_capability="10.3", boost_sm_clock_mhz=1900, multiprocessor_count=160)
    assert nvml_fp16_flops(unknown_arch) is None  # not in the table: unknown, never guessed
    assert nvml_fp16_flops(NvmlGpuReading(0, compute_capability="8.9", boost_sm_clock_mhz=2520)) is None  # no SMs


def test_nvml_gives_each_gpu_its_own_figures_matching_the_published_ones() -> None:
    ada, hopper = nvml_devices(FakeGpu(**RTX_4090), FakeGpu(**H100_SXM))
    table = device_table()
    for device in (ada, hopper):
        published = table[device.name]
        assert device.memory_bandwidth_bytes_per_s == pytest.approx(published.bandwidth_bytes_per_s, rel=0.01)
        assert device.fp16_flops == pytest.approx(published.flops, rel=0.01)
    # the boost clock, not the top of the V/F curve (3120 MHz would overstate the 4090 by a quarter)
    assert ada.fp16_flops == pytest.approx(128 * 2520e6 * 1024)


def test_nvml_host_link_is_the_pcie_generation_times_its_lanes() -> None:
    (ada,) = nvml_devices(FakeGpu(**RTX_4090))
    assert ada.host_link_bytes_per_s == pytest.approx(31.5 * GB, rel=1e-3)  # PCIe 4.0 x16, one direction
    assert device_table()["NVIDIA GeForce RTX 4090"].link_bytes_per_s == ada.host_link_bytes_per_s  # its spec sheet
    assert pcie_bytes_per_s(5, 16) == pytest.approx(63.0 * GB, rel=1e-3) and pcie_bytes_per_s(4, 8) == 15.752e9
    assert pcie_bytes_per_s(9, 16) is None and pcie_bytes_per_s(4, None) is None  # unpublished, unknown


def test_nvml_figures_a_driver_declines_stay_unknown() -> None:
    (plain,) = nvml_devices(FakeGpu(**RTX_3090, used_bytes=GiB))  # every speed call answers NotSupported
    assert plain.memory_bandwidth_bytes_per_s is None and plain.fp16_flops is None
    assert plain.host_link_bytes_per_s is None
    no_boost = {**RTX_4090, "boost_sm_clock_mhz": None}
    (fallback,) = nvml_devices(FakeGpu(**no_boost))  # the maximum SM clock only where no boost clock is given
    assert fallback.fp16_flops == pytest.approx(128 * 3120e6 * 1024)
    import pynvml

    unified = {**RTX_4090, "name": "NVIDIA GB10", "memory_error": pynvml.NVMLError_NotSupported}
    (spark,) = nvml_devices(FakeGpu(**unified), ram=128 * GiB)
    assert spark.unified and spark.memory_bandwidth_bytes_per_s is None  # reads host RAM: NVML's bus says nothing


def test_a_dgx_sparks_gb10_reads_host_memory_at_the_tables_bandwidth_and_computes_at_its_own_rate() -> None:
    """GB10 (compute capability 12.1, 48 SMs at 2418 MHz) has no memory of its own: NVML declines to size it, so its
    budget is the host's RAM and its bandwidth the table's 273 GB/s of LPDDR5X (no PCIe link: nothing crosses one);
    its FP16 rate is NVML's SMs x clock x Blackwell RTX's 1024, the table's 118.8 TFLOPS."""
    import pynvml

    gb10 = {**RTX_4090, "name": "NVIDIA GB10", "memory_error": pynvml.NVMLError_NotSupported, "compute_capability": (12, 1),
            "gpu_cores": None, "multiprocessor_count": 48, "boost_sm_clock_mhz": 2418, "max_memory_clock_mhz": 8533,
            "memory_bus_width_bits": 256}  # fmt: skip
    (spark,) = nvml_devices(FakeGpu(**gb10), ram=128 * GiB)
    assert spark.unified and spark.total_bytes == 128 * GiB and spark.memory_bandwidth_bytes_per_s is None
    table = device_table()["NVIDIA GB10"]
    assert spark.fp16_flops == pytest.approx(table.flops, rel=1e-3) and table.flops == 118.8 * TFLOPS
    described = describe_machine(vram=[24 * GiB])
    speeds = machine_speeds(described.model_copy(update={"devices": (spark.model_copy(update={"index": 0}),)}))
    assert speeds["GPU0"] == type(table)(273 * GB, spark.fp16_flops, "cuda", None)
    assert not table.hbm and table.link_bytes_per_s is None


def test_rdna4_and_the_smaller_rtx_50_cards_are_in_the_table_by_their_drivers_names() -> None:
    """libdrm's amdgpu.ids names RDNA4 "AMD Radeon RX 9070 XT" (7550 C0), "... RX 9070" (7550 C3), "... RX 9060 XT"
    (7590 C0); NVIDIA's driver the GeForce RTX 5060 and 5050. RDNA4's matrix rate is twice RDNA3's per CU and clock
    (1024 FP16 FLOPs), its bandwidth 20 Gbps GDDR6 x its bus; a name that another card's starts with is that card."""
    from launcher.speed import table_gpu

    table = device_table()
    for name, cus, mhz, bus in (
        ("RX 9070 XT", 64, 2970, 256),
        ("RX 9070", 56, 2520, 256),
        ("RX 9060 XT", 32, 3130, 128),
    ):
        speed = table[table_gpu(name)]
        assert table_gpu(name) == f"AMD Radeon {name}" and speed.backend == "rocm"
        assert speed.flops == pytest.approx(cus * mhz * 1e6 * 1024, rel=1e-3)
        assert speed.bandwidth_bytes_per_s == 20e9 * bus / 8
    assert table["AMD Radeon RX 9070 XT"].flops == pytest.approx(2 * 64 / 96 * 2970 / 2500 * 122.88e12, rel=1e-2)
    for name, sms, mhz, gbps in (("RTX 5060", 30, 2497, 28), ("RTX 5050", 20, 2572, 20)):
        speed = table[f"NVIDIA GeForce {name}"]
        assert table_gpu(name) == f"NVIDIA GeForce {name}"
        assert speed.flops == pytest.approx(sms * mhz * 1e6 * 1024, rel=1e-3)
        assert speed.bandwidth_bytes_per_s == gbps * 1e9 * 128 / 8


# --- machine_speeds: a device's own figures, then the table ------------------------------------------------------


def one_gpu(name: str, **figures: float) -> HardwareSnapshot:
    described = describe_machine(vram=[24 * GiB])
    device = described.devices[0].model_copy(update={"name": name, **figures})
    return described.model_copy(update={"devices": (device,)})


def test_machine_speeds_prefers_a_devices_own_figures_then_the_table() -> None:
    table = device_table()["NVIDIA GeForce RTX 4090"]
    by_name = machine_speeds(one_gpu("NVIDIA GeForce RTX 4090"))["GPU0"]
    assert (by_name.bandwidth_bytes_per_s, by_name.flops) == (table.bandwidth_bytes_per_s, table.flops)
    own = machine_speeds(one_gpu("NVIDIA GeForce RTX 4090", memory_bandwidth_bytes_per_s=900 * GB))["GPU0"]
    assert (own.bandwidth_bytes_per_s, own.flops, own.backend) == (900 * GB, table.flops, "cuda")  # each on its own
    unnamed = machine_speeds(one_gpu("NVIDIA RTX Foo", memory_bandwidth_bytes_per_s=700 * GB, fp16_flops=90 * TFLOPS))
    assert unnamed["GPU0"] == type(table)(700 * GB, 90 * TFLOPS, "cuda")  # a name the table lacks, known from NVML
    assert "GPU0" not in machine_speeds(one_gpu("NVIDIA RTX Foo", fp16_flops=90 * TFLOPS))  # no bandwidth: unknown
    assert "CPU" not in machine_speeds(one_gpu("NVIDIA RTX Foo"))  # a described host is not this one


def test_an_hbm_card_is_known_by_its_bus_width_from_nvml_else_by_its_name() -> None:
    """HBM decodes at its own efficiency (launcher.speed.Fit.eta_hbm): NVML's bus width says which memory a card has
    (an H100's 5120 bits, a 4090's 384), a card NVML gives no width for is known by the table's `memory`."""
    ada, hopper = nvml_devices(FakeGpu(**RTX_4090), FakeGpu(**H100_SXM))
    assert (ada.memory_bus_width_bits, hopper.memory_bus_width_bits) == (384, 5120)
    machine = describe_machine(vram=[24 * GiB, 80 * GiB]).model_copy(update={"devices": (ada, hopper)})
    speeds = machine_speeds(machine)
    assert not speeds["GPU0"].hbm and speeds["GPU1"].hbm
    # a card the table lacks (a newer data-centre part): NVML's width alone
    newer = machine_speeds(one_gpu("NVIDIA B300", memory_bandwidth_bytes_per_s=8000 * GB, memory_bus_width_bits=8192))
    assert newer["GPU0"].hbm
    assert machine_speeds(one_gpu("NVIDIA A100-SXM4-80GB"))["GPU0"].hbm  # a profile's card: the table's memory
    assert not machine_speeds(one_gpu("NVIDIA RTX Foo", memory_bandwidth_bytes_per_s=700 * GB))["GPU0"].hbm


def test_a_persons_short_gpu_name_finds_its_one_chip_in_the_table() -> None:
    """A profile's `name: RTX 3060` (or --gpu-name's text) is the chip whose table name holds it, when only one does."""
    table = device_table()["NVIDIA GeForce RTX 3060"]
    short = machine_speeds(one_gpu("RTX 3060"))["GPU0"]
    assert (short.bandwidth_bytes_per_s, short.flops) == (table.bandwidth_bytes_per_s, table.flops)
    assert "GPU0" not in machine_speeds(one_gpu("RTX"))  # several chips hold it: unknown, not a guess among them
    # a laptop's chip of the same number is not the card: its bus and clocks are narrower (the 4090's: 576 GB/s)
    for laptop in ("NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA GeForce RTX 3080 Ti Laptop GPU", "RTX 4070 Mobile"):
        assert "GPU0" not in machine_speeds(one_gpu(laptop)), laptop
    assert machine_speeds(one_gpu("NVIDIA GeForce RTX 4090 D"))["GPU0"].flops == 294.2 * TFLOPS  # its own entry


# --- a profile's overrides -----------------------------------------------------------------------------------------


def test_a_profiles_device_sets_its_bandwidth_and_flops() -> None:
    profile = parse_profile(
        "machine: box\ndevices:\n"
        "  - {name: NVIDIA GeForce RTX 4090, kind: cuda, memory: 24GiB, bandwidth: 936GB/s, flops: 142TFLOPS}\n"
        "  - {name: Mystery GPU, kind: cuda, memory: 12GiB, bandwidth: 1.5 TB/s}\n"
        "  - {name: host, kind: cpu, memory: 64GiB, bandwidth: 80GiB/s}\n"
    )
    speeds = machine_speeds(profile_hardware(profile))  # type: ignore[arg-type]
    assert (speeds["GPU0"].bandwidth_bytes_per_s, speeds["GPU0"].flops) == (936 * GB, 142 * TFLOPS)  # over the table
    assert (speeds["GPU1"].bandwidth_bytes_per_s, speeds["GPU1"].flops) == (1.5e12, None)
    assert speeds["CPU"].bandwidth_bytes_per_s == 80 * 2**30


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("bandwidth: 936", r"line 3: 'devices\[0\].bandwidth' must be a bandwidth like 936GB/s or 1.5TB/s, got 936$"),
        ("bandwidth: 936GB", r"'devices\[0\].bandwidth' must be a bandwidth like 936GB/s .*, got '936GB'$"),
        ("bandwidth: 0GB/s", r"'devices\[0\].bandwidth' must be more than 0 and at most 1e\+15 per second"),
        ("flops: 142 teraflops", r"'devices\[0\].flops' must be FLOPS like 142TFLOPS \(dense FP16\), got '142 tera"),
    ],
)
def test_a_profiles_speed_figures_are_checked_in_one_line(device: str, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        parse_profile(f"machine: box\ndevices:\n  - {{name: g, kind: cuda, memory: 8GiB, {device}}}\n", source="p.yaml")


def test_a_cpu_device_sets_the_hosts_flops() -> None:
    """The host's FP32 FLOPS price prefill and attention on the CPU (a measured figure unless a profile gives one)."""
    profile = parse_profile("machine: box\ndevices:\n  - {name: g, kind: cuda, memory: 8GiB}\n"
                            "  - {name: h, kind: cpu, memory: 8GiB, bandwidth: 50GB/s, flops: 1TFLOPS}\n")  # fmt: skip
    host = machine_speeds(profile_hardware(profile))["CPU"]  # type: ignore[arg-type]
    assert (host.bandwidth_bytes_per_s, host.flops, host.backend) == (50 * GB, 1 * TFLOPS, "cpu")


def test_speed_figures_parse_with_their_units() -> None:
    assert parse_bandwidth("936GB/s") == 936e9 and parse_bandwidth("400 GiB/s") == 400 * 2**30
    assert parse_flops("989TFLOPS") == 989e12 and parse_flops("1.2pflops") == pytest.approx(1.2e15)
    with pytest.raises(ValueError, match="must be a bandwidth"):
        parse_bandwidth("fast")


# --- calibration from the machine's record ------------------------------------------------------------------------


def run_entry(backend: str, version: str | None, ratio: float, finding: str | None = None,
              model_version: int | None = MODEL_VERSION) -> dict:  # fmt: skip
    speed = {"predicted_tg_per_s": 100.0, "measured_tg_per_s": 100.0 * ratio, "tg_ratio": ratio, "finding": finding,
             "model_version": model_version}  # fmt: skip
    return {"model": "tiny", "quant": "Q8_0", "backend": backend, "version": version, "speed": speed}


def test_calibration_is_the_median_ratio_of_this_backend_and_build(tmp_path: Path) -> None:
    machine = one_gpu("NVIDIA GeForce RTX 4090")
    assert calibration(machine, "llamacpp", "b6413") is None  # nothing measured yet
    for entry in [
        run_entry("llamacpp", "b6413", 0.80),
        run_entry("llamacpp", "b6413", 0.95),
        run_entry("llamacpp", "b6413", 0.90),
        run_entry("llamacpp", "b6413", 0.20, finding="slow: decode 20 tokens/s, predicted 100: probable CPU fallback"),
        run_entry("llamacpp", "b7000", 0.50),  # another build
        run_entry("ollama", "0.12.0", 1.30),  # another backend
        run_entry("llamacpp", "b6413", 0.10, model_version=None),  # measured against an older form of prediction
        run_entry("llamacpp", "b6413", 0.10, model_version=MODEL_VERSION - 1),
        # no finding (a CPU-only run has none), but a decode timed through a stall: not this machine's speed
        run_entry("llamacpp", "b6413", 0.002),
        run_entry("llamacpp", "b6413", 40.0),
    ]:
        record.append(machine, entry)
    assert calibration(machine, "llamacpp", "b6413") == Calibration(0.90, 3)
    assert calibration(machine, "llamacpp", "b7000") == Calibration(0.50, 1)
    assert calibration(machine, "ollama", "0.12.0") == Calibration(1.30, 1)
    assert calibration(one_gpu("NVIDIA GeForce RTX 3090"), "llamacpp", "b6413") is None  # another machine


def test_calibration_takes_the_runs_of_the_same_quant_type_first(tmp_path: Path) -> None:
    machine = one_gpu("NVIDIA GeForce RTX 4090")
    for quant, ratio, pp, attention in (("Q8_0", 0.9, 1.2, None), ("Q8_0", 0.8, 1.4, 0.5), ("Q4_1", 0.4, None, None)):
        entry = run_entry("llamacpp", "b6413", ratio)
        entry["quant"] = quant
        entry["speed"].update(pp_ratio=pp, attention_ratio=attention)
        record.append(machine, entry)
    assert calibration(machine, "llamacpp", "b6413", "q8_0") == Calibration(0.85, 2, 1.3, 0.5)
    # attention reads the KV cache whatever the weights' type: its ratio comes from every run; a type whose runs
    # measured no prefill takes prefill's from every run, as decode does when the type has no run
    assert calibration(machine, "llamacpp", "b6413", "Q4_1") == Calibration(0.4, 1, 1.3, 0.5)
    assert calibration(machine, "llamacpp", "b6413", "F16") == Calibration(0.8, 3, 1.3, 0.5)  # no F16 run: all
    assert calibration(machine, "llamacpp", "b7000", "Q4_1") is None
    assert calibration(machine, "llamacpp", "b6413", "Q4_1").note() == (  # type: ignore[union-attr]
        "calibrated by 1 verified run on this machine: decode ×0.40, prefill ×1.30, attention ×0.50"
    )
    assert calibration(machine, "llamacpp", "b6413", "Q8_0").note() == (  # type: ignore[union-attr]
        "calibrated by 2 verified runs on this machine: decode ×0.85, prefill ×1.30, attention ×0.50"
    )


def test_calibration_takes_this_models_own_runs_first(tmp_path: Path) -> None:
    machine = one_gpu("NVIDIA GeForce RTX 4090")
    for model, quant, ratio, attention in (("tiny", "Q8_0", 0.9, 0.5), ("tiny", "Q8_0", 0.7, 0.3),
                                           ("/m/big.gguf", "Q8_0", 0.5, 0.8), ("/m/big.gguf", "Q4_1", 0.3, 0.6),
                                           ("/m/swa.gguf", "Q8_0", 0.6, None)):  # fmt: skip
        entry = run_entry("llamacpp", "b6413", ratio)
        entry.update(model=model, quant=quant)
        entry["speed"].update(attention_ratio=attention)
        record.append(machine, entry)
    # the same model and type; the same type on another model; the same model of another type; every run
    assert calibration(machine, "llamacpp", "b6413", "Q8_0", "/m/big.gguf") == Calibration(
        0.5, 1, None, 0.7, same_model=True
    )  # attention: this model's two runs
    assert calibration(machine, "llamacpp", "b6413", "Q8_0", "/m/other.gguf") == Calibration(0.65, 4, None, 0.55)
    assert calibration(machine, "llamacpp", "b6413", "Q2_K", "tiny") == Calibration(0.8, 2, None, 0.4, same_model=True)
    assert calibration(machine, "llamacpp", "b6413", "Q2_K", "/m/other.gguf") == Calibration(0.6, 5, None, 0.55)
    # a model whose own runs could not tell attention apart (too small a share): no other model's ratio for it
    assert calibration(machine, "llamacpp", "b6413", "Q8_0", "/m/swa.gguf") == Calibration(0.6, 1, same_model=True)
    assert calibration(machine, "llamacpp", "b6413", "Q8_0", "/m/big.gguf").note() == (  # type: ignore[union-attr]
        "calibrated by 1 verified run of this model on this machine: decode ×0.50, attention ×0.70"
    )


def test_a_calibration_note_says_which_ratio_came_from_other_models(tmp_path: Path) -> None:
    """A model whose own run kept no prefill ratio takes another model's: the note says so, not "of this model"."""
    machine = one_gpu("NVIDIA GeForce RTX 4090")

    def add(model: str, ratio: float, pp: float | None) -> None:
        entry = run_entry("llamacpp", "b6413", ratio)
        entry["model"] = model
        entry["speed"].update(pp_ratio=pp, attention_ratio=0.4 if model == "/m/a.gguf" else None)
        record.append(machine, entry)

    add("/m/a.gguf", 0.9, None)
    add("/m/b.gguf", 0.7, 1.5)
    borrowed = calibration(machine, "llamacpp", "b6413", "Q8_0", "/m/a.gguf")
    assert borrowed == Calibration(0.9, 1, 1.5, 0.4, same_model=True)
    assert borrowed.note() == (  # type: ignore[union-attr]
        "calibrated by 1 verified run of this model on this machine: decode ×0.90, attention ×0.40; "
        "prefill ×1.50 from other models' runs"
    )
    add("/m/a.gguf", 0.8, 1.1)  # a run of its own that kept one
    own = calibration(machine, "llamacpp", "b6413", "Q8_0", "/m/a.gguf")
    assert own == Calibration(0.85, 2, 1.1, 0.4, same_model=True, pp_same_model=True)
    assert own.note() == (  # type: ignore[union-attr]
        "calibrated by 2 verified runs of this model on this machine: decode ×0.85, prefill ×1.10, attention ×0.40"
    )


def test_a_calibration_scales_each_part_of_the_prediction(tmp_path: Path) -> None:
    from launcher.speed import DeviceSpeed, predict, times

    plan = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)])
    option = plan.chosen
    assert option is not None
    cpu = {name: DeviceSpeed(30e9, 200e9, "cpu") for name in ("CPU", "GPU0")}
    parts = times(option, cpu, 1024)
    assert parts is not None and parts.prefill_s is not None
    scaled = predict(option, cpu, 1024, calibration=Calibration(0.5, 1, 2.0, 0.25))
    assert scaled.tg_per_s == pytest.approx(1 / (parts.decode_s / 0.5 + parts.decode_attention_s / 0.25))
    assert scaled.pp_per_s == pytest.approx(1 / (parts.prefill_s / 2.0 + parts.prefill_attention_s / 0.25))


def test_the_plan_is_calibrated_by_what_this_build_measured_here(tmp_path: Path) -> None:
    from launcher.fit import attach_speeds

    machine = one_gpu("NVIDIA GeForce RTX 4090")
    for ratio in (0.92, 0.88, 0.95):
        record.append(machine, run_entry("llamacpp", "b6413", ratio))
    raw = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)])
    attach_speeds(raw, machine, backend="llamacpp", version="b9999")  # a build with no run here: uncalibrated
    assert not any(n.startswith("calibrated") for n in raw.notes)
    plan = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)])
    attach_speeds(plan, machine, backend="llamacpp", version="b6413")
    before, after = raw.chosen.speed, plan.chosen.speed  # type: ignore[union-attr]
    assert before is not None and after is not None
    assert after["tg_per_s"] == pytest.approx(before["tg_per_s"] * 0.92, abs=0.1)
    assert after["tg_per_s_at_depth"] == pytest.approx(before["tg_per_s_at_depth"] * 0.92, abs=0.1)
    assert after["pp_per_s"] == before["pp_per_s"]  # the record's ratio is decode's
    assert "calibrated by 3 verified runs on this machine: ×0.92" in plan.notes


def test_an_ollama_plan_is_calibrated_by_the_ollama_version_a_launch_would_use(tmp_path: Path) -> None:
    """Ollama's version is known before a launch (the server at OLLAMA_HOST, or the `ollama` binary fitquant would
    start), so the next plan with it is calibrated by that version's verified runs on this machine."""
    from ollama_api_server import OllamaApiServer

    from launcher.backends.ollama import OllamaBackend
    from launcher.run import backend_build

    stub = OllamaApiServer(version="0.12.6").start()
    try:
        assert backend_build(OllamaBackend(host=stub.url)) == ("ollama", "0.12.6")
    finally:
        stub.close()
    fake = tmp_path / "ollama"  # no server answers: the binary's own version (as `ollama --version` prints it)
    fake.write_text("#!/bin/sh\necho 'Warning: could not connect to a running Ollama instance' >&2\n"
                    "echo 'Warning: client version is 0.13.1' >&2\n")  # fmt: skip
    fake.chmod(0o755)
    assert OllamaBackend(host="127.0.0.1:9", binary=str(fake)).server_version() == "0.13.1"
    assert OllamaBackend(host="127.0.0.1:9", binary=str(tmp_path / "missing")).server_version() is None
    machine = one_gpu("NVIDIA GeForce RTX 4090")
    record.append(machine, run_entry("ollama", "0.12.6", 0.8))
    from launcher.fit import attach_speeds

    plan = make_test_plan([tiny_candidate(tmp_path, "Q8_0", QT.Q8_0)])
    attach_speeds(plan, machine, backend="ollama", version="0.12.6")
    assert "calibrated by 1 verified run on this machine: ×0.80" in plan.notes


def test_a_calibration_keeps_prefills_attention_on_decodes_loop_apart_from_the_tiled_path(tmp_path: Path) -> None:
    """A quantized cache's prefill attention (decode's loop on a CPU) and f16's (tiled) are measured apart and kept
    apart: each plan takes the one for its cache."""
    machine = one_gpu("NVIDIA GeForce RTX 4090")
    for loop, tiled in ((0.3, None), (0.5, None), (None, 2.0)):
        entry = run_entry("llamacpp", "b6413", 1.0)
        entry["speed"].update(attention_ratio=0.4, prefill_loop_ratio=loop, prefill_attention_ratio=tiled)
        record.append(machine, entry)
    found = calibration(machine, "llamacpp", "b6413", "Q8_0", "tiny")
    assert found == Calibration(1.0, 3, None, 0.4, 2.0, 0.4, same_model=True)
    assert found.note() == (  # type: ignore[union-attr]
        "calibrated by 3 verified runs of this model on this machine: decode ×1.00, attention ×0.40, "
        "prefill attention ×2.00, prefill attention (quantized cache) ×0.40"
    )
