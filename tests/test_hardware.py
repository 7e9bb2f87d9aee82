"""The hardware stage, driven through its seams: fake NVML, a temporary amdgpu sysfs, captured sysctl."""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path

import httpx
import pynvml
import pytest
from fakes_hardware import (
    AMDGPU_IDS,
    IOREG_M2_MAX,
    RTX_3060,
    RTX_3090,
    SYSCTL_INTEL_MAC,
    SYSCTL_M2_MAX_32GIB,
    VM_STAT_M2_MAX,
    FakeAmdGpu,
    FakeGpu,
    FakeNvml,
    fake_run,
    write_amd_sysfs,
    write_meminfo,
)

from launcher.errors import HardwareError
from launcher.hardware import (
    SCHEMA_VERSION,
    HardwareSnapshot,
    collect_readings,
    describe_machine,
    detect_hardware,
    parse_vram_list,
    resolve_machine,
)
from launcher.hardware.amd import amd_devices, gfx_target, parse_amdgpu_ids, parse_kfd_properties, read_amd
from launcher.hardware.apple import default_working_set_bytes, parse_gpu_cores, parse_sysctl, parse_vm_stat
from launcher.hardware.cpu import parse_cpu_model, parse_meminfo
from launcher.hardware.runtimes import probe_backends, probe_ollama
from launcher.hardware.visible import hip_visible, visible_devices
from launcher.units import GiB, MiB

HOST_RAM = 64 * GiB
HOST_AVAILABLE = 48 * GiB


@pytest.fixture
def proc(tmp_path):
    return write_meminfo(tmp_path / "proc", total_bytes=HOST_RAM, available_bytes=HOST_AVAILABLE)


@pytest.fixture
def no_sysfs(tmp_path):
    (tmp_path / "sys").mkdir()
    return tmp_path / "sys"


def linux(nvml, proc, sysfs, env=None):
    return detect_hardware(nvml=nvml, sysfs_root=sysfs, proc_root=proc, env=env or {}, platform="linux")


def two_nvidia_gpus(**first):
    gpu0 = FakeGpu(
        **RTX_3090,
        used_bytes=5 * GiB + 256 * MiB,
        compute_processes=[(4242, 5 * GiB)],
        graphics_processes=[(1001, 200 * MiB)],
        **first,
    )
    gpu1 = FakeGpu(**RTX_3060, used_bytes=256 * MiB, compute_capability=(8, 6))
    return FakeNvml([gpu0, gpu1], process_names={4242: "/home/alice/.venv/bin/python3", 1001: "/usr/lib/Xorg"})


# --- NVIDIA -------------------------------------------------------------------------------------


def test_nvidia_two_gpus_of_different_sizes_each_with_its_own_free_memory(proc, no_sysfs):
    nvml = two_nvidia_gpus()
    snapshot = linux(nvml, proc, no_sysfs)

    big, small = snapshot.devices
    assert (big.index, big.system_index, big.kind, big.name) == (0, 0, "cuda", "NVIDIA GeForce RTX 3090")
    assert big.total_bytes == 24 * GiB
    assert big.used_bytes == 5 * GiB + 256 * MiB  # v2: allocations plus the driver's reserve
    assert big.free_bytes == 24 * GiB - 5 * GiB - 256 * MiB  # what the other process holds is not free
    assert {(p.pid, p.name, p.used_bytes) for p in big.processes} == {
        (4242, "/home/alice/.venv/bin/python3", 5 * GiB),
        (1001, "/usr/lib/Xorg", 200 * MiB),
    }
    assert (small.index, small.total_bytes, small.free_bytes) == (1, 12 * GiB, 12 * GiB - 256 * MiB)
    assert small.processes == ()
    assert big.uuid == RTX_3090["uuid"] and big.pci_bus_id == "00000000:01:00.0"
    assert big.compute_capability == "8.6" and big.driver == "550.54.15"
    assert not big.unified and not big.integrated
    assert snapshot.ram_total_bytes == HOST_RAM and snapshot.ram_available_bytes == HOST_AVAILABLE
    assert any("CUDA_DEVICE_ORDER" in note for note in snapshot.notes)
    assert nvml.calls[-1] == "nvmlShutdown" and not nvml.initialized


def test_nvidia_gpus_are_never_summed(proc, no_sysfs):
    snapshot = linux(two_nvidia_gpus(), proc, no_sysfs)
    assert len(snapshot.devices) == 2
    assert max(d.total_bytes for d in snapshot.devices) == 24 * GiB


