"""CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES: which GPUs a runtime will see.

Pure: takes the variable's value and the devices' UUIDs in driver order, returns the driver indices the
runtime sees, in the order it numbers them (the first one becomes device 0), plus notes.

The rules are CUDA's (CUDA C Programming Guide, "CUDA Environment Variables"), which HIP copies:
a comma-separated list of indices or UUIDs (a unique prefix is enough, "GPU-" included); an empty
value hides every GPU; the list is read up to the first entry that is not a valid device (a
negative or out-of-range index, an unknown UUID, a repeat), and that entry and everything after it
are ignored. So "-1" hides everything and "0,-1,1" means just device 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def visible_devices(value: str | None, uuids: Sequence[str | None], *, variable: str) -> tuple[list[int], list[str]]:
    """Driver indices visible under `variable=value`, in runtime order; None = unset = all of them."""
    count = len(uuids)
    if value is None:
        return list(range(count)), []
    if not value.strip():
        return [], [f"{variable} is set but empty: the runtime sees no GPU"] if count else []
    chosen: list[int] = []
    for entry in (part.strip() for part in value.split(",")):
        index = _resolve(entry, uuids)
        if index is None or index in chosen:
            if count:
                why = "a repeat" if index is not None else "not a device here"
                tail = "it and the entries after it are ignored" if chosen else "the runtime sees no GPU"
                return chosen, [f"{variable}={value!r}: {entry!r} is {why}; {tail}"]
            return chosen, []
        chosen.append(index)
    return chosen, []


def _resolve(entry: str, uuids: Sequence[str | None]) -> int | None:
    if entry.lstrip("-").isdigit():
        index = int(entry)
        return index if 0 <= index < len(uuids) else None
    if not entry:
        return None
    wanted = entry.lower()
    matches = [i for i, uuid in enumerate(uuids) if uuid and uuid.lower().startswith(wanted)]
    return matches[0] if len(matches) == 1 else None


def cuda_visible(env: Mapping[str, str], uuids: Sequence[str | None]) -> tuple[list[int], list[str]]:
    """NVIDIA GPUs (NVML order) that CUDA will see."""
    return visible_devices(env.get("CUDA_VISIBLE_DEVICES"), uuids, variable="CUDA_VISIBLE_DEVICES")


def hip_visible(env: Mapping[str, str], uuids: Sequence[str | None]) -> tuple[list[int], list[str]]:
    """AMD GPUs (KFD order) that HIP will see.

    ROCR_VISIBLE_DEVICES filters first (in the ROCr runtime); HIP_VISIBLE_DEVICES then numbers what is
    left. HIP also honours CUDA_VISIBLE_DEVICES, with the same effect, when HIP_VISIBLE_DEVICES is unset.
    """
    rocr, notes = visible_devices(env.get("ROCR_VISIBLE_DEVICES"), uuids, variable="ROCR_VISIBLE_DEVICES")
    variable = "HIP_VISIBLE_DEVICES" if "HIP_VISIBLE_DEVICES" in env else "CUDA_VISIBLE_DEVICES"
    hip, hip_notes = visible_devices(env.get(variable), [uuids[i] for i in rocr], variable=variable)
    return [rocr[i] for i in hip], notes + hip_notes
