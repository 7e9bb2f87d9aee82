"""launcher.llamalog against literal log excerpts: lines captured from the llama.cpp that llama-cpp-python
0.3.36 vendors, llama-server's prefixed format, CUDA lines, and older builds' formats (memory-model.md §7)."""

from __future__ import annotations

import pytest

from launcher import llamalog
from launcher.llamalog import BufferLine, KVCacheLine, gpu_device, parse

# Captured from this llama.cpp: Gemma 3 270M Q4_K_M, no_alloc dry run, n_ctx 4096, swa_full off.
GEMMA3_270M_NO_ALLOC = """\
llama_model_loader: loaded meta data with 33 key-value pairs and 236 tensors from gemma-3-270m-q4_k_m.gguf (version GGUF V3 (latest))
print_info: file format = GGUF V3 (latest)
print_info: file type   = Q4_K - Medium
print_info: file size   = 235.16 MiB (7.36 BPW) 
print_info: arch                  = gemma3
print_info: no_alloc              = 1
print_info: n_ctx_train           = 32768
print_info: n_layer               = 18
print_info: n_swa                 = 512
print_info: model params          = 268.10 M
load: token to piece cache size = 1.9446 MB
load_tensors: loading model tensors, this can take a while... (load_mode = none)
load_tensors:          CPU model buffer size =     0.00 MiB
llama_context: constructing llama_context
llama_context: n_seq_max             = 1
llama_context: n_ctx                 = 4096
llama_context: n_ctx_seq             = 4096
llama_context: n_batch               = 2048
llama_context: n_ubatch              = 512
llama_context: causal_attn           = 1
llama_context: flash_attn            = auto
llama_context: kv_unified            = false
llama_context: n_ctx_seq (4096) < n_ctx_train (32768) -- the full capacity of the model will not be utilized
llama_context:        CPU  output buffer size =     1.00 MiB
llama_kv_cache_iswa: creating non-SWA KV cache, size = 4096 cells
llama_kv_cache:        CPU KV buffer size =     0.00 MiB
llama_kv_cache: size =   12.00 MiB (  4096 cells,   3 layers,  1/1 seqs), K (f16):    6.00 MiB, V (f16):    6.00 MiB
llama_kv_cache: attn_rot_k = 0, n_embd_head_k_all = 256
llama_kv_cache_iswa: creating     SWA KV cache, size = 1024 cells
llama_kv_cache:        CPU KV buffer size =     0.00 MiB
llama_kv_cache: size =   15.00 MiB (  1024 cells,  15 layers,  1/1 seqs), K (f16):    7.50 MiB, V (f16):    7.50 MiB
sched_reserve: reserving ...
resolve_fused_ops: Flash Attention enabled
sched_reserve:        CPU compute buffer size =   514.50 MiB
sched_reserve: graph: nodes = 727, splits = 1, input objects = 4, input tensors = 9
sched_reserve: reserve took 3.07 ms, sched copies = 1
"""  # noqa: W291

# Captured from this llama.cpp: the corpus' tiny granitehybrid (3 Mamba-2 layers + 1 attention layer).
GRANITE_HYBRID = """\
print_info: file type   = Q4_K - Medium
print_info: file size   = 1.84 MiB (4.87 BPW) 
print_info: arch                  = granitehybrid
print_info: model params          = 3.16 M
load_tensors:          CPU model buffer size =     0.00 MiB
llama_context: n_ctx                 = 4096
llama_context: n_ctx_seq             = 4096
llama_context: flash_attn            = auto
llama_context:        CPU  output buffer size =     0.00 MiB
llama_kv_cache:        CPU KV buffer size =     0.00 MiB
llama_kv_cache: size =    2.00 MiB (  4096 cells,   1 layers,  1/1 seqs), K (f16):    1.00 MiB, V (f16):    1.00 MiB
llama_memory_recurrent:        CPU RS buffer size =     0.40 MiB
llama_memory_recurrent: size =    0.40 MiB (     1 cells,   4 layers,  1 seqs  0 rs_seq), R (f32):    0.02 MiB, S (f32):    0.38 MiB, P (f32):    0.00 MiB
resolve_fused_ops: Flash Attention enabled
sched_reserve:        CPU compute buffer size =    12.18 MiB
"""  # noqa: W291

