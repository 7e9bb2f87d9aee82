"""Run: the closed loop. Fetch the chosen quant, start it, wait until ready, verify where it landed, warm it
up, and on a spill, an out-of-memory or a crash, stop it and take the plan's next configuration.

The next configuration is the plan made again with the failed one marked as not fitting: the next lower
quant above the floor, then a smaller context (unless --strict), as `make_plan` orders them. Every attempt
is reported with its outcome. A verified result is appended to the machine's record (launcher.record).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from launcher.backends.base import AttemptFailed, Instance, LaunchRequest, Outcome
from launcher.errors import BackendError, NoFitError
from launcher.plan import MeasureKey, Measurements, Option, Plan, make_plan

if TYPE_CHECKING:
    from launcher.backends.base import Backend
    from launcher.hardware.types import HardwareSnapshot
    from launcher.verify import Placement

RUN_SCHEMA_VERSION = 1
Warmup = Literal["short", "full", "none"]
DEFAULT_MAX_ATTEMPTS = 3


@dataclass
class Attempt:
    """One launch of one configuration, and how it ended."""

    quant: str
    n_ctx: int
    n_gpu_layers: int
    outcome: Outcome
    detail: str
    log_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "quant": self.quant,
            "n_ctx": self.n_ctx,
            "n_gpu_layers": self.n_gpu_layers,
            "outcome": self.outcome,
            "detail": self.detail,
            "log_path": self.log_path,
        }


@dataclass
class RunResult:
    """A verified, ready server: what runs, where it landed, and every attempt it took."""

    plan: Plan  # the plan the running option came from (made again after each failed attempt)
    option: Option
    instance: Instance
    placement: Placement
    attempts: list[Attempt]
    warmup: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The run contract (docs/run.schema.json)."""
        o, inst, p = self.option, self.instance, self.plan.policy
        return {
            "schema_version": RUN_SCHEMA_VERSION,
            "model": self.plan.model,
            "backend": {"name": inst.backend, "server": inst.server, "version": inst.version},
            "endpoint": inst.endpoint,
            "model_name": inst.model_name,
            "pid": inst.pid,
            "log_path": str(inst.log_path) if inst.log_path else None,
            "argv": inst.extra.get("argv"),
            "chosen": {
                "quant": o.quant,
                "n_ctx": o.n_ctx,
                "n_gpu_layers": o.n_gpu_layers,
                "cpu_moe": o.cpu_moe,
                "cache_type_k": p.type_k,
                "cache_type_v": p.type_v,
                "flash_attn": o.estimate.flash_attn,
                "n_parallel": p.n_parallel,
                "size_bytes": o.candidate.size_bytes,
                "files": [f.local_path or f.name for f in o.candidate.files],
            },
            "placement": self.placement.to_json(),
            "attempts": [a.to_json() for a in self.attempts],
            "warmup": dict(self.warmup),
            "notes": list(self.plan.notes),
        }


def expected_verdict(plan: Plan, option: Option) -> str:
    """What a correct launch of `option` looks like: all on the GPU, on the CPU only, or a planned partial."""
    if not any(b.name != "CPU" for b in plan.budgets) or option.n_gpu_layers == 0:
        return "cpu-only"
    return "gpu" if option.fully_offloaded else "spill"


def next_plan(plan: Plan, failed: Option) -> Plan | None:
    """The plan made again with `failed` marked as not fitting; None when nothing else is left to try."""
    measured: Measurements = dict(plan.measured)
    checked = [b for b in plan.budgets if b.name != "CPU"] or plan.budgets
    measured[MeasureKey.of(failed)] = {b.name: b.usable_bytes + 1 for b in checked}
    again = make_plan(plan.model, [o.candidate for o in plan.candidates], plan.budgets, plan.policy, measured=measured)
    again.notes = [*plan.notes, *(n for n in again.notes if n not in plan.notes)]
    return again if again.chosen is not None else None