def test_nvml_installed_but_no_driver_falls_back_to_cpu_with_a_note(proc, no_sysfs):
    snapshot = linux(FakeNvml(init_error=pynvml.NVMLError_DriverNotLoaded), proc, no_sysfs)
    assert snapshot.devices == ()
    assert snapshot.notes == (
        "NVML found but no NVIDIA driver loaded; no NVIDIA GPU will be used",
        "no GPU found: models will run on the CPU",
    )
    assert snapshot.ram_total_bytes == HOST_RAM


def test_no_nvml_library_is_a_cpu_machine_without_an_nvidia_note(proc, no_sysfs):
    snapshot = linux(FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound), proc, no_sysfs)
    assert snapshot.devices == ()
    assert snapshot.notes == ("no GPU found: models will run on the CPU",)


def test_nvml_that_cannot_start_for_another_reason_is_a_hardware_error(proc, no_sysfs):
    with pytest.raises(HardwareError, match=r"NVML could not start \(NVMLError_LibRmVersionMismatch: "):
        linux(FakeNvml(init_error=pynvml.NVMLError_LibRmVersionMismatch), proc, no_sysfs)


def test_nvml_memory_v1_is_used_when_the_driver_lacks_v2(proc, no_sysfs):
    nvml = two_nvidia_gpus(memory_v2_error=pynvml.NVMLError_FunctionNotFound)
    big = linux(nvml, proc, no_sysfs).devices[0]
    assert big.total_bytes == 24 * GiB
    assert big.free_bytes == 24 * GiB - 5 * GiB - 256 * MiB
    assert big.used_bytes == 5 * GiB  # v1 leaves the reserve out


def test_nvml_memory_error_other_than_not_supported_is_a_hardware_error(proc, no_sysfs):
    nvml = two_nvidia_gpus(memory_error=pynvml.NVMLError_GpuIsLost)
    with pytest.raises(HardwareError, match=r"memory of GPU 0 \(NVIDIA GeForce RTX 3090\): NVMLError_GpuIsLost"):
        linux(nvml, proc, no_sysfs)


def test_gpu_without_own_memory_is_unified_with_host_ram(proc, no_sysfs):
    spark = FakeGpu(
        name="NVIDIA GB10",
        uuid="GPU-0b10",
        pci_bus_id="0000000F:01:00.0",
        total_bytes=0,
        used_bytes=0,
        compute_capability=(12, 1),
        memory_error=pynvml.NVMLError_NotSupported,
    )
    (device,) = linux(FakeNvml([spark]), proc, no_sysfs).devices
    assert device.unified and device.integrated
    assert (device.total_bytes, device.free_bytes, device.used_bytes) == (HOST_RAM, HOST_AVAILABLE, None)
    assert device.compute_capability == "12.1"


def test_processes_not_supported_leaves_processes_unknown(proc, no_sysfs):
    nvml = two_nvidia_gpus(processes_error=pynvml.NVMLError_NotSupported)
    big = linux(nvml, proc, no_sysfs).devices[0]
    assert big.processes is None
    assert big.free_bytes == 24 * GiB - 5 * GiB - 256 * MiB


def test_process_holding_unreported_memory_is_listed_without_a_size(proc, no_sysfs):
    gpu = FakeGpu(**RTX_3060, used_bytes=2 * GiB, compute_processes=[(77, None)])
    (device,) = linux(FakeNvml([gpu]), proc, no_sysfs).devices
    assert [(p.pid, p.name, p.used_bytes) for p in device.processes] == [(77, None, None)]


def test_cuda_visible_devices_1_keeps_only_the_second_gpu_renumbered_0(proc, no_sysfs):
    snapshot = linux(two_nvidia_gpus(), proc, no_sysfs, env={"CUDA_VISIBLE_DEVICES": "1"})
    (device,) = snapshot.devices
    assert (device.index, device.system_index, device.name) == (0, 1, "NVIDIA GeForce RTX 3060")
    assert device.total_bytes == 12 * GiB