# Captured from this llama.cpp: tiny deepseek2 with MLA (only K is cached).
DEEPSEEK2_MLA = """\
llama_kv_cache: size =   10.00 MiB (  4096 cells,   4 layers,  1/1 seqs), K (f16):   10.00 MiB, V (f16):    0.00 MiB
"""

# llama-server (current, -lv 4) with the default prefix and timestamps, full CUDA offload, iSWA model.
SERVER_CUDA = """\
0.00.012.345 I llama_model_load_from_file_impl: using device CUDA0 (NVIDIA GeForce RTX 4090) (0000:01:00.0) - 23725 MiB free
0.00.040.720 I llama_model_loader: loaded meta data with 40 key-value pairs and 808 tensors from /models/gemma-3-27b-it-Q4_K_M.gguf (version GGUF V3 (latest))
0.00.051.001 I print_info: file size   = 15.40 GiB (4.91 BPW) 
0.00.051.002 I print_info: model params          = 27.01 B
0.01.100.000 I load_tensors: offloading output layer to GPU
0.01.100.001 I load_tensors: offloading 61 repeating layers to GPU
0.01.100.002 I load_tensors: offloaded 63/63 layers to GPU
0.01.100.003 I load_tensors:        CUDA0 model buffer size = 15188.27 MiB
0.01.100.004 I load_tensors:   CPU_Mapped model buffer size =  1102.50 MiB
0.02.000.000 I llama_context: n_seq_max             = 4
0.02.000.001 I llama_context: n_ctx                 = 32768
0.02.000.002 I llama_context: n_ctx_seq             = 32768
0.02.000.003 I llama_context: flash_attn            = auto
0.02.000.004 I llama_context: kv_unified            = true
0.02.000.005 I llama_context:  CUDA_Host  output buffer size =     4.01 MiB
0.02.000.006 I llama_kv_cache_iswa: creating non-SWA KV cache, size = 32768 cells
0.02.000.007 I llama_kv_cache:      CUDA0 KV buffer size =  2560.00 MiB
0.02.000.008 I llama_kv_cache: size = 2560.00 MiB ( 32768 cells,  10 layers,  4/1 seqs), K (f16): 1280.00 MiB, V (f16): 1280.00 MiB
0.02.000.009 I llama_kv_cache_iswa: creating     SWA KV cache, size = 4608 cells
0.02.000.010 I llama_kv_cache:      CUDA0 KV buffer size =  1872.00 MiB
0.02.000.011 I llama_kv_cache: size = 1872.00 MiB (  4608 cells,  52 layers,  4/1 seqs), K (f16):  936.00 MiB, V (f16):  936.00 MiB
0.02.100.000 I resolve_fused_ops: Flash Attention enabled
0.02.200.000 I sched_reserve:      CUDA0 compute buffer size =   522.63 MiB
0.02.200.001 I sched_reserve:  CUDA_Host compute buffer size =   146.07 MiB
"""  # noqa: W291