def launch(
    plan: Plan,
    backend: Backend,
    request: LaunchRequest,
    *,
    log_dir: Path,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    warmup: Warmup = "short",
    progress: bool = True,
    on_attempt: Callable[[Attempt], None] | None = None,
    on_start: Callable[[Option], None] | None = None,
) -> RunResult:
    """Start plan.chosen on `backend` and prove it; step down on failure. Raises NoFitError with every attempt
    in its message when no attempt could be verified, BackendError/FetchError for what no step-down fixes."""
    if plan.chosen is None:
        raise NoFitError(plan.reason, plan=plan)
    attempts: list[Attempt] = []
    current: Plan | None = plan
    while current is not None and current.chosen is not None and len(attempts) < max_attempts:
        option = current.chosen
        fetched = backend.fetch(option.candidate, vision=current.policy.vision, progress=progress)
        option = replace(option, candidate=fetched)
        if on_start is not None:
            on_start(option)
        instance: Instance | None = None
        try:
            instance = backend.start(current, option, request, log_dir=log_dir)
            backend.wait_ready(instance, request.ready_timeout_s)
            placement = backend.placement(instance, option)
            expected = expected_verdict(current, option)
            if placement.verdict != expected and not (expected == "spill" and placement.verdict == "gpu"):
                outcome: Outcome = "oom" if placement.verdict == "oom" else "spill"
                raise AttemptFailed(outcome, f"expected {expected}, got {placement.verdict}: {placement.reason}")
            warm = warm_up(instance, placement, option, warmup, timeout_s=request.ready_timeout_s, backend=backend)
        except AttemptFailed as failed:
            if instance is not None:
                backend.stop(instance)
            attempt = Attempt(option.quant, option.n_ctx, option.n_gpu_layers, failed.outcome, failed.detail,
                              str(instance.log_path) if instance and instance.log_path else None)  # fmt: skip
            attempts.append(attempt)
            if on_attempt is not None:
                on_attempt(attempt)
            current = next_plan(current, option)
            continue
        except BaseException:
            if instance is not None:
                backend.stop(instance)
            raise
        attempt = Attempt(option.quant, option.n_ctx, option.n_gpu_layers, "verified", placement.reason,
                          str(instance.log_path) if instance.log_path else None)  # fmt: skip
        attempts.append(attempt)
        if on_attempt is not None:
            on_attempt(attempt)
        return RunResult(current, option, instance, placement, attempts, warm)
    tried = "; ".join(f"{a.quant} at {a.n_ctx} tokens: {a.outcome} ({a.detail})" for a in attempts)
    if current is None or current.chosen is None:
        why = "nothing else above the quality floor fits" + (" (--strict)" if plan.policy.strict else "")
    else:
        why = f"gave up after {len(attempts)} attempt{'s' if len(attempts) != 1 else ''} (--max-attempts)"
    error = NoFitError(f"{why}; tried {tried}", plan=current or plan)
    error.attempts = attempts  # type: ignore[attr-defined]
    raise error


# ---------------------------------------------------------------------------------------------------------
# Warm-up: prove it generates; `full` also fills the context once (compute-buffer growth, late OOM)


def warm_up(
    instance: Instance,
    placement: Placement,
    option: Option,
    mode: Warmup,
    *,
    timeout_s: float,
    backend: Backend,
) -> dict[str, Any]:
    """Run the warm-up; AttemptFailed when the server fails it (crash, out of memory, timeout)."""
    from launcher.chat import ChatError, complete

    if mode == "none":
        return {"mode": "none"}
    started = time.monotonic()
    report: dict[str, Any] = {"mode": mode}
    try:
        hello = [{"role": "user", "content": "Say hello."}]
        text = "".join(complete(instance, hello, max_tokens=8, timeout_s=timeout_s))
        report["short_reply"] = text
        if mode == "full":
            n_slot = placement.n_ctx_per_slot or option.n_ctx // max(1, option.estimate.settings.n_parallel)
            tokens = max(16, n_slot - 96)  # room for the chat template and the reply
            prompt = _filler(instance, tokens, timeout_s=timeout_s)
            filled = "".join(complete(instance, [{"role": "user", "content": prompt}], max_tokens=4,
                                      timeout_s=timeout_s))  # fmt: skip
            report["filled_tokens"] = tokens
            report["full_reply"] = filled
    except ChatError as exc:
        raise _warmup_failure(instance, str(exc)) from None
    proc = instance.process
    if proc is not None and proc.poll() is not None:
        raise _warmup_failure(instance, f"the server exited (status {proc.returncode})")
    report["seconds"] = round(time.monotonic() - started, 3)
    return report


