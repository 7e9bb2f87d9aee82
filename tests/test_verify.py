"""launcher.verify: the verdict rules, the prediction beside the measurement, Ollama's /api/ps, NVML, and the lines
people read. Log excerpts are real llama.cpp lines (backends.md §10, memory-model.md §7 and §7a, and the public
threads named beside them); tests/test_verify_corpus.py runs the whole saved corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from fakes_hardware import FakeGpu, FakeNvml

from launcher import llamalog
from launcher.cli import _Group
from launcher.cli.verify import verify
from launcher.estimate import DeviceEstimate
from launcher.verify import (
    EXIT_STATUS,
    HOST_SLACK_BYTES,
    DevicePlacement,
    Placement,
    attach_nvml,
    attach_prediction,
    device_name,
    is_oom_line,
    mismatches,
    nvml_used_by_pid,
    oom_line,
    oom_lines,
    placement_from_log,
    placement_from_ollama,
    render_comparison,
    strip_header,
    summary_line,
    visible_nvml_indices,
)

MiB = 1024**2
GiB = 1024**3

# backends.md §10: gemma-3-270m on an RPC device, -c 4096 -ctk q8_0 -ctv q8_0 -fa on; the token embedding table
# (262144 x 640, Q6_K... stored as 170.00 MiB) stays in CPU_Mapped memory at a full offload.
RPC_FITS = """\
llama_prepare_model_devices: using device RPC0 (127.0.0.1:50111) (unknown id) - 24105 MiB free
load_tensors: offloaded 19/19 layers to GPU
load_tensors:   CPU_Mapped model buffer size =   170.00 MiB
load_tensors: RPC0[127.0.0.1:50111] model buffer size =   235.16 MiB
llama_context:        CPU  output buffer size =     4.00 MiB
llama_kv_cache: RPC0[127.0.0.1:50111] KV buffer size =     6.38 MiB
llama_kv_cache: RPC0[127.0.0.1:50111] KV buffer size =    19.92 MiB
sched_reserve: RPC0[127.0.0.1:50111] compute buffer size =    23.55 MiB
sched_reserve:        CPU compute buffer size =     9.55 MiB
"""
TOKEN_EMBD_270M = 178257920  # gemma-3-270m-q4_k_m.gguf token_embd.weight: exactly 170.00 MiB

# A current llama-server (-lv 4, --no-log-prefix) full offload with the model's hparams printed.
SERVER_FULL = """\
llama_model_load_from_file_impl: using device CUDA0 (NVIDIA GeForce RTX 4090) (0000:01:00.0) - 23725 MiB free
print_info: n_vocab               = 262144
print_info: n_embd                = 5376
print_info: n_embd_inp            = 5376
load_tensors: offloading output layer to GPU
load_tensors: offloading 61 repeating layers to GPU
load_tensors: offloaded 63/63 layers to GPU
load_tensors:        CUDA0 model buffer size = 15188.27 MiB
load_tensors:   CPU_Mapped model buffer size =  {host} MiB
llama_context: n_seq_max             = 4
llama_context: n_ctx                 = 32768
llama_context: n_ctx_seq             = 32768
llama_context: flash_attn            = auto
llama_context:  CUDA_Host  output buffer size =     4.01 MiB
llama_kv_cache:      CUDA0 KV buffer size =  2560.00 MiB
llama_kv_cache: size = 2560.00 MiB ( 32768 cells,  10 layers,  4/1 seqs), K (q8_0): 1280.00 MiB, V (q8_0): 1280.00 MiB
resolve_fused_ops: Flash Attention enabled
sched_reserve:      CUDA0 compute buffer size =   522.63 MiB
sched_reserve:  CUDA_Host compute buffer size =   146.07 MiB
"""


def server_full(host_mib: str) -> str:
    return SERVER_FULL.replace("{host}", host_mib)


# -- gpu: the host allowance is the token embeddings ----------------------------------------------------------


def test_full_offload_keeps_only_token_embeddings_on_host() -> None:
    p = placement_from_log(RPC_FITS, token_embd_bytes=TOKEN_EMBD_270M)
    assert p.verdict == "gpu"
    assert (p.layers_on_gpu, p.layers_total) == (19, 19)
    assert p.host_model_bytes == TOKEN_EMBD_270M
    assert p.host_allowed_bytes == TOKEN_EMBD_270M + HOST_SLACK_BYTES + round(TOKEN_EMBD_270M * 0.01)
    assert not p.host_allowed_is_bound
    assert p.reason.startswith("19/19 layers on RPC0; host keeps 170.0 MiB of weights")
    assert "(exact)" in p.reason
    rpc, cpu = p.devices
    assert (rpc.name, rpc.is_gpu, cpu.name, cpu.is_gpu) == ("RPC0", True, "CPU", False)
    assert rpc.model_bytes == round(235.16 * MiB)
    assert rpc.kv_bytes == round(6.38 * MiB) + round(19.92 * MiB)  # both iSWA KV buffers count
    assert rpc.compute_bytes == round(23.55 * MiB)
    assert (cpu.model_bytes, cpu.output_bytes, cpu.compute_bytes) == (TOKEN_EMBD_270M, 4 * MiB, round(9.55 * MiB))
    assert summary_line(p) == "100% GPU: 19/19 layers on RPC0, 285.0 MiB used"


@pytest.mark.parametrize(
    ("token_embd", "verdict"),
    [
        (TOKEN_EMBD_270M, "gpu"),
        # 170.00 MiB of host weights against an allowance of 166.0 MiB + 1 MiB + 1% = 168.7 MiB
        (166 * MiB, "spill"),
        # the allowance is inclusive: 167.3 MiB + 1 MiB + 1% (1.673 MiB) = 170.0 MiB, the host weights exactly
        (round((170 * MiB - HOST_SLACK_BYTES) / 1.01), "gpu"),
        (round((170 * MiB - HOST_SLACK_BYTES) / 1.01) - 1, "spill"),
    ],
)
def test_host_allowance_threshold_is_exact(token_embd: int, verdict: str) -> None:
    p = placement_from_log(RPC_FITS, token_embd_bytes=token_embd)
    assert p.verdict == verdict
    if verdict == "spill":
        assert p.reason.startswith("19/19 layers on the GPU, but 170.0 MiB of weights stay in host memory")
        assert summary_line(p) == "spill: 19/19 layers on the GPU, but 170.0 MiB of weights in host memory"


def test_bound_from_n_vocab_and_n_embd_when_no_gguf() -> None:
    # no file type in the log: 262144 x 5376 x 4 bytes (+ 1 MiB + 1%), the bound for any type
    p = placement_from_log(server_full("1102.50"))
    assert p.verdict == "gpu"
    assert p.host_allowed_is_bound
    assert p.host_allowed_bytes == 262144 * 5376 * 4 + MiB + round(262144 * 5376 * 4 * 0.01)
    assert "a bound from the log" in p.reason and "no file type in the log: at most 32 bits" in p.reason
    assert (p.n_ctx, p.n_ctx_per_slot, p.n_slots, p.type_k, p.type_v, p.flash_attn) == (
        32768, 32768, 4, "q8_0", "q8_0", True,
    )  # fmt: skip
    cuda, cpu = p.devices
    assert cuda.name == "CUDA0" and cuda.output_bytes == 0
    assert cpu.output_bytes == round(4.01 * MiB) and cpu.compute_bytes == round(146.07 * MiB)
    over = placement_from_log(server_full("5500.00"))
    assert over.verdict == "spill" and "a bound from the log" in over.reason


@pytest.mark.parametrize(
    ("extra", "per_value"),
    [
        ("print_info: file type   = Q4_K - Medium\n", 34 / 32),  # main type, Q6_K when tied, Q8_0: at most Q8_0
        ("print_info: file type   = BF16\n", 2.0),
        ("print_info: file type   = all F32\n", 4.0),
        ("print_info: file type   = Q4_K - Medium\ntensor token_embd.weight (q6_K) buffer type overridden to CPU\n",
         210 / 256),  # the per-tensor line names the type: exact bytes per value
    ],
)  # fmt: skip
def test_embedding_bytes_from_file_type_or_tensor_line(extra: str, per_value: float) -> None:
    p = placement_from_log(extra + server_full("1102.50"))
    embd = round(262144 * 5376 * per_value)
    assert p.host_allowed_bytes == embd + MiB + round(embd * 0.01)
    assert p.verdict == ("gpu" if p.host_allowed_bytes >= 1102.5 * MiB else "spill")


def test_without_any_allowance_host_weights_bigger_than_gpu_weights_spill() -> None:
    # memory-model.md §7a: "offloaded 33/33" with the weights fallen back to the host
    text = (
        "load_tensors: offloaded 33/33 layers to GPU\n"
        "load_tensors:        CUDA0 model buffer size =     1.02 MiB\n"
        "load_tensors:   CPU_Mapped model buffer size = 15317.02 MiB\n"
    )
    p = placement_from_log(text)
    assert p.verdict == "spill" and p.host_allowed_bytes is None
    assert "15.0 GiB of weights stay in host memory against 1.0 MiB on the GPU" in p.reason
    # issue 17: never 100% GPU while the log cannot size the host weights against the token embeddings
    small_host = placement_from_log(RPC_FITS)
    assert small_host.verdict == "incomplete" and "pass --model" in small_host.reason
    tiny_host = placement_from_log(RPC_FITS.replace("170.00 MiB", "0.50 MiB"))
    assert tiny_host.verdict == "gpu"


def test_cpu_moe_full_count_is_a_spill() -> None:
    # ggml-org/llama.cpp#22319 (-cmoe): 44/44 "offloaded", experts in four CPU_Mapped buffers
    text = "\n".join(
        [
            "load_tensors: offloaded 44/44 layers to GPU",
            *(f"load_tensors:   CPU_Mapped model buffer size = {mib} MiB" for mib in
              ("43780.02", "45255.08", "45257.27", "20628.57")),
            "load_tensors:        CUDA0 model buffer size = 24202.74 MiB",
        ]
    )  # fmt: skip
    p = placement_from_log(text, token_embd_bytes=540 * MiB)
    assert p.verdict == "spill"
    assert p.host_model_bytes == round(154920.94 * MiB)  # llamalog sums the four lines, in MiB
    assert summary_line(p) == "spill: 44/44 layers on the GPU, but 151.3 GiB of weights in host memory"


# -- spill, cpu-only, incomplete ------------------------------------------------------------------------------


def test_partial_offload_names_the_counts() -> None:
    text = (
        "load_tensors: offloaded 12/49 layers to GPU\n"
        "load_tensors:        CUDA0 model buffer size =  4300.00 MiB\n"
        "load_tensors:   CPU_Mapped model buffer size = 13391.34 MiB\n"
    )
    p = placement_from_log(text, token_embd_bytes=300 * MiB)
    assert p.verdict == "spill"
    assert p.reason == "12/49 layers on the GPU, 37 on the CPU"
    assert summary_line(p) == "spill: 12/49 layers on the GPU, 37 on the CPU"


def test_zero_layers_and_no_gpu_are_cpu_only() -> None:
    zero = placement_from_log(
        "llm_load_tensors: offloaded 0/33 layers to GPU\nllm_load_tensors:        CPU buffer size =  5459.93 MiB\n"
    )
    assert zero.verdict == "cpu-only" and zero.reason == "0/33 layers on the GPU"
    assert summary_line(zero) == "CPU only: 0/33 layers on the GPU"
    # ggml-org/llama.cpp#20490: a CPU-only build prints "offloaded 49/49 layers to GPU"
    build = placement_from_log(
        "load_tensors: offloaded 49/49 layers to GPU\n"
        "load_tensors:   CPU_Mapped model buffer size = 47011.44 MiB\n"
        "load_tensors:   CPU_REPACK model buffer size = 27650.53 MiB\n"
    )
    assert build.verdict == "cpu-only"
    assert build.reason.startswith("no GPU on this machine (the log says 49/49 offloaded")
    assert summary_line(build) == "CPU only: no GPU on this machine"
    assert [d.name for d in build.devices] == ["CPU"]


def test_no_offload_line_and_no_error_is_incomplete() -> None:
    p = placement_from_log("print_info: n_vocab               = 262144\nload_tensors: loading model tensors\n")
    assert p.verdict == "incomplete"
    assert summary_line(p).startswith("incomplete: the log ends before the model was placed")
    assert placement_from_log("").verdict == "incomplete"


# -- out of memory --------------------------------------------------------------------------------------------

OOM_TEXTS = [
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4507.00 MiB on device 0: cudaMalloc failed: out of memory",
    "CUDA error: out of memory",
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 1024.00 MiB on device 0: hipMalloc failed: out of memory",
    "E ROCm error: out of memory",
    "error: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
    "ggml_vulkan: vk::Device::allocateMemory: ErrorOutOfDeviceMemory",
    "ggml_vulkan: Requested buffer size exceeds device memory allocation limit: ErrorOutOfDeviceMemory",
    "ggml_gallocr_reserve_n: failed to allocate CUDA0 buffer of size 4725934080",
    "llama_model_load: error loading model: unable to allocate CUDA0 buffer",
    "E alloc_tensor_range: failed to allocate RPC0[127.0.0.1:50113] buffer of size 246587904",
    "llama_kv_cache_init: failed to allocate buffer for kv cache",
]


@pytest.mark.parametrize("line", OOM_TEXTS)
def test_out_of_memory_texts(line: str) -> None:
    p = placement_from_log(RPC_FITS + line + "\n", token_embd_bytes=TOKEN_EMBD_270M)
    assert p.verdict == "oom"
    assert p.errors == [line]
    assert p.reason == f"out of memory: {line}"
    assert summary_line(p) == f"out of memory: {line}"


def test_warnings_and_retries_are_not_the_outcome() -> None:
    pinned = "ggml_cuda_host_malloc: failed to allocate 1900.00 MiB of pinned memory: out of memory"
    assert placement_from_log(RPC_FITS + pinned + "\n", token_embd_bytes=TOKEN_EMBD_270M).verdict == "gpu"
    # ggml-org/llama.cpp#26297: the allocation fails with pipeline parallelism, the retry without it succeeds
    retried = RPC_FITS + (
        "1.06.520.077 E ggml_backend_cuda_buffer_type_alloc_buffer: allocating 51748.72 MiB on device 1: "
        "cudaMalloc failed: out of memory\n"
        "1.06.520.084 E ggml_gallocr_reserve_n_impl: failed to allocate CUDA1 buffer of size 54262464512\n"
        "1.06.520.086 E graph_reserve: failed to allocate compute buffers\n"
        "1.06.520.107 W sched_reserve: compute buffer allocation failed, retrying without pipeline parallelism\n"
        "1.07.304.130 I srv    load_model: initializing, n_slots = 1, n_ctx_slot = 50176, kv_unified = 'false'\n"
    )
    p = placement_from_log(retried, token_embd_bytes=TOKEN_EMBD_270M)
    assert p.verdict == "gpu" and p.errors == []
    # ...but an allocation failing after the retry is the outcome
    again = retried + "1.08.000.000 E graph_reserve: failed to allocate compute buffers\n"
    assert placement_from_log(again).verdict == "oom"


def test_metal_status_5_counts_unless_metal_names_another_cause() -> None:
    status = "ggml_metal_graph_compute: command buffer 0 failed with status 5"
    assert oom_lines([status]) == [status]
    # ggml-org/llama.cpp#8886: the GPU ignored submissions after earlier errors, not memory
    ignored = "error: Ignored (for causing prior/excessive GPU errors) (00000004:kIOAccelCommandBufferCallbackErrorSubmissionsIgnored)"
    assert oom_lines([status, ignored]) == []
    oom = "error: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"
    assert oom_lines([status, oom]) == [status, oom]
    # the reason quotes the line that names memory
    p = placement_from_log(RPC_FITS + status + "\n" + oom + "\n")
    assert p.reason == f"out of memory: {oom}"


def test_last_load_decides_and_fit_is_reported() -> None:
    failed_probe = (
        "llama_model_loader: loaded meta data with 40 key-value pairs and 808 tensors from m.gguf\n"
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 35533.34 MiB on device 0: cudaMalloc failed: out of memory\n"
        "llama_model_load: error loading model: unable to allocate CUDA0 buffer\n"
    )
    second = "llama_model_loader: loaded meta data with 40 key-value pairs and 808 tensors from m.gguf\n" + RPC_FITS
    assert placement_from_log(failed_probe + second, token_embd_bytes=TOKEN_EMBD_270M).verdict == "gpu"
    assert placement_from_log(second + failed_probe).verdict == "oom"
    # memory-model.md §6: a --fit failure is not fatal; the load goes on with the user's settings
    fit_failed = (
        "common_params_fit_impl: projected to use 24840 MiB of device memory vs. 22341 MiB of free device memory\n"
        "common_fit_params: failed to fit params to free device memory: model_params::tensor_buft_overrides "
        "already set by user, abort\n"
    )
    p = placement_from_log(fit_failed + RPC_FITS, token_embd_bytes=TOKEN_EMBD_270M)
    assert p.verdict == "gpu"
    assert p.reason.endswith("; --fit failed: model_params::tensor_buft_overrides already set by user, abort")
    # fit lowered the layer count: the final offload line decides
    fitted = "common_params_fit: successfully fit params to free device memory\n" + RPC_FITS.replace("19/19", "12/19")
    p = placement_from_log(fitted)
    assert (
        p.verdict == "spill"
        and p.reason == "12/19 layers on the GPU, 7 on the CPU; --fit fitted the parameters; the final load decides"
    )


def test_header_block_is_skipped() -> None:
    text = "# source: a/b#1\n# verdict: gpu\n\n" + RPC_FITS
    assert strip_header(text) == RPC_FITS.rstrip("\n")
    assert placement_from_log(text).layers_total == 19


# -- devices --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("buffer", "device"),
    [
        ("RPC0[127.0.0.1:50111]", "RPC0"),
        ("CUDA0", "CUDA0"),
        ("Metal_Mapped", "Metal"),
        ("MTL0_Mapped", "MTL0"),
        ("CUDA_Host", "CPU"),
        ("ROCm_Host", "CPU"),
        ("CPU_REPACK", "CPU"),
        ("CPU_Mapped", "CPU"),
        ("Radeon RX 580 Series", "Radeon RX 580 Series"),
    ],
)
def test_device_names(buffer: str, device: str) -> None:
    assert device_name(buffer) == device


def test_gpu_order_follows_using_device_lines_else_names() -> None:
    # ggml-org/llama.cpp#16725 prints ROCm1's buffer before ROCm0's
    text = (
        "load_tensors: offloaded 81/81 layers to GPU\n"
        "load_tensors:        ROCm1 model buffer size = 10788.36 MiB\n"
        "load_tensors:        ROCm0 model buffer size = 22292.66 MiB\n"
        "load_tensors:   CPU_Mapped model buffer size =   688.88 MiB\n"
    )
    assert [d.name for d in placement_from_log(text).devices] == ["ROCm0", "ROCm1", "CPU"]
    listed = (
        "llama_model_load_from_file_impl: using device ROCm1 (AMD Radeon RX 7900 XTX) (0000:03:00.0) - 24000 MiB free\n"
        "llama_model_load_from_file_impl: using device ROCm0 (AMD Radeon RX 7900 XTX) (0000:04:00.0) - 24000 MiB free\n"
    )
    assert [d.name for d in placement_from_log(listed + text).devices] == ["ROCm1", "ROCm0", "CPU"]


def test_llamalog_reads_vocab_embd_and_described_gpu_buffers() -> None:
    log = llamalog.parse(
        "llm_load_print_meta: n_vocab          = 128256\n"
        "llm_load_print_meta: n_embd           = 8192\n"
        "print_info: n_embd_head_k    = 128\n"
        "llm_load_tensors: Radeon RX 580 Series buffer size =  1491.89 MiB\n"
        "llama_context: AMD Radeon RX 7600 (RADV GFX1102) compute buffer size =    10.00 MiB\n"
        "llama_new_context_with_model:        CPU input buffer size   =     9.01 MiB\n"
    )
    assert (log.n_vocab, log.n_embd) == (128256, 8192)
    assert [(b.name, b.kind, b.mib) for b in log.buffers] == [
        ("Radeon RX 580 Series", "model", 1491.89),
        ("AMD Radeon RX 7600 (RADV GFX1102)", "compute", 10.0),
    ]
    assert log.errors == []


# -- the plan's prediction ------------------------------------------------------------------------------------


def test_prediction_maps_gpu_i_to_ith_gpu_and_excludes_overhead() -> None:
    p = placement_from_log(RPC_FITS, token_embd_bytes=TOKEN_EMBD_270M)
    devices = [
        DeviceEstimate("CPU", "cpu", weights_bytes=TOKEN_EMBD_270M, compute_bytes=9 * MiB, output_bytes=4 * MiB),
        DeviceEstimate("GPU0", "rpc", weights_bytes=round(235.16 * MiB), kv_bytes=26 * MiB, recurrent_bytes=MiB,
                       compute_bytes=28 * MiB, overhead_bytes=256 * MiB),
    ]  # fmt: skip
    assert attach_prediction(p, devices) is p
    rpc, cpu = p.devices
    assert rpc.predicted == {"model": round(235.16 * MiB), "kv": 27 * MiB, "compute": 28 * MiB, "output": 0}
    assert rpc.predicted_bytes == round(235.16 * MiB) + 55 * MiB  # the 256 MiB overhead is not printed by llama.cpp
    assert cpu.predicted == {"model": TOKEN_EMBD_270M, "kv": 0, "compute": 9 * MiB, "output": 4 * MiB}
    assert summary_line(p) == "100% GPU: 19/19 layers on RPC0, 285.0 MiB used, 290.2 MiB predicted"
    # the same from DeviceEstimate.to_json() dicts
    q = attach_prediction(placement_from_log(RPC_FITS), [d.to_json() for d in devices])
    assert [d.predicted for d in q.devices] == [rpc.predicted, cpu.predicted]


def test_prediction_on_two_gpus_and_a_missing_host_device() -> None:
    text = (
        "load_tensors: offloaded 81/81 layers to GPU\n"
        "load_tensors:        CUDA0 model buffer size = 24277.75 MiB\n"
        "load_tensors:        CUDA2 model buffer size = 46151.91 MiB\n"
    )
    p = placement_from_log(text)
    attach_prediction(p, [
        DeviceEstimate("CPU", "cpu", weights_bytes=GiB),
        DeviceEstimate("GPU0", "cuda", weights_bytes=24 * GiB),
        DeviceEstimate("GPU1", "cuda", weights_bytes=45 * GiB),
        DeviceEstimate("GPU2", "cuda", weights_bytes=GiB),  # no third GPU in the log: left out
    ])  # fmt: skip
    assert [(d.name, d.predicted_bytes) for d in p.devices] == [
        ("CUDA0", 24 * GiB), ("CUDA2", 45 * GiB), ("CPU", GiB),
    ]  # fmt: skip
    assert p.devices[2].measured_bytes == 0 and not p.devices[2].is_gpu


def test_render_comparison() -> None:
    p = placement_from_log(RPC_FITS, token_embd_bytes=TOKEN_EMBD_270M)
    attach_prediction(p, [DeviceEstimate("GPU0", "rpc", weights_bytes=round(235.16 * MiB), kv_bytes=13 * MiB)])
    lines = render_comparison(p)
    assert lines[0].split() == ["device", "kind", "predicted", "measured", "difference"]
    rows = {tuple(line.split()[:2]): line for line in lines[1:]}
    assert rows[("RPC0", "model")].split()[2:] == ["235.2", "MiB", "235.2", "MiB", "+0.0", "MiB", "(+0.0%)"]
    assert rows[("RPC0", "kv")].split()[2:] == ["13.0", "MiB", "26.3", "MiB", "-13.3", "MiB", "(-50.6%)"]
    assert rows[("RPC0", "compute")].split()[2:] == ["0.0", "MiB", "23.6", "MiB", "-23.6", "MiB", "(-100.0%)"]
    assert rows[("CPU", "total")].split()[2:] == ["-", "183.6", "MiB"]
    p.devices[0].nvml_used_bytes = 512 * MiB
    assert render_comparison(p)[5].split() == ["RPC0", "NVML", "(process)", "512.0", "MiB"]


# -- Ollama ---------------------------------------------------------------------------------------------------


def test_ollama_entries() -> None:
    # backends.md §2's example entry
    entry = {"name": "gemma3", "size": 6591830464, "size_vram": 5333539264, "context_length": 4096}
    p = placement_from_ollama(entry, expected_ctx=4096)
    assert (p.verdict, p.source, p.n_ctx, p.context_mismatch) == ("spill", "ollama", 4096, False)
    assert p.reason == "81% on the GPU: 5.0 GiB of 6.1 GiB in VRAM, 1.2 GiB in system memory"
    gpu, cpu = p.devices
    assert (gpu.name, gpu.is_gpu, gpu.model_bytes) == ("GPU", True, 5333539264)
    assert (cpu.name, cpu.is_gpu, cpu.model_bytes) == ("CPU", False, 6591830464 - 5333539264)
    assert summary_line(p) == "spill: " + p.reason

    full = placement_from_ollama({"size": 5 * GiB, "size_vram": 5 * GiB, "context_length": 8192}, expected_ctx=8192)
    assert full.verdict == "gpu" and summary_line(full) == "100% GPU: all 5.0 GiB in VRAM"
    cpu_only = placement_from_ollama({"size": 5 * GiB, "size_vram": 0, "context_length": 8192}, expected_ctx=None)
    assert cpu_only.verdict == "cpu-only" and cpu_only.reason == "0% on the GPU: all 5.0 GiB in system memory"
    # a sliver in system memory is still a spill, never rounded up to 100%
    sliver = placement_from_ollama({"size": 1000 * MiB, "size_vram": 999 * MiB}, expected_ctx=None)
    assert sliver.verdict == "spill" and sliver.reason.startswith("99% on the GPU")
    assert placement_from_ollama({"size": 0, "size_vram": 0}, expected_ctx=None).verdict == "incomplete"


def test_ollama_context_mismatch() -> None:
    p = placement_from_ollama({"size": 5 * GiB, "size_vram": 5 * GiB, "context_length": 4096}, expected_ctx=32768)
    assert p.verdict == "gpu" and p.context_mismatch and p.expected_ctx == 32768
    assert p.reason.endswith("; context 4096, not the 32768 asked for")
    assert p.to_json()["context_mismatch"] is True


# -- NVML -----------------------------------------------------------------------------------------------------


def test_nvml_used_by_pid_sums_the_process_family() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        me = os.getpid()
        gpus = [
            FakeGpu("RTX 4090", "GPU-0", "00000000:01:00.0", 24 * GiB, 10 * GiB,
                    compute_processes=[(me, 100 * MiB), (child.pid, 2 * GiB), (999999, 5 * GiB)]),
            FakeGpu("RTX 4090", "GPU-1", "00000000:02:00.0", 24 * GiB, 1 * GiB,
                    compute_processes=[(999999, GiB)]),
            FakeGpu("RTX 4090", "GPU-2", "00000000:03:00.0", 24 * GiB, 1 * GiB,
                    compute_processes=[(child.pid, None)], graphics_processes=[(child.pid, 300 * MiB)]),
        ]  # fmt: skip
        used = nvml_used_by_pid(me, nvml=FakeNvml(gpus))
    finally:
        child.kill()
        child.wait()
    assert used == {0: 100 * MiB + 2 * GiB, 2: 300 * MiB}
    p = attach_nvml(placement_from_log(RPC_FITS), used)
    assert p.devices[0].nvml_used_bytes == 100 * MiB + 2 * GiB


def test_nvml_absent_is_none() -> None:
    import pynvml

    assert nvml_used_by_pid(1, nvml=FakeNvml(init_error=pynvml.NVMLError_DriverNotLoaded)) is None
    assert nvml_used_by_pid(1, nvml=object()) is None  # never raises, whatever the stand-in


def test_to_json_keeps_the_schema_fields() -> None:
    p = Placement("gpu", "x", devices=[DevicePlacement("CUDA0", model_bytes=1, is_gpu=True)])
    data = p.to_json()
    for key in ("verdict", "reason", "layers_on_gpu", "layers_total", "devices", "host_model_bytes",
                "host_allowed_bytes", "errors", "source", "n_ctx", "n_ctx_per_slot", "n_slots"):  # fmt: skip
        assert key in data
    assert data["devices"][0]["measured_bytes"] == 1


# -- the command ----------------------------------------------------------------------------------------------


@click.group(cls=_Group)
@click.option("--debug", is_flag=True)
def cli(debug: bool) -> None:
    pass


cli.add_command(verify)


def test_cli_reads_stdin_and_prints_people_text(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["verify", "-", "--expect", "incomplete"], input=RPC_FITS)
    assert result.exit_code == 0, result.output
    assert "incomplete: 19/19 layers on RPC0" in result.output
    result = CliRunner().invoke(cli, ["verify", "-"], input=RPC_FITS.replace("170.00 MiB", "0.50 MiB"))
    assert result.exit_code == 0, result.output
    assert "100% GPU: 19/19 layers on RPC0, 285.0 MiB used" in result.output
    assert "reason: 19/19 layers on RPC0; host keeps 512.0 KiB of weights" in result.output


def test_cli_missing_file_is_one_error_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["verify", str(tmp_path / "nope.log")])
    assert result.exit_code == 1
    assert (
        result.output.strip() == f"VerifyError: cannot read the log {tmp_path / 'nope.log'}: No such file or directory"
    )


def test_cli_model_gives_exact_allowance_and_prediction(gemma3_270m_path: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text(RPC_FITS)
    result = CliRunner().invoke(cli, ["verify", str(log), "--model", str(gemma3_270m_path), "--ctx", "4096", "--json"])
    assert result.exit_code == 0, result.output
    import json

    data = json.loads(result.output)
    assert data["verdict"] == "gpu"
    assert data["host_allowed_bytes"] == TOKEN_EMBD_270M + MiB + round(TOKEN_EMBD_270M * 0.01)
    assert data["host_allowed_is_bound"] is False
    rpc, cpu = data["devices"]
    # the weights are llama.cpp's own arithmetic: the prediction matches the printed buffers to the MiB
    assert abs(rpc["predicted"]["model"] - rpc["model_bytes"]) < MiB
    assert cpu["predicted"]["model"] == TOKEN_EMBD_270M == cpu["model_bytes"]
    assert rpc["predicted_bytes"] == sum(rpc["predicted"].values())


# -- issue 17: exit by verdict, one OOM classifier, mismatches, one NVML attach ------------------------------

OOM_LOG = RPC_FITS + "llama_model_load: error loading model: unable to allocate RPC0 buffer\n"
SPILL_LOG = RPC_FITS.replace("offloaded 19/19", "offloaded 12/19")
CPU_LOG = RPC_FITS.replace("offloaded 19/19", "offloaded 0/19")
GPU_LOG = RPC_FITS.replace("170.00 MiB", "0.50 MiB")


@pytest.mark.parametrize(
    ("text", "verdict", "status"),
    [
        (GPU_LOG, "gpu", 0),
        (SPILL_LOG, "spill", 3),
        (CPU_LOG, "cpu-only", 4),
        (OOM_LOG, "oom", 5),
        (RPC_FITS, "incomplete", 6),  # cannot tell the host weights from the token embeddings
        ("", "incomplete", 6),
        ("\x00\xff\xfe garbage \x1b[31m\n" * 50, "incomplete", 6),
    ],
)
def test_cli_exits_by_verdict(tmp_path: Path, text: str, verdict: str, status: int) -> None:
    log = tmp_path / "load.log"
    log.write_bytes(text.encode("utf-8", "surrogateescape"))
    result = CliRunner().invoke(cli, ["verify", str(log), "--json"])
    assert result.exit_code == status, result.output
    assert json.loads(result.output)["verdict"] == verdict
    assert EXIT_STATUS[verdict] == status
    allowed = CliRunner().invoke(cli, ["verify", str(log), "--expect", f"gpu,{verdict}"])
    assert allowed.exit_code == 0, allowed.output


def test_cli_expect_names_verdicts_only(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["verify", "-", "--expect", "gpu,fast"], input=GPU_LOG)
    assert result.exit_code == 2
    assert "'fast' is not a verdict; use gpu, spill, cpu-only, oom, incomplete" in result.output


def test_oom_line_is_the_one_classifier() -> None:
    pinned = "ggml_cuda_host_malloc: failed to allocate 1900.00 MiB of pinned memory: out of memory"
    cuda = "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 51748.72 MiB on device 1: cudaMalloc failed: out of memory"
    assert oom_line([pinned, "llama_context: n_ctx = 4096"]) is None
    assert oom_line([pinned, cuda, "graph_reserve: failed to allocate compute buffers"]) == cuda
    assert (
        oom_line([cuda, "sched_reserve: compute buffer allocation failed, retrying without pipeline parallelism"])
        is None
    )
    ollama = "model requires more system memory (12.3 GiB) than is available (8.0 GiB)"
    assert oom_line([ollama]) == ollama
    assert oom_line(["print_info: general.name = out of memory"]) is None  # the model's own strings
    assert is_oom_line("ErrorOutOfDeviceMemory") and not is_oom_line("unordered_map::at")
    assert oom_line(["x" * 5_000_000 + " out of memory"]) is None  # past MAX_LINE_CHARS: not read, and fast


def test_backends_use_the_one_classifier() -> None:
    import launcher.backends.llamacpp as llamacpp
    import launcher.backends.ollama as ollama

    assert not hasattr(llamacpp, "_OOM") and not hasattr(ollama, "_OOM")


def test_mismatch_names_device_kind_and_likely_cause() -> None:
    text = RPC_FITS.replace("(non-SWA, 4096 cells)", "").replace("(SWA, 2560 cells)", "")
    p = placement_from_log(
        text + "llama_kv_cache: creating     SWA KV cache, size = 2560 cells\n"
        "llama_kv_cache: size =   19.92 MiB (  2560 cells,  15 layers,  1/1 seqs), K (q8_0): 9.96 MiB, V (q8_0): 9.96 MiB\n",
        token_embd_bytes=TOKEN_EMBD_270M,
    )
    assert p.swa_cache
    attach_prediction(p, [
        {"name": "RPC0", "weights_bytes": 235 * MiB, "kv_bytes": 2 * MiB, "compute_bytes": 23 * MiB},
        {"name": "CPU", "weights_bytes": 170 * MiB, "compute_bytes": 60 * MiB},
    ])  # fmt: skip
    found = mismatches(p)
    assert [(m.device, m.kind) for m in found] == [("RPC0", "kv"), ("CPU", "compute")]
    kv, compute = found
    assert kv.cause.startswith("a full-size SWA cache (swa_full)")
    assert kv.line().startswith("mismatch: RPC0 kv predicted 2.0 MiB, measured 26.3 MiB (-92.4%): likely cause: a full")
    assert compute.cause.startswith("a smaller ubatch/n_batch than planned")
    assert p.to_json()["mismatches"][0] == kv.to_json() == {
        "device": "RPC0", "kind": "kv", "predicted_bytes": 2 * MiB, "measured_bytes": p.devices[0].kv_bytes,
        "cause": kv.cause,
    }  # fmt: skip
    # within max(5%, 16 MiB): said nowhere
    attach_prediction(
        p, [{"name": "RPC0", "weights_bytes": 235 * MiB, "kv_bytes": 20 * MiB, "compute_bytes": 23 * MiB}]
    )
    assert [(m.device, m.kind) for m in mismatches(p)] == [("CPU", "compute")]
    attach_prediction(p, [{"name": "RPC0", "kv_bytes": 2 * MiB}], type_k="f16")
    assert mismatches(p)[1].cause == "the server used a q8_0 KV cache, not the planned f16"


def test_cli_prints_the_mismatch_line(tmp_path: Path) -> None:
    from launcher.cli.render import render_placement

    p = placement_from_log(GPU_LOG)
    attach_prediction(
        p, [{"name": "RPC0", "weights_bytes": 135 * MiB, "kv_bytes": 26 * MiB, "compute_bytes": 23 * MiB}]
    )
    runner = CliRunner()
    with runner.isolation() as streams:
        render_placement(p)
        text = streams[0].getvalue().decode()
    assert (
        "mismatch: RPC0 model predicted 135.0 MiB, measured 235.2 MiB (-42.6%): likely cause: a different file" in text
    )


def test_attach_nvml_maps_nvml_index_to_the_servers_rank() -> None:
    used = {1: 3 * GiB}  # the server runs on NVML GPU 1 only (CUDA_VISIBLE_DEVICES=1): GPU 1 is its CUDA0
    p = attach_nvml(placement_from_log(GPU_LOG), used, visible=visible_nvml_indices({"CUDA_VISIBLE_DEVICES": "1"}))
    assert p.gpu_devices[0].nvml_used_bytes == 3 * GiB
    # without CUDA_VISIBLE_DEVICES, NVML GPU 1 is the server's second GPU: not this one-GPU server's device
    p = attach_nvml(placement_from_log(GPU_LOG), used, visible=None)
    assert p.gpu_devices[0].nvml_used_bytes is None
    assert visible_nvml_indices({}) is None
    assert visible_nvml_indices({"CUDA_VISIBLE_DEVICES": "2,0,x,1"}) == [2, 0]
    assert visible_nvml_indices({"CUDA_VISIBLE_DEVICES": "GPU-bb"}, ["GPU-aa", "GPU-bb"]) == [1]


def test_host_weights_evidence_proves_a_spill_whatever_the_sizes() -> None:
    moe = "tensor blk.3.ffn_up_exps.weight (q4_K) buffer type overridden to CPU\n" + GPU_LOG
    p = placement_from_log(moe, token_embd_bytes=TOKEN_EMBD_270M)
    assert p.verdict == "spill" and "1 expert tensors are in host buffers (blk.3.ffn_up_exps.weight in CPU)" in p.reason
    cmd = "main: llama-server -m x.gguf --n-cpu-moe 4 -ngl 99\n" + GPU_LOG
    assert placement_from_log(cmd).verdict == "spill"
    assert placement_from_log("main: llama-server --n-cpu-moe 0\n" + GPU_LOG).verdict == "gpu"


def test_older_vulkan_buffers_named_by_description_map_to_their_devices() -> None:
    """Older Vulkan builds print `Radeon RX 580 Series buffer size`: the start-up device list says which Vulkan
    device that is, so two different GPUs are two devices, each with its own figures."""
    log = "\n".join([
        "ggml_vulkan: Found 2 Vulkan devices:",
        "ggml_vulkan: 0 = Radeon RX 580 Series (RADV POLARIS10) (radv) | uma: 0 | fp16: 0 | warp size: 64",
        "ggml_vulkan: 1 = NVIDIA GeForce RTX 3060 (NVIDIA) | uma: 0 | fp16: 1 | warp size: 32",
        "llama_model_loader: loaded meta data with 30 key-value pairs and 291 tensors from m.gguf (version GGUF V3 (latest))",
        "llm_load_tensors: offloaded 33/33 layers to GPU",
        "llm_load_tensors: Radeon RX 580 Series buffer size =  1491.89 MiB",
        "llm_load_tensors: NVIDIA GeForce RTX 3060 buffer size =  2000.00 MiB",
        "llm_load_tensors:        CPU buffer size =    70.31 MiB",
        "llama_kv_cache_init: Radeon RX 580 Series KV buffer size =  512.00 MiB",
        "llama_kv_cache_init: NVIDIA GeForce RTX 3060 KV buffer size =  640.00 MiB",
    ])  # fmt: skip
    placement = placement_from_log(log)
    by_name = {d.name: d for d in placement.gpu_devices}
    assert sorted(by_name) == ["Vulkan0", "Vulkan1"]
    assert round(by_name["Vulkan0"].model_bytes / 2**20, 2) == 1491.89
    assert round(by_name["Vulkan1"].kv_bytes / 2**20, 2) == 640.0
    # two GPUs of one description cannot be told apart by it: the printed name stays
    same = log.replace("NVIDIA GeForce RTX 3060 (NVIDIA)", "Radeon RX 580 Series (RADV POLARIS10)")
    names = {d.name for d in placement_from_log(same).gpu_devices}
    assert "Radeon RX 580 Series" in names and not any(n.startswith("Vulkan") for n in names)


def test_cli_says_when_compute_moved_to_the_cpu(tmp_path: Path) -> None:
    """A load that is all on the GPU by memory but whose graph has more splits than a full offload needs: the
    verdict stays `gpu` (exit 0), and one line says compute probably ran on the CPU."""
    log = tmp_path / "nkvo.log"
    log.write_text(GPU_LOG + "\nsched_reserve: graph: nodes = 727, splits = 38, input objects = 4, input tensors = 9\n")
    done = CliRunner().invoke(verify, [str(log)])
    assert done.exit_code == 0, done.output
    assert "slow: 38 graph splits, a full offload needs 2: compute probably ran on the CPU" in done.output
    plain = tmp_path / "plain.log"
    plain.write_text(
        GPU_LOG + "\nsched_reserve: graph: nodes = 727, splits = 2, input objects = 4, input tensors = 9\n"
    )
    assert "graph splits" not in CliRunner().invoke(verify, [str(plain)]).output
