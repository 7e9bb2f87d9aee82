"""fit(): the whole decision for one model on one machine, in one call.

catalog (candidates and headers) -> hardware (budgets) -> plan (pure) -> engine confirmation (llama.cpp
dry runs of the chosen configuration and the neighbours the decision hinged on, when llama-cpp-python is
installed) -> the final Plan, saying which figures came from the engine and which from the estimate.
"""

from __future__ import annotations

from typing import Any

from launcher.plan import Option, Plan, Policy, budgets_for, make_plan

# Rounds of measure-and-replan: an engine figure can move the decision to a neighbour, which is then
# measured in turn; each round measures up to three options, so a ladder is walked in a few rounds.
CONFIRM_ROUNDS = 12


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
    machine: Any = None,
    candidates: list[Any] | None = None,
    confirm: bool = True,
    client: Any = None,
) -> Plan:
    """Plan `model` for `machine` (a HardwareSnapshot; probed when None) under `policy`."""
    from launcher.catalog import list_candidates

    if candidates is None:
        candidates = list_candidates(model, client=client)
    if machine is None:
        from launcher.hardware import detect_hardware

        machine = detect_hardware()
    budgets = budgets_for(machine.devices, ram_available_bytes=machine.ram_available_bytes,
                          reserve_bytes=policy.reserve_bytes)  # fmt: skip
    shown = model or "the embedded default model"
    plan = make_plan(shown, candidates, budgets, policy)
    if not confirm:
        plan.notes.append("engine confirmation off: every figure is fitquant's estimate")
        return plan
    from launcher.engine import engine_available

    if not engine_available():
        plan.notes.append("llama-cpp-python is not installed: figures are estimates (pip install 'fitquant[llamacpp]')")
        return plan
    from launcher.confirm import engine_offloads, measure_options

    has_gpu = any(b.name != "CPU" for b in budgets)
    if has_gpu and not engine_offloads():
        # The installed llama.cpp has no GPU backend, so it cannot size CUDA/Metal buffers: its CPU figures
        # would not describe the GPU. Keep the estimate and say so.
        plan.notes.append(
            "the installed llama.cpp is a CPU-only build: GPU figures are estimates "
            "(a CUDA or Metal build of llama-cpp-python measures them)"
        )
        return plan
    measured: dict[tuple[str, int, int, bool], dict[str, int]] = {}
    for _ in range(CONFIRM_ROUNDS):
        todo = [o for o in _decisive(plan) if (o.quant, o.n_ctx, o.n_gpu_layers, o.cpu_moe) not in measured]
        if not todo:
            break
        measured.update(measure_options(todo, client=client))
        plan = make_plan(shown, candidates, budgets, policy, measured=measured)
    if plan.mode == "reduced-context" and plan.chosen is not None:
        _confirm_reduced_context(plan, measured, client)
    if plan.chosen is not None and plan.chosen.figures == "engine":
        plan.notes.append("the chosen configuration was measured by llama.cpp itself (dry run, no allocation)")
    return plan


def _confirm_reduced_context(
    plan: Plan, measured: dict[tuple[str, int, int, bool], dict[str, int]], client: Any
) -> None:
    """Re-find the largest context with llama.cpp's figures; if the chosen quant then falls short of the
    smallest context worth proposing, try the next quants above the floor, best quality first."""
    assert plan.chosen is not None
    estimated = plan.chosen
    wanted = min(plan.policy.min_context, plan.policy.n_ctx)
    start = next(i for i, o in enumerate(plan.candidates) if o.quant == estimated.quant)
    best: Option | None = None
    for option in [estimated, *(o for o in plan.candidates[start + 1 :] if o.above_floor)]:
        refined = _refine_context(plan, option, measured, client)
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


def _refine_context(
    plan: Plan, chosen: Option, measured: dict[tuple[str, int, int, bool], dict[str, int]], client: Any
) -> Option | None:
    """Find, with llama.cpp's own figures, the largest context at which `chosen`'s quant fits.

    Starts from the estimate's answer and brackets the boundary in 256-token steps, then bisects; every
    probe is a dry run, recorded in `measured`. Returns the engine-measured option at the boundary, or None
    when llama.cpp could not measure it.
    """
    from launcher.confirm import measure_options
    from launcher.plan import CONTEXT_STEP, check_fit, evaluate

    budgets, policy, floor = plan.budgets, plan.policy, plan.floor
    limit = policy.n_ctx // CONTEXT_STEP

    probed: dict[int, Option] = {}

    def fits(steps: int) -> bool:
        option = evaluate(chosen.candidate, chosen.facts, policy, budgets, n_ctx=steps * CONTEXT_STEP, floor=floor)
        key = (option.quant, option.n_ctx, option.n_gpu_layers, option.cpu_moe)
        if key not in measured:
            measured.update(measure_options([option], client=client))
        if key not in measured:
            raise _Unmeasurable
        option.needs = dict(measured[key])
        option.figures = "engine"
        check_fit(option, budgets)
        probed[steps] = option
        return option.fits

    try:
        low = _bracket_and_bisect(fits, max(1, chosen.n_ctx // CONTEXT_STEP), limit)
    except _Unmeasurable:
        return None
    return probed.get(low) if low else None


class _Unmeasurable(Exception):
    pass


def _bracket_and_bisect(fits: Any, start: int, limit: int) -> int:
    """The largest n in 1..limit with fits(n), assuming fits is monotone; 0 when none. Few probes near start."""
    step = 1
    if fits(start):
        low, high = start, limit + 1
        while True:
            probe = min(limit, low + step)
            if probe == low:
                return low
            if not fits(probe):
                high = probe
                break
            low, step = probe, step * 2
    else:
        high = start
        while True:
            probe = max(1, high - step)
            if fits(probe):
                low = probe
                break
            if probe == 1:
                return 0
            high, step = probe, step * 2
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low
