"""Accuracy: compare estimates with llama.cpp's own figures for the same configuration.

Shared by the test suite (which asserts the tolerances) and scripts/bench_estimate.py (which prints
the table). The oracle is llama.cpp itself, run by launcher.measure.dryrun with `no_alloc`.

Tolerances (the foundation issue's contract, and issue 11's lower bound):
- weights, KV cache and recurrent state: exact, to the precision llama.cpp prints (MiB, 2 decimals);
  weights against `llama_model_size`, which is exact in bytes;
- compute buffer: within 10% or 16 MiB, whichever is larger, and never more than 2% or 8 MiB (whichever is
  larger) below llama.cpp's figure: an estimate that is low says "fits" where llama.cpp will not;
- total: within 2% or 32 MiB, whichever is larger.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.estimate import MemoryEstimate, Settings
from launcher.model import ModelFacts

MiB = 1024**2
# llama.cpp prints "%7.2f" of a float: compare at that precision, allowing the last digit's rounding.
PRINT_PRECISION_MIB = 0.0051


@dataclass(frozen=True)
class Check:
    """One component of one configuration: what fitquant predicted and what llama.cpp reported."""

    component: str  # "weights" | "kv" | "kv:SWA" | "recurrent" | "compute" | "total"
    predicted_mib: float
    measured_mib: float
    tolerance_mib: float
    exact: bool  # compared at llama.cpp's print precision rather than within a tolerance
    low_tolerance_mib: float | None = None  # how far below llama.cpp it may be, when not tolerance_mib

    @property
    def error_mib(self) -> float:
        return self.predicted_mib - self.measured_mib

    @property
    def error_ratio(self) -> float:
        return self.error_mib / self.measured_mib if self.measured_mib else 0.0

    @property
    def ok(self) -> bool:
        low = self.tolerance_mib if self.low_tolerance_mib is None else self.low_tolerance_mib
        return -low <= self.error_mib <= self.tolerance_mib


def engine_settings(settings: Settings) -> Any:
    """The launcher.engine settings that run `settings` on llama.cpp's CPU backend."""
    from launcher.engine import EngineSettings

    return EngineSettings(
        n_ctx=settings.n_ctx,
        n_gpu_layers=settings.n_gpu_layers,
        type_k=settings.type_k,
        type_v=settings.type_v,
        flash_attn=settings.flash_attn,
        n_parallel=settings.n_parallel,
        kv_unified=settings.kv_unified,
        swa_full=settings.swa_full,
        n_batch=settings.n_batch,
        n_ubatch=settings.n_ubatch,
    )


def settings_matrix(
    facts: ModelFacts,
    *,
    contexts: tuple[int, ...] = (4096, 32768, 131072),
    train_context: bool = False,
    slot_outputs: bool = False,
) -> Iterator[Settings]:
    """Every setting the contract covers for one model: contexts the model allows (and its training context
    when `train_context`), K/V f16 (flash attention off and on) and q8_0, one slot and four (unified and
    per-sequence), swa_full off and on; with `slot_outputs`, each also with llama-server's one output per slot
    (n_outputs_max = n_parallel) besides the library's default (every token)."""
    allowed = [c for c in contexts if not facts.n_ctx_train or c <= max(facts.n_ctx_train, contexts[0])]
    if train_context and facts.n_ctx_train and facts.n_ctx_train not in allowed:
        allowed.append(facts.n_ctx_train)
    kv_modes = (("f16", "off"), ("f16", "on"), ("q8_0", "on"))
    slots = ((1, False), (4, True), (4, False))
    swa_modes = (False, True) if facts.swa_type != "none" else (False,)
    outputs = (False, True) if slot_outputs else (False,)
    for n_ctx in allowed:
        for cache_type, flash_attn in kv_modes:
            for n_parallel, unified in slots:
                for swa_full in swa_modes:
                    for per_slot in outputs:
                        yield Settings(
                            n_ctx=n_ctx,
                            type_k=cache_type,
                            type_v=cache_type,
                            flash_attn=flash_attn,
                            n_parallel=n_parallel,
                            kv_unified=unified,
                            swa_full=swa_full,
                            n_outputs_max=n_parallel if per_slot else 0,
                        )


