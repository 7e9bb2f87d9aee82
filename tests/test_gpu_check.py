"""scripts/gpu_check and scripts/gpu_bundle: the header-only real-size models they make, the budgets they set, the
CPU subset run for real (no GPU here), and the size of what a device run carries."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import corpus_real
import gguf
import psutil
import pytest

from launcher.gguf import read_header

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
GiB = 2**30


def load_script(name: str) -> ModuleType:
    """A script of scripts/ (no .py suffix) as a module."""
    module_name = name.replace("-", "_")
    loader = importlib.machinery.SourceFileLoader(module_name, str(ROOT / "scripts" / name))
    spec = importlib.util.spec_from_loader(module_name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


gpu_check = load_script("gpu_check")
gpu_bundle = load_script("gpu_bundle")


# --- the header-only models: the layout of a real Q4_K_M file ---------------------------------------------------

# Sizes of the published Q4_K_M files (Hugging Face listings, in GB): the type mix, not only the shapes, is right.
PUBLISHED_Q4_K_M_GB = {
    "real_llama31_8b": 4.92,
    "real_qwen3_14b": 9.00,
    "real_qwen3_30b_a3b": 18.6,
    "real_gemma3_12b": 7.30,
    "real_llama31_70b": 42.5,
}


@pytest.mark.parametrize("builder", sorted(gpu_check.GPU_MODELS.values()))
def test_header_only_model_has_the_real_q4_k_m_layout(builder: str, tmp_path: Path) -> None:
    model = getattr(corpus_real, builder)("Q4_K_M")
    path = tmp_path / f"{model.name}-Q4_K_M.gguf"
    size = corpus_real.write_sparse(model, path, pieces=gpu_check.WARMUP_PIECES)
    assert path.stat().st_size == size
    assert path.stat().st_blocks * 512 < 64 * MiB  # a hole, not gigabytes of zeros
    assert abs(size / 1e9 - PUBLISHED_Q4_K_M_GB[builder]) < 0.015 * PUBLISHED_Q4_K_M_GB[builder]

    header = read_header(path)  # fitquant's parser: header bytes only
    assert [t.name for t in header.tensors] == [name for name, _, _ in model.tensors]
    offset = 0
    for tensor, (name, shape, type_name) in zip(header.tensors, model.tensors, strict=True):
        assert gguf.GGMLQuantizationType(tensor.ggml_type).name == type_name, name
        assert tensor.shape == shape, name
        assert tensor.offset == offset, f"{name} is not where the previous tensor ends"
        offset += tensor.n_bytes + (-tensor.n_bytes % header.alignment)
    assert header.data_offset + offset == size  # the data region is exactly the tensors, as in a converted file
    assert sum(t.n_bytes for t in header.tensors) == model.weight_bytes
    assert header.metadata["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M


def test_quant_mixes_follow_llama_quant_cpp() -> None:
    def types(model: corpus_real.RealModel) -> dict[str, str]:
        return {name: type_name for name, _, type_name in model.tensors}

    q4 = types(corpus_real.real_llama31_8b("Q4_K_M"))
    assert (q4["output.weight"], q4["token_embd.weight"]) == ("Q6_K", "Q4_K")
    assert (q4["blk.0.attn_v.weight"], q4["blk.4.attn_v.weight"], q4["blk.6.ffn_down.weight"]) == (
        "Q6_K",
        "Q4_K",
        "Q6_K",
    )
    q3 = types(corpus_real.real_llama31_8b("Q3_K_M"))
    assert (q3["blk.1.attn_v.weight"], q3["blk.2.attn_v.weight"], q3["blk.0.ffn_down.weight"]) == (
        "Q5_K",
        "Q4_K",
        "Q5_K",
    )
    assert (q3["blk.2.ffn_down.weight"], q3["blk.2.attn_output.weight"], q3["blk.2.ffn_up.weight"]) == (
        "Q4_K",
        "Q4_K",
        "Q3_K",
    )
    q5 = types(corpus_real.real_llama31_8b("Q5_K_M"))
    assert (q5["blk.4.attn_v.weight"], q5["blk.4.ffn_up.weight"], q5["output.weight"]) == ("Q5_K", "Q5_K", "Q6_K")
    # LLM_TYPE_70B: a Q3_K/Q4_K attn_v becomes Q5_K
    assert types(corpus_real.real_llama31_70b("Q4_K_M"))["blk.20.attn_v.weight"] == "Q5_K"
    assert types(corpus_real.real_llama31_70b("Q3_K_M"))["blk.20.attn_v.weight"] == "Q5_K"
    # 576-wide rows are not whole 256-blocks: the 32-block fallbacks
    small = types(corpus_real.real_smollm2_135m("Q3_K_M"))
    assert (small["blk.3.attn_q.weight"], small["token_embd.weight"]) == ("Q4_0", "Q8_0")
    sizes = [corpus_real.real_qwen3_14b(q).weight_bytes for q in gpu_check.LADDER]
    assert sizes == sorted(sizes, reverse=True) and sizes[1] - sizes[2] > GiB  # a step-down frees real memory


def test_fitquant_reads_a_header_only_model_and_sizes_its_weights_exactly(tmp_path: Path) -> None:
    model = corpus_real.real_llama31_70b("Q4_K_M")
    path = tmp_path / "Llama-3.1-70B-Q4_K_M.gguf"
    size = corpus_real.write_sparse(model, path, pieces=gpu_check.WARMUP_PIECES)
    data_bytes = size - gguf.GGUFReader(path).data_offset  # the gguf package's reader agrees on the layout

    def fitquant(*args: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "launcher", *args, "--json"], capture_output=True, text=True,
                              timeout=120, cwd=ROOT)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    inspected = fitquant("inspect", str(path))
    assert (inspected["n_layer"], inspected["n_vocab"], inspected["file_type"]) == (80, 128256, "Q4_K_M")
    assert abs(inspected["n_params"] - 70.55e9) < 0.01e9
    assert inspected["tensor_bytes_total"] == data_bytes == model.weight_bytes
    estimate = fitquant("estimate", str(path), "--ctx", "8192", "--ngl", "all", "--vram", "200GiB")
    assert sum(d["weights_bytes"] for d in estimate["devices"]) == data_bytes


# --- budgets -----------------------------------------------------------------------------------------------------


def _config(budget: str) -> object:
    return gpu_check.Config("m", 8192, budget, "/models/m", "Q4_K_M", "Q3_K_M", "Q5_K_M", "Q3_K_M")


NEEDS = {"Q5_K_M": {"total": 6 * GiB}, "Q4_K_M": {"total": 5 * GiB}, "Q3_K_M": {"total": 4 * GiB}}


def test_fit_budget_reserves_so_that_the_first_choice_fits_and_the_one_above_does_not() -> None:
    budget, limit = gpu_check.budgets_for(_config("fit"), NEEDS, mode="gpu", free_bytes=100 * GiB, fit_measured=None)
    usable = 100 * GiB - budget.values["reserve_bytes"]
    assert 5 * GiB < usable < 6 * GiB
    assert usable - 5 * GiB == 512 * MiB
    assert "--vram" not in budget.args and limit == {}  # the real GPU, detected


def test_step_down_budget_leaves_half_the_gap_below_what_the_fit_run_measured() -> None:
    measured = {"process_bytes": 5 * GiB + 700 * MiB}  # NVML: the buffers plus the CUDA runtime
    budget, limit = gpu_check.budgets_for(
        _config("step-down"), NEEDS, mode="gpu", free_bytes=100 * GiB, fit_measured=measured
    )
    assert budget.args[budget.args.index("--vram") + 1] == str(
        100 * GiB
    )  # fitquant is told the memory before the ballast
    assert limit["device_bytes"] == 5 * GiB + 700 * MiB - GiB // 2
    assert limit["basis"] == "measured by the fit run"
    fit, _ = gpu_check.budgets_for(_config("fit"), NEEDS, mode="gpu", free_bytes=100 * GiB, fit_measured=None)
    assert budget.values["reserve_bytes"] == fit.values["reserve_bytes"]  # so the plan chooses Q4_K_M again


def test_gpu_report_states_what_was_measured() -> None:
    record = {
        "model": "llama-3.1-8b", "n_ctx": 8192, "budget": "step-down", "outcome": "verified", "verdict": "gpu",
        "attempts": [{"quant": "Q4_K_M", "n_ctx": 8192, "outcome": "oom", "detail": "cudaMalloc failed"},
                     {"quant": "Q3_K_M", "n_ctx": 8192, "outcome": "verified", "detail": "33/33 layers on CUDA0"}],
        "predicted": {"weights": 3610 * MiB, "kv": 544 * MiB, "compute": 80 * MiB, "output": 0, "overhead": 256 * MiB,
                      "total": 4490 * MiB},
        "printed": {"weights": 3610 * MiB, "kv": 544 * MiB, "compute": 258 * MiB, "output": 0, "total": 4412 * MiB},
        "used_bytes": 4900 * MiB, "runtime_overhead_bytes": 488 * MiB, "total_error_pct": -8.37,
    }  # fmt: skip
    gpu = gpu_check.Gpu("NVIDIA H200", "9.0", 143771 * MiB, "580.159.03")
    head, notes = gpu_check.statement("gpu", gpu, [record])
    assert head == "measured on NVIDIA H200 (140 GiB, driver 580.159.03)"
    assert "1 stepped down after a failed first attempt; failed attempts: 1 out of memory" in notes[0]
    report = {"mode": "gpu", "statement": head, "machine": gpu.describe(), "seconds": 1.0, "notes": notes,
              "llama_server": {"version": "v", "path": "p"}, "fitquant": "f", "configurations": [record]}  # fmt: skip
    table = gpu_check.markdown(report)
    assert "| total pred / NVML process | error |" in table
    assert ("| llama-3.1-8b | 8192 | step-down | Q4_K_M@8192: oom, Q3_K_M@8192: verified | gpu | 3,610 / 3,610 "
            "| 544 / 544 | 80 / 258 | 0 / 0 | 256 / 488 | 4,490 / 4,900 | -8.4% |") in table  # fmt: skip


# --- the bundle ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "kept"),
    [
        ("CMakeLists.txt", True),
        ("ggml/src/ggml-cuda/mmq.cu", True),
        ("ggml/src/ggml-cuda/template-instances/mmq-instance-q4_k.cu", True),
        ("ggml/src/ggml-rpc/ggml-rpc.cpp", True),
        ("tools/server/server.cpp", True),
        ("tools/ui/CMakeLists.txt", True),
        ("scripts/ui-assets.cmake", True),
        ("vendor/cpp-httplib/httplib.h", True),
        ("ggml/src/ggml-vulkan/ggml-vulkan.cpp", False),
        ("ggml/src/ggml-metal/ggml-metal.m", False),
        ("tools/ui/src/app.html", False),
        ("docs/ops/CUDA.csv", False),
        ("models/ggml-vocab-llama-bpe.gguf", False),
        ("scripts/compare-llama-bench.py", False),
        ("tests/test-backend-ops.cpp", False),
    ],
)
def test_bundle_keeps_what_a_cuda_server_build_compiles(path: str, kept: bool) -> None:
    assert gpu_bundle.keep_llama_cpp_path(path) is kept


BUNDLE = ROOT / "gpu_bundle"


@pytest.mark.skipif(
    not (BUNDLE / "bundle.json").exists(), reason="no gpu_bundle/: scripts/gpu_bundle makes it (network)"
)
def test_bundle_and_working_tree_fit_in_what_a_device_run_carries() -> None:
    manifest = json.loads((BUNDLE / "bundle.json").read_text())
    total = gpu_bundle.working_tree_bytes(ROOT, exclude=BUNDLE) + gpu_bundle.folder_bytes(BUNDLE)
    assert total < gpu_bundle.CARRY_LIMIT_BYTES, f"{total / MiB:.1f} MiB"
    wheels = {p.name for p in (BUNDLE / "wheels").glob("*.whl")}
    assert set(manifest["wheels"]) == wheels and manifest["fitquant_wheel"] in wheels
    names = {w.split("-")[0].lower().replace("_", "-") for w in wheels}
    assert {"fitquant", "gguf", "numpy", "pydantic", "pydantic-core", "nvidia-ml-py", "httpx", "click"} <= names
    with tarfile.open(BUNDLE / "llama.cpp.tar.gz") as tar:
        members = tar.getnames()
        assert "llama.cpp/CMakeLists.txt" in members and "llama.cpp/tools/server/server.cpp" in members
        assert any(m.startswith("llama.cpp/ggml/src/ggml-cuda/") for m in members)
        assert not any(m.startswith(("llama.cpp/docs/", "llama.cpp/models/", "llama.cpp/ggml/src/ggml-vulkan/"))
                       for m in members)  # fmt: skip
        head = tar.extractfile("llama.cpp/.git/HEAD")
        assert head is not None and head.read().decode().strip() == manifest["llama_cpp_commit"]


# --- the CPU subset, for real ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gpu_check_without_a_gpu_measures_the_cpu_subset_and_says_so(gemma3_270m_path: Path, tmp_path: Path) -> None:
    from rpc_device import built_binaries

    built_binaries()  # skips (or, under CI, fails) without scripts/build-llama-cpp's CPU build
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check"), "--cpu", "--out", str(out), "--work", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no GPU: measured the CPU subset only" in done.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert (report["mode"], report["statement"]) == ("cpu", "no GPU: measured the CPU subset only")
    assert "Not measured: GPU memory, CUDA buffers, NVML, the CUDA runtime overhead" in report["notes"][0]
    rows = {(r["model"], r["n_ctx"], r["budget"]): r for r in report["configurations"]}
    assert set(rows) == {(m, c, b) for m, (_, budgets) in gpu_check.CPU_MODELS.items() for b in budgets
                         for c in gpu_check.CPU_CONTEXTS}  # fmt: skip
    for key, r in rows.items():
        assert r["outcome"] == "verified", (key, r.get("error"))
        assert r["verdict"] == "gpu" and r["device"] == "RPC0", key
        # weights as llama.cpp printed them (two decimals of MiB) against the plan's
        assert abs(r["printed"]["weights"] - r["predicted"]["weights"]) < 0.01 * MiB, key
        assert r["measured"]["process_bytes"] > r["printed"]["total"] / 2, key
    for ctx in gpu_check.CPU_CONTEXTS:
        fit, down = rows[("smollm2-135m", ctx, "fit")], rows[("smollm2-135m", ctx, "step-down")]
        usable = fit["vram_bytes"] - fit["reserve_bytes"]
        assert fit["planned_bytes"]["Q5_K_M"] > usable >= fit["planned_bytes"]["Q4_K_M"]
        assert fit["chosen"]["quant"] == "Q4_K_M"  # the reserve left Q5_K_M out
        assert [a["quant"] for a in down["attempts"]] == ["Q4_K_M", "Q3_K_M"]
        assert down["attempts"][0]["outcome"] in ("oom", "crash") and down["chosen"]["quant"] == "Q3_K_M"
        assert down["device_limit"]["basis"] == "measured by the fit run"
    table = (out / "gpu_check.md").read_text()
    assert table.startswith("# fitquant gpu_check: no GPU: measured the CPU subset only")
    assert table.count("\n| ") == 1 + len(rows)  # the header and one row per configuration
    assert "| total pred / rpc-server RSS |" in table and "NVML process" not in table
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert any(n.endswith(".stderr") for n in tar.getnames())
    # nothing left running: no server of these models, no rpc-server on the ports used
    ports = {r["argv"][r["argv"].index("--rpc") + 1].rsplit(":", 1)[1] for r in rows.values()}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        assert str(tmp_path) not in cmd or proc.pid == psutil.Process().pid, cmd
        assert not ("ggml-rpc-server" in cmd and any(f"-p {p} " in cmd + " " for p in ports)), cmd
