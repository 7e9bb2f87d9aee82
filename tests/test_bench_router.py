"""scripts/bench_router.py for real, once, with tiny settings: `fitquant serve` on the built llama-server with
SmolLM2 and Gemma 3 270M. Checks the table's figures are all there and parse, and that every process it started
is gone afterwards; no timing is asserted (speed is the benchmark's business, not a unit test's)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from processes import built_llama_server, gone

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

FIGURES = [
    "request latency via router, p50 / p99",
    "request latency direct, p50 / p99",
    "latency added by router, p50",
    "latency added by router, p99",
    "  per-round difference, p99",
    "  A/A control (direct vs direct), p99",
    "streamed tokens/s via router",
    "streamed tokens/s direct",
    "streamed tokens/s, router / direct",
    "  the same as a ratio of the medians",
    "  90% interval of that median over rounds",
    "  A/A control (direct / direct)",
    "  90% interval of the control's median",
    "  router CPU per relayed chunk",
    "  router CPU while streaming, of one core",
    "  a bare byte relay (no HTTP) / direct",
    "  90% interval of the bare relay's median",
    "  bare relay CPU per relayed chunk",
    "swap via router: request to first token",
    "same argv direct: start to /health 200",
    "same argv direct: start to first token",
    "same argv direct: SIGTERM to exit",
    "swap added over direct start",
]


def _bench(*args: str, server: Path, gemma: Path) -> subprocess.CompletedProcess[str]:
    from launcher.embedded import embedded_model_path

    argv = [sys.executable, "scripts/bench_router.py", "--runs", "4", "--stream-runs", "1", "--swap-runs", "1",
            "--tokens", "8", "--ctx", "1024", "--llama-server", str(server), "--small-model",
            str(embedded_model_path()), "--swap-model", str(gemma), *args]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=600)


def test_bench_router_reports_every_figure_with_a_verdict_and_stops_every_process(gemma3_270m_path: Path) -> None:
    done = _bench("--json", server=built_llama_server(), gemma=gemma3_270m_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    rows = {r["figure"]: r for r in out["rows"]}
    assert [f for f in FIGURES if f not in rows] == []
    for row in rows.values():
        assert math.isfinite(float(row["value"].split()[0])), row
        if row["target"] is not None:
            assert row["result"] in ("PASS", "FAIL"), row
    # the figures behind the rows are numbers where they must be
    assert out["latency"]["runs"] == 4 and out["latency"]["direct_p50_ms"] > 0 and out["latency"]["router_p50_ms"] > 0
    assert out["stream"]["content_chunks"] == [8], "ignore_eos: each run streams exactly --tokens content chunks"
    assert 0 < out["swap"]["direct_ready_s"] <= out["swap"]["direct_first_token_s"]
    assert out["swap"]["load_verify_s"] > 0 and out["swap"]["router_first_token_s"] > out["swap"]["load_verify_s"]
    assert out["stream"]["bare_ratio"] > 0 and out["stream"]["bare_cpu_per_chunk_us"] >= 0
    # serve, both model servers, the bare relay and the direct start: all started, all stopped
    assert len(out["pids"]) >= 5
    assert [pid for pid in out["pids"] if not gone(pid)] == []
    # the printed table (without --json) is the same rows: figure | value | target | result
    lines = _script().render(out).splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["figure", "value", "target", "result"]
    for figure in FIGURES:
        [line] = [x for x in lines if x.startswith(figure + " ")]
        cells = [c.strip() for c in line.split("|")]
        assert cells[1] == rows[figure]["value"] and cells[3] == (rows[figure]["result"] or ""), line


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("bench_router", ROOT / "scripts" / "bench_router.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