def test_cuda_visible_devices_by_uuid_prefix_and_order(proc, no_sysfs):
    env = {"CUDA_VISIBLE_DEVICES": "GPU-9f00aa11,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    snapshot = linux(two_nvidia_gpus(), proc, no_sysfs, env=env)
    assert [(d.index, d.system_index) for d in snapshot.devices] == [(0, 1), (1, 0)]
    assert not any("CUDA_DEVICE_ORDER" in note for note in snapshot.notes)


@pytest.mark.parametrize(
    ("value", "expected", "note"),
    [
        ("", [], "CUDA_VISIBLE_DEVICES is set but empty: the runtime sees no GPU"),
        ("-1", [], "CUDA_VISIBLE_DEVICES='-1': '-1' is not a device here; the runtime sees no GPU"),
        (
            "1,7,0",
            [1],
            "CUDA_VISIBLE_DEVICES='1,7,0': '7' is not a device here; it and the entries after it are ignored",
        ),
        ("0,0", [0], "CUDA_VISIBLE_DEVICES='0,0': '0' is a repeat; it and the entries after it are ignored"),
        (" 1 , 0 ", [1, 0], None),
        ("GPU-", [], "CUDA_VISIBLE_DEVICES='GPU-': 'GPU-' is not a device here; the runtime sees no GPU"),
        (None, [0, 1], None),
    ],
)
def test_visible_devices_follows_cuda_rules(value, expected, note):
    chosen, notes = visible_devices(value, ["GPU-aaa", "GPU-bbb"], variable="CUDA_VISIBLE_DEVICES")
    assert chosen == expected
    assert notes == ([note] if note else [])


def test_hip_visible_devices_index_into_what_rocr_visible_devices_left():
    uuids = ["GPU-a", "GPU-b", "GPU-c"]
    assert hip_visible({"ROCR_VISIBLE_DEVICES": "2,1", "HIP_VISIBLE_DEVICES": "1"}, uuids) == ([1], [])
    assert hip_visible({"CUDA_VISIBLE_DEVICES": "2"}, uuids) == ([2], [])
    assert hip_visible({}, uuids) == ([0, 1, 2], [])


# --- AMD ----------------------------------------------------------------------------------------

APU_780M = FakeAmdGpu(
    gfx_target_version=110003,
    device_id=0x15BF,
    render_minor=128,
    pci_slot="0000:c5:00.0",
    vram_total_bytes=512 * MiB,
    vram_used_bytes=96 * MiB,
    gtt_total_bytes=16 * GiB,
    gtt_used_bytes=1 * GiB,
    unique_id=0x1A2B3C4D5E6F7081,
)
RX_7900_XTX = FakeAmdGpu(
    gfx_target_version=110000,
    device_id=0x744C,
    render_minor=129,
    pci_slot="0000:03:00.0",
    vram_total_bytes=24 * GiB,
    vram_used_bytes=2 * GiB,
    gtt_total_bytes=32 * GiB,
    gtt_used_bytes=20 * MiB,
    product_name="AMD Radeon RX 7900 XTX",
)


def test_amd_apu_is_integrated_carve_out_plus_gtt_never_dedicated_vram(proc, tmp_path):
    sysfs = write_amd_sysfs(tmp_path / "sys", [APU_780M])
    snapshot = linux(FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound), proc, sysfs)

    (apu,) = snapshot.devices
    assert (apu.kind, apu.index, apu.system_index) == ("rocm", 0, 0)
    assert apu.integrated and apu.unified
    assert apu.total_bytes == 512 * MiB + 16 * GiB
    assert apu.used_bytes == 96 * MiB + 1 * GiB
    assert apu.free_bytes == (512 - 96) * MiB + 15 * GiB
    assert apu.compute_capability == "gfx1103"
    assert apu.name == "AMD Radeon GPU (gfx1103, 1002:15bf)"
    assert apu.pci_bus_id == "0000:c5:00.0"
    assert apu.uuid == "GPU-1a2b3c4d5e6f7081"
    assert apu.driver == "amdgpu"
    assert apu.processes is None
    assert (
        "AMD GPU 0 (AMD Radeon GPU (gfx1103, 1002:15bf)) is integrated: 512.0 MiB carve-out + 16.0 GiB GTT "
        "shared with system RAM, not dedicated VRAM"
    ) in snapshot.notes


def test_amd_apu_free_gtt_is_capped_by_available_host_ram(tmp_path, no_sysfs):
    proc = write_meminfo(tmp_path / "tight", total_bytes=32 * GiB, available_bytes=4 * GiB)
    sysfs = write_amd_sysfs(tmp_path / "sys-apu", [APU_780M])
    (apu,) = linux(FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound), proc, sysfs).devices
    assert apu.free_bytes == (512 - 96) * MiB + 4 * GiB


def test_amd_discrete_card_next_to_an_apu_and_hip_visible_devices(proc, tmp_path):
    sysfs = write_amd_sysfs(tmp_path / "sys", [APU_780M, RX_7900_XTX])
    nvml = FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound)

    apu, card = linux(nvml, proc, sysfs).devices
    assert apu.integrated and not card.integrated and not card.unified
    assert (card.name, card.total_bytes, card.free_bytes, card.used_bytes) == (
        "AMD Radeon RX 7900 XTX",
        24 * GiB,
        22 * GiB,
        2 * GiB,
    )
    assert card.compute_capability == "gfx1100"

    (only,) = linux(nvml, proc, sysfs, env={"HIP_VISIBLE_DEVICES": "1"}).devices
    assert (only.index, only.system_index, only.name) == (0, 1, "AMD Radeon RX 7900 XTX")