# 2024 builds (llama.cpp b3xxx, Ollama <= 0.5): llm_load_tensors / llama_new_context_with_model names.
OLD_2024 = """\
llm_load_print_meta: model ftype      = Q4_K - Medium
llm_load_print_meta: model size       = 4.58 GiB (4.89 BPW) 
llm_load_print_meta: model params     = 8.03 B
llm_load_tensors: ggml ctx size =    0.27 MiB
llm_load_tensors: offloading 32 repeating layers to GPU
llm_load_tensors: offloading non-repeating layers to GPU
llm_load_tensors: offloaded 33/33 layers to GPU
llm_load_tensors:        CPU buffer size =   281.81 MiB
llm_load_tensors:      CUDA0 buffer size =  4403.49 MiB
llama_new_context_with_model: n_ctx      = 8192
llama_new_context_with_model: n_batch    = 512
llama_new_context_with_model: n_ubatch   = 512
llama_new_context_with_model: flash_attn = 0
llama_kv_cache_init:      CUDA0 KV buffer size =  1024.00 MiB
llama_new_context_with_model: KV self size  = 1024.00 MiB, K (f16):  512.00 MiB, V (f16):  512.00 MiB
llama_new_context_with_model:  CUDA_Host  output buffer size =     0.49 MiB
llama_new_context_with_model:      CUDA0 compute buffer size =   560.00 MiB
llama_new_context_with_model:  CUDA_Host compute buffer size =    24.01 MiB
"""  # noqa: W291

# mid-2025 builds: llama_kv_cache_unified, "N seqs" without the stream count, older RS line.
MID_2025 = """\
llama_context: n_ctx_per_seq = 4096
llama_context: flash_attn    = 1
llama_kv_cache_unified:      CUDA0 KV buffer size =   512.00 MiB
llama_kv_cache_unified: size =  512.00 MiB (  4096 cells,  32 layers,  1 seqs), K (f16):  256.00 MiB, V (f16):  256.00 MiB
llama_memory_recurrent:      CUDA0 RS buffer size =    15.56 MiB
llama_memory_recurrent: size =   15.56 MiB (     1 cells,  48 layers,  1 seqs), R (f32):    0.56 MiB, S (f32):   15.00 MiB
llama_context:      CUDA0 compute buffer size =   300.75 MiB
"""


def test_real_gemma3_no_alloc_log() -> None:
    log = parse(GEMMA3_270M_NO_ALLOC)
    assert log.n_ctx == 4096 and log.n_ctx_seq == 4096 and log.n_seq_max == 1
    assert log.n_batch == 2048 and log.n_ubatch == 512
    assert log.flash_attn_setting == "auto" and log.flash_attn is True
    assert log.kv_unified is False
    assert log.arch == "gemma3" and log.n_layer == 18 and log.n_ctx_train == 32768
    assert log.file_type == "Q4_K - Medium" and log.file_size_mib == 235.16 and log.bpw == 7.36
    assert log.n_params == pytest.approx(268.10e6)
    # no_alloc prints 0.00 for model and KV buffers; the two KV lines are summed into one figure
    assert BufferLine("CPU", "model", 0.0) in log.buffers
    assert BufferLine("CPU", "KV", 0.0) in log.buffers
    assert log.total_mib("compute") == 514.50
    assert log.total_mib("output") == 1.00
    assert len([b for b in log.buffers if b.kind == "KV"]) == 1
    assert log.kv_caches == [
        KVCacheLine(12.0, 4096, 3, 1, 1, "f16", 6.0, "f16", 6.0, role="non-SWA"),
        KVCacheLine(15.0, 1024, 15, 1, 1, "f16", 7.5, "f16", 7.5, role="SWA"),
    ]
    assert log.kv_mib == 27.0
    assert log.offloaded_layers is None
    assert log.errors == []
    assert log.n_loads == 1


def test_real_hybrid_rs_lines() -> None:
    log = parse(GRANITE_HYBRID)
    assert log.total_mib("RS") == 0.40
    assert log.total_mib("KV") == 0.0
    [rs] = log.rs_caches
    assert (rs.cells, rs.layers, rs.seqs, rs.rs_seq) == (1, 4, 1, 0)
    assert (rs.r_type, rs.r_mib, rs.s_type, rs.s_mib, rs.p_type, rs.p_mib) == ("f32", 0.02, "f32", 0.38, "f32", 0.0)
    assert log.rs_mib == 0.40
    [kv] = log.kv_caches
    assert (kv.cells, kv.layers, kv.total_mib) == (4096, 1, 2.0)
    assert log.n_params == pytest.approx(3.16e6)


