#!/usr/bin/env python3
"""Speed predictions against measurements: the published llama-bench rows fitquant's model is fitted on (with
llmfit's formula on the same rows, so the gap is measured, not claimed), then this machine: the embedded models
run for real through fitquant's own run path, decode and prefill measured by the server at warm-up.

    .venv/bin/python scripts/bench_speed.py [--no-local]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def published() -> None:
    from launcher.speed import llmfit_published, predict_published, published_rows

    print(
        "| device | model | tg measured | tg predicted | error | llmfit | error | pp measured | pp predicted | error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in published_rows():
        s = predict_published(row)
        peer = llmfit_published(row)
        tg = s.tg_per_s or 0.0
        pp = f"{s.pp_per_s:.0f}" if s.pp_per_s else "-"
        pp_error = f"{s.pp_per_s / row['pp'] - 1:+.0%}" if s.pp_per_s and row.get("pp") else "-"
        print(f"| {row['device']} | {row['model']} | {row['tg']} | {tg:.1f} | {tg / row['tg'] - 1:+.0%} | {peer:.1f} | "
              f"{peer / row['tg'] - 1:+.0%} | {row.get('pp') or '-'} | {pp} | {pp_error} |")  # fmt: skip


def local() -> None:
    from launcher.backends.base import LaunchRequest
    from launcher.embedded import embedded_model_path, gemma_model_path
    from launcher.plan import Policy
    from launcher.run import RunSpec, backend_and_machine, start, stop

    print("\n| model (this machine, CPU) | ctx | tg measured | tg predicted | ratio | pp measured (full fill) |")
    print("|---|---|---|---|---|---|")
    backend, machine, _ = backend_and_machine("llamacpp")
    for path in (embedded_model_path(), gemma_model_path()):
        spec = RunSpec(str(path), Policy(n_ctx=2048), LaunchRequest(), warmup="full", confirm=False)
        result = start(spec, backend=backend, machine=machine)
        try:
            s = result.speed
            print(f"| {path.name} | 2048 | {s['measured_tg_per_s']} | {s['predicted_tg_per_s']} | {s['tg_ratio']} | "
                  f"{s['measured_pp_per_s']} |")  # fmt: skip
        finally:
            stop(result, backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-local", action="store_true", help="Only the published rows (no model is started).")
    args = parser.parse_args()
    published()
    if not args.no_local:
        local()


if __name__ == "__main__":
    main()
