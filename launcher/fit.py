"""fit(): the whole decision for one model on one machine, in one call.

catalog (candidates and headers) -> hardware (budgets) -> plan (pure) -> engine confirmation (llama.cpp
dry runs of the chosen configuration and the neighbours the decision hinged on, when llama-cpp-python is
installed) -> the final Plan, saying which figures came from the engine and which from the estimate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from launcher.errors import NoFitError
from launcher.plan import (
    CONTEXT_STEP,
    MeasureKey,
    Measurements,
    Option,
    Plan,
    Policy,
    apply_measurement,
    budgets_for,
    evaluate,
    largest_true,
    make_plan,
)

if TYPE_CHECKING:
    import httpx

    from launcher.catalog.types import Candidate
    from launcher.hardware import HardwareSnapshot

# Rounds of measure-and-replan: an engine figure can move the decision to a neighbour, which is then
# measured in turn; each round measures up to three options, so a ladder is walked in a few rounds.
CONFIRM_ROUNDS = 12

# Measures options (llama.cpp dry runs by default); options it cannot measure are left out of the result.
Measurer = Callable[[list[Option]], Measurements]


def _near_miss(option: Option, plan: Plan) -> bool:
    """Rejected by the estimate, but by less than the estimate's compute tolerance (10% or 16 MiB)."""
    margin = max(16 * 2**20, option.estimate.compute_bytes // 10)
    return all(option.needs.get(b.name, 0) - b.usable_bytes <= margin for b in plan.budgets)


def _decisive(plan: Plan) -> list[Option]:
    """What the decision hinges on: the chosen option, every better quant the estimate rejected by a
    margin within its error, and the next quant down."""
    ordered = [o for o in plan.candidates if o.above_floor]
    if plan.chosen is not None and plan.mode in ("gpu", "cpu"):
        rank = plan.chosen.quality_rank
        picked = [plan.chosen] + [o for o in ordered if o.quality_rank > rank and _near_miss(o, plan)]
        below = [o for o in ordered if o.quality_rank < rank]
        picked += below[:1]
    else:
        picked = [o for o in ordered if _near_miss(o, plan)]
        if plan.chosen is not None:
            picked.append(plan.chosen)
    return [o for o in picked if not o.cpu_moe]  # llama.cpp's dry run takes no tensor overrides here


def fit(
    model: str | None,
    policy: Policy,
    *,
    machine: HardwareSnapshot | None = None,
    candidates: Sequence[Candidate] | None = None,
    confirm: bool = True,
    measurer: Measurer | None = None,
    client: httpx.Client | None = None,
    remembered: tuple[Measurements, list[str]] | None = None,
    build: tuple[str, str | None] | None = None,
) -> Plan:
    """Plan `model` for `machine` (probed when None) under `policy`; raise NoFitError when nothing fits.
    `build` (backend name, server version) calibrates the predicted speeds by that build's runs on this machine.

    With `confirm`, the options the decision hinges on are measured by `measurer` (by default llama.cpp
    dry runs, when llama-cpp-python is installed and runs the plan's backend) and the plan is made again
    with the measured figures. NoFitError carries the refused plan (`exc.plan`): its candidates, reasons
    and alternatives. `remembered` (launcher.record.remembered) are figures measured by earlier launches on
    this machine: the plan starts from them, and the dry run does not measure those configurations again.
    """
    if machine is None:
        from launcher.hardware import detect_hardware

        machine = detect_hardware()
    plan = _fit(model, policy, machine=machine, candidates=candidates, confirm=confirm, measurer=measurer,
                client=client, remembered=remembered)  # fmt: skip
    from launcher.record import model_key

    attach_speeds(plan, machine, backend=build[0] if build else None, version=build[1] if build else None,
                  model=model_key(model))  # fmt: skip
    if policy.min_tg_per_s is not None:
        apply_min_speed(plan, policy.min_tg_per_s)
    if policy.prefer == "speed":
        apply_prefer_speed(plan)
    if plan.chosen is None:
        raise NoFitError(plan.reason, plan=plan)
    note = cpu_kv_note(plan, machine)
    if note is not None:
        plan.notes.append(note)
    return plan


def attach_speeds(
    plan: Plan,
    machine: HardwareSnapshot,
    *,
    backend: str | None = None,
    version: str | None = None,
    model: str | None = None,
) -> None:
    """Predicted decode and prefill tokens/s on every option of the plan (launcher.speed), where the machine's
    devices have known figures: a GPU's own (NVML, a profile) or by name, the host's (a profile's, else measured;
    not for a described machine). With the `backend` and its build's `version` that will run the plan, each
    option is calibrated by what verified runs of that build measured on this machine, those of this `model`
    (launcher.record.model_key) and its quant type first (launcher.speed.calibration), and a plan note says so for
    the chosen one."""
    from launcher.speed import Calibration, calibration, machine_speeds, predict

    # the chosen option first: a host times its kernels for the first options' weights (up to a bound) before the rest
    options = list({id(o): o for o in [*([plan.chosen] if plan.chosen else []), *plan.alternatives, *plan.candidates]
                    }.values())  # fmt: skip
    devices = machine_speeds(machine, options)
    by_quant: dict[str, Calibration | None] = {}

    def calibrated(quant: str) -> Calibration | None:
        if backend is None or not devices:
            return None
        if quant not in by_quant:
            by_quant[quant] = calibration(machine, backend, version, quant, model)
        return by_quant[quant]

    for option in options:
        factors = calibrated(option.quant)
        empty = predict(option, devices, 0, calibration=factors)
        deep = predict(option, devices, option.n_ctx // max(1, plan.policy.n_parallel), calibration=factors)
        if empty.tg_per_s is None and empty.pp_per_s is None:
            continue
        option.speed = {**empty.to_json(), "tg_per_s_at_depth": deep.to_json()["tg_per_s"],
                        "pp_per_s_at_depth": deep.to_json()["pp_per_s"]}  # fmt: skip
        option.calibration = factors
    chosen = calibrated(plan.chosen.quant) if plan.chosen is not None and plan.chosen.speed else None
    if chosen is not None:
        plan.notes.append(chosen.note())


KV_SPEEDUP_NOTE = 1.5  # an f16 cache is named beside a quantized one that prefills at least this much slower


def cpu_kv_note(plan: Plan, machine: HardwareSnapshot) -> str | None:
    """On a plan that runs on the CPU alone with a quantized K/V cache: how much faster the same option would
    prefill and decode at the target depth with an f16 cache on this host, and what that costs in memory, where it
    prefills at least KV_SPEEDUP_NOTE times faster. llama.cpp's CPU flash attention tiles a prompt's queries only
    for f16 K and V, and runs a per-query loop over a quantized cache (launcher.measure.kernels times both)."""
    from dataclasses import replace

    from launcher.speed import attention_measured, machine_speeds, predict
    from launcher.units import format_bytes

    chosen = plan.chosen
    settings = chosen.estimate.settings if chosen is not None else None
    if (
        chosen is None
        or settings is None
        or chosen.speed is None
        or settings.flash_attn == "off"
        or any(b.name != "CPU" for b in plan.budgets)
        or {settings.type_k, settings.type_v} <= {"f16", "f32"}
    ):
        return None  # fmt: skip
    policy = replace(plan.policy, type_k="f16", type_v="f16", flash_attn=settings.flash_attn)
    f16 = evaluate(chosen.candidate, chosen.facts, policy, plan.budgets, n_ctx=chosen.n_ctx, n_gpu_layers=0,
                   cpu_moe=chosen.cpu_moe, floor=plan.floor)  # fmt: skip
    devices = machine_speeds(machine, [chosen, f16])
    if not (attention_measured(chosen, devices) and attention_measured(f16, devices)):
        return None  # a fitted figure on either side: the difference would not be this host's
    depth = chosen.n_ctx // max(1, plan.policy.n_parallel)
    now, then = predict(chosen, devices, depth), predict(f16, devices, depth)
    if not (now.pp_per_s and then.pp_per_s and now.tg_per_s and then.tg_per_s):
        return None
    if then.pp_per_s < KV_SPEEDUP_NOTE * now.pp_per_s:
        return None
    extra = f16.total_bytes - chosen.total_bytes
    room = "it fits" if f16.fits else f"it does not fit here ({f16.reason})"
    return (f"K/V {settings.type_k}/{settings.type_v} on this CPU: an f16 cache would prefill "
            f"{then.pp_per_s / now.pp_per_s:.1f}x and decode {then.tg_per_s / now.tg_per_s:.1f}x as fast at "
            f"{depth} tokens (llama.cpp's CPU flash attention tiles prompts only for f16 K and V; measured on this "
            f"host) for {format_bytes(extra)} more memory; {room}" + (": --kv f16" if f16.fits else ""))  # fmt: skip


def apply_min_speed(plan: Plan, min_tg_per_s: float) -> None:
    """--min-speed: keep the highest-quality option that fits and decodes at least `min_tg_per_s` tokens/s at the
    target depth (predicted); the plan says which it took and why, or that none is fast enough or that the speed
    cannot be told (a device's figures unknown), and then keeps the choice by memory alone."""
    chosen = plan.chosen
    if chosen is None:
        return
    wanted = f"--min-speed {min_tg_per_s:g}"

    def at_depth(option: Option) -> float:
        return (option.speed or {}).get("tg_per_s_at_depth") or 0.0

    if not (chosen.speed or {}).get("tg_per_s_at_depth"):
        plan.notes.append(f"{wanted}: the speed of these devices is unknown; chosen by memory alone")
        return
    if at_depth(chosen) >= min_tg_per_s:
        return
    fast = [o for o in plan.candidates if o.fits and o.above_floor and at_depth(o) >= min_tg_per_s]
    if not fast:
        best = max((o for o in plan.candidates if o.fits), key=at_depth, default=chosen)
        plan.notes.append(f"{wanted}: nothing that fits decodes that fast at the target depth; the fastest is "
                          f"{best.quant} at {at_depth(best):.1f} tokens/s")  # fmt: skip
        return
    faster = max(fast, key=lambda o: o.quality_rank)
    plan.notes.append(f"{wanted}: {chosen.quant} decodes {at_depth(chosen):.1f} tokens/s at the target depth; "
                      f"{faster.quant} is the highest quality that reaches it ({at_depth(faster):.1f})")  # fmt: skip
    plan.chosen = faster
    plan.reason = f"{faster.quant} is the highest-quality quant that fits and decodes {min_tg_per_s:g} tokens/s or more"


def apply_prefer_speed(plan: Plan) -> None:
    """--prefer speed: of the options that fit entirely above the quality floor, the one predicted to decode fastest
    at the target depth (a smaller quant reads fewer bytes per token); the plan says what it gave up. Without the
    devices' speed figures the choice stays by quality, and the plan says so."""
    chosen = plan.chosen
    if chosen is None:
        return

    def at_depth(option: Option) -> float | None:
        return (option.speed or {}).get("tg_per_s_at_depth")

    if at_depth(chosen) is None:
        plan.notes.append("--prefer speed: the speed of these devices is unknown; chosen by quality")
        return
    entirely = chosen.fully_offloaded
    pool = [o for o in plan.candidates if o.fits and o.above_floor and at_depth(o) is not None
            and (o.fully_offloaded or not entirely)]  # fmt: skip
    fastest = max(pool, key=lambda o: (at_depth(o) or 0.0, o.quality_rank), default=chosen)
    if fastest is chosen:
        return
    plan.notes.append(f"--prefer speed: {fastest.quant} decodes {at_depth(fastest):.1f} tokens/s at the target depth, "
                      f"{chosen.quant} (the highest quality that fits) {at_depth(chosen):.1f}")  # fmt: skip
    plan.chosen = fastest
    plan.reason = f"{fastest.quant} is the fastest quant above the quality floor that fits (--prefer speed)"


def fit_together(
    models: Sequence[tuple[str | None, Policy, str]],
    *,
    machine: HardwareSnapshot,
    remembered: Sequence[tuple[Measurements, list[str]] | None] | None = None,
    confirm: bool = True,
    measurer: Measurer | None = None,
    build: tuple[str, str | None] | None = None,
) -> list[Plan]:
    """Plan several models to run at once on `machine`, in order: each plan sees the memory the ones before it
    take. `models` are (reference, policy, name shown in errors). A model that does not fit entirely (all on the
    GPU, or in RAM on a machine without one) raises NoFitError naming it and the models beside it."""
    plans: list[Plan] = []
    remaining = machine
    known = list(remembered or [None] * len(models))
    for (model, policy, name), memory in zip(models, known, strict=True):
        beside = ", ".join(shown for _, _, shown in models[: len(plans)])
        where = f" beside {beside}" if beside else ""
        try:
            plan = fit(model, policy, machine=remaining, confirm=confirm, measurer=measurer, remembered=memory,
                       build=build)  # fmt: skip
        except NoFitError as exc:
            raise NoFitError(f"{name!r} does not fit entirely{where}: {exc}", plan=exc.plan) from None
        if plan.mode not in ("gpu", "cpu"):
            raise NoFitError(f"{name!r} does not fit entirely{where}: {plan.reason}", plan=plan)
        assert plan.chosen is not None
        plans.append(plan)
        remaining = less_free(remaining, plan.chosen.needs)
    return plans


def less_free(machine: HardwareSnapshot, needs: Mapping[str, int]) -> HardwareSnapshot:
    """The machine with `needs` (bytes per plan budget: GPU0.., CPU) taken from its free memory."""
    devices = tuple(
        d.model_copy(update={"free_bytes": max(0, d.free_bytes - needs.get(f"GPU{d.index}", 0))})
        if d.free_bytes is not None
        else d
        for d in machine.devices
    )
    ram = machine.ram_available_bytes
    if ram is not None and not machine.devices:
        ram = max(0, ram - needs.get("CPU", 0))
    return machine.model_copy(update={"devices": devices, "ram_available_bytes": ram})


def _fit(
    model: str | None,
    policy: Policy,
    *,
    machine: HardwareSnapshot | None,
    candidates: Sequence[Candidate] | None,
    confirm: bool,
    measurer: Measurer | None,
    client: httpx.Client | None,
    remembered: tuple[Measurements, list[str]] | None = None,
) -> Plan:
    from launcher.catalog import list_candidates

    if candidates is None:
        candidates = list_candidates(model, client=client)
    if machine is None:
        from launcher.hardware import detect_hardware

        machine = detect_hardware()
    budgets = budgets_for(machine.devices, ram_available_bytes=machine.ram_available_bytes,
                          reserve_bytes=policy.reserve_bytes)  # fmt: skip
    from launcher.http import redact_url

    shown = redact_url(model) if model else "the embedded default model"  # no credentials in a plan
    known, known_notes = remembered or ({}, [])
    plan = make_plan(shown, candidates, budgets, policy, measured=known)
    plan.notes.extend(known_notes)
    if not confirm:
        plan.notes.append("engine confirmation off: every figure is fitquant's estimate"
                          + (" or was measured on this machine" if known else ""))  # fmt: skip
        return plan
    if measurer is None:
        why_not = _why_no_engine(any(b.name != "CPU" for b in budgets))
        if why_not:
            plan.notes.append(why_not)
            return plan
        from launcher.measure.confirm import measure_options

        def measurer(options: list[Option]) -> Measurements:
            return measure_options(options, client=client)

    measured: Measurements = dict(known)
    tried: set[MeasureKey] = set(known)  # asked once: an option the measurer could not measure is not asked again
    for _ in range(CONFIRM_ROUNDS):
        todo = [o for o in _decisive(plan) if MeasureKey.of(o) not in tried]
        if not todo:
            break
        tried.update(MeasureKey.of(o) for o in todo)
        measured.update(measurer(todo))
        plan = make_plan(shown, candidates, budgets, policy, measured=measured)
        plan.notes.extend(known_notes)
    if plan.mode == "reduced-context" and plan.chosen is not None:
        _confirm_reduced_context(plan, measured, measurer)
    if plan.chosen is not None and plan.chosen.figures == "engine":
        plan.notes.append("the chosen configuration was measured by llama.cpp itself (dry run, no allocation)")
    return plan


def _why_no_engine(has_gpu: bool) -> str | None:
    """Why llama.cpp cannot confirm this plan here, or None when it can."""
    from launcher.measure.confirm import engine_offloads
    from launcher.measure.dryrun import engine_available

    if not engine_available():
        return "llama-cpp-python is not installed: figures are estimates (pip install 'fitquant[llamacpp]')"
    if has_gpu and not engine_offloads():
        # The installed llama.cpp has no GPU backend, so it cannot size CUDA/Metal buffers: its CPU figures
        # would not describe the GPU. Keep the estimate and say so.
        return (
            "the installed llama.cpp is a CPU-only build: GPU figures are estimates "
            "(a CUDA or Metal build of llama-cpp-python measures them)"
        )
    return None


def _confirm_reduced_context(plan: Plan, measured: Measurements, measurer: Measurer) -> None:
    """Re-find the largest context with llama.cpp's figures; if the chosen quant then falls short of the
    smallest context worth proposing, try the next quants above the floor, best quality first."""
    assert plan.chosen is not None
    estimated = plan.chosen
    wanted = min(plan.policy.min_context, plan.policy.n_ctx)
    start = next(i for i, o in enumerate(plan.candidates) if o.quant == estimated.quant)
    best: Option | None = None
    for option in [estimated, *(o for o in plan.candidates[start + 1 :] if o.above_floor)]:
        refined = _refine_context(plan, option, measured, measurer)
        if refined is not None and (best is None or refined.n_ctx > best.n_ctx):
            best = refined
        if best is not None and best.n_ctx >= wanted:
            break
    if best is None or (best.quant, best.n_ctx) == (estimated.quant, estimated.n_ctx):
        return
    plan.alternatives = [best if o is estimated else o for o in plan.alternatives]
    plan.chosen = best
    plan.reason = plan.reason.rsplit(";", 1)[0] + f"; {best.quant} fits entirely at {best.n_ctx} tokens"
    plan.notes.append(
        f"llama.cpp's own figures moved the choice from {estimated.quant} at {estimated.n_ctx} tokens "
        f"to {best.quant} at {best.n_ctx}"
    )


class _Unmeasurable(Exception):
    pass


def _refine_context(plan: Plan, chosen: Option, measured: Measurements, measurer: Measurer) -> Option | None:
    """Find, with llama.cpp's own figures, the largest context at which `chosen`'s quant fits.

    Starts from the estimate's answer and brackets the boundary in 256-token steps, then bisects; every
    probe is a dry run, recorded in `measured`. Returns the engine-measured option at the boundary, or None
    when llama.cpp could not measure it.
    """
    budgets, policy, floor = plan.budgets, plan.policy, plan.floor
    probed: dict[int, Option] = {}

    def fits(steps: int) -> bool:
        option = evaluate(chosen.candidate, chosen.facts, policy, budgets, n_ctx=steps * CONTEXT_STEP, floor=floor)
        key = MeasureKey.of(option)
        if key not in measured:
            measured.update(measurer([option]))
        if key not in measured:
            raise _Unmeasurable
        probed[steps] = apply_measurement(option, measured[key], budgets)
        return option.fits

    try:
        low = largest_true(fits, policy.n_ctx // CONTEXT_STEP, start=max(1, chosen.n_ctx // CONTEXT_STEP))
    except _Unmeasurable:
        return None
    return probed.get(low) if low else None
