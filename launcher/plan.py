"""Plan: the best quant, context and offload for a machine, why, and how to launch it. Pure.

Inputs are data: candidates (launcher.catalog) with their parsed headers, the machine's devices
(launcher.hardware, probed or described), a target context and a policy. Output is a Plan: the chosen
configuration, every candidate ranked with fit or no fit and why, the alternatives when nothing fits
at the target, and both launch configurations (llama-server argv, Ollama model/options/env).

Policy (../shared/DESIGN.md "What fits means"): the highest-quality quant that runs entirely on the
GPU(s) at the target context with the chosen KV cache type, never below the quality floor for the
model's size. A configuration fits a device when everything the device will hold plus the reserve
(1 GiB per GPU by default) is at most its free memory. When nothing above the floor fits: the largest
context that does with the best quant above the floor, else a partial offload labelled as running
partly on the CPU (MoE: experts to the CPU first, attention and KV stay on the GPU). `strict` accepts
nothing but a full fit. Without a GPU it plans for system RAM with no layers offloaded.

Placement (several GPUs): the layers are split in proportion to each device's usable memory when that fits.
Otherwise the other placements are searched (evaluate_placements): each device alone, devices left out, and each
order of the devices (the last one takes the output layer, src/llama-model.cpp), filled front to back with layer
counts as the -ts weights; the one that fits on the fewest devices wins, and the plan notes why it was taken over
the proportional split. A partial offload takes the most layers any placement holds, then the fewest devices.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from launcher.catalog.types import Candidate, CandidateFile
from launcher.defaults import DEFAULT_KV_TYPE, DEFAULT_MIN_CONTEXT, DEFAULT_RESERVE_BYTES, DEFAULT_UBATCH
from launcher.estimate import (
    GPU,
    MemoryEstimate,
    Settings,
    default_flash_attn,
    default_kv_unified,
    estimate,
)
from launcher.model import ModelFacts, model_facts
from launcher.quants import at_least, known_labels, normalize_label, quality_floor, quant_info
from launcher.units import MiB, format_bytes

if TYPE_CHECKING:
    from launcher.calibration import Calibration
    from launcher.hardware.types import Device

SCHEMA_VERSION = 1
#: The plan JSON's launch forms, one per runtime (Plan.to_json's `launch_forms`).
LAUNCH_FORM_KEYS = ("llama_server_argv", "ollama")
CONTEXT_STEP = 256  # llama.cpp pads n_ctx to 256 (src/llama-context.cpp)


@dataclass(frozen=True)
class Policy:
    """What the user asked for, and the rules of choice."""

    n_ctx: int
    type_k: str = DEFAULT_KV_TYPE
    type_v: str = DEFAULT_KV_TYPE
    flash_attn: str | None = None  # None: launcher.estimate.default_flash_attn (on for a quantized V cache)
    n_parallel: int = 1
    kv_unified: bool | None = None  # None: unified when several slots share one context (llama-server's default)
    n_ubatch: int = DEFAULT_UBATCH
    n_batch: int | None = None  # None: llama.cpp's 2048 (a server that sets it says so: ServerMemory)
    reserve_bytes: int = DEFAULT_RESERVE_BYTES  # kept free on every device
    min_quant: str | None = None  # quality floor override; None = by model size
    strict: bool = False  # nothing but a full fit at the target context
    vision: bool = False  # count the vision projector (mmproj) when the model has one
    min_context: int = DEFAULT_MIN_CONTEXT  # smallest reduced context worth proposing
    min_tg_per_s: float | None = None  # --min-speed: the highest quality that decodes this fast at the target depth
    prefer: str = "quality"  # --prefer speed: the fastest option above the quality floor (predicted decode at depth)
    # What the server does by default that changes memory (launcher.backends.base.ServerMemory, declared by the
    # backend that runs the plan): logits for every prompt token (llama-cpp-python's server) rather than one per
    # slot (llama-server), a larger output graph; a full-size SWA cache; host weights repacked for the CPU.
    all_logits: bool = False
    swa_full: bool = False
    cpu_repack: tuple[tuple[str, int], ...] = ()  # estimate.cpu_repack_rules of the CPU the server runs on

    def __post_init__(self) -> None:
        if self.flash_attn is None:
            object.__setattr__(self, "flash_attn", default_flash_attn(self.type_v))
        if self.min_quant is not None:
            object.__setattr__(self, "min_quant", quality_floor_label(self.min_quant))

    def settings(self, n_ctx: int | None = None, *, n_gpu_layers: int = -1, cpu_moe: bool = False) -> Settings:
        unified = self.kv_unified if self.kv_unified is not None else default_kv_unified(self.n_parallel)
        return Settings(
            n_ctx=n_ctx or self.n_ctx,
            type_k=self.type_k,
            type_v=self.type_v,
            flash_attn=self.flash_attn or default_flash_attn(self.type_v),
            n_gpu_layers=n_gpu_layers,
            n_parallel=self.n_parallel,
            kv_unified=unified,
            n_ubatch=self.n_ubatch,
            **({"n_batch": self.n_batch} if self.n_batch is not None else {}),
            cpu_moe=cpu_moe,
            n_outputs_max=0 if self.all_logits else self.n_parallel,
            swa_full=self.swa_full,
            cpu_repack=self.cpu_repack,
        )


def quality_floor_label(text: str) -> str:
    """A quality floor as written (q4_k_m, Q4_K_M) as the quant label it names; ValueError for an unknown one."""
    label = normalize_label(text)
    if label not in known_labels():
        raise ValueError(f"{label!r} is not a quant fitquant knows, e.g. Q4_K_M")
    return label


@dataclass(frozen=True)
class Budget:
    """One device the plan may fill: its free memory now and what to keep free."""

    name: str  # "GPU0", "GPU1", ... or "CPU" (system RAM when there is no GPU)
    backend: str  # "cuda" | "rocm" | "metal" | "cpu"
    free_bytes: int
    reserve_bytes: int

    @property
    def usable_bytes(self) -> int:
        return max(0, self.free_bytes - self.reserve_bytes)


@dataclass
class Option:
    """One candidate at one configuration, with what it needs on each device and whether that fits."""

    candidate: Candidate
    facts: ModelFacts
    n_ctx: int
    n_gpu_layers: int
    cpu_moe: bool
    estimate: MemoryEstimate
    needs: dict[str, int]  # device -> bytes (estimate, or engine-measured when confirmed)
    fits: bool
    reason: str
    quality_rank: float
    above_floor: bool
    figures: str = "estimate"  # "estimate" | "engine (llama.cpp dry run, <backend> backend)"
    split: Split | None = None  # the GPUs in llama.cpp's device order and their shares; None: proportional over all
    placement_why: str = ""  # with a split: why it was taken over the proportional split
    # predicted tokens/s (launcher.speed, attached by fit where the devices' figures are known): decode at an empty
    # context and at the target depth, prefill; None: not predicted
    speed: dict[str, float | None] | None = None
    # the ratios `speed` was scaled by (this machine's verified runs of the build that will run it); None: uncalibrated
    calibration: Calibration | None = field(default=None, repr=False, compare=False)

    @property
    def quant(self) -> str:
        return self.candidate.quant

    @property
    def total_bytes(self) -> int:
        return sum(self.needs.values())

    @property
    def fully_offloaded(self) -> bool:
        return self.n_gpu_layers >= self.facts.n_layer + 1 and not self.cpu_moe


class MeasureKey(NamedTuple):
    """What identifies one measured configuration: the quant and the settings a dry run varies."""

    quant: str
    n_ctx: int
    n_gpu_layers: int
    cpu_moe: bool

    @classmethod
    def of(cls, option: Option) -> MeasureKey:
        return cls(option.quant, option.n_ctx, option.n_gpu_layers, option.cpu_moe)


# engine-measured bytes per device of each configuration (launcher.measure.confirm produces them)
Measurements = dict[MeasureKey, dict[str, int]]


def apply_measurement(option: Option, needs: dict[str, int], budgets: list[Budget]) -> Option:
    """Replace the option's estimated needs with measured ones and check the fit again."""
    option.needs = dict(needs)
    option.figures = "engine"
    check_fit(option, budgets)
    return option


