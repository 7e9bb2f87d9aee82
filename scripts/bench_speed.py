#!/usr/bin/env python3
"""Speed predictions against measurements (issue 21 "Accuracy and checks").

1. Published llama-bench rows fitquant's constants are fitted on, uncalibrated, with llmfit's formula on the same
   rows, so the gap is measured, not claimed.
2. This machine: the embedded models (SmolLM2 135M Q4_1 and Gemma 3 270M Q4_K_M) and a quant ladder made from them
   (llama-cpp-python's llama_model_quantize: F16, Q8_0, Q4_K_M, Q2_K of SmolLM2, Q8_0 of Gemma), each measured by
   llama-bench from the same llama.cpp build (scripts/build-llama-cpp) at pp512 and tg128 at depths 0, 512 and 2048
   with fitquant's default cache (flash attention, q8_0 K and V), beside fitquant's prediction: uncalibrated (this
   host's measured bandwidth and FLOPS, and llama.cpp's CPU kernels timed on it: flash attention and each weight
   type's matrix products on the model's shapes, printed above the table, and the fixed cost per op, from a decode
   of the embedded SmolLM2 Q4_1: that model's own decode rows are then no independent check of it; no run of any
   other model), then calibrated after one `--warmup full` of each model through fitquant's own run
   path (a temporary FITQUANT_HOME: the record it writes is thrown away), and for Gemma's rows also after SmolLM2's
   warm-ups alone (its own not yet run): calibrated by another model of the same type, which tests the calibration
   across models, not an echo of it.

   Each model in turn: a llama-bench round, its warm-up, then --rounds - 1 more llama-bench rounds, each figure the
   fastest round's. This machine's speed wanders by 10-20% over minutes (a spell of other tenants' load only ever
   slows a run down): one round's figure can be a busy spell's, not the model's, and a warm-up taken minutes away
   from the figures it is checked against would measure the difference between two spells, not the prediction.

    .venv/bin/python scripts/bench_speed.py [--no-local] [--reps N] [--rounds R] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEPTHS = (0, 512, 2048)
PP, TG = 512, 128
SMOL_LADDER = ("F16", "Q8_0", "Q4_K_M", "Q2_K")  # made from the embedded Q4_1 (requantized: speed, not quality)
GEMMA_LADDER = ("Q8_0",)
CTX = 4096  # every depth plus the prompt or the generated tokens fits


def published() -> None:
    """Published llama-bench rows: the ones the constants are fitted on, then held-out ones they never saw."""
    from launcher.speed import llmfit_published, predict_published, published_rows, validation_rows

    print("| rows | device | model | test | measured | predicted | error | llmfit | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    misses: dict[str, list[float]] = {"fitted": [], "held out": []}
    notes = []
    for kind, rows in (("fitted", published_rows()), ("held out", validation_rows())):
        for row in rows:
            s = predict_published(row)
            mark = " (suspect)" if row.get("suspect") else " (known miss)" if row.get("miss") else ""
            # a row of an older llama.cpp, predicted by its own era's constants (launcher.speed.ERA_2024)
            era = f" [{row['era']} build]" if row.get("era") else ""
            name = f"{kind} | {row['device']} | {row['model']}{era}{mark}"
            errors = []
            named = re.search(r"\btg(\d+)\b", row.get("source", ""))  # the source's test, else llama-bench's
            test = f"tg{named.group(1)}" if named else "tg128"
            if row.get("tg"):  # a prefill-only row has none
                peer = llmfit_published(row)
                tg = s.tg_per_s or 0.0
                print(f"| {name} | {test} | {row['tg']} | {tg:.1f} | {tg / row['tg'] - 1:+.0%} | "
                      f"{peer:.1f} | {peer / row['tg'] - 1:+.0%} |")  # fmt: skip
                errors.append(tg / row["tg"] - 1)
            if row.get("pp"):
                pp_test = f"pp{row.get('pp_tokens', 512)}"
                if row.get("n_ubatch"):  # a micro-batch other than llama-bench's 512
                    pp_test += f" -ub {row['n_ubatch']}"
                pp = f"{s.pp_per_s:.4g} | {s.pp_per_s / row['pp'] - 1:+.0%}" if s.pp_per_s else "- | -"
                pp_error = (s.pp_per_s or 0.0) / row["pp"] - 1
                if row.get("prefill_held_out"):  # a row fitted for its decode only: its prefill is held out
                    why = row.get("prefill_suspect") or row.get("prefill_miss")
                    pp_mark = " (suspect)" if row.get("prefill_suspect") else " (known miss)" if why else ""
                    print(f"| held out | {row['device']} | {row['model']}{era} (prefill){pp_mark} | {pp_test} | "
                          f"{row['pp']} | {pp} | - | - |")  # fmt: skip
                    if not row.get("prefill_suspect"):
                        misses["held out"].append(pp_error)
                    if why:
                        notes.append(f"{pp_mark.strip(' ()')}: {row['device']} {row['model']}{era} prefill: {why}")
                else:
                    print(f"| {name} | {pp_test} | {row['pp']} | {pp} | - | - |")
                    errors.append(pp_error)
            for deep in row.get("deep", ()):  # the same model at depth (llama-bench -d), or a longer prompt
                at = f" @ d{deep['depth']}" if deep.get("depth") else ""
                if deep["test"] == "tg":
                    d = predict_published(row, depth=deep["depth"], n_ubatch=deep.get("n_ubatch"))
                    label, value = f"tg{deep['n_gen']}{at}" if deep.get("n_gen") else f"{test}{at}", d.tg_per_s
                else:
                    d = predict_published(row, n_prompt=deep["n_prompt"], depth=deep.get("depth", 0),
                                          n_ubatch=deep.get("n_ubatch"))  # fmt: skip
                    ubatch = deep.get("n_ubatch") or row.get("n_ubatch")
                    ub = f" -ub {ubatch}" if ubatch else ""
                    label, value = f"pp{deep['n_prompt']}{ub}{at}", d.pp_per_s
                shown = f"{value:.4g} | {value / deep['t_per_s'] - 1:+.0%}" if value else "- | -"
                print(f"| {name} | {label} | {deep['t_per_s']} | {shown} | - | - |")
                errors.append((value or 0.0) / deep["t_per_s"] - 1)
            if row.get("suspect"):
                notes.append(f"suspect: {row['device']} {row['model']}{era}: {row['suspect']}")
            else:
                misses[kind] += errors
            if row.get("miss"):
                notes.append(f"known miss: {row['device']} {row['model']}{era}: {row['miss']}")
    print()
    for kind, errors in misses.items():
        within = sum(abs(e) <= 0.25 for e in errors)
        worst = max((abs(e) for e in errors), default=0.0)
        print(
            f"{kind}: {within}/{len(errors)} figures within 25%, worst {worst:.0%} (suspect rows left out; known "
            "misses counted)"
        )
    for note in notes:
        print(note)


# -- this machine ---------------------------------------------------------------------------------------------------


def quantize(source: Path, label: str, folder: Path) -> Path:
    """`source` requantized to `label` (kept in `folder`, reused when there)."""
    import llama_cpp

    from tests.corpus import quantize_file

    out = folder / f"{source.stem.split('.')[0]}-{label}.gguf"
    if out.is_file():
        return out
    if quantize_file(source, out, getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{label}"), allow_requantize=True) != 0:
        raise SystemExit(f"bench_speed: quantizing {source.name} to {label} failed")
    return out


def llama_bench(binary: Path, model: Path, reps: int) -> dict[tuple[str, int], float]:
    """llama-bench's mean tokens/s per (test, depth): ("pp", d) for pp512 @ d, ("tg", d) for tg128 @ d."""
    argv = [str(binary), "-m", str(model), "-p", str(PP), "-n", str(TG), "-d", ",".join(map(str, DEPTHS)),
            "-fa", "1", "-ctk", "q8_0", "-ctv", "q8_0", "-r", str(reps), "-o", "json"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"bench_speed: llama-bench failed on {model.name}: {done.stderr.strip()[-300:]}")
    return {("pp" if r["n_prompt"] else "tg", int(r["n_depth"])): float(r["avg_ts"]) for r in json.loads(done.stdout)}