def test_amd_gpu_node_without_a_drm_device_has_unknown_memory(proc, tmp_path):
    sysfs = write_amd_sysfs(tmp_path / "sys", [RX_7900_XTX])
    (sysfs / "class/drm/renderD129/device").unlink()
    snapshot = linux(FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound), proc, sysfs)
    (card,) = snapshot.devices
    assert (card.total_bytes, card.free_bytes) == (None, None)
    assert any("cannot read its memory" in note for note in snapshot.notes)


def test_amd_card_without_a_product_name_is_named_by_libdrms_table(tmp_path):
    """Most consumer cards' VBIOS gives no product_name: amdgpu.ids names them by (device, revision), the name the
    speed table knows them by. The XTX, XT and GRE share device 744C; the revision tells them apart."""
    from launcher.speed import machine_speeds

    ids = tmp_path / "amdgpu.ids"
    ids.write_text(AMDGPU_IDS)
    xt = replace(RX_7900_XTX, product_name=None, revision=0xCC)
    sysfs = write_amd_sysfs(tmp_path / "sys", [xt, replace(APU_780M, revision=0xC1)])
    reading = read_amd(sysfs, ids_files=[tmp_path / "missing.ids", ids])
    assert reading.ids_file == str(ids)
    card, apu = amd_devices(reading, env={})[0]
    assert card.name == "AMD Radeon RX 7900 XT"
    assert apu.name == "AMD Radeon GPU (gfx1103, 1002:15bf)"  # 15BF C1 is not in this excerpt: the fallback
    speed = machine_speeds(describe_machine(vram=[20 * GiB], gpu_names=["AMD Radeon RX 7900 XT"]))["GPU0"]
    assert (speed.bandwidth_bytes_per_s, speed.backend) == (800e9, "rocm")

    # no revision file, no readable table, or one too large to be it: the fallback name, never a guess by device alone
    bare = write_amd_sysfs(tmp_path / "bare", [replace(RX_7900_XTX, product_name=None)])
    assert amd_devices(read_amd(bare, ids_files=[ids]), env={})[0][0].name == "AMD Radeon GPU (gfx1100, 1002:744c)"
    nameless = write_amd_sysfs(tmp_path / "nameless", [xt])
    assert amd_devices(read_amd(nameless, ids_files=[]), env={})[0][0].name == "AMD Radeon GPU (gfx1100, 1002:744c)"
    huge = tmp_path / "huge.ids"
    huge.write_text(AMDGPU_IDS + "#" * (1 << 20))
    reading = read_amd(nameless, ids_files=[huge])
    assert reading.ids_file is None and amd_devices(reading, env={})[0][0].name.startswith("AMD Radeon GPU (")
    # a VBIOS product name wins over the table
    named = write_amd_sysfs(tmp_path / "named", [replace(RX_7900_XTX, revision=0xCC)])
    assert amd_devices(read_amd(named, ids_files=[ids]), env={})[0][0].name == "AMD Radeon RX 7900 XTX"


def test_strix_halos_gpu_is_named_as_the_speed_table_knows_it_by_either_libdrm(tmp_path):
    """Strix Halo (Ryzen AI Max+ 395): device 1586, an APU whose GTT the kernel may raise to most of the RAM. libdrm
    named its GPU "Radeon 8060S Graphics" until December 2025 and "AMD Radeon 8060S Graphics" since: either way it is
    the table's AMD Radeon 8060S, which predicts its speed from 256 GB/s of unified LPDDR5X."""
    from launcher.speed import device_table, machine_speeds

    halo = FakeAmdGpu(gfx_target_version=110501, device_id=0x1586, render_minor=128, pci_slot="0000:c5:00.0",
                      vram_total_bytes=512 * MiB, vram_used_bytes=64 * MiB, gtt_total_bytes=124 * GiB,
                      gtt_used_bytes=0, revision=0xC1)  # fmt: skip
    sysfs = write_amd_sysfs(tmp_path / "sys", [halo])
    for name in ("Radeon 8060S Graphics", "AMD Radeon 8060S Graphics"):
        ids = tmp_path / "amdgpu.ids"
        ids.write_text(f"1.0.0\n1586,\tC1,\t{name}\n")
        (apu,) = amd_devices(read_amd(sysfs, ids_files=[ids]), env={})[0]
        assert apu.name == "AMD Radeon 8060S Graphics" and apu.integrated and apu.compute_capability == "gfx1151"
        described = describe_machine(vram=[24 * GiB])
        speed = machine_speeds(described.model_copy(update={"devices": (apu,)}))["GPU0"]
        assert speed == device_table()["AMD Radeon 8060S"] and speed.bandwidth_bytes_per_s == 256e9
        assert (speed.backend, speed.link_bytes_per_s) == ("rocm", None)


