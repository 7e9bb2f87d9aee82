#!/usr/bin/env python3
"""Estimate vs llama.cpp: model x setting x component, predicted, measured, error; the worst per model and per
component.

Corpora (choose with --corpus, all by default):
- tiny:  the test corpus — tiny models of a dozen architecture families quantized to a ladder — plus the real
         Gemma 3 270M: the contract's matrix on one quant per family, the weights on every rung;
- real:  header-only copies of nine real-size models (tests/corpus_real.py REAL_BUILDERS);
- broad: fifteen more (BROAD_BUILDERS): wide dense models at long contexts, attention width unlike the
         embedding width, GQA 4/8/16, head sizes 64/128/256, vocabularies over 200k, MoE with shared experts,
         hybrid recurrent models.
The real and broad corpora are swept over contexts 4k, 32k, 128k and the training context (those the model
allows), K/V f16 (flash attention off and on) and q8_0, one slot and four (unified and per sequence), swa_full
off and on for SWA models, and at the longest context also with llama-server's one output per slot.

Every setting is measured with llama.cpp itself (launcher.measure.dryrun: no_alloc dry runs on the CPU backend)
and compared with tests/accuracy.py's tolerances: weights, KV and recurrent state exact; compute within 10% or
16 MiB and never more than 2% or 8 MiB low; total within 2% or 32 MiB.

Usage: .venv/bin/python scripts/bench_estimate.py [--corpus tiny,real,broad] [--quick] [--failures-only]
                                                  [--summary-only]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CONTEXTS = (4096, 32768, 131072)


def time_estimate_cli(gemma: Path, runs: int = 5) -> float:
    exe = ROOT / ".venv" / "bin" / "fitquant"
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([str(exe), "estimate", str(gemma), "--ctx", "32k", "--json"], check=True,
                       capture_output=True)  # fmt: skip
        best = min(best, time.perf_counter() - start)
    return best


def sweep(facts: Any) -> Iterator[Any]:
    """The real-dimension sweep: the contract's matrix at 4k..the training context; at the longest context
    also with one output per slot (llama-server's n_outputs_max)."""
    from accuracy import settings_matrix

    settings = list(settings_matrix(facts, contexts=CONTEXTS, train_context=True))
    longest = max(s.n_ctx for s in settings)
    yield from settings
    for s in settings_matrix(facts, contexts=(longest,), slot_outputs=True):
        if s.n_outputs_max:
            yield s


def quick(facts: Any) -> Iterator[Any]:
    from launcher.estimate import Settings

    yield Settings(n_ctx=4096)


def summarize(rows: Iterable[Any], *, rungs: set[str]) -> tuple[list[list[str]], list[list[str]]]:
    """(per model, per component) tables: the worst error below and above llama.cpp's figure. Ladder `rungs`
    (one setting each, for their weights) count in the component table only."""
    by_model: dict[str, list[Any]] = {}
    refused: dict[str, int] = {}
    for row in rows:
        if row.error is not None:
            refused[row.model] = refused.get(row.model, 0) + 1
            continue
        by_model.setdefault(row.model, []).append(row)
    model_table = []
    components: dict[str, list[Any]] = {}
    for model, model_rows in by_model.items():
        checks = [c for r in model_rows for c in r.checks]
        for c in checks:
            components.setdefault(c.component.split(" ")[0], []).append(c)
        if model in rungs:
            continue
        exact = all(c.ok for c in checks if c.exact)
        compute = [c for c in checks if c.component == "compute"]
        low = min(compute, key=lambda c: c.error_mib)
        high = max(compute, key=lambda c: c.error_mib)
        model_table.append(
            [
                model,
                str(len(model_rows)) + (f" (+{refused[model]} refused)" if model in refused else ""),
                "yes" if exact else "NO",
                f"{min(low.error_mib, 0):+.2f} MiB {min(low.error_ratio, 0):+.1%}",
                f"{max(high.error_mib, 0):+.2f} MiB {max(high.error_ratio, 0):+.1%}",
                f"{max(c.measured_mib for c in compute):.0f}",
                "yes" if all(c.ok for c in compute) else "NO",
            ]
        )
    component_table = []
    for component, checks in sorted(components.items()):
        low = min(checks, key=lambda c: c.error_mib)
        high = max(checks, key=lambda c: c.error_mib)
        component_table.append(
            [
                component,
                str(len(checks)),
                f"{min(low.error_mib, 0):+.2f} MiB",
                f"{max(high.error_mib, 0):+.2f} MiB",
                str(sum(not c.ok for c in checks)),
            ]
        )
    return model_table, component_table


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="tiny,real,broad", help="comma-separated: tiny, real, broad")
    parser.add_argument("--quick", action="store_true", help="one setting per model (4k, f16)")
    parser.add_argument("--failures-only", action="store_true", help="print only rows out of tolerance")
    parser.add_argument("--summary-only", action="store_true", help="print only the summary tables")
    args = parser.parse_args()
    chosen = {c.strip() for c in args.corpus.split(",") if c.strip()}
    unknown = chosen - {"tiny", "real", "broad"}
    if unknown:
        parser.error(f"unknown corpus: {', '.join(sorted(unknown))}")

    import corpus as corpus_mod
    import corpus_real
    from accuracy import describe, run_matrix

    started = time.perf_counter()
    root = corpus_mod.default_root()
    rows = []
    rungs: set[str] = set()
    gemma = None
    if "tiny" in chosen:
        corpus = corpus_mod.build_corpus(root)
        gemma = corpus_mod.gemma3_270m_path(root)
        # full matrix on one quant per family and on Gemma 3 270M; weights on every rung of every ladder
        full = [(m.name, m.path) for m in corpus if m.quant == "Q4_K_M"]
        if gemma is not None:
            full.append(("gemma-3-270m-Q4_K_M", gemma))
        rows += run_matrix(full, full=not args.quick)
        ladder = [(m.name, m.path) for m in corpus if m.quant != "Q4_K_M"]
        rungs = {name for name, _ in ladder}
        rows += run_matrix(ladder, full=False)
    real = []
    if "real" in chosen:
        real += [(m.name, m.path) for m in corpus_real.build_real_corpus(root)]
    if "broad" in chosen:
        real += [(m.name, m.path) for m in corpus_real.build_broad_corpus(root)]
    if real:
        rows += run_matrix(real, matrix=quick if args.quick else sweep)

    failures = checked = refused = 0
    header = f"{'model':<28} {'setting':<30} {'component':<10} {'predicted':>11} {'llama.cpp':>11} {'error':>9}  ok"
    if not args.summary_only:
        print(header)
        print("-" * len(header))
    for row in rows:
        if row.error is not None:
            refused += 1
            print(f"{row.model:<28} {describe(row.settings):<30} llama.cpp refused: {row.error}")
            continue
        for check in row.checks:
            checked += 1
            failures += not check.ok
            if args.summary_only or (args.failures_only and check.ok):
                continue
            print(
                f"{row.model:<28} {describe(row.settings):<30} {check.component:<10} {check.predicted_mib:>9.2f}Mi"
                f" {check.measured_mib:>9.2f}Mi {check.error_mib:>+8.2f}M  {'yes' if check.ok else 'NO'}"
            )
    model_table, component_table = summarize(rows, rungs=rungs)
    print()
    print("Worst compute error per model (estimate - llama.cpp; bound: +10% or 16 MiB, -2% or 8 MiB):")
    print_table(["model", "settings", "weights/KV/RS exact", "worst low", "worst high", "max MiB", "in bound"],
                model_table)  # fmt: skip
    print()
    print("Worst error per component (estimate - llama.cpp):")
    print_table(["component", "checks", "worst low", "worst high", "out of tolerance"], component_table)
    print()
    print(f"{len(rows)} configurations, {checked} checks, {failures} out of tolerance")
    if refused:
        print(f"{refused} configurations llama.cpp itself could not run (listed above): nothing to compare with")
    if gemma is not None:
        print(f"fitquant estimate on Gemma 3 270M (best of 5, Python start included): {time_estimate_cli(gemma):.3f} s")
    print(f"bench wall time: {time.perf_counter() - started:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
