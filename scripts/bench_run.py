#!/usr/bin/env python3
"""fitquant run's own overhead: time from `fitquant run` start to verified-ready, minus the time the same
server takes to become ready when started directly with the same argv, on Gemma 3 270M Q4_K_M.

Each round runs `fitquant run --serve --json --warmup none --no-engine` (Python start, plan, launch, wait,
verify, record: everything up to the JSON line), stops it, then starts the argv fitquant used directly and
polls the same readiness URL at the same interval. The baseline runs in the same process, interleaved.

Usage: .venv/bin/python scripts/bench_run.py [--runs N] [--ctx N] [--llama-server PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def fitquant_ready(model: str, ctx: int, env: dict[str, str]) -> tuple[float, dict]:
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", model, "--ctx", str(ctx), "--serve", "--json", "--warmup", "none",
         "--no-engine"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - started
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if not line:
        raise SystemExit(f"fitquant run failed:\n{err}")
    return elapsed, json.loads(line)


def direct_ready(argv: list[str], server: str, env: dict[str, str]) -> float:
    import httpx

    from launcher.backends.process import free_port

    port = free_port()
    argv = list(argv)
    argv[argv.index("--port") + 1] = str(port)
    url = f"http://127.0.0.1:{port}" + ("/health" if server == "llama-server" else "/v1/models")
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {argv}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--llama-server", help="run this llama-server (default: the backend's own choice)")
    args = parser.parse_args()

    from launcher.embedded import gemma_model_path  # the model of the numbers kept so far

    model = str(gemma_model_path())
    env = dict(os.environ)
    env["FITQUANT_HOME"] = tempfile.mkdtemp(prefix="fitquant-bench-run-")
    if args.llama_server:
        env["FITQUANT_LLAMA_SERVER"] = args.llama_server
    ours, theirs, server = [], [], ""
    for _ in range(args.runs):
        elapsed, result = fitquant_ready(model, args.ctx, env)
        server = result["backend"]["server"]
        ours.append(elapsed)
        theirs.append(direct_ready(result["argv"], server, env))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"server: {server}, model: Gemma 3 270M Q4_K_M, context {args.ctx}, {args.runs} runs (median)")
    print(f"{'':32} {'seconds':>8}")
    print(f"{'fitquant run -> verified ready':32} {a:8.3f}")
    print(f"{'same argv started directly':32} {b:8.3f}")
    print(f"{'fitquant overhead':32} {a - b:8.3f}   (ratio {a / b:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