def test_real_mla_line_has_no_v() -> None:
    [kv] = parse(DEEPSEEK2_MLA).kv_caches
    assert (kv.k_type, kv.k_mib, kv.v_type, kv.v_mib, kv.layers) == ("f16", 10.0, "f16", 0.0, 4)


def test_server_prefixed_cuda_log() -> None:
    log = parse(SERVER_CUDA)
    assert [d.name for d in log.devices] == ["CUDA0"]
    assert log.devices[0].free_mib == 23725
    assert log.devices[0].description.startswith("NVIDIA GeForce RTX 4090")
    assert log.offloaded_layers == (63, 63)
    assert log.total_mib("model") == pytest.approx(15188.27 + 1102.50)
    assert log.total_mib("model", gpu_only=True) == 15188.27
    # both iSWA KV buffer lines count
    assert log.total_mib("KV") == 2560.00 + 1872.00
    assert log.total_mib("KV", device="CUDA0") == 4432.0
    assert [c.cells for c in log.kv_caches] == [32768, 4608]
    assert [c.role for c in log.kv_caches] == ["non-SWA", "SWA"]
    assert log.kv_caches[0].seqs == 4 and log.kv_caches[0].streams == 1
    assert log.kv_unified is True and log.n_seq_max == 4
    assert log.flash_attn is True
    assert log.total_mib("compute") == pytest.approx(522.63 + 146.07)
    assert log.total_mib("compute", gpu_only=True) == 522.63
    assert log.by_device() == {
        "CUDA0": {"model": 15188.27, "KV": 4432.0, "compute": 522.63},
        "host": {"model": 1102.5, "output": 4.01, "compute": 146.07},
    }
    assert log.file_size_mib == pytest.approx(15.40 * 1024)
    assert log.n_params == pytest.approx(27.01e9)


def test_old_2024_format() -> None:
    log = parse(OLD_2024)
    assert log.offloaded_layers == (33, 33)
    assert log.total_mib("model") == pytest.approx(281.81 + 4403.49)
    assert log.total_mib("model", device="CUDA0") == 4403.49
    assert log.total_mib("KV") == 1024.0
    assert log.total_mib("output") == 0.49
    assert log.total_mib("compute") == pytest.approx(584.01)
    assert log.n_ctx == 8192 and log.n_ubatch == 512
    assert log.flash_attn is False and log.flash_attn_setting == "0"
    [kv] = log.kv_caches
    assert kv.cells is None and kv.total_mib == 1024.0 and kv.k_mib == 512.0
    assert log.file_type == "Q4_K - Medium"
    assert log.file_size_mib == pytest.approx(4.58 * 1024)
    assert log.n_params == pytest.approx(8.03e9)
    # "ggml ctx size" is not a buffer
    assert all(b.mib != 0.27 for b in log.buffers)


def test_mid_2025_format() -> None:
    log = parse(MID_2025)
    assert log.n_ctx_seq == 4096
    assert log.flash_attn is True
    [kv] = log.kv_caches
    assert (kv.cells, kv.layers, kv.seqs, kv.streams) == (4096, 32, 1, None)
    [rs] = log.rs_caches
    assert rs.rs_seq is None and rs.p_type is None and rs.s_mib == 15.0
    assert log.total_mib("RS") == 15.56
    assert log.total_mib("compute") == 300.75


def test_several_loads_keep_the_last() -> None:
    probe = SERVER_CUDA.replace("15188.27", "9999.00").replace("2560.00 MiB\n", "1.00 MiB\n", 1)
    log = parse(probe + SERVER_CUDA)
    assert log.n_loads == 2
    assert log.total_mib("model", gpu_only=True) == 15188.27
    assert log.total_mib("KV") == 4432.0
    assert len(log.devices) == 1
    assert log.earlier[0].total_mib("model", gpu_only=True) == 9999.00
    # a log without device lines splits at "loaded meta data"
    two = GEMMA3_270M_NO_ALLOC + GEMMA3_270M_NO_ALLOC.replace("514.50", "100.00")
    assert parse(two).total_mib("compute") == 100.00
    assert parse(two).n_loads == 2