def test_amdgpu_ids_parser():
    names = parse_amdgpu_ids(AMDGPU_IDS)
    assert names[(0x744C, 0xC8)] == "AMD Radeon RX 7900 XTX" and names[(0x744C, 0xCE)] == "AMD Radeon RX 7900 GRE"
    assert names[(0x7481, 0xC7)] == "AMD Steam Machine"  # spaces, not tabs
    assert names[(0x743F, 0xC3)] == "AMD Radeon RX 6500"  # a pair listed twice: the first line
    assert (1, 0) not in names and len(names) == 10  # "1.0.0" and the comments are not entries
    assert parse_amdgpu_ids("744C, C8\nZZZZ,\tC8,\tX\n744C,\tC8,\t\n12345,\t01,\tToo long\n") == {}
    # a name that would be shown as the GPU's: not a terminal escape, not a page of text
    hostile = f"744C,\tC8,\tAMD \x1b[2J Radeon\n744C,\tCC,\t{'X' * 101}\n744C,\tCE,\t{'Y' * 100}\n"
    assert parse_amdgpu_ids(hostile) == {(0x744C, 0xCE): "Y" * 100}


@pytest.mark.skipif(not Path("/usr/share/libdrm/amdgpu.ids").is_file(), reason="no libdrm amdgpu.ids here")
def test_amdgpu_ids_parser_reads_this_machines_libdrm_table():
    names = parse_amdgpu_ids(Path("/usr/share/libdrm/amdgpu.ids").read_text())
    assert len(names) > 300 and names[(0x73BF, 0xC1)] == "AMD Radeon RX 6800 XT"  # in every version since 2020


def test_kfd_properties_and_gfx_names():
    assert parse_kfd_properties("gfx_target_version 90010\nvendor_id 4098\nbad line here\n") == {
        "gfx_target_version": 90010,
        "vendor_id": 4098,
    }
    assert [gfx_target(v) for v in (110003, 90010, 100302, 90008)] == ["gfx1103", "gfx90a", "gfx1032", "gfx908"]


# --- Apple --------------------------------------------------------------------------------------


def test_apple_m2_with_32_gib_is_one_unified_metal_gpu(proc):
    nvml = FakeNvml([FakeGpu(**RTX_3090, used_bytes=0)])
    run = fake_run({"sysctl": SYSCTL_M2_MAX_32GIB, "vm_stat": VM_STAT_M2_MAX, "ioreg": IOREG_M2_MAX})
    snapshot = detect_hardware(nvml=nvml, run=run, proc_root=proc, env={}, platform="darwin")

    (gpu,) = snapshot.devices
    assert (gpu.kind, gpu.index, gpu.name) == ("metal", 0, "Apple M2 Max (38-core GPU)")  # the chip and its GPU bin
    assert gpu.unified and gpu.integrated
    assert gpu.total_bytes == default_working_set_bytes(32 * GiB)
    assert 24 * GiB < gpu.total_bytes < 24.2 * GiB  # between 74 % and 84 % of 32 GiB, see apple.py
    available = (262144 + 524288 + 65536) * 16384
    assert snapshot.ram_available_bytes == available == 13 * GiB
    assert gpu.free_bytes == available  # the same RAM: less is free than the working set allows
    assert snapshot.ram_total_bytes == 32 * GiB
    assert (snapshot.cpu.model, snapshot.cpu.physical_cores, snapshot.cpu.logical_cores) == ("Apple M2 Max", 12, 12)
    assert nvml.calls == []  # no NVML on a Mac
    assert any(note.startswith("Metal working set estimated at 24.1 GiB of 32.0 GiB") for note in snapshot.notes)


