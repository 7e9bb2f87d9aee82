#!/usr/bin/env python3
"""Wall time of `fitquant plan` on a local folder of 12 quants, Python start included.

Builds the folder once (the test corpus' tiny llama ladder plus three more k-quant variants made with
llama.cpp's quantizer), then runs the real command several times: with llama.cpp confirming the choice
(the default when llama-cpp-python is installed) and with --no-engine.

Usage: .venv/bin/python scripts/bench_plan.py [--runs N]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

EXTRA = {
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q3_K_L": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
}


def twelve_quants() -> Path:
    import corpus as corpus_mod
    import llama_cpp

    root = corpus_mod.default_root()
    ladder = [m for m in corpus_mod.build_corpus(root) if m.family_name == "tiny-llama"]
    folder = root / "bench-plan-12"
    folder.mkdir(parents=True, exist_ok=True)
    for m in ladder:
        target = folder / m.path.name
        if not target.exists():
            shutil.copy(m.path, target)
    source = next(m.path for m in ladder if m.quant == "F16")
    for label, ftype in EXTRA.items():
        target = folder / f"tiny-llama-{label}.gguf"
        if target.exists():
            continue
        if corpus_mod.quantize_file(source, target, getattr(llama_cpp, ftype)) != 0:
            raise SystemExit(f"quantizing {label} failed")
    files = sorted(folder.glob("*.gguf"))
    if len(files) < 12:
        raise SystemExit(f"expected 12 quants in {folder}, found {len(files)}")
    return folder


def best_wall(argv: list[str], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {result.stderr.strip()}")
        best = min(best, elapsed)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    folder = twelve_quants()
    exe = str(ROOT / ".venv" / "bin" / "fitquant")
    base = [exe, "plan", str(folder), "--ctx", "4k", "--json"]
    rows = [
        ("RAM 64 GiB, engine confirmation", [*base, "--ram", "64GiB"]),
        ("RAM 64 GiB, --no-engine", [*base, "--ram", "64GiB", "--no-engine"]),
        ("GPU 12 GiB described (estimate)", [*base, "--vram", "12GiB"]),
        (
            "GPU 300 MiB, reserve 0, 32k: reduced",
            [exe, "plan", str(folder), "--ctx", "32k", "--vram", "300MiB", "--reserve", "0", "--json"],
        ),
    ]
    print(f"fitquant plan on {len(list(folder.glob('*.gguf')))} quants in {folder}")
    print(f"{'case':<40} {'best wall (s)':>14}")
    for label, argv in rows:
        print(f"{label:<40} {best_wall(argv, args.runs):>14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
