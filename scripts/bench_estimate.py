#!/usr/bin/env python3
"""Estimate vs llama.cpp: model x setting x component, predicted, measured, error.

Builds (or reuses) the test corpus — tiny models of a dozen architecture families quantized to a
ladder — plus the real Gemma 3 270M, measures every setting of the accuracy contract with llama.cpp
itself (launcher.measure.dryrun, no_alloc dry runs on the CPU backend) and prints one row per component.
Also times `fitquant estimate` on the Gemma 3 270M file, Python start included.

Usage: .venv/bin/python scripts/bench_estimate.py [--quick] [--failures-only]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def time_estimate_cli(gemma: Path, runs: int = 5) -> float:
    exe = ROOT / ".venv" / "bin" / "fitquant"
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([str(exe), "estimate", str(gemma), "--ctx", "32k", "--json"], check=True,
                       capture_output=True)  # fmt: skip
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one setting per model (4k, f16)")
    parser.add_argument("--failures-only", action="store_true", help="print only rows out of tolerance")
    args = parser.parse_args()

    import corpus as corpus_mod

    started = time.perf_counter()
    corpus = corpus_mod.build_corpus(corpus_mod.default_root())
    gemma = corpus_mod.gemma3_270m_path(corpus_mod.default_root())
    # Full matrix on one quant per family and on Gemma 3 270M; weights on every rung of every ladder.
    full = [(m.name, m.path) for m in corpus if m.quant == "Q4_K_M"]
    if gemma is not None:
        full.append(("gemma-3-270m-Q4_K_M", gemma))
    import corpus_real

    # Real dimensions of popular models, as header-only sparse files: the compute buffer at full size.
    full += [(m.name, m.path) for m in corpus_real.build_real_corpus(corpus_mod.default_root())]
    ladder = [(m.name, m.path) for m in corpus if m.quant != "Q4_K_M"]
    from accuracy import describe, run_matrix

    rows = run_matrix(full, full=not args.quick) + run_matrix(ladder, full=False)

    header = f"{'model':<28} {'setting':<26} {'component':<10} {'predicted':>11} {'llama.cpp':>11} {'error':>9}  ok"
    print(header)
    print("-" * len(header))
    failures = checked = 0
    worst: dict[str, tuple[float, float]] = {}  # component -> (largest |error| MiB, largest |error| ratio)
    for row in rows:
        if row.error is not None:
            failures += 1
            print(f"{row.model:<28} {describe(row.settings):<26} llama.cpp refused: {row.error}")
            continue
        for check in row.checks:
            checked += 1
            failures += not check.ok
            mib, ratio = worst.get(check.component, (0.0, 0.0))
            # ratios of sub-MiB figures printed to 2 decimals say nothing; rank those by MiB only
            ratio = max(ratio, abs(check.error_ratio)) if check.measured_mib >= 1 else ratio
            worst[check.component] = (max(mib, abs(check.error_mib)), ratio)
            if args.failures_only and check.ok:
                continue
            print(
                f"{row.model:<28} {describe(row.settings):<26} {check.component:<10} {check.predicted_mib:>9.2f}Mi"
                f" {check.measured_mib:>9.2f}Mi {check.error_mib:>+8.2f}M  {'yes' if check.ok else 'NO'}"
            )
    print()
    print(f"{'model':<28} {'worst compute error':>20} {'worst total error':>18}")
    by_model: dict[str, list] = {}
    for row in rows:
        by_model.setdefault(row.model, []).extend(row.checks)
    for model, checks in by_model.items():
        compute = [c for c in checks if c.component == "compute"]
        total = [c for c in checks if c.component == "total"]
        if len(compute) < 2:  # ladder rungs: one setting each, summarised by the weights check
            continue
        wc = max(compute, key=lambda c: abs(c.error_mib))
        wt = max(total, key=lambda c: abs(c.error_mib))
        print(
            f"{model:<28} {wc.error_mib:>+10.2f} MiB {wc.error_ratio:>+7.1%}"
            f" {wt.error_mib:>+8.2f} MiB {wt.error_ratio:>+7.1%}"
        )
    print()
    print(f"{len(rows)} configurations, {checked} checks, {failures} out of tolerance")
    print("largest error per component (MiB, and relative where the figure is at least 1 MiB):")
    for component, (mib, ratio) in sorted(worst.items()):
        print(f"  {component:<12} {mib:8.2f} MiB  {ratio:7.2%}")
    if gemma is not None:
        print(f"fitquant estimate on Gemma 3 270M (best of 5, Python start included): {time_estimate_cli(gemma):.3f} s")
    print(f"bench wall time: {time.perf_counter() - started:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
