"""The verdict corpus: real load logs from public issue threads (llama.cpp, Ollama, LM Studio, forks), excerpted
verbatim, each with the verdict a person gives it. Every fixture goes through placement_from_log and through
`fitquant verify FILE --json`; where the log has an offload line, the layer counts are checked too.

Header of each tests/data/verdict_logs/*.log (leading `#` lines, skipped by the parser):
    # source: owner/repo#number     (or the reference document the lines come from)
    # backend: cuda|rocm|metal|vulkan|cpu|rpc
    # verdict: gpu|spill|cpu-only|oom
    # why: one line a person would say
    # layers: N/M                    (only where the log prints "offloaded N/M layers to GPU")
    # alone: incomplete              (only where the excerpt cannot prove the verdict by itself: a full offload
                                      whose host weights it cannot size against the token embeddings)
The command exits by the verdict the log alone gives (0 gpu, 3 spill, 4 cpu-only, 5 oom, 6 incomplete).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from launcher.cli import _Group
from launcher.cli.verify import verify
from launcher.verify import EXIT_STATUS, placement_from_log

FIXTURES = sorted((Path(__file__).parent / "data" / "verdict_logs").glob("*.log"))
_HEADER = re.compile(r"^# (?P<key>[a-z]+): (?P<value>.*)$")
_SOURCE = re.compile(r"^[\w.-]+/[\w.-]+#\d+$|^fitquant shared/reference/(?:backends\.md §10|memory-model\.md §7a) ")


def header(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _HEADER.match(line)
        if not m:
            break
        fields[m["key"]] = m["value"]
    return fields


@click.group(cls=_Group)
def cli() -> None:
    pass


cli.add_command(verify)


def test_corpus_covers_backends_and_verdicts() -> None:
    headers = [header(path) for path in FIXTURES]
    assert len(headers) >= 24
    backends = Counter(h["backend"] for h in headers)
    verdicts = Counter(h["verdict"] for h in headers)
    assert {"cuda", "rocm", "metal", "vulkan", "rpc", "cpu"} <= set(backends)
    assert {"gpu", "spill", "cpu-only", "oom"} == set(verdicts)
    oom_backends = {h["backend"] for h in headers if h["verdict"] == "oom"}
    assert {"cuda", "rocm", "metal", "vulkan"} <= oom_backends


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fixture_header(path: Path) -> None:
    fields = header(path)
    assert set(fields) - {"layers", "alone"} == {"source", "backend", "verdict", "why"}, fields
    assert fields.get("alone", "incomplete") == "incomplete"
    assert _SOURCE.match(fields["source"]), fields["source"]
    assert fields["backend"] in {"cuda", "rocm", "metal", "vulkan", "cpu", "rpc"}
    assert fields["verdict"] in {"gpu", "spill", "cpu-only", "oom"}
    text = path.read_text(encoding="utf-8")
    offloads = re.findall(r"offloaded (\d+/\d+) layers to GPU", text)
    planned = re.findall(r"layers\.model=(\d+) layers\.offload=(\d+)", text)
    ngl = re.findall(r"--n-gpu-layers (\d+)", text)
    if not offloads and planned:  # Ollama's planner only: the runner's --n-gpu-layers of layers.model
        offloads = [f"{ngl[-1] if ngl else planned[-1][1]}/{planned[-1][0]}"]
    assert fields.get("layers") == (offloads[-1] if offloads else None)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fixture_verdict(path: Path) -> None:
    fields = header(path)
    placement = placement_from_log(path.read_text(encoding="utf-8"))
    assert placement.verdict == fields.get("alone", fields["verdict"]), placement.reason
    if "layers" in fields:
        n, m = (int(x) for x in fields["layers"].split("/"))
        assert (placement.layers_on_gpu, placement.layers_total) == (n, m)
    if placement.verdict == "oom":
        assert placement.errors and placement.reason.startswith("out of memory: ")
    else:
        assert placement.errors == []
    if placement.verdict == "incomplete":  # never 100% GPU on a guess; the reason says what would decide
        assert "pass --model" in placement.reason
    if placement.verdict == "gpu":
        assert placement.gpu_devices and all(d.model_bytes > 0 for d in placement.gpu_devices)
        assert placement.host_model_bytes < sum(d.model_bytes for d in placement.gpu_devices)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fixture_through_the_command(path: Path) -> None:
    fields = header(path)
    result = CliRunner().invoke(cli, ["verify", str(path), "--json"])
    verdict = fields.get("alone", fields["verdict"])
    assert result.exit_code == EXIT_STATUS[verdict], result.output
    data = json.loads(result.output)
    assert data["verdict"] == verdict
    if "layers" in fields:
        assert f"{data['layers_on_gpu']}/{data['layers_total']}" == fields["layers"]
    assert data == placement_from_log(path.read_text(encoding="utf-8")).to_json()


def test_some_fixtures_in_detail() -> None:
    by_name = {path.stem.split("-", 1)[0]: path for path in FIXTURES}
    moe = placement_from_log(by_name["06"].read_text(encoding="utf-8"))
    assert moe.host_model_bytes > 150 * 1024**3 and [d.name for d in moe.gpu_devices] == ["CUDA0"]
    rocm = placement_from_log(by_name["13"].read_text(encoding="utf-8"))
    assert [d.name for d in rocm.devices] == ["ROCm0", "ROCm1", "ROCm2", "ROCm3", "CPU"]
    rx580 = placement_from_log(by_name["20"].read_text(encoding="utf-8"))
    assert rx580.devices[0].name == "Radeon RX 580 Series" and rx580.devices[0].kv_bytes == 1152 * 1024**2
    metal = placement_from_log(by_name["18"].read_text(encoding="utf-8"))
    assert "Insufficient Memory" in metal.reason
    rpc = placement_from_log(by_name["26"].read_text(encoding="utf-8"), token_embd_bytes=178257920)
    assert rpc.verdict == "gpu" and "(exact)" in rpc.reason
    # the log alone proves the CPU buffer is token_embd: "(and 0 others) ... using CPU instead", no other host buffer
    for number in ("02", "13"):
        full = placement_from_log(by_name[number].read_text(encoding="utf-8"))
        assert full.verdict == "gpu" and "only token_embd.weight" in full.reason
    moe_host = placement_from_log(by_name["28"].read_text(encoding="utf-8"))
    assert "expert tensors are in host buffers (blk.0.ffn_gate_exps.weight in CUDA_Host)" in moe_host.reason
    planner = placement_from_log(by_name["30"].read_text(encoding="utf-8"))
    assert "Ollama's plan, runner --n-gpu-layers 34" in planner.reason