def test_a_macs_gpu_is_priced_by_its_bin_and_not_guessed_without_one():
    """ioreg's core count names the bin the speed table lists; without it the chip alone names no bin: no speed."""
    from launcher.speed import machine_speeds

    run = fake_run({"sysctl": SYSCTL_M2_MAX_32GIB, "vm_stat": VM_STAT_M2_MAX, "ioreg": IOREG_M2_MAX})
    machine = detect_hardware(run=run, env={}, platform="darwin")
    assert not any("core count" in note for note in machine.notes)
    speed = machine_speeds(machine)["GPU0"]
    assert (speed.bandwidth_bytes_per_s, speed.flops, speed.backend) == (400e9, 13.6e12, "metal")
    # a 30-core M2 Max: the same memory, 30 of the 38 cores' arithmetic
    run = fake_run({"sysctl": SYSCTL_M2_MAX_32GIB, "vm_stat": VM_STAT_M2_MAX,
                    "ioreg": IOREG_M2_MAX.replace("= 38", "= 30")})  # fmt: skip
    speed = machine_speeds(detect_hardware(run=run, env={}, platform="darwin"))["GPU0"]
    assert (speed.bandwidth_bytes_per_s, speed.flops) == (400e9, 10.74e12)

    for ioreg in (None, "", IOREG_M2_MAX.replace("= 38", "= 0"), IOREG_M2_MAX.replace("= 38", "= 4096")):
        outputs = {"sysctl": SYSCTL_M2_MAX_32GIB, "vm_stat": VM_STAT_M2_MAX}
        if ioreg is not None:
            outputs["ioreg"] = ioreg
        machine = detect_hardware(run=fake_run(outputs), env={}, platform="darwin")
        (gpu,) = machine.devices
        assert gpu.name == "Apple M2 Max"
        assert any(note.startswith("ioreg gave no GPU core count") and "predict no speed" in note
                   for note in machine.notes)  # fmt: skip
        assert "GPU0" not in machine_speeds(machine)  # two bins of the chip: none is taken for it


def test_apple_wired_limit_sets_the_working_set():
    text = SYSCTL_M2_MAX_32GIB.replace("iogpu.wired_limit_mb: 0", "iogpu.wired_limit_mb: 28672")
    run = fake_run({"sysctl": text, "vm_stat": VM_STAT_M2_MAX.replace("262144.", "1572864.")})
    (gpu,) = detect_hardware(run=run, env={}, platform="darwin").devices
    assert gpu.total_bytes == 28 * GiB
    assert gpu.free_bytes == 28 * GiB


def test_intel_mac_has_no_metal_gpu():
    run = fake_run({"sysctl": SYSCTL_INTEL_MAC})
    snapshot = detect_hardware(run=run, env={}, platform="darwin")
    assert snapshot.devices == ()
    assert snapshot.ram_total_bytes == 16 * GiB
    assert snapshot.cpu.model == "Intel(R) Core(TM) i7-9750H CPU @ 2.60GHz"
    assert any("not an Apple Silicon Mac" in note for note in snapshot.notes)
    assert any(note.startswith("vm_stat: FileNotFoundError") for note in snapshot.notes)


def test_default_working_set_matches_the_recorded_points_and_is_clamped_outside():
    assert default_working_set_bytes(16 * GiB) == int(11.84 * GiB)
    assert default_working_set_bytes(128 * GiB) == int(107.52 * GiB)
    assert default_working_set_bytes(8 * GiB) == int(8 * GiB * 0.74)
    assert default_working_set_bytes(192 * GiB) == int(192 * GiB * 0.84)
    assert default_working_set_bytes(16 * GiB) < default_working_set_bytes(64 * GiB) < 64 * GiB


def test_sysctl_and_vm_stat_parsers():
    assert parse_sysctl(SYSCTL_M2_MAX_32GIB)["machdep.cpu.brand_string"] == "Apple M2 Max"
    assert parse_sysctl("sysctl: unknown oid 'iogpu.wired_limit_mb'\nhw.memsize: 8\n") == {"hw.memsize": "8"}
    assert parse_vm_stat("Pages free: 10.\n") is None  # no page size line
    assert parse_vm_stat("Mach Virtual Memory Statistics: (page size of 4096 bytes)\nPages free: 10.\n") == 40960
    assert parse_gpu_cores(IOREG_M2_MAX) == 38
    assert parse_gpu_cores('    | |   "gpu-core-count" = 14\n') == 14  # `ioreg -l`'s tree, drawn
    for text in (
        "",
        '"gpu-core-count" = 0',
        '"gpu-core-count" = 2048',
        '"gpu-core-count" = 12a',
        '"gpu-core-count" = -1',
        '"gpu-core-count-max" = 40',
        '"model" = "Apple M4"',
    ):
        assert parse_gpu_cores(text) is None, text


# --- host ---------------------------------------------------------------------------------------