def option_for(path: Path, machine: Any) -> Any:
    from launcher.fit import fit
    from launcher.plan import Policy

    plan = fit(str(path), Policy(n_ctx=CTX), machine=machine, confirm=False)
    assert plan.chosen is not None
    return plan.chosen


def predictions(option: Any, devices: Any, calibration: Any) -> dict[tuple[str, int], float | None]:
    from launcher.speed import predict

    out: dict[tuple[str, int], float | None] = {}
    for depth in DEPTHS:
        out[("pp", depth)] = predict(option, devices, depth, n_prompt=PP, calibration=calibration).pp_per_s
        # tg128 @ d: 128 tokens decoded from depth d, 64 on average before each
        out[("tg", depth)] = predict(option, devices, depth + TG // 2, calibration=calibration).tg_per_s
    return out


def warm_up(models: dict[str, Path], machine: Any) -> tuple[str, str | None]:
    """One `--warmup full` run of each model through fitquant's run path (recorded in FITQUANT_HOME, which local()
    points at a temporary folder); the (backend, version) the record is keyed by."""
    from launcher.backends.base import LaunchRequest
    from launcher.plan import Policy
    from launcher.run import RunSpec, backend_and_machine, backend_build, start, stop

    backend, _, _ = backend_and_machine("llamacpp")
    for name, path in models.items():
        spec = RunSpec(str(path), Policy(n_ctx=2048), LaunchRequest(), warmup="full", confirm=False)
        result = start(spec, backend=backend, machine=machine)
        stop(result, backend)
        s, w = result.speed, result.warmup
        print(f"  warm-up {name}: decode {s.get('measured_tg_per_s')} t/s of {w.get('decode_samples')} (ratio "
              f"{s.get('tg_ratio')}), after the fill {s.get('measured_tg_per_s_at_fill')} of "
              f"{w.get('decode_samples_at_fill')} (attention ratio {s.get('attention_ratio')}), shallow prefill "
              f"{s.get('measured_pp_per_s_shallow')} of {w.get('prefill_samples_shallow')}, fill "
              f"{s.get('measured_pp_per_s')} t/s (prefill ratio {s.get('pp_ratio')}), after the fill "
              f"{s.get('measured_pp_per_s_at_fill')} t/s", file=sys.stderr)  # fmt: skip
    build = backend_build(backend)
    assert build is not None
    return build


def local(reps: int, rounds: int = 2) -> list[dict[str, Any]]:
    from launcher.backends.builds import find_built
    from launcher.embedded import embedded_model_path, gemma_model_path
    from launcher.hardware import detect_hardware
    from launcher.record import model_key
    from launcher.speed import calibration, machine_speeds

    binary = find_built("llama-bench")
    if binary is None:
        raise SystemExit("bench_speed: no llama-bench in the cached llama.cpp build; scripts/build-llama-cpp --force "
                         "builds it beside llama-server")  # fmt: skip
    from launcher.paths import cache_dir

    folder = cache_dir() / "bench-ladder"
    folder.mkdir(parents=True, exist_ok=True)
    smol, gemma = embedded_model_path(), gemma_model_path()
    models = {
        "SmolLM2-135M Q4_1": smol,
        **{f"SmolLM2-135M {q}": quantize(smol, q, folder) for q in SMOL_LADDER},
        "Gemma-3-270M Q4_K_M": gemma,
        **{f"Gemma-3-270M {q}": quantize(gemma, q, folder) for q in GEMMA_LADDER},
    }
    machine = detect_hardware()
    options = {name: option_for(path, machine) for name, path in models.items()}
    devices = machine_speeds(machine, list(options.values()))
    cpu = devices.get("CPU")
    print(f"\nthis machine: {os.cpu_count()} cpus, measured {cpu.bandwidth_bytes_per_s / 1e9:.1f} GB/s copy, "
          f"{(cpu.flops or 0) / 1e9:.0f} GFLOPS FP32 matmul" if cpu else "\nthis machine: no host figures")  # fmt: skip
    if cpu and cpu.tensor_overhead_s:
        print(f"  llama.cpp's fixed cost per block tensor of a decoded token: {cpu.tensor_overhead_s * 1e6:.2f} us")
    for key, rate in sorted((cpu.kernel_rates or {}).items()) if cpu else ():
        what = "flash attention" if "-" in key.split(" ")[1] else "weights"  # attention keys name K-V types
        print(f"  {what} {key}: {rate / 1e9:.1f} GFLOPS (llama.cpp's kernel, timed on this host)")
    measured: dict[str, dict[tuple[str, int], float]] = {name: {} for name in models}
    raw = {name: predictions(options[name], devices, None) for name in models}
    smol_models = {name: path for name, path in models.items() if name.startswith("SmolLM2")}
    gemma_models = {name: path for name, path in models.items() if name not in smol_models}

    def factors(names: dict[str, Path]) -> dict[str, Any]:
        # what the next plan of each model would be calibrated by: its own runs first, else its type's
        return {name: calibration(machine, backend, version, name.rsplit(" ", 1)[-1], model_key(str(path)))
                for name, path in names.items()}  # fmt: skip

    def bench(name: str, path: Path) -> None:
        for key, value in llama_bench(binary, path, reps).items():
            measured[name][key] = max(value, measured[name].get(key, 0.0))

    by_other: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fitquant-bench-speed-") as home:
        os.environ["FITQUANT_HOME"] = home  # the warm-ups' record and instances: thrown away after
        try:
            for name, path in models.items():
                if name in gemma_models and not by_other:
                    by_other = factors(gemma_models)  # Gemma not run yet: SmolLM2's runs of its type
                # the model's warm-up between its llama-bench rounds: the machine's speed wanders over minutes, and
                # a warm-up taken in another spell than the figures it is checked against would measure the spell
                bench(name, path)
                backend, version = warm_up({name: path}, machine)
                for _ in range(rounds - 1):
                    bench(name, path)
            by_own = factors(models)
        finally:
            del os.environ["FITQUANT_HOME"]
    rows = []
    for name in models:
        own = predictions(options[name], devices, by_own[name])
        other = predictions(options[name], devices, by_other[name]) if name in by_other else {}
        for test in ("pp", "tg"):
            for depth in DEPTHS:
                key = (test, depth)
                rows.append({"model": name, "test": f"{test}{PP if test == 'pp' else TG} @ d{depth}",
                             "measured": measured[name].get(key), "predicted": raw[name][key],
                             "calibrated": own[key], "by_other": other.get(key)})  # fmt: skip
    return rows


def render(rows: list[dict[str, Any]]) -> None:
    def err(p: float | None, m: float | None) -> str:
        return f"{p / m - 1:+.0%}" if p and m else "-"

    def value(v: float | None) -> str:
        return f"{v:.1f}" if v else "-"

    print("\n| model (this machine, CPU) | test | llama-bench t/s | predicted | error | after its warm-up | error "
          "| after another model's | error |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, p, c, o = r["measured"], r["predicted"], r["calibrated"], r["by_other"]
        print(f"| {r['model']} | {r['test']} | {value(m)} | {value(p)} | {err(p, m)} | {value(c)} | {err(c, m)} | "
              f"{value(o)} | {err(o, m)} |")  # fmt: skip
    for label, key in (("uncalibrated", "predicted"), ("after one warm-up of the model", "calibrated"),
                       ("after another model's warm-ups of its type (Gemma's rows)", "by_other")):  # fmt: skip
        errors = [abs(r[key] / r["measured"] - 1) for r in rows if r[key] and r["measured"]]
        if not errors:
            continue
        within = {t: sum(e <= t for e in errors) for t in (0.1, 0.2)}
        print(f"\n{label}: {within[0.2]}/{len(errors)} within 20%, {within[0.1]}/{len(errors)} within 10%, "
              f"median error {sorted(errors)[len(errors) // 2]:.0%}, worst {max(errors):.0%}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-local", action="store_true", help="Only the published rows (nothing is run).")
    parser.add_argument("--reps", type=int, default=3, help="llama-bench repetitions per test (default 3).")
    parser.add_argument("--rounds", type=int, default=2, help="llama-bench rounds per model, warm-up after the first.")
    parser.add_argument("--json", type=Path, help="Also write this machine's rows to FILE.")
    args = parser.parse_args()
    published()
    if args.no_local:
        return
    rows = local(args.reps, args.rounds)
    render(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