def largest_true(fits: Callable[[int], bool], limit: int, *, start: int | None = None) -> int:
    """The largest n in 1..limit with fits(n), for a monotone `fits` (true up to some n, false after); 0 when none.

    Probes `start` first (default: the middle), brackets the boundary outward in doubling steps, then
    bisects: a good guess costs a few probes, a bad one no more than a plain bisection's twice.
    """
    if limit < 1:
        return 0
    start = min(max(1, (1 + limit) // 2 if start is None else start), limit)
    step = 1
    if fits(start):
        low, high = start, limit + 1
        while high - low > 1:
            probe = min(limit, low + step)
            if probe == low:
                return low
            if not fits(probe):
                high = probe
                break
            low, step = probe, step * 2
    else:
        low, high = 0, start
        while high > 1:
            probe = max(1, high - step)
            if fits(probe):
                low = probe
                break
            high, step = probe, step * 2
        if low == 0:
            return 0
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


@dataclass
class Plan:
    """The decision: the chosen option (None when nothing fits), how it runs, and why."""

    model: str
    policy: Policy
    budgets: list[Budget]
    floor: str
    mode: str  # "gpu" | "reduced-context" | "moe-cpu-experts" | "partial-offload" | "cpu" | "none"
    reason: str
    chosen: Option | None
    candidates: list[Option]  # every candidate at the target context, best quality first
    alternatives: list[Option] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    measured: Measurements = field(default_factory=dict)  # the measured figures this plan was made with

    @property
    def fits_on_gpu(self) -> bool:
        return self.chosen is not None and self.mode in ("gpu", "reduced-context")

    def to_json(self, *, launch_forms: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The Plan contract (docs/plan.schema.json); sizes in bytes.

        `launch_forms`: how each runtime starts the chosen option, under its key (`llama_server_argv`, `ollama`),
        as `launcher.backends.launch_forms(plan, port=...)` renders them through each Backend.launch_form (the plan
        cannot: the backends import the plan). Keys it lacks, and all of them when nothing is chosen, are null.
        """
        chosen = None
        forms = (launch_forms or {}) if self.chosen is not None else {}
        if self.chosen is not None:
            c = self.chosen
            usable = {b.name: b.usable_bytes for b in self.budgets}
            chosen = {
                **_option_json(c),
                "files": [_file_json(f) for f in c.candidate.files],
                "devices": [d.to_json() for d in c.estimate.devices],
                "headroom_bytes": {name: usable[name] - c.needs.get(name, 0) for name in usable},
                "mode": self.mode,
                "placement": c.split.to_json() if c.split is not None else None,
                "placement_why": c.placement_why or None,
            }
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "policy": {
                "n_ctx": self.policy.n_ctx,
                "cache_type_k": self.policy.type_k,
                "cache_type_v": self.policy.type_v,
                "flash_attn": self.policy.flash_attn,
                "n_parallel": self.policy.n_parallel,
                "reserve_bytes": self.policy.reserve_bytes,
                "quality_floor": self.floor,
                "strict": self.policy.strict,
                "vision": self.policy.vision,
            },
            "budgets": [
                {"name": b.name, "backend": b.backend, "free_bytes": b.free_bytes, "reserve_bytes": b.reserve_bytes}
                for b in self.budgets
            ],
            "mode": self.mode,
            "fits_on_gpu": self.fits_on_gpu,
            "reason": self.reason,
            "chosen": chosen,
            "candidates": [_option_json(o) for o in self.candidates],
            "alternatives": [{**_option_json(o), "mode": _mode_of(o)} for o in self.alternatives],
            "notes": list(self.notes),
            **{key: forms.get(key) for key in LAUNCH_FORM_KEYS},
        }


def _file_json(f: CandidateFile) -> dict[str, Any]:
    return {"name": f.name, "size_bytes": f.size_bytes, "url": f.url, "local_path": f.local_path, "sha256": f.sha256}


def _option_json(o: Option) -> dict[str, Any]:
    return {
        "quant": o.quant,
        "size_bytes": o.candidate.size_bytes,
        "bits_per_weight": o.candidate.bits_per_weight,
        "quality_rank": o.quality_rank,
        "above_floor": o.above_floor,
        "n_ctx": o.n_ctx,
        "n_gpu_layers": o.n_gpu_layers,
        "cpu_moe": o.cpu_moe,
        "fits": o.fits,
        "fits_on_gpu": o.fits and o.fully_offloaded and any(n != "CPU" for n in o.needs),
        "reason": o.reason,
        "total_bytes": o.total_bytes,
        "needs_bytes": dict(o.needs),
        "figures": o.figures,
        "speed": dict(o.speed) if o.speed is not None else None,
        "quality": quality_json(o.quant, o.candidate.bits_per_weight),
    }


def quality_json(quant: str, bits_per_weight: float | None) -> dict[str, Any]:
    """The quant's published quality loss against the full-precision model, and which measure it is: a mean KL
    divergence (or a perplexity note) measures how far the output distribution moved, not task accuracy."""
    from launcher.quants import quant_info

    info = quant_info(quant, bits_per_weight)
    return {
        "kld": info.kld,
        "measure": "mean KL divergence vs FP16" if info.kld is not None else None,
        "source": info.kld_source,
        "note": info.ppl_note,
    }


def _mode_of(o: Option) -> str:
    if o.cpu_moe:
        return "moe-cpu-experts"
    if not o.fully_offloaded and any(n != "CPU" for n in o.needs):
        return "partial-offload"
    return "reduced-context"


def budgets_for(devices: Sequence[Device], *, ram_available_bytes: int | None, reserve_bytes: int) -> list[Budget]:
    """Budgets from hardware devices (objects with kind, index, free_bytes); system RAM when there is none."""
    gpus = [
        Budget(f"GPU{d.index}", d.kind, int(d.free_bytes or 0), reserve_bytes)
        for d in devices
        if d.free_bytes is not None
    ]
    if gpus:
        return gpus
    return [Budget("CPU", "cpu", int(ram_available_bytes or 0), reserve_bytes)]


def layer_split(budgets: Sequence[Budget], split: Split | None = None) -> list[GPU]:
    """The GPUs layers go to, in llama.cpp's device order, each with its share of the layers (-ts).

    Without `split`: every GPU in its own order, weighted by its usable memory (free less the reserve) in MiB.
    The one split rule: the launch passes these devices (--device) and weights (--tensor-split) to llama.cpp,
    so the estimate places layers where llama.cpp will (src/llama-model.cpp splits layers by those proportions).
    """
    if split is not None:
        backend = {b.name: b.backend for b in budgets}
        return [GPU(n, split_weight=w, backend=backend[n]) for n, w in zip(split.devices, split.weights, strict=True)]
    return [
        GPU(b.name, split_weight=max(1, b.usable_bytes // MiB), backend=b.backend) for b in budgets if b.name != "CPU"
    ]


@dataclass(frozen=True)
class Split:
    """A placement of the layers on the GPUs: which devices take them, in llama.cpp's device order (the last one
    also takes the output layer: src/llama-model.cpp places layer n_layer with the last device's share), and each
    device's share (-ts). The launch passes `devices` as --device and `weights` as --tensor-split."""

    devices: tuple[str, ...]  # budget names
    weights: tuple[int, ...]
    how: str  # for people: "GPU1 alone", "GPU1, GPU0 (output layer on GPU0)", ...

    def to_json(self) -> dict[str, Any]:
        return {"devices": list(self.devices), "weights": list(self.weights), "how": self.how}


# llama.cpp's device names by backend (ggml backends' registry names; RPC devices are numbered in --rpc order)
_LLAMA_DEVICE_PREFIX = {"cuda": "CUDA", "rocm": "ROCm", "rpc": "RPC", "vulkan": "Vulkan", "metal": "MTL"}


def llama_device_names(budgets: Sequence[Budget]) -> dict[str, str]:
    """Budget name -> the device name llama.cpp gives it (CUDA0, ROCm1, RPC0, Vulkan0): the n-th GPU budget of a
    backend is that backend's device n (both follow the driver's order)."""
    seen: dict[str, int] = {}
    names = {}
    for b in budgets:
        if b.name == "CPU":
            continue
        n = seen.get(b.backend, 0)
        seen[b.backend] = n + 1
        names[b.name] = f"{_LLAMA_DEVICE_PREFIX.get(b.backend, b.backend.upper())}{n}"
    return names


MAX_SEARCHED_GPUS = 3  # beyond this many GPUs: each device alone, and all of them with each one last (time)


def candidate_orders(budgets: Sequence[Budget]) -> list[tuple[str, ...]]:
    """The device orders worth trying besides the proportional split, as budget names: each device alone (the
    largest first), then every subset of two or more devices with each of its members last (taking the output
    layer), larger subsets after smaller ones. Pure."""
    from itertools import combinations

    gpus = [b for b in budgets if b.name != "CPU"]
    if len(gpus) < 2:
        return []
    out: list[tuple[str, ...]] = [(b.name,) for b in sorted(gpus, key=lambda b: -b.usable_bytes)]
    sizes = range(2, len(gpus) + 1) if len(gpus) <= MAX_SEARCHED_GPUS else [len(gpus)]
    for size in sizes:
        for subset in combinations([b.name for b in gpus], size):
            for last in reversed(subset):
                out.append((*(n for n in subset if n != last), last))
    return out


def _describe(order: tuple[str, ...], budgets: Sequence[Budget]) -> str:
    left_out = [b.name for b in budgets if b.name != "CPU" and b.name not in order]
    how = f"{order[0]} alone" if len(order) == 1 else ", ".join(order) + f" (output layer on {order[-1]})"
    return how + (f", without {', '.join(left_out)}" if left_out and len(order) > 1 else "")


def evaluate(
    candidate: Candidate,
    facts: ModelFacts,
    policy: Policy,
    budgets: list[Budget],
    *,
    n_ctx: int | None = None,
    n_gpu_layers: int = -1,
    cpu_moe: bool = False,
    floor: str,
    split: Split | None = None,
) -> Option:
    """Estimate one candidate at one configuration (on `split`, default proportional over every GPU) and check it
    against every budget."""
    gpu_budgets = [b for b in budgets if b.name != "CPU"]
    settings = policy.settings(n_ctx, n_gpu_layers=n_gpu_layers if gpu_budgets else 0, cpu_moe=cpu_moe)
    gpus = layer_split(budgets, split)
    result = estimate(facts, settings, gpus=gpus)
    needs = {d.name: d.total_bytes for d in result.devices}
    # the projector: a separate mmproj file, or a vision encoder inside the GGUF (what Ollama loads as one)
    projector = candidate.projector.size_bytes if candidate.projector is not None else facts.inline_vision_bytes
    if policy.vision and projector and gpus:
        first = gpus[0].name  # llama-server puts the projector on the first device it uses
        # projector weights plus its image-encoding compute; llama-server reserves both (memory-model.md §4)
        needs[first] = needs.get(first, 0) + projector + projector // 2
    info = quant_info(candidate.quant, candidate.bits_per_weight)
    above = at_least(candidate.quant, floor, bits_per_weight=candidate.bits_per_weight)
    option = Option(
        candidate=candidate,
        facts=facts,
        n_ctx=result.n_ctx,
        n_gpu_layers=result.n_gpu_layers,
        cpu_moe=cpu_moe,
        estimate=result,
        needs=needs,
        fits=False,
        reason="",
        quality_rank=info.rank,
        above_floor=above,
        split=split,
    )
    check_fit(option, budgets)
    return option


def evaluate_placements(
    candidate: Candidate,
    facts: ModelFacts,
    policy: Policy,
    budgets: list[Budget],
    *,
    floor: str,
    measured: Callable[[Option], Option] = lambda o: o,
    **kwargs: Any,
) -> Option:
    """`evaluate` on the proportional split; when that does not fit and there are several GPUs, on the other
    device orders (candidate_orders), each filled front to back (_fill): the placement that fits on the fewest
    devices, the most headroom breaking ties. The proportional option when none fits. `measured` replaces
    estimates with measured figures (make_plan's)."""
    proportional = measured(evaluate(candidate, facts, policy, budgets, floor=floor, **kwargs))
    if proportional.fits:
        return proportional
    usable = {b.name: b.usable_bytes for b in budgets}

    def ev(split: Split) -> Option:
        return measured(evaluate(candidate, facts, policy, budgets, floor=floor, split=split, **kwargs))

    best: tuple[tuple[int, int], Option] | None = None
    seen: set[tuple[tuple[str, ...], tuple[int, ...]]] = set()
    ngl = kwargs.get("n_gpu_layers", -1)
    act = facts.n_layer + 1 if ngl < 0 else min(ngl, facts.n_layer + 1)
    for order in candidate_orders(budgets):
        if best is not None and len(order) > best[0][0]:
            break  # the orders come by size, and fewer devices win
        split = _fill(order, act, ev, usable, budgets)
        if split is None or (split.devices, split.weights) in seen:
            continue
        seen.add((split.devices, split.weights))
        option = ev(split)
        if not option.fits:
            continue
        headroom = min(usable[n] - option.needs.get(n, 0) for n in split.devices)
        key = (len(split.devices), -headroom)
        if best is None or key < best[0]:
            best = (key, option)
    if best is None:
        return proportional
    chosen = best[1]
    weights = ",".join(str(g.split_weight) for g in layer_split(budgets))
    chosen.placement_why = (
        f"placed on {chosen.split.how if chosen.split else ''}: the proportional split over every GPU "
        f"(-ts {weights}) {proportional.reason.removeprefix('fits: ')}"
    )
    return chosen


def _fill(
    order: tuple[str, ...],
    act: int,
    ev: Callable[[Split], Option],
    usable: Mapping[str, int],
    budgets: Sequence[Budget],
) -> Split | None:
    """Layer counts for `order` (its weights, so llama.cpp's split points fall exactly between layers): each device
    but the last takes the most layers it holds, the last device the rest and the output layer. Devices left
    with no layer are dropped (llama.cpp would still reserve a compute buffer on them). None when act is 0."""
    if act < 1:
        return None
    counts: list[int] = []
    remaining = act
    for i, name in enumerate(order[:-1]):

        def fits(c: int, i: int = i, name: str = name, remaining: int = remaining) -> bool:
            # the devices between this one and the last wait with no layer; the last holds the rest
            trial = (*counts, c, *([0] * (len(order) - i - 2)), remaining - c)
            option = ev(Split(order, trial, ""))
            return option.needs.get(name, 0) <= usable[name]

        c = largest_true(fits, remaining - 1)
        counts.append(c)
        remaining -= c
    counts.append(remaining)
    kept = tuple(n for n, c in zip(order, counts, strict=True) if c)
    weights = tuple(c for c in counts if c)
    return Split(kept, weights, _describe(kept, budgets))


def check_fit(option: Option, budgets: list[Budget]) -> None:
    """Set option.fits and option.reason from option.needs against the budgets."""
    gpu_budgets = [b for b in budgets if b.name != "CPU"]
    checked = gpu_budgets or budgets
    worst = None
    for budget in checked:
        need = option.needs.get(budget.name, 0)
        if need > budget.usable_bytes:
            over = need - budget.usable_bytes
            if worst is None or over > worst[0]:
                worst = (over, budget, need)
    if worst is not None:
        _, budget, need = worst
        option.fits = False
        option.reason = (
            f"needs {format_bytes(need)} on {budget.name}, {format_bytes(budget.usable_bytes)} usable "
            f"({format_bytes(budget.free_bytes)} free less {format_bytes(budget.reserve_bytes)} reserve)"
        )
        return
    option.fits = True
    parts = [
        f"{format_bytes(option.needs.get(b.name, 0))} of {format_bytes(b.usable_bytes)} on {b.name}" for b in checked
    ]
    option.reason = "fits: " + ", ".join(parts)
    if gpu_budgets and option.needs.get("CPU", 0) and not option.fully_offloaded:
        option.reason += f", {format_bytes(option.needs['CPU'])} on the CPU"


Evaluator = Callable[..., Option]  # one candidate evaluated at n_ctx= / n_gpu_layers= / cpu_moe=


def _largest_fitting(probe: Callable[[int], Option], limit: int) -> Option | None:
    """The option at the largest n in 1..limit that fits, by largest_true; None when none does."""
    probed: dict[int, Option] = {}

    def fits(n: int) -> bool:
        probed[n] = probe(n)
        return probed[n].fits

    return probed[n] if (n := largest_true(fits, limit)) else None


def _largest_context(ev: Evaluator, policy: Policy) -> Option | None:
    """The largest context (a multiple of 256) at which the candidate fits: exact per layer, not linear."""
    return _largest_fitting(lambda steps: ev(n_ctx=steps * CONTEXT_STEP), policy.n_ctx // CONTEXT_STEP)


def _partial_offload(ev: Evaluator, facts: ModelFacts) -> Option | None:
    """The most layers that fit on the GPU(s) at the target context (the output layer goes first)."""
    # n_layer + 1 would be a full offload, already rejected
    return _largest_fitting(lambda layers: ev(n_gpu_layers=layers), facts.n_layer)


def make_plan(
    model: str,
    candidates: Sequence[Candidate],
    budgets: list[Budget],
    policy: Policy,
    *,
    measured: Measurements | None = None,
) -> Plan:
    """Choose among `candidates` for `budgets` under `policy`. Pure.

    `measured` holds engine-measured bytes per device of some configurations; those figures replace the
    estimate where given (launcher.measure.confirm produces them, and launcher.run after a launch).
    """
    plan = _make_plan(model, candidates, budgets, policy, measured=measured)
    plan.measured = dict(measured or {})
    chosen = plan.chosen
    if chosen is not None and chosen.placement_why:
        plan.notes.append(chosen.placement_why)
    if chosen is not None and not chosen.above_floor and chosen.candidate.explicit:
        # the floor chooses among quants; it does not overrule a file the user named
        name = chosen.candidate.files[0].name if chosen.candidate.files else chosen.quant
        plan.notes.append(
            f"{name} is below the quality floor {plan.floor} for a model of {chosen.facts.n_params / 1e9:.1f}B "
            f"parameters; running it because {chosen.candidate.explicit}"
        )
    return plan


def _gpu_names(needs: Mapping[str, int]) -> set[str]:
    return {name for name, nbytes in needs.items() if name != "CPU" and nbytes}


def _make_plan(
    model: str,
    candidates: Sequence[Candidate],
    budgets: list[Budget],
    policy: Policy,
    *,
    measured: Measurements | None = None,
) -> Plan:
    usable = [c for c in candidates if c.header is not None]
    notes = [f"{c.quant}: no header ({'; '.join(c.notes) or 'unreadable'}), not considered" for c in candidates
             if c.header is None]  # fmt: skip
    if not usable:
        return Plan(model, policy, budgets, "-", "none", "no candidate has a readable GGUF header", None, [], [], notes)
    facts_of = {id(c): model_facts(c.header) for c in usable}  # type: ignore[arg-type]
    n_params = max(f.n_params for f in facts_of.values())
    floor = policy.min_quant or quality_floor(n_params)
    has_gpu = any(b.name != "CPU" for b in budgets)

    def with_measurement(option: Option) -> Option:
        needs = measured.get(MeasureKey.of(option)) if measured else None
        if needs is None:
            return option
        if _gpu_names(needs) == _gpu_names(option.needs):
            return apply_measurement(option, needs, budgets)
        # figures measured on other devices (another placement of the same configuration) only tell that it does
        # not load: a failed launch is recorded as needing more than every device has
        trial = apply_measurement(replace(option, needs=dict(option.needs)), needs, budgets)
        return option if trial.fits else trial

    def evaluator(option: Option) -> Evaluator:
        def ev(**kwargs: Any) -> Option:
            return evaluate_placements(option.candidate, option.facts, policy, budgets, floor=floor,
                                       measured=with_measurement, **kwargs)  # fmt: skip

        return ev

    options = [
        evaluate_placements(c, facts_of[id(c)], policy, budgets, floor=floor, measured=with_measurement) for c in usable
    ]
    options.sort(key=lambda o: (-o.quality_rank, o.candidate.size_bytes))
    where = "the GPU" + ("s" if sum(b.name != "CPU" for b in budgets) > 1 else "") if has_gpu else "system RAM"
    fitting = [o for o in options if o.fits and (o.above_floor or o.candidate.explicit)]
    if fitting:
        chosen = fitting[0]
        better = [o for o in options if o.quality_rank > chosen.quality_rank]
        why = f"{chosen.quant} is the highest-quality quant that fits entirely in {where} at {chosen.n_ctx} tokens"
        if better:
            why += f" ({better[-1].quant} {better[-1].reason})"
        if not has_gpu:
            notes.append("no GPU found: planned for system RAM with no layers offloaded (ngl 0)")
        alternatives = []
        experts = _moe_beside(chosen, better, evaluator) if has_gpu else None
        if experts is not None:
            alternatives.append(experts)
            notes.append(f"{experts.quant} fits with its MoE experts on the CPU (attention and KV cache on the GPU): "
                         f"a better quant than {chosen.quant}, usually slower; compare their speeds")  # fmt: skip
        return Plan(model, policy, budgets, floor, "gpu" if has_gpu else "cpu", why, chosen, options, alternatives,
                    notes)  # fmt: skip

    above = [o for o in options if o.above_floor or o.candidate.explicit]
    below_fit = [o for o in options if o.fits and not o.above_floor and not o.candidate.explicit]
    if below_fit:
        notes.append(
            f"{below_fit[0].quant} would fit but is below the quality floor {floor} for a model of "
            f"{n_params / 1e9:.1f}B parameters (--min-quant lowers it)"
        )
    if not above:
        reason = f"no candidate reaches the quality floor {floor}"
        return Plan(model, policy, budgets, floor, "none", reason, None, options, [], notes)
    smallest = above[-1]
    notes.append(
        f"{smallest.quant} at {policy.n_ctx} tokens would need {format_bytes(max(smallest.needs.values()))} on one "
        f"device ({format_bytes(max(smallest.needs.values()) + policy.reserve_bytes)} free with the reserve)"
    )
    plan = Plan(model, policy, budgets, floor, "none", "", None, options, [], notes)
    _choose_fallback(plan, above, evaluator, where)
    return plan


def _moe_beside(chosen: Option, better: list[Option], evaluator: Callable[[Option], Evaluator]) -> Option | None:
    """For an MoE model whose better quants do not fit entirely: the best of them that fits with its experts on the
    CPU, shown beside the choice (a user may prefer a Q4 at 34 tokens/s with experts on the CPU to a Q2 entirely on
    the GPU); None for a dense model or when none fits that way."""
    if not chosen.facts.expert_count:
        return None
    for option in better:  # best first
        if not option.above_floor:
            continue
        moe = evaluator(option)(cpu_moe=True)
        if moe.fits:
            return moe
    return None


def _choose_fallback(plan: Plan, above: list[Option], evaluator: Callable[[Option], Evaluator], where: str) -> None:
    """Nothing above the floor fits at the target: find the largest context that does (best quality first),
    and a partial offload of the best quant; choose by policy (reduced context, then offload, then the
    most context any quant reaches) and set the plan's mode, reason, choice and alternatives."""
    policy = plan.policy
    best_context = None
    short_context = None  # the most context any quant reaches when none reaches policy.min_context
    for option in above:  # best quality first
        reduced = _largest_context(evaluator(option), policy)
        if reduced is not None and reduced.n_ctx >= min(policy.min_context, policy.n_ctx):
            best_context = reduced
            plan.alternatives.append(best_context)
            break
        if reduced is not None and (short_context is None or reduced.n_ctx > short_context.n_ctx):
            short_context = reduced
    offload = None
    if any(b.name != "CPU" for b in plan.budgets):
        top = above[0]
        if top.facts.expert_count:
            moe = evaluator(top)(cpu_moe=True)
            if moe.fits:
                offload = moe
        if offload is None:
            offload = _partial_offload(evaluator(top), top.facts)
        if offload is not None:
            plan.alternatives.append(offload)
    target_reason = f"nothing above the quality floor {plan.floor} fits in {where} at {policy.n_ctx} tokens"
    plan.reason = target_reason
    if policy.strict:
        plan.reason += " (--strict)"
    elif best_context is not None:
        plan.mode, plan.chosen = "reduced-context", best_context
        plan.reason += f"; {best_context.quant} fits entirely at {best_context.n_ctx} tokens"
    elif offload is not None:
        plan.mode, plan.chosen = ("moe-cpu-experts" if offload.cpu_moe else "partial-offload"), offload
        how = (
            "with its MoE experts on the CPU (attention and KV cache stay on the GPU)"
            if offload.cpu_moe
            else f"with {offload.n_gpu_layers} of {offload.facts.n_layer + 1} layers on the GPU"
        )
        plan.reason += f"; {offload.quant} runs partly on the CPU {how}"
    elif short_context is not None:
        plan.notes.append(f"no quant above the floor reaches {policy.min_context} tokens entirely in {where}")
        plan.mode, plan.chosen = "reduced-context", short_context
        plan.reason += f"; only {short_context.n_ctx} tokens fit, with {short_context.quant}"
        plan.alternatives.append(short_context)


def shell_line(argv: list[str]) -> str:
    """The argv as one line a shell reads back the same."""
    return shlex.join(argv)