def test_meminfo_and_cpuinfo_parsers():
    fields = parse_meminfo("MemTotal:       24684084 kB\nMemAvailable:   24260568 kB\nHugePages_Total:       0\n")
    assert fields == {"MemTotal": 24684084 * 1024, "MemAvailable": 24260568 * 1024, "HugePages_Total": 0}
    assert (
        parse_cpu_model("processor\t: 0\nmodel name\t: Intel(R)  Xeon(R) Processor\n") == "Intel(R) Xeon(R) Processor"
    )
    arm = "processor\t: 0\nBogoMIPS\t: 108.00\nCPU part\t: 0xd08\n\nHardware\t: BCM2835\nModel\t: Raspberry Pi 4\n"
    assert parse_cpu_model(arm) == "Raspberry Pi 4"
    assert parse_cpu_model("processor\t: 0\n") is None


def test_cpu_only_machine_has_no_devices_and_ram_from_meminfo(proc, no_sysfs):
    snapshot = linux(FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound), proc, no_sysfs)
    assert snapshot.devices == ()
    assert (snapshot.ram_total_bytes, snapshot.ram_available_bytes) == (HOST_RAM, HOST_AVAILABLE)
    assert snapshot.cpu.model == "AMD Ryzen 7 7840U w/ Radeon 780M Graphics"
    assert snapshot.cpu.logical_cores and snapshot.cpu.logical_cores >= 1
    gpus = detect_hardware(nvml=FakeNvml([FakeGpu(**RTX_3060, used_bytes=0)]), sysfs_root=no_sysfs, env={}).devices
    assert gpus[0].index == 0


# --- described machines ------------------------------------------------------------------------


def test_describe_two_24_gib_gpus_and_ram():
    snapshot = describe_machine(vram=parse_vram_list("24GiB,24GiB"), ram=64 * GiB)
    assert snapshot.described
    assert [(d.index, d.kind, d.total_bytes, d.free_bytes, d.used_bytes) for d in snapshot.devices] == [
        (0, "cuda", 24 * GiB, 24 * GiB, 0),
        (1, "cuda", 24 * GiB, 24 * GiB, 0),
    ]
    assert (snapshot.ram_total_bytes, snapshot.ram_available_bytes) == (64 * GiB, 64 * GiB)
    assert snapshot.backends is None


def test_describe_unified_mac_and_cpu_only_box():
    mac = describe_machine(unified=32 * GiB)
    (gpu,) = mac.devices
    assert gpu.kind == "metal" and gpu.unified and gpu.integrated
    assert gpu.total_bytes == default_working_set_bytes(32 * GiB)
    assert mac.ram_total_bytes == 32 * GiB
    box = describe_machine(ram=16 * GiB)
    assert box.devices == () and box.ram_total_bytes == 16 * GiB and box.described


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "describe at least one of vram, ram or unified memory"),
        ({"vram": [12 * GiB], "unified": 32 * GiB}, "give either discrete GPU memory (vram) or unified memory"),
        ({"unified": 32 * GiB, "ram": 64 * GiB}, "unified memory is the machine's RAM"),
        ({"vram": [0]}, "vram must be a positive number of bytes, got 0"),
        ({"ram": -1}, "ram must be a positive number of bytes, got -1"),
    ],
)
def test_describe_machine_rejects_contradictions(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        describe_machine(**kwargs)


def test_parse_vram_list():
    assert parse_vram_list("24GiB") == [24 * GiB]
    assert parse_vram_list(" 24GiB , 12GiB ") == [24 * GiB, 12 * GiB]
    assert parse_vram_list("12GB") == [12 * 1000**3]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("12XB", "'12XB' is not a size; write it like 24GiB, 12GB or 512MiB"),
        ("24GiB,lots", "'lots' is not a size; write it like 24GiB, 12GB or 512MiB"),
        ("24GiB,,12GiB", "'24GiB,,12GiB' has an empty item; write one size per GPU, like 24GiB,24GiB"),
        ("0", "'0' is not a GPU size; it must be more than 0"),
    ],
)
def test_parse_vram_list_errors_name_the_bad_item_in_one_line(text, message):
    with pytest.raises(ValueError) as caught:
        parse_vram_list(text)
    assert str(caught.value) == message


def test_resolve_machine_describes_when_given_sizes_as_text():
    snapshot = resolve_machine(vram="12GiB", ram="32GiB")
    assert snapshot.described and snapshot.devices[0].total_bytes == 12 * GiB
    assert snapshot.ram_total_bytes == 32 * GiB
    with pytest.raises(ValueError, match="'12XB' is not a size"):
        resolve_machine(vram="12XB")


# --- JSON and doctor ----------------------------------------------------------------------------


