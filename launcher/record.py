"""The per-machine record: every verified launch, appended, keyed by a hardware fingerprint.

`state_dir()/machines/<fingerprint>.jsonl` holds one JSON object per verified result (model, quant,
context, settings, predicted and measured bytes per device, backend and version, time); beside it,
`<fingerprint>.json` describes the hardware the fingerprint stands for. The next plan for the same model
on the same machine starts from the measured figures (`remembered`). Profiles show this record; fitquant
never writes into a file a person wrote.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.paths import append_private, state_dir, write_private

if TYPE_CHECKING:
    from launcher.hardware.types import HardwareSnapshot
    from launcher.plan import Measurements, Policy

RECORD_VERSION = 1


def machine_identity(machine: HardwareSnapshot) -> dict[str, Any]:
    """What the fingerprint stands for: GPU names, UUIDs, total memory and driver; the host's RAM and CPU."""
    return {
        "devices": [
            {"kind": d.kind, "name": d.name, "uuid": d.uuid, "total_bytes": d.total_bytes, "driver": d.driver}
            for d in machine.devices
        ],
        "ram_total_bytes": machine.ram_total_bytes,
        "cpu": machine.cpu.model,
        "described": machine.described,
    }


def fingerprint(machine: HardwareSnapshot) -> str:
    """A short stable hash of machine_identity: the same hardware gives the same record."""
    blob = json.dumps(machine_identity(machine), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_key(model: str | None) -> str:
    """How the record names a model: a local path absolute (the same file however it was typed), a URL without
    its credentials (user info, query string: `launcher.http.redact_url`), else as given."""
    from launcher.http import is_url, redact_url

    if model is None:
        return "the embedded default model"
    if is_url(model):
        return redact_url(model)
    path = Path(model).expanduser()
    try:
        return str(path.resolve()) if path.exists() else model
    except OSError:  # a name too long for the file system is no file of ours: the catalog says what it is
        return model


def records_dir() -> Path:
    return state_dir() / "machines"


def record_path(machine: HardwareSnapshot) -> Path:
    return records_dir() / f"{fingerprint(machine)}.jsonl"


def settings_key(policy: Policy) -> dict[str, Any]:
    """The settings a measurement depends on besides quant, context and offload (not the CPU's weight repacking:
    the host decides it, and the measured figures include it)."""
    return {
        "type_k": policy.type_k,
        "type_v": policy.type_v,
        "flash_attn": policy.flash_attn,
        "n_parallel": policy.n_parallel,
        "n_ubatch": policy.n_ubatch,
        "n_batch": policy.n_batch,
        "vision": policy.vision,
        "all_logits": policy.all_logits,
        "swa_full": policy.swa_full,
    }


def append(machine: HardwareSnapshot, entry: dict[str, Any]) -> Path:
    """Add one verified result to this machine's record (one line, appended: earlier lines are never rewritten).
    The files are 0600 in a 0700 folder and never written through a symlink (`launcher.paths`)."""
    path = record_path(machine)
    identity = path.with_suffix(".json")
    if not identity.exists():
        write_private(
            identity, json.dumps({"fingerprint": fingerprint(machine), **machine_identity(machine)}, indent=2)
        )
    line = json.dumps({"record_version": RECORD_VERSION, "time": time.time(), **entry}, sort_keys=True)
    append_private(path, line + "\n")
    return path


def entries(machine: HardwareSnapshot) -> list[dict[str, Any]]:
    """Every readable entry of this machine's record, oldest first (a torn or foreign line is skipped)."""
    path = record_path(machine)
    if not path.exists():
        return []
    out = []
    for line in path.read_text("utf-8", "replace").splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and value.get("record_version") == RECORD_VERSION:
            out.append(value)
    return out


def remembered(
    machine: HardwareSnapshot, model: str, policy: Policy, *, quants: Sequence[str] | None = None
) -> tuple[Measurements, list[str]]:
    """Measured bytes per device of this model's verified configurations on this machine, with a note saying
    so; the newest entry wins for each configuration."""
    from launcher.plan import MeasureKey

    wanted = settings_key(policy)
    measured: Measurements = {}
    last = None
    for entry in entries(machine):
        if entry.get("model") != model or entry.get("settings") != wanted:
            continue
        if quants is not None and entry.get("quant") not in quants:
            continue
        needs = entry.get("needs_bytes")
        if not isinstance(needs, dict):
            continue
        key = MeasureKey(str(entry["quant"]), int(entry["n_ctx"]), int(entry["n_gpu_layers"]), bool(entry["cpu_moe"]))
        measured[key] = {str(k): int(v) for k, v in needs.items()}
        last = entry
    notes = []
    if last is not None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(last["time"])))
        notes.append(
            f"starts from what was measured on this machine: {len(measured)} verified configuration"
            f"{'s' if len(measured) != 1 else ''}, the last {last['quant']} at {last['n_ctx']} tokens on {when}"
        )
    return measured, notes


def fa_quants(machine: HardwareSnapshot, backend: str, version: str | None) -> str | None:
    """The FlashAttention K-V pairs the last verified load of this backend and server version printed on this
    machine (a CUDA build's FA_QUANTS), or None."""
    for entry in reversed(entries(machine)):
        same = entry.get("backend") == backend and entry.get("version") == version
        if same and isinstance(entry.get("fa_quants"), str):
            return str(entry["fa_quants"])
    return None
