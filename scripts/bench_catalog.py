#!/usr/bin/env python3
"""Catalog listing speed: a 24-quant Hugging Face repository through a local Hub-shaped server with latency.

The server (tests/hf_server.py) serves real GGUF files of the test corpus under 24 quant names (each copy with
its own sha256) and sleeps `--latency-ms` before every answer. Rows:

- cold: empty cache: the tree listing, then every quant's header by range reads (8 at a time);
- warm: the same listing again: the cached listing is fresh, so no request at all;
- refresh: `refresh=True` (or an expired listing): the tree again, headers from the cache (keyed by sha256);
- CLI cold / warm: `fitquant quants REPO --json` in a fresh process (Python start and imports included).

Targets (issue 4): cold under 3 s, warm under 0.3 s, at 50 ms per request. Exit status 1 if one is missed.

Usage: .venv/bin/python scripts/bench_catalog.py [--latency-ms 50] [--page-size 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

REPO = "bench/Tiny-Llama-GGUF"
TARGET_COLD_S = 3.0
TARGET_WARM_S = 0.3


def _measure(server, fn) -> tuple[float, int, int, int]:
    server.reset_counters()
    start = time.perf_counter()
    found = fn()
    elapsed = time.perf_counter() - start
    return elapsed, len(server.requests), server.blob_bytes, len(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=50.0, help="sleep before every answer (default 50)")
    parser.add_argument("--page-size", type=int, default=1000, help="tree entries per page (the Hub: 1000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per row; the median is shown (default 3)")
    args = parser.parse_args()

    import corpus
    from hf_server import LADDER_24, HFServer, ladder_files

    models = corpus.build_corpus(corpus.default_root())
    files = ladder_files(models, LADDER_24)
    for f in files.values():
        _ = f.sha256  # the server's own hashing is not the client's time
    server = HFServer(page_size=args.page_size, latency_s=args.latency_ms / 1000)
    server.add_repo(REPO, {**files, "README.md": b"# Tiny Llama\n", ".gitattributes": b"*.gguf filter=lfs\n"})
    os.environ["HF_ENDPOINT"] = server.endpoint
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        os.environ.pop(name, None)

    import launcher.catalog.huggingface  # noqa: F401 - imports are not part of a listing's time
    from launcher.catalog import list_candidates

    rows: dict[str, list[tuple[float, int, int, int]]] = {"cold": [], "warm": [], "refresh": []}
    cli: dict[str, list[float]] = {"CLI cold": [], "CLI warm": []}
    exe = ROOT / ".venv" / "bin" / "fitquant"
    try:
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as home:
                os.environ["FITQUANT_HOME"] = home
                rows["cold"].append(_measure(server, lambda: list_candidates(REPO)))
                rows["warm"].append(_measure(server, lambda: list_candidates(REPO)))
                rows["refresh"].append(_measure(server, lambda: list_candidates(REPO, refresh=True)))
            if exe.exists():
                with tempfile.TemporaryDirectory() as home:
                    env = {**os.environ, "FITQUANT_HOME": home}
                    for label in ("CLI cold", "CLI warm"):
                        start = time.perf_counter()
                        subprocess.run([str(exe), "quants", REPO, "--json"], env=env, check=True, capture_output=True)
                        cli[label].append(time.perf_counter() - start)
    finally:
        server.close()

    print(f"{REPO}: 24 quants, {args.latency_ms:g} ms per request, {args.page_size} tree entries per page, "
          f"median of {args.runs} runs")  # fmt: skip
    print(f"{'row':<10} {'wall s':>8} {'requests':>9} {'blob bytes':>11} {'per quant':>10} {'quants':>7}")
    for label, runs in rows.items():
        wall = statistics.median(r[0] for r in runs)
        requests, served, n = runs[-1][1], runs[-1][2], runs[-1][3]
        per = served // n if n else 0
        print(f"{label:<10} {wall:>8.3f} {requests:>9} {served:>11} {per:>10} {n:>7}")
    for label, times in cli.items():
        if times:
            print(f"{label:<10} {statistics.median(times):>8.3f} {'':>9} {'':>11} {'':>10} {'':>7}")
    cold = statistics.median(r[0] for r in rows["cold"])
    warm = statistics.median(r[0] for r in rows["warm"])
    ok = cold < TARGET_COLD_S and warm < TARGET_WARM_S
    verdict = "met" if ok else "MISSED"
    print(f"targets: cold < {TARGET_COLD_S:g} s ({cold:.3f}), warm < {TARGET_WARM_S:g} s ({warm:.3f}): {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