def test_to_json_has_the_documented_shape(proc, no_sysfs):
    data = linux(two_nvidia_gpus(), proc, no_sysfs).to_json()
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert set(data) == {
        "schema_version", "described", "devices", "ram_total_bytes", "ram_available_bytes", "cpu", "backends", "notes"
    }  # fmt: skip
    assert {"index", "kind", "name", "total_bytes", "free_bytes", "unified"} <= set(data["devices"][0])
    assert data["devices"][0]["processes"][0] == {"pid": 4242, "name": "/home/alice/.venv/bin/python3",
                                                  "used_bytes": 5 * GiB}  # fmt: skip
    assert set(data["cpu"]) == {"model", "physical_cores", "logical_cores"}
    assert data["backends"] == {"llama_cpp_gpu_offload": None, "ollama": None}
    assert json.loads(json.dumps(data)) == data
    assert (
        HardwareSnapshot.model_validate(
            {k: v for k, v in data.items() if k not in ("schema_version",)} | {"backends": None}
        )
        .devices[1]
        .total_bytes
        == 12 * GiB
    )


def test_doctor_reports_raw_readings_without_secrets(proc, no_sysfs, monkeypatch):
    monkeypatch.setattr("launcher.hardware.runtimes.llama_cpp_gpu_offload", lambda: None)
    monkeypatch.setattr("launcher.hardware.runtimes.probe_ollama", lambda url, **_: None)
    env = {"CUDA_VISIBLE_DEVICES": "0", "HF_TOKEN": "hf_secret", "HOME": "/home/alice", "USER": "alice"}
    report = collect_readings(nvml=two_nvidia_gpus(), sysfs_root=no_sysfs, proc_root=proc, env=env, platform="linux")

    text = json.dumps(report)
    assert "hf_secret" not in text and "alice" not in text
    assert report["environment"] == {"CUDA_VISIBLE_DEVICES": "0"}
    gpu0 = report["nvml"]["gpus"][0]
    assert gpu0["memory_version"] == 2 and gpu0["reserved_bytes"] == 256 * MiB
    assert [4242, "python3", 5 * GiB] in gpu0["processes"]
    assert report["host"]["ram_total_bytes"] == HOST_RAM
    assert report["amd"]["present"] is False
    assert [d["name"] for d in report["snapshot"]["devices"]] == ["NVIDIA GeForce RTX 3090"]


def test_doctor_never_raises_when_nvml_is_broken(proc, no_sysfs, monkeypatch):
    monkeypatch.setattr("launcher.hardware.runtimes.llama_cpp_gpu_offload", lambda: None)
    monkeypatch.setattr("launcher.hardware.runtimes.probe_ollama", lambda url, **_: None)
    nvml = FakeNvml(init_error=pynvml.NVMLError_NoPermission)
    report = collect_readings(nvml=nvml, sysfs_root=no_sysfs, proc_root=proc, env={}, platform="linux")
    assert report["nvml"]["init_error"] == "NVMLError_NoPermission: Insufficient Permissions"
    assert report["snapshot"]["error"].startswith("HardwareError: NVML could not start")


# --- runtimes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "url"),
    [
        (None, "http://127.0.0.1:11434"),
        ("", "http://127.0.0.1:11434"),
        ("0.0.0.0", "http://0.0.0.0:11434"),
        (":11435", "http://127.0.0.1:11435"),
        ("example.com:8080", "http://example.com:8080"),
        ("https://example.com", "https://example.com:443"),
        ("http://example.com/ollama/", "http://example.com:80/ollama"),
        ("[::1]:11434", "http://[::1]:11434"),
    ],
)
def test_probe_backends_reads_ollama_host_like_the_ollama_client(host, url):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, json={"version": "0.30.1"})

    env = {} if host is None else {"OLLAMA_HOST": host}
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        found = probe_backends(env=env, client=client)
    assert seen == [httpx.URL(f"{url}/api/version")]
    assert found.ollama is not None and found.ollama.url == url


def test_probe_backends_finds_no_ollama_at_a_host_no_client_can_dial():
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(500))) as client:
        assert probe_backends(env={"OLLAMA_HOST": "ftp://x"}, client=client).ollama is None


def test_probe_ollama_reads_the_version():
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/version"
        return httpx.Response(200, json={"version": "0.30.1"})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        server = probe_ollama("http://127.0.0.1:11434", client=client)
    assert (server.url, server.version) == ("http://127.0.0.1:11434", "0.30.1")


def test_probe_ollama_is_none_when_something_else_answers():
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, text="<html>"))) as client:
        assert probe_ollama("http://127.0.0.1:11434", client=client) is None
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(404))) as client:
        assert probe_ollama("http://127.0.0.1:11434", client=client) is None


def test_probe_ollama_is_none_when_nothing_listens():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert probe_ollama(f"http://127.0.0.1:{port}", timeout=0.3) is None
