"""A profile as the planner's inputs: the machine it describes (or the probe), a per-device reserve kept by
lowering free memory, the Policy from its defaults and model entry, and the machine's verified records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

from launcher.defaults import DEFAULT_PLAN_CONTEXT
from launcher.profiles.schema import ModelEntry, Profile
from launcher.units import format_bytes

if TYPE_CHECKING:
    from launcher.hardware.types import HardwareSnapshot
    from launcher.plan import Policy


def profile_hardware(profile: Profile) -> HardwareSnapshot | None:
    """The machine the profile describes (devices, ram, unified), or None when it leaves that to the probe."""
    from launcher.hardware import describe_machine
    from launcher.hardware.types import DeviceKind
    from launcher.speed import table_gpu

    if profile.devices is None and profile.ram is None and profile.unified is None:
        return None
    devices = profile.devices or []
    gpus = [(i, d) for i, d in enumerate(devices) if d.kind != "cpu"]
    for i, device in gpus:
        if device.kind not in get_args(DeviceKind):
            raise profile.error(("devices", i, "kind"), f"{device.kind} devices are not planned by this fitquant "
                                f"yet (it plans {', '.join(get_args(DeviceKind))})")  # fmt: skip
    ram = profile.ram if profile.ram is not None else next((d.memory for d in devices if d.kind == "cpu"), None)
    try:
        chip = [table_gpu(profile.chip)] if profile.chip else None  # the table's own name (checked at load)
        machine = describe_machine(vram=[d.memory for _, d in gpus] or None, ram=ram, unified=profile.unified,
                                   gpu_names=chip)  # fmt: skip
    except ValueError as exc:
        raise profile.error(("devices",), str(exc)) from None
    host = next((d for d in devices if d.kind == "cpu"), None)
    if host is not None and (host.bandwidth is not None or host.flops is not None):
        machine = machine.model_copy(update={"host_bandwidth_bytes_per_s": host.bandwidth, "host_flops": host.flops})
    if not gpus:
        return machine
    named = tuple(
        described.model_copy(
            update={
                "kind": spec.kind,
                "name": spec.name,
                "unified": spec.kind == "metal",
                "integrated": spec.kind == "metal",
                "memory_bandwidth_bytes_per_s": spec.bandwidth,  # the person's figures win over the table
                "fp16_flops": spec.flops,
            }
        )
        for described, (_, spec) in zip(machine.devices, gpus, strict=True)
    )
    return machine.model_copy(update={"devices": named})


def profile_machine(
    profile: Profile, machine: HardwareSnapshot | None = None, *, reserve_bytes: int | None = None
) -> tuple[HardwareSnapshot, int]:
    """The machine to plan for (given, else the profile's, else probed) and the reserve for its Policy.

    A per-device reserve is kept by lowering that device's free memory by what it keeps beyond the smallest
    reserve, which the Policy then keeps everywhere: each device ends with free less its own reserve usable.
    `reserve_bytes` (a caller's explicit choice) replaces the profile's reserve on every device.
    """
    machine = _machine_of(profile, machine)
    if reserve_bytes is not None:
        return machine, reserve_bytes
    kept, reserve, _notes = _keep_reserves(profile, machine)
    return kept, reserve


def _machine_of(profile: Profile, machine: HardwareSnapshot | None) -> HardwareSnapshot:
    if machine is None:
        machine = profile_hardware(profile)
    if machine is None:
        from launcher.hardware import detect_hardware

        machine = detect_hardware()
    return machine


def _keep_reserves(profile: Profile, machine: HardwareSnapshot) -> tuple[HardwareSnapshot, int, list[str]]:
    """See profile_machine; also the notes saying which devices keep more free than the Policy's reserve."""
    if not isinstance(profile.reserve, dict):
        return machine, profile.reserve, []
    gpus = [d for d in machine.devices if d.free_bytes is not None]
    if not gpus:
        return machine, profile.reserve_of("CPU"), []
    known = {"default", "CPU", *(f"GPU{d.index}" for d in gpus), *(d.name for d in gpus)}
    for key in profile.reserve:
        if key not in known:
            raise profile.error(("reserve", key), f"names no device of this machine; use {', '.join(sorted(known))}")
    reserves = {d.index: profile.reserve_of(f"GPU{d.index}", d.name) for d in gpus}
    common = min(reserves.values())
    devices, notes = [], []
    for device in machine.devices:
        extra = reserves.get(device.index, common) - common
        if extra and device.free_bytes is not None:
            device = device.model_copy(update={"free_bytes": max(0, device.free_bytes - extra)})
            notes.append(f"GPU{device.index} keeps {format_bytes(common + extra)} free (profile reserve): "
                         f"its free memory is counted {format_bytes(extra)} lower")  # fmt: skip
        devices.append(device)
    kept = machine.model_copy(update={"devices": tuple(devices), "notes": (*machine.notes, *notes)})
    return kept, common, notes


def profile_policy(profile: Profile, entry: ModelEntry | None = None, *, reserve_bytes: int | None = None,
                   **overrides: Any) -> Policy:  # fmt: skip
    """The Policy for one model of the profile: the profile's defaults, then the entry's context, floor and
    vision, then `overrides` (Policy fields a caller set explicitly, e.g. command-line flags) win."""
    from launcher.plan import Policy

    d = profile.defaults
    values: dict[str, Any] = {
        "n_ctx": (entry.context if entry else None) or DEFAULT_PLAN_CONTEXT,
        "type_k": d.kv,
        "type_v": d.kv,
        "flash_attn": d.flash_attn,
        "n_parallel": d.parallel,
        "reserve_bytes": profile.reserve_of("CPU") if reserve_bytes is None else reserve_bytes,
        "min_quant": (entry.min_quant if entry else None) or d.min_quant,
        "vision": entry.vision if entry else False,
    }
    if "type_v" in overrides and "flash_attn" not in overrides:
        values["flash_attn"] = None  # decided again for the new V type
    values.update(overrides)
    return Policy(**values)


@dataclass(frozen=True)
class ProfilePlan:
    """What the planner takes for one model on a profile's machine."""

    model: str | None  # the model reference (an entry's alias resolved); None: the embedded default
    entry: ModelEntry | None  # the profile's entry for it, if any
    policy: Policy
    machine: HardwareSnapshot
    port: int | None  # the entry's port, if any
    notes: tuple[str, ...] = ()  # what the profile changed about the machine (a per-device reserve), for people


def profile_plan(
    profile: Profile,
    model: str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    machine: HardwareSnapshot | None = None,
) -> ProfilePlan:
    """Plan inputs for `model` (a reference, or an entry's alias) on the profile's machine.

    `overrides` are Policy fields the caller set explicitly; they win over the profile (a `reserve_bytes`
    there replaces the profile's reserve on every device). `machine` replaces the profile's devices and
    the probe. `fit(plan.model, plan.policy, machine=plan.machine)` then answers for that machine.
    """
    given = dict(overrides or {})
    entry = profile.find_model(model)
    machine = _machine_of(profile, machine)
    notes: list[str] = []
    if "reserve_bytes" in given:
        reserve = int(given.pop("reserve_bytes"))
    else:
        machine, reserve, notes = _keep_reserves(profile, machine)
    policy = profile_policy(profile, entry, reserve_bytes=reserve, **given)
    port = entry.port if entry else None
    return ProfilePlan(entry.model if entry else model, entry, policy, machine, port, tuple(notes))


# ---------------------------------------------------------------------------------------------- records


def profile_records(profile: Profile, machine: HardwareSnapshot) -> list[dict[str, Any]]:
    """The verified results of the profile's models in `machine`'s record (all of them when the profile lists
    no model), oldest first: what ran, when, predicted and measured bytes per device."""
    from launcher.record import entries

    wanted = {m.model for m in profile.models}
    return [e for e in entries(machine) if not wanted or e.get("model") in wanted]