def test_flash_attention_resolution() -> None:
    base = "llama_context: flash_attn            = auto\n"
    assert parse(base).flash_attn is None
    assert parse(base + "resolve_fused_ops: Flash Attention enabled\n").flash_attn is True
    off = "resolve_fused_ops: Flash Attention not supported, set to disabled\n"
    assert parse(base + off).flash_attn is False
    # late-2025 wording
    assert parse(base + "llama_context: Flash Attention was auto, set to enabled\n").flash_attn is True
    assert parse("llama_context: flash_attn            = enabled\n").flash_attn is True
    assert parse("llama_context: flash_attn            = disabled\n").flash_attn is False
    forced = "llama_init_from_model: enabling flash_attn since it is required for quantized V cache\n"
    assert parse(forced + "llama_context: flash_attn            = enabled\n").flash_attn is True


def test_errors_and_fit_lines() -> None:
    text = (
        "llama_init_from_model: quantized V cache requires flash_attn to be enabled\n"
        "common_params_fit_impl: projected to use 35754 MiB of device memory vs. 30733 MiB of free device memory\n"
        "common_params_fit: failed to fit params to free device memory: n_gpu_layers already set by user\n"
    )
    log = parse(text)
    assert log.errors == ["llama_init_from_model: quantized V cache requires flash_attn to be enabled"]
    assert log.fit == "failed" and log.fit_message == "n_gpu_layers already set by user"
    assert parse("common_params_fit: successfully fit params to free device memory\n").fit == "ok"


def test_memory_breakdown_table() -> None:
    text = """\
llama_memory_breakdown_print: | memory breakdown [MiB] | total   free    self   model   context   compute    unaccounted |
llama_memory_breakdown_print: |   - CUDA0 (RTX 5090)   | 32606 = 30330 + (21832 = 16386 +    4950 +     495) +      -19555 |
llama_memory_breakdown_print: |   - Host               |                   1234 =  1000 +     200 +      34                |
"""
    gpu, host = parse(text).breakdown
    assert (gpu.name, gpu.description) == ("CUDA0", "RTX 5090")
    assert (gpu.total_mib, gpu.free_mib, gpu.self_mib, gpu.model_mib, gpu.context_mib, gpu.compute_mib) == (
        32606,
        30330,
        21832,
        16386,
        4950,
        495,
    )
    assert gpu.unaccounted_mib == -19555
    assert (host.name, host.self_mib, host.model_mib, host.context_mib, host.compute_mib) == (
        "Host",
        1234,
        1000,
        200,
        34,
    )
    assert host.total_mib is None


def test_line_iterables_and_noise() -> None:
    chunks = ["noise without a colon\n", "llama_context:        CPU compute buffer size =     8.51 MiB\nrandom: x\n"]
    assert parse(chunks).total_mib("compute") == 8.51
    assert parse("").buffers == [] and parse("").n_ctx is None


@pytest.mark.parametrize(
    ("name", "device"),
    [
        ("CPU", None),
        ("CPU_Mapped", None),
        ("CPU_REPACK", None),
        ("CUDA_Host", None),
        ("AMX", None),
        ("CUDA0", "CUDA0"),
        ("ROCm1", "ROCm1"),
        ("Metal_Mapped", "Metal"),
        ("Vulkan0", "Vulkan0"),
    ],
)
def test_gpu_device(name: str, device: str | None) -> None:
    assert gpu_device(name) == device


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(ValueError):
        parse("").total_mib("weights")
    assert set(llamalog.KINDS) == {"model", "KV", "RS", "compute", "output"}
