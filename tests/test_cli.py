"""`fitquant inspect` and `fitquant estimate`: exit codes, exact error lines, JSON contracts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher.cli import main

ESTIMATE_DEVICE_KEYS = {
    "name", "weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "output_bytes", "overhead_bytes",
    "total_bytes",
}  # fmt: skip
INSPECT_KEYS = {
    "architecture", "n_layer", "n_head_kv", "head_dim_k", "head_dim_v", "context_length", "sliding_window",
    "swa_layers", "expert_count", "expert_used_count", "file_type", "n_params", "tensor_bytes_total",
}  # fmt: skip


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_cli_estimate_json_contract(gemma3_270m_path: Path):
    code, out, _ = run("estimate", str(gemma3_270m_path), "--ctx", "32k", "--ngl", "0", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["schema_version"] == 1
    assert data["architecture"] == "gemma3"
    assert data["n_ctx"] == 32768
    assert [d["name"] for d in data["devices"]] == ["CPU"]
    device = data["devices"][0]
    assert set(device) >= ESTIMATE_DEVICE_KEYS
    for key in ("weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "total_bytes"):
        assert data[key] == sum(d[key] for d in data["devices"])
    assert device["total_bytes"] == sum(device[k] for k in ESTIMATE_DEVICE_KEYS - {"name", "total_bytes"})
    # q8_0 is the default KV type: 3 global layers x 32768 cells + 15 SWA layers x 1024 cells, 256 x 1.0625 B each
    assert data["kv_bytes"] == 2 * (3 * 32768 + 15 * 1024) * 256 // 32 * 34
    assert data["weights_bytes"] == 246587904


def test_cli_estimate_on_a_described_gpu_offloads_all_but_the_input_layer(gemma3_270m_path: Path):
    code, out, _ = run("estimate", str(gemma3_270m_path), "--ctx", "4096", "--vram", "12GiB", "--json")
    assert code == 0
    data = json.loads(out)
    names = [d["name"] for d in data["devices"]]
    assert names == ["CPU", "GPU0"]
    assert data["n_gpu_layers"] == 19
    cpu, gpu = data["devices"]
    assert cpu["kv_bytes"] == 0 and gpu["kv_bytes"] > 0
    # token_embd (Q8_0, 640 x 262144) stays on the CPU; the output layer uses a copy of it on the GPU
    assert cpu["weights_bytes"] == 640 * 262144 // 32 * 34


def test_cli_estimate_partial_offload_keeps_some_layers_on_cpu(gemma3_270m_path: Path):
    code, out, _ = run("estimate", str(gemma3_270m_path), "--ctx", "4096", "--vram", "12GiB", "--ngl", "5", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["devices"][0]["kv_bytes"] > 0 and data["devices"][1]["kv_bytes"] > 0
    assert any("partial offload" in note for note in data["notes"])


def test_cli_inspect_json_contract(gemma3_270m_path: Path):
    code, out, _ = run("inspect", str(gemma3_270m_path), "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) >= INSPECT_KEYS
    assert data["n_head_kv"] == [1] * 18
    assert data["swa_layers"] == [i for i in range(18) if i % 6 != 5]
    assert data["file_type"] == "Q4_K_M"
    assert data["tensor_bytes_total"] == 246587904


def test_cli_human_output_names_the_components(gemma3_270m_path: Path):
    code, out, _ = run("estimate", str(gemma3_270m_path), "--ctx", "128K", "--kv", "f16")
    assert code == 0
    assert "KV cache" in out and "compute" in out and "gemma3, ctx 131072" in out
    assert "exceeds the model's training context 32768" in out


@pytest.mark.parametrize(
    ("args", "code", "line"),
    [
        (["estimate", "/nonexistent/model.gguf"], 1, "GGUFFormatError: /nonexistent/model.gguf: open: No such file or directory"),
        (["estimate", "{model}", "--ctx", "12q"], 2, "Error: Invalid value for '--ctx': '12q' is not a context length; write it like 32768, 32k or 128K"),
        (["estimate", "{model}", "--ngl", "lots"], 2, "Error: Invalid value for '--ngl': 'lots' is not a layer count; write a number like 20, or 'all'"),
        (["estimate", "{model}", "--vram", "12XB"], 2, "Error: Invalid value for '--vram': '12XB' is not a size; write it like 24GiB, 12GB or 512MiB"),
        (["estimate", "{model}", "--kv", "q8_0", "--flash-attn", "off"], 1, "EstimateError: a quantized V cache (q8_0) requires flash attention; use --flash-attn on or an f16 V cache"),
    ],
)  # fmt: skip
def test_cli_bad_input_is_one_clear_line(gemma3_270m_path: Path, args, code, line):
    args = [a.replace("{model}", str(gemma3_270m_path)) for a in args]
    result = subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == code
    assert result.stderr.strip().splitlines()[-1] == line
    assert "Traceback" not in result.stderr


def test_cli_not_a_gguf_file(tmp_path: Path):
    path = tmp_path / "notes.gguf"
    path.write_text("hello world, not a model")
    result = subprocess.run([sys.executable, "-m", "launcher", "inspect", str(path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"GGUFFormatError: {path} at byte 0: read magic: not a GGUF file: magic is b'hell', expected b'GGUF'"
    )


def test_cli_without_a_model_uses_the_embedded_default(monkeypatch, tmp_path: Path):
    code, out, _ = run("inspect", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["architecture"] == "llama"  # SmolLM2-135M-Instruct (tests/test_embedded.py covers it)
    assert data["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    # its sha256 is checked once and recorded under FITQUANT_HOME; the second call trusts the record
    marker = next((tmp_path / "fitquant-home").rglob("SmolLM2-135M-Instruct.Q4_1.gguf.verified"))
    before = marker.stat().st_mtime_ns
    assert run("inspect", "--json")[0] == 0
    assert marker.stat().st_mtime_ns == before


def test_cli_error_line_names_the_public_error_type(monkeypatch):
    from launcher.errors import CatalogError

    class _Private(CatalogError):
        pass

    def fail(*_args, **_kwargs):
        raise _Private("qwen3:14b: cannot connect to the registry")

    monkeypatch.setattr("launcher.catalog.list_candidates", fail)
    code, _, err = run("plan", "qwen3:14b", "--ram", "8GiB")
    assert code == 1
    assert err.strip() == "CatalogError: qwen3:14b: cannot connect to the registry"


@pytest.mark.parametrize("columns", [80, 120, 200])
def test_cli_plan_table_fits_the_terminal(gemma3_270m_path: Path, columns: int):
    result = CliRunner().invoke(
        main, ["plan", str(gemma3_270m_path), "--vram", "2GiB", "--no-engine"], env={"COLUMNS": str(columns)}
    )
    assert result.exit_code == 0, result.output
    table = [line for line in result.stdout.splitlines() if line[:1] in "┏┃┡│└"]
    assert len(table) >= 5  # header and the quant's row
    assert all(len(line) <= columns for line in table)
    assert "…" not in result.stdout  # no cell cut off, the bars included
    bar = next(line for line in table if "▶" in line)
    cells = sum(bar.count(ch) for ch in "█·")
    assert 8 <= cells <= 40  # the bar is sized to what the terminal leaves
    assert "memory: █ weights  █ KV  █ compute  █ runtime" in result.stdout


# ---------------------------------------------------------------------------------------------- hostile input bounded


def _fitquant(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["plan", "x.gguf", "--ctx", "99999999999999999999"],
         "Error: Invalid value for '--ctx': context length '99999999999999999999' is too large: at most 16777216 "
         "tokens (16M)"),
        (["plan", "x.gguf", "--ctx", "9" * 5000],
         "Error: Invalid value for '--ctx': '99999999999999999999999999999999999...' is not a context length; "
         "write it like 32768, 32k or 128K"),
        (["plan", "x.gguf", "--vram", "99999999999999999999999GiB"],
         "Error: Invalid value for '--vram': '99999999999999999999999GiB' is more than 1 PiB; no machine has that "
         "much memory"),
        (["plan", "x.gguf", "--ram", "9" * 400],
         "Error: Invalid value for '--ram': '99999999999999999999999999999999999...' is not a size; write it like "
         "24GiB, 12GB or 512MiB"),
        (["plan", "x.gguf", "--unified", "2048TiB"],
         "Error: Invalid value for '--unified': '2048TiB' is more than 1 PiB; no machine has that much memory"),
        (["plan", "x.gguf", "--reserve", "1.5PB"],
         "Error: Invalid value for '--reserve': '1.5PB' is not a size; write it like 24GiB, 12GB or 512MiB"),
        (["plan", "x.gguf", "--reserve", "1200TB"],
         "Error: Invalid value for '--reserve': '1200TB' is more than 1 PiB; no machine has that much memory"),
        (["plan", "x.gguf", "--vram", "24GiB", "--unified", "32GiB"],
         "Error: give either discrete GPU memory (vram) or unified memory, not both"),
        (["estimate", "--vram", "24GiB", "--unified", "32GiB"],
         "Error: give either discrete GPU memory (vram) or unified memory, not both"),
        (["run", "x.gguf", "--gpu-name", "RTX 4090"],
         "Error: GPU names describe GPUs: give their memory too (vram or unified)"),
        (["plan", "x.gguf", "--vram", "24GiB", "--gpu-name", "RTX 408"],
         "Error: Invalid value for '--gpu-name': GPU name 'RTX 408' matches 2 chips (NVIDIA GeForce RTX 4080; "
         "NVIDIA GeForce RTX 4080 SUPER); name one of them"),
    ],
)  # fmt: skip
def test_cli_absurd_sizes_and_contexts_are_one_line(args: list[str], line: str):
    result = _fitquant(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["plan", "quants"])
def test_cli_overlong_gguf_path_is_one_line(tmp_path: Path, command: str):
    path = str(tmp_path / ("a" * 5000)) + ".gguf"
    result = _fitquant(command, path, *(["--ram", "8GiB", "--no-engine"] if command == "plan" else []))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"CatalogError: {path[:40]}...")
    assert line.endswith(f"aaaa.gguf ({len(path)} characters): cannot be read as a path (File name too long)")
    assert len(line) < 200


def test_cli_plan_for_a_named_gpu_predicts_its_speed_from_the_chip_table():
    """--vram with --gpu-name: a plan for another machine predicts from that chip's figures; unnamed, it cannot."""
    base = ["plan", "--vram", "24GiB", "--ctx", "4096", "--no-engine", "--json"]
    code, out, err = run(*base, "--gpu-name", "RTX 4090")
    assert code == 0, err
    named = json.loads(out)["chosen"]["speed"]
    code, out, err = run(*base, "--gpu-name", "RTX 3060")
    slower = json.loads(out)["chosen"]["speed"]
    code, out, err = run(*base)
    unnamed = json.loads(out)["chosen"]["speed"]
    assert named["tg_per_s"] > slower["tg_per_s"] > 0  # 1008 GB/s against 360: the same plan, another chip
    assert unnamed is None  # a described GPU with no name has no figures: unknown, never guessed