def _filler(instance: Instance, tokens: int, *, timeout_s: float) -> str:
    """A prompt of about `tokens` tokens for this server's tokenizer (a word is not always one token), measured
    with the server's own tokenizer where it has one."""
    from launcher.chat import count_tokens

    words = tokens
    sample = 256
    counted = count_tokens(instance, "hello" + " hello" * (sample - 1), timeout_s=timeout_s)
    if counted:
        words = max(1, tokens * sample // counted)
    prompt = "hello" + " hello" * (words - 1)
    while counted and words > 1 and (count_tokens(instance, prompt, timeout_s=timeout_s) or 0) > tokens:
        words = words * 9 // 10  # a tokenizer that merges runs unevenly: trim until it fits
        prompt = "hello" + " hello" * (words - 1)
    return prompt


def _warmup_failure(instance: Instance, detail: str) -> AttemptFailed:
    from launcher.backends.llamacpp import _OOM
    from launcher.backends.process import tail

    lines = tail(instance.log_path, 40)
    text = detail + "\n" + "\n".join(lines)
    proc = instance.process
    died = proc is not None and proc.poll() is not None
    if _OOM.search(text):
        oom = next((line for line in lines if _OOM.search(line)), detail)
        return AttemptFailed("oom", f"out of memory during warm-up: {oom.strip()[:300]}", log_tail=lines[-12:])
    if "timed out" in detail.lower() and not died:
        return AttemptFailed("timeout", f"warm-up timed out: {detail}", log_tail=lines[-12:])
    return AttemptFailed("crash", f"warm-up failed: {detail}", log_tail=lines[-12:])


def record_entry(result: RunResult, model: str) -> dict[str, Any]:
    """The machine-record line of a verified result: model, quant, context, settings, predicted and measured
    bytes per device (measured plus the runtime overhead llama.cpp does not print = what the plan needs)."""
    from launcher.record import settings_key

    o, p = result.option, result.placement
    gpu_budgets = [b.name for b in result.plan.budgets if b.name != "CPU"]
    overhead = {d.name: d.overhead_bytes for d in o.estimate.devices}
    needs: dict[str, int] = {}
    devices = []
    gpus = p.gpu_devices
    for d in p.devices:
        budget = "CPU" if not d.is_gpu else (gpu_budgets[gpus.index(d)] if gpus.index(d) < len(gpu_budgets) else None)
        devices.append({"budget": budget, **d.to_json()})
        if budget is not None:
            needs[budget] = needs.get(budget, 0) + d.measured_bytes + overhead.get(budget, 0)
    return {
        "model": model,  # launcher.record.model_key: what the next `run`/`plan` of this model looks up
        "quant": o.quant,
        "n_ctx": o.n_ctx,
        "n_gpu_layers": o.n_gpu_layers,
        "cpu_moe": o.cpu_moe,
        "settings": settings_key(result.plan.policy),
        "backend": result.instance.backend,
        "server": result.instance.server,
        "version": result.instance.version,
        "verdict": p.verdict,
        "devices": devices,
        "needs_bytes": needs,
        "predicted_bytes": dict(o.needs),
    }


def remember(machine: HardwareSnapshot, result: RunResult, model: str) -> Path:
    """Append the verified result to this machine's record, under `model` (launcher.record.model_key)."""
    from launcher.record import append

    return append(machine, record_entry(result, model))


def require_backend(backend: Backend) -> None:
    why = backend.unavailable()
    if why:
        raise BackendError(why)


def choose_backend(name: str, *, llama_server: str | None = None, rpc: Sequence[str] = ()) -> Backend:
    """The backend to launch on. auto: llama.cpp when a server is here (exact flags, verified from its log),
    else Ollama."""
    from launcher.backends import load_backend

    if name == "auto":
        llamacpp = load_backend("llamacpp", server=llama_server)
        if llama_server or rpc or llamacpp.unavailable() is None:
            return llamacpp
        ollama = load_backend("ollama")
        if ollama.unavailable() is None:
            return ollama
        raise BackendError(f"no backend can run here: {llamacpp.unavailable()}; {ollama.unavailable()}")
    backend = load_backend(name, server=llama_server) if name == "llamacpp" else load_backend(name)
    require_backend(backend)
    if rpc and name != "llamacpp":
        raise BackendError("--rpc is a llama.cpp option; use --backend llamacpp")
    return backend


def launch_machine(
    *,
    vram: list[int] | None = None,
    ram: int | None = None,
    unified: int | None = None,
    rpc: Sequence[str] = (),
    backend: Backend,
) -> HardwareSnapshot:
    """The machine to plan a launch for: probed or described; with RPC servers, their devices as llama.cpp
    lists them (`llama-server --rpc ... --list-devices`), unless `vram` describes them."""
    from launcher.hardware import describe_machine, resolve_machine

    if not rpc:
        return resolve_machine(vram=vram, ram=ram, unified=unified)
    if vram is not None:
        return describe_machine(vram=vram, ram=ram, kind="rpc")
    from launcher.backends.llamacpp import LlamaCppBackend, rpc_devices

    if not isinstance(backend, LlamaCppBackend):
        raise BackendError("RPC devices are llama.cpp's; use the llamacpp backend")
    return rpc_devices(backend.program, tuple(rpc))