def compare(estimate: MemoryEstimate, measurement: Any) -> list[Check]:
    """Checks of one estimate against one launcher.measure.dryrun measurement of the same settings."""
    checks: list[Check] = []

    def exact(component: str, predicted_bytes: int, measured_mib: float) -> None:
        checks.append(Check(component, predicted_bytes / MiB, measured_mib, PRINT_PRECISION_MIB, True))

    weights_exact = estimate.weights_bytes == measurement.model_size_bytes
    checks.append(
        Check("weights", estimate.weights_bytes / MiB, measurement.model_size_bytes / MiB, 0.0, True)
        if weights_exact
        else Check("weights", estimate.weights_bytes / MiB, measurement.model_size_bytes / MiB, -1.0, True)
    )
    caches = [c for c in estimate.kv_caches if c.layers or len(estimate.kv_caches) == 1]
    measured_caches = list(measurement.kv_caches)
    if len(caches) == len(measured_caches):
        for predicted, measured in zip(caches, measured_caches, strict=True):
            name = "kv" if predicted.kind in ("full", "non-SWA") else "kv:SWA"
            exact(name, predicted.total_bytes, measured.total_mib)
            if predicted.cells != measured.cells:
                checks.append(Check(name + " cells", predicted.cells, measured.cells, 0.0, True))
    else:
        checks.append(
            Check("kv caches", float(len(caches)), float(len(measured_caches)), 0.0, True)
        )  # a different number of caches is a failure in itself
    measured_rs = sum(rs.total_mib for rs in measurement.rs_caches)
    if estimate.recurrent_bytes or measured_rs:
        exact("recurrent", estimate.recurrent_bytes, measured_rs)
    measured_compute = measurement.total_mib("compute")
    predicted_compute = estimate.compute_bytes / MiB
    checks.append(
        Check(
            "compute",
            predicted_compute,
            measured_compute,
            max(0.10 * measured_compute, 16.0),
            False,
            low_tolerance_mib=max(0.02 * measured_compute, 8.0),
        )
    )
    measured_kv = sum(c.total_mib for c in measured_caches)
    measured_total = (
        measurement.model_size_bytes / MiB + measured_kv + measured_rs + measured_compute
        + measurement.total_mib("output")
    )  # fmt: skip
    predicted_total = (
        estimate.weights_bytes + estimate.kv_bytes + estimate.recurrent_bytes + estimate.compute_bytes
        + estimate.output_bytes
    ) / MiB  # fmt: skip
    checks.append(Check("total", predicted_total, measured_total, max(0.02 * measured_total, 32.0), False))
    return checks


@dataclass(frozen=True)
class Row:
    """One configuration of one model: its checks, or why llama.cpp could not measure it."""

    model: str
    settings: Settings
    checks: tuple[Check, ...]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(check.ok for check in self.checks)


def run_matrix(
    models: Iterable[tuple[str, Path]],
    *,
    full: bool = True,
    matrix: Callable[[ModelFacts], Iterable[Settings]] | None = None,
) -> list[Row]:
    """Estimate and measure every setting of the contract (or only 4k f16 when not `full`, or the settings
    `matrix` gives) for each model.

    All measurements run in one llama.cpp worker process (launcher.measure.dryrun.measure_many).
    """
    from launcher.estimate import estimate
    from launcher.gguf import read_header
    from launcher.measure.dryrun import EngineSettings, measure_many
    from launcher.model import model_facts

    jobs, plan = [], []
    for name, path in models:
        facts = model_facts(read_header(path))
        if matrix is not None:
            chosen = list(matrix(facts))
        else:
            chosen = list(settings_matrix(facts)) if full else [Settings(n_ctx=4096)]
        for settings in chosen:
            plan.append((name, facts, settings))
            jobs.append((path, EngineSettings.from_settings(settings)))
    rows = []
    for (name, facts, settings), measured in zip(plan, measure_many(jobs), strict=True):
        if isinstance(measured, Exception):
            rows.append(Row(name, settings, (), str(measured)))
        else:
            rows.append(Row(name, settings, tuple(compare(estimate(facts, settings), measured))))
    return rows


def describe(settings: Settings) -> str:
    """Short label of a setting: '32k q8_0 fa-on np4u swa-full'."""
    s = settings
    slots = f"np{s.n_parallel}{'u' if s.kv_unified and s.n_parallel > 1 else ''}"
    outputs = f" out{s.n_outputs_max}" if s.n_outputs_max else ""
    ctx = f"{s.n_ctx // 1024}k" if s.n_ctx % 1024 == 0 else str(s.n_ctx)
    return f"{ctx} {s.type_k} fa-{s.flash_attn} {slots}{outputs}{' swa-full' if s.swa_full else ''}"
