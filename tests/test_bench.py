"""`fitquant bench`: a running model measured at a few depths through its own server, predicted beside measured;
and `fitquant ps` showing the warm-up's decode speed beside the prediction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from processes import built_llama_server, gone

from launcher.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_bench_refuses_bad_depths_and_an_unknown_model_in_one_line() -> None:
    bad = CliRunner().invoke(main, ["bench", "--depth", "0,lots"])
    assert bad.exit_code == 2 and "'lots' is not a depth in tokens like 0, 512 or 4k" in bad.output
    none = CliRunner().invoke(main, ["bench"])
    assert none.exit_code == 1
    assert none.output.strip().endswith("nothing is running; start a model with `fitquant run MODEL --serve` first")
    named = CliRunner().invoke(main, ["bench", "qwen3:14b"])
    assert named.exit_code == 1 and "no running model is called 'qwen3:14b'" in named.output
    zero = CliRunner().invoke(main, ["bench", "--reps", "0"])
    assert zero.exit_code == 2 and "'--reps': 0 is not in the range 1<=x<=100" in zero.output


@pytest.mark.slow
def test_bench_measures_a_running_model_at_each_depth_beside_the_prediction(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("bench-key\n")
    env = {**os.environ, "FITQUANT_LLAMA_SERVER": str(built_llama_server())}
    env.pop("OLLAMA_HOST", None)
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", "--ctx", "2048", "--no-engine", "--serve",
                             "--json", "--api-key-file", str(key)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        started = json.loads(line)
        # bench calibrates by the build that runs, as its instance recorded it, not by whichever llama-server this
        # shell would start (here none at all)
        elsewhere = {**env, "FITQUANT_LLAMA_SERVER": str(tmp_path / "no-such-llama-server")}
        done = subprocess.run([sys.executable, "-m", "launcher", "bench", "--depth", "0,256,4096", "--tokens", "8",
                               "--reps", "2", "--api-key-file", str(key), "--json"],
                              capture_output=True, text=True, env=elsewhere, cwd=ROOT, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["quant"] == "Q4_1" and result["n_ctx"] == 2048 and result["server"] == "llama-server"
        assert [r["depth"] for r in result["rows"]] == [0, 256]
        # the run's warm-up calibrated this machine: the prediction is the one the next plan makes, and says so
        assert result["notes"][0] == "depths above 1976 tokens skipped: the context is 2048"
        assert result["notes"][1].startswith("predicted: calibrated by 1 verified run of this model on this machine")
        assert len(result["notes"]) == 2
        deep = result["rows"][1]
        assert deep["prompt_tokens"] >= 256  # the filler reached the depth (plus the chat template)
        assert deep["generated_tokens"] == 8  # ignore_eos: a fixed count to time
        for row in result["rows"]:
            assert row["measured_tg_per_s"] > 0 and row["measured_pp_per_s"] > 0
            # two requests a depth, each a prompt new to the cache: their mean, and how far they spread
            assert row["reps"] == 2 and row["measured_tg_per_s_sd"] >= 0 and row["measured_pp_per_s_sd"] >= 0, row
            assert row["predicted_tg_per_s"] > 0  # this host's measured bandwidth and the fitted CPU constants
        # the KV cache read grows (the whole answer in the message: a failure here is a calibration to read)
        assert result["rows"][0]["predicted_tg_per_s"] > deep["predicted_tg_per_s"], (result, started.get("speed"))
        listed = subprocess.run([sys.executable, "-m", "launcher", "ps", "--json"], capture_output=True, text=True,
                                env=env, cwd=ROOT, timeout=60)  # fmt: skip
        [instance] = json.loads(listed.stdout)["instances"]
        assert instance["measured_tg_per_s"] == started["speed"]["measured_tg_per_s"]
        assert instance["predicted_tg_per_s"] == started["speed"]["predicted_tg_per_s"]
        assert instance["reference"] == ""  # the embedded default model: bench plans it again for the prediction
        assert instance["version"] and instance["version"] == started["backend"]["version"]
        assert "bench-key" not in done.stdout + done.stderr + listed.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert gone(started["pid"])
