"""Run: the one run path that `fitquant run`, `fitquant serve` and the router call.

    choose_backend(...)        which runtime (an explicit llama-server is probed here, before any download)
    run_machine(...)           the machine: probed, described, RPC devices, or a profile's (its reserve applied once)
    plan_runs(specs, ...)      policy (the backend's memory defaults counted) -> remembered measurements -> fit,
                               several models together on what the ones before them leave
    start_planned(spec, plan)  launch (fetch, start, ready, verify, warm up, step down on memory failures only)
                               -> record -> register the instance
    start(spec, ...)           plan_runs + start_planned for one model
    stop(result, backend)      stop the server and unregister it

Only memory failures step down (out of memory, a spill, a crash while loading or allocating): the plan is made
again with the failed configuration marked as not fitting, which gives the next lower quant above the floor,
then a smaller context (unless --strict). A server that is up but refuses a request, or is not ready in time,
ends the run with RunFailed: no quant or context fixes that. Every attempt is reported with its outcome
(launcher.attempts). A verified result is appended to the machine's record (launcher.record).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from launcher.attempts import Attempt
from launcher.backends.base import AttemptFailed, Instance, LaunchRequest
from launcher.errors import BackendError, NoFitError, RunFailed
from launcher.plan import MeasureKey, Measurements, Option, Plan, Policy, make_plan

if TYPE_CHECKING:
    from launcher.backends.base import Backend
    from launcher.calibration import Calibration
    from launcher.chat import ChatReply
    from launcher.hardware.types import HardwareSnapshot
    from launcher.profiles import Profile
    from launcher.verify import Placement

__all__ = [
    "Attempt",
    "RunResult",
    "RunSpec",
    "choose_backend",
    "plan_runs",
    "read_api_key",
    "run_machine",
    "server_policy",
    "start",
    "start_planned",
    "stop",
]

RUN_SCHEMA_VERSION = 1
Warmup = Literal["short", "full", "none"]
DEFAULT_MAX_ATTEMPTS = 3
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class RunSpec:
    """One model to run and how: what `run`, `serve` and the router hand to the run path."""

    model: str | None  # a model reference; None: the embedded default model
    policy: Policy  # what the user asked for (the backend's memory defaults are added by plan_runs)
    request: LaunchRequest = field(default_factory=LaunchRequest)
    name: str | None = None  # how `ps` and the log name it (a profile's alias); default: the model
    confirm: bool = True  # llama.cpp dry runs confirm the plan before download
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    warmup: Warmup = "short"
    via: str | None = None  # the address clients use instead of the server's own (serve's one endpoint): `ps` shows it

    @property
    def shown_name(self) -> str:
        return self.name or self.model or "the embedded default model"


@dataclass
class RunResult:
    """A verified, ready server: what runs, where it landed, and every attempt it took."""

    plan: Plan  # the plan the running option came from (made again after each failed attempt)
    option: Option
    instance: Instance
    placement: Placement
    attempts: list[Attempt]
    warmup: dict[str, Any] = field(default_factory=dict)
    instance_name: str | None = None  # its record in launcher.instances (what `fitquant ps` lists)
    speed: dict[str, Any] = field(default_factory=dict)  # speed_report: predicted beside measured tokens/s

    def to_json(self) -> dict[str, Any]:
        """The run contract (docs/run.schema.json)."""
        o, inst, p = self.option, self.instance, self.plan.policy
        return {
            "schema_version": RUN_SCHEMA_VERSION,
            "ok": True,
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
            "speed": dict(self.speed),
            "notes": list(self.plan.notes),
        }


def failure_json(model: str, error: BaseException) -> dict[str, Any]:
    """The run contract's failure form: what failed, in one line, and every attempt with its outcome."""
    attempts = getattr(error, "attempts", None) or []
    return {
        "schema_version": RUN_SCHEMA_VERSION,
        "ok": False,
        "model": model,
        "error": {"type": _public_type(error), "message": str(error)},
        "attempts": [a.to_json() for a in attempts],
    }


def _public_type(error: BaseException) -> str:
    """The error's public name: the first class of its line that launcher.errors defines."""
    import launcher.errors as errors

    for cls in type(error).__mro__:
        if getattr(errors, cls.__name__, None) is cls:
            return cls.__name__
    return type(error).__name__


# ---------------------------------------------------------------------------------------------------------
# Backend, machine, policy


def choose_backend(
    name: str,
    *,
    llama_server: str | None = None,
    rpc: Sequence[str] = (),
    ollama_host: str | None = None,
    machine: HardwareSnapshot | None = None,
) -> Backend:
    """The backend to launch on, checked before anything is downloaded. auto: llama.cpp when a server is here
    (exact flags, verified from its log) that can reach this machine's GPUs, else Ollama. A named llama-server
    that is not executable or not a llama-server, or a CPU-only llama.cpp server on a machine with a GPU, is
    refused here in one line. `machine`: the machine the plan will use, whose GPUs the server must reach
    (None: not checked; a machine described with no GPU needs none)."""
    from launcher.backends import load_backend

    if rpc and name not in ("auto", "llamacpp"):
        raise BackendError("--rpc is a llama.cpp option; use --backend llamacpp")

    def cpu_only(backend: Backend) -> str | None:
        from launcher.backends.llamacpp import LlamaCppBackend, gpu_reach_problem

        if machine is None or not isinstance(backend, LlamaCppBackend) or backend.unavailable() is not None:
            return None
        gpus = [f"GPU{d.index} {d.name}" for d in machine.devices if d.kind not in ("rpc", "cpu")]
        return gpu_reach_problem(backend.program, gpus)

    if name == "auto":
        llamacpp = load_backend("llamacpp", server=llama_server)
        if llama_server or rpc:
            require_backend(llamacpp)
            if not rpc and (problem := cpu_only(llamacpp)) is not None:
                raise BackendError(problem)  # the server named is the one to run: no other backend instead
            return llamacpp
        problem = cpu_only(llamacpp) if llamacpp.unavailable() is None else None
        if llamacpp.unavailable() is None and problem is None:
            return llamacpp
        ollama = load_backend("ollama", host=ollama_host)
        if ollama.unavailable() is None:
            return ollama
        if problem is not None:
            raise BackendError(problem)
        raise BackendError(f"no backend can run here: {llamacpp.unavailable()}; {ollama.unavailable()}")
    if name == "llamacpp":
        backend = load_backend(name, server=llama_server)
        require_backend(backend)
        if not rpc and (problem := cpu_only(backend)) is not None:
            raise BackendError(problem)
        return backend
    backend = load_backend(name, host=ollama_host) if name == "ollama" else load_backend(name)
    require_backend(backend)
    return backend


def planning_backend(name: str = "auto") -> Backend | None:
    """The backend `run` would choose here, for a plan to count its server's memory defaults; None when none can
    run here (the plan then describes llama-server's defaults)."""
    try:
        return choose_backend(name)
    except BackendError:
        return None


def gpu_reach(machine: HardwareSnapshot, *, llama_server: str | None = None) -> dict[str, Any]:
    """What `run` would find about the llama.cpp server here (`fitquant hw --doctor`): which server, the GPUs it can
    offload to, and the one-line finding when it cannot reach this machine's GPUs (None when it can, or there is
    no GPU to reach)."""
    from launcher.backends.llamacpp import LlamaCppBackend, gpu_reach_problem, server_gpu_devices

    backend = LlamaCppBackend(llama_server)
    why = backend.unavailable()
    if why is not None:
        return {"server": None, "path": None, "gpu_devices": [], "finding": why}
    program = backend.program
    gpus = [f"GPU{d.index} {d.name}" for d in machine.devices if d.kind not in ("rpc", "cpu")]
    return {
        "server": program.kind,
        "path": program.argv0[-1] if program.kind == "llama-cpp-python" else program.argv0[0],
        "gpu_devices": list(server_gpu_devices(program)),
        "finding": gpu_reach_problem(program, gpus),
    }


def require_backend(backend: Backend) -> None:
    why = backend.unavailable()
    if why:
        raise BackendError(why)


def backend_and_machine(
    name: str,
    *,
    llama_server: str | None = None,
    rpc: Sequence[str] = (),
    ollama_host: str | None = None,
    vram: list[int] | None = None,
    ram: int | None = None,
    unified: int | None = None,
    profile: Profile | None = None,
    gpu_names: Sequence[str] | None = None,
) -> tuple[Backend, HardwareSnapshot, int | None]:
    """The backend, the machine and the reserve for `run`, `serve` and the router, resolved in one place. The
    machine comes first where it can (its GPUs decide whether a llama.cpp server that cannot reach them is
    refused, or Ollama preferred); RPC devices are listed by the chosen llama-server, so then the backend comes
    first."""
    rpc = tuple(profile.rpc) if profile is not None and not rpc else tuple(rpc)
    needs_server = bool(rpc) and vram is None and (profile is None or profile.devices is None)
    if needs_server:
        backend = choose_backend(name, llama_server=llama_server, rpc=rpc, ollama_host=ollama_host)
        machine, reserve = run_machine(
            backend, vram=vram, ram=ram, unified=unified, rpc=rpc, profile=profile, gpu_names=gpu_names
        )
        return backend, machine, reserve
    machine, reserve = run_machine(
        None, vram=vram, ram=ram, unified=unified, rpc=rpc, profile=profile, gpu_names=gpu_names
    )
    backend = choose_backend(name, llama_server=llama_server, rpc=rpc, ollama_host=ollama_host, machine=machine)
    return backend, machine, reserve


def run_machine(
    backend: Backend | None,
    *,
    vram: list[int] | None = None,
    ram: int | None = None,
    unified: int | None = None,
    rpc: Sequence[str] = (),
    profile: Profile | None = None,
    gpu_names: Sequence[str] | None = None,
) -> tuple[HardwareSnapshot, int | None]:
    """The machine to plan a launch for, resolved in one place, and the reserve its Policy must keep (None: the
    caller's). Probed, or described by `vram`/`ram`/`unified`; with RPC servers, their devices as llama.cpp lists
    them (`llama-server --rpc ... --list-devices`) unless `vram` describes them; with a profile, the devices it
    describes (else the probe) with its reserve applied once: a device keeping more than the common reserve has
    its free memory lowered by the difference, and the common reserve is returned for the Policy."""
    if profile is not None:
        from launcher.profiles import profile_hardware, profile_machine

        if gpu_names:
            raise ValueError("a profile names its own GPUs (each device's name:); drop the GPU names")
        described = profile_hardware(profile)
        if described is None:
            described = run_machine(backend, rpc=tuple(profile.rpc))[0]
        return profile_machine(profile, described)
    from launcher.hardware import describe_machine, resolve_machine

    if not rpc:
        return resolve_machine(vram=vram, ram=ram, unified=unified, gpu_names=gpu_names), None
    if vram is not None:
        return describe_machine(vram=vram, ram=ram, kind="rpc", gpu_names=gpu_names), None
    if gpu_names:
        raise ValueError("GPU names describe GPUs: give the RPC devices' memory too (vram)")
    from launcher.backends.llamacpp import LlamaCppBackend, rpc_devices

    if not isinstance(backend, LlamaCppBackend):
        raise BackendError("RPC devices are llama.cpp's; use the llamacpp backend")
    return rpc_devices(backend.program, tuple(rpc)), None


def server_policy(policy: Policy, backend: Backend | None) -> Policy:
    """`policy` with what the backend's server does by default that changes memory (ServerMemory), so the plan
    counts it; unchanged without a backend. Host weights repacked for the CPU are counted by this computer's CPU
    features: the server runs here (a plan for another machine's profile is off by that much for the weights it
    keeps on the CPU, and its verified runs there record what was measured)."""
    if backend is None:
        return policy
    memory = backend.server_memory()
    repack: tuple[tuple[str, int], ...] = ()
    if memory.cpu_repack:
        from launcher.estimate import cpu_repack_rules
        from launcher.hardware.cpu import cpu_features

        repack = cpu_repack_rules(*cpu_features())
    return replace(
        policy,
        all_logits=memory.all_logits,
        swa_full=memory.swa_full,
        cpu_repack=repack,
        n_batch=policy.n_ubatch if memory.batch_is_ubatch else policy.n_batch,
        vision=policy.vision or memory.loads_projector,
    )


def kv_for_build(policy: Policy, backend: Backend | None, machine: HardwareSnapshot) -> tuple[Policy, str | None]:
    """`policy` with a K/V cache pair the llama.cpp build runs flash attention for on the GPU, and the note saying
    what changed (None when nothing did). A CUDA build compiles FlashAttention kernels for some pairs only
    (FA_QUANTS: from fitquant's build, else what an earlier load on this machine printed); any other pair is
    converted to f16 on every step, silently slow. Unknown pairs, other GPUs and a CPU-only machine: unchanged."""
    from launcher.backends.llamacpp import LlamaCppBackend

    if not isinstance(backend, LlamaCppBackend) or backend.unavailable() is not None:
        return policy, None
    if not any(d.kind == "cuda" for d in machine.devices):
        return policy, None
    from launcher.estimate import default_flash_attn

    if (policy.flash_attn or default_flash_attn(policy.type_v)) == "off":
        return policy, None
    from launcher import record
    from launcher.speed import nearest_kv_pair, parse_fa_quants

    have = backend.fa_quants() or record.fa_quants(machine, backend.name, backend.program.version)
    if have is None:
        return policy, None
    try:
        compiled = parse_fa_quants(have)
    except ValueError:
        return policy, None
    k, v = nearest_kv_pair(policy.type_k, policy.type_v, compiled)
    if (k, v) == (policy.type_k, policy.type_v):
        return policy, None
    note = (f"K/V cache {policy.type_k}/{policy.type_v}: this llama-server build has no FlashAttention kernel for "
            f"that pair (FA_QUANTS {have}; it would convert K and V to f16 every step, slowly): using {k}/{v}, the "
            "nearest pair it runs on the GPU")  # fmt: skip
    return replace(policy, type_k=k, type_v=v), note


def read_api_key(
    path: Path | None, *, env: Mapping[str, str] | None = None, what: str = "--api-key-file"
) -> str | None:
    """The API key servers require: from `path`, else FITQUANT_API_KEY; None when neither. An unreadable or empty
    file is refused in one line: a server silently started without the key the user meant is worse."""
    env = os.environ if env is None else env
    if path is not None:
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise BackendError(f"{what} {path}: {why}") from None
        if not key:
            raise BackendError(f"{what} {path} is empty; write the key into it, or leave the option out")
        return key
    return env.get("FITQUANT_API_KEY") or None


def exposure_warning(request: LaunchRequest) -> str | None:
    """A loud line when a server will listen beyond this machine without an API key; None otherwise."""
    if request.host in LOOPBACK_HOSTS or request.host.startswith("127.") or request.api_key:
        return None
    return (
        f"WARNING: the server listens on {request.host} without an API key: anyone who can reach this machine "
        "can use it; pass --api-key-file (or FITQUANT_API_KEY, or the profile's api_key_env/api_key_file), or "
        "bind 127.0.0.1"
    )


# ---------------------------------------------------------------------------------------------------------
# Plan


def plan_runs(
    specs: Sequence[RunSpec],
    *,
    backend: Backend | None,
    machine: HardwareSnapshot,
    entirely: bool = False,
) -> list[Plan]:
    """Each model's plan on `machine`, in order, each on what the ones before it take.

    The backend's memory defaults are counted, and each plan starts from what earlier launches measured on this
    machine (launcher.record). NoFitError when one does not fit; with several models (or `entirely`), also when
    one does not fit entirely on the GPU (or in RAM on a CPU-only machine), naming it and the ones beside it."""
    from launcher import record
    from launcher.fit import fit, fit_together

    policies, kv_notes = [], []
    for spec in specs:
        policy, note = kv_for_build(server_policy(spec.policy, backend), backend, machine)
        policies.append(policy)
        kv_notes.append(note)
    known = [record.remembered(machine, record.model_key(s.model), p) for s, p in zip(specs, policies, strict=True)]
    build = backend_build(backend)
    if len(specs) == 1 and not entirely:
        spec = specs[0]
        plans = [fit(spec.model, policies[0], machine=machine, confirm=spec.confirm, remembered=known[0], build=build)]
    else:
        plans = fit_together(
            [(s.model, p, s.shown_name) for s, p in zip(specs, policies, strict=True)],
            machine=machine,
            remembered=known,
            confirm=all(s.confirm for s in specs),
            build=build,
        )
    for plan, note in zip(plans, kv_notes, strict=True):
        if note is not None:
            plan.notes.insert(0, note)
    return plans


def backend_build(backend: Backend | None) -> tuple[str, str | None] | None:
    """(backend name, server version) as the machine record stores them: what the speed calibration is keyed by.
    llama.cpp's server version from its program; Ollama's from the server a launch would use (or its binary)."""
    from launcher.backends.llamacpp import LlamaCppBackend
    from launcher.backends.ollama import OllamaBackend

    if isinstance(backend, LlamaCppBackend) and backend.unavailable() is None:
        return backend.name, backend.program.version
    if isinstance(backend, OllamaBackend):
        version = backend.server_version()
        return (backend.name, version) if version is not None else None
    return None


# ---------------------------------------------------------------------------------------------------------
# Launch


def start(
    spec: RunSpec,
    *,
    backend: Backend,
    machine: HardwareSnapshot,
    log_dir: Path | None = None,
    progress: bool = False,
    on_plan: Callable[[Plan], None] | None = None,
    on_attempt: Callable[[Attempt], None] | None = None,
    on_start: Callable[[Option], None] | None = None,
) -> RunResult:
    """The whole run path for one model: plan it, then start_planned."""
    plan = plan_runs([spec], backend=backend, machine=machine)[0]
    if on_plan is not None:
        on_plan(plan)
    return start_planned(spec, plan, backend=backend, machine=machine, log_dir=log_dir, progress=progress,
                         on_attempt=on_attempt, on_start=on_start)  # fmt: skip


def start_planned(
    spec: RunSpec,
    plan: Plan,
    *,
    backend: Backend,
    machine: HardwareSnapshot,
    log_dir: Path | None = None,
    progress: bool = False,
    on_attempt: Callable[[Attempt], None] | None = None,
    on_start: Callable[[Option], None] | None = None,
) -> RunResult:
    """Launch `plan` (fetch, start, ready, verify, warm up, step down on memory failures only), record the
    verified result on this machine, and register the instance (`fitquant ps`). stop() undoes the last two."""
    from launcher import record
    from launcher.paths import private_dir, state_dir

    result = launch(plan, backend, spec.request, log_dir=log_dir or private_dir(state_dir() / "logs"),
                    max_attempts=spec.max_attempts, warmup=spec.warmup, progress=progress,
                    on_attempt=on_attempt, on_start=on_start)  # fmt: skip
    try:
        if spec.warmup != "none":
            result.speed = speed_report(result, machine)
        remember(machine, result, record.model_key(spec.model))
        result.instance_name = register(result, spec.shown_name, reference=spec.model or "",
                                        own_key=spec.request.own_key, via=spec.via)  # fmt: skip
    except BaseException:
        backend.stop(result.instance)
        raise
    return result


def stop(result: RunResult, backend: Backend) -> None:
    """Stop the server (or unload the model) and remove its instance record; idempotent."""
    from launcher import instances

    try:
        backend.stop(result.instance)
    finally:
        if result.instance_name:
            instances.remove(result.instance_name)
            result.instance_name = None


def register(result: RunResult, name: str, *, reference: str | None = None, own_key: bool = False,
             via: str | None = None) -> str:  # fmt: skip
    """Write the instance record `fitquant ps` and `fitquant stop` read; returns its name. `own_key`: the server's
    key is fitquant's own (a router's private server), kept in the record; a user's key never is. `via`: the
    address clients use instead of the server's own."""
    from launcher import instances

    inst = result.instance
    instance_name = instances.instance_name(name, result.option.quant, inst.port)
    instances.save(
        instances.RunningInstance(
            name=instance_name, model=name, quant=result.option.quant, n_ctx=result.option.n_ctx,
            backend=inst.backend, server=inst.server, pid=inst.pid, owner_pid=os.getpid(), endpoint=inst.endpoint,
            verdict=result.placement.verdict, started=time.time(),
            log_path=str(inst.log_path) if inst.log_path else None,
            model_name=inst.model_name, reference=reference, measured_tg_per_s=result.speed.get("measured_tg_per_s"),
            predicted_tg_per_s=_planned_tg(result.speed), speed_finding=result.speed.get("finding"),
            version=inst.version, via=via, api_key=inst.api_key if own_key else None,
        )
    )  # fmt: skip
    return instance_name


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
    """Start plan.chosen on `backend` and prove it; step down after a memory failure only. Raises NoFitError
    (with every attempt) when no configuration could be verified, RunFailed when an attempt ended for a cause no
    smaller configuration fixes, BackendError/FetchError for what no step-down fixes before any start."""
    if plan.chosen is None:
        raise NoFitError(plan.reason, plan=plan)
    attempts: list[Attempt] = []
    current: Plan | None = plan
    warning = exposure_warning(request)
    while current is not None and current.chosen is not None and len(attempts) < max_attempts:
        option = current.chosen
        fetched = backend.fetch(option.candidate, vision=current.policy.vision, progress=progress)
        option = replace(option, candidate=fetched)
        if on_start is not None:
            on_start(option)
        instance: Instance | None = None
        try:
            instance = backend.start(current, option, request, log_dir=log_dir)
            if warning and instance.log_path is not None:
                _log_line(instance.log_path, f"fitquant: {warning}")
            backend.wait_ready(instance, request.ready_timeout_s)
            placement = backend.placement(instance, option)
            expected = expected_verdict(current, option)
            if placement.verdict != expected and not (expected == "spill" and placement.verdict == "gpu"):
                outcome: Literal["oom", "spill"] = "oom" if placement.verdict == "oom" else "spill"
                raise AttemptFailed(outcome, f"expected {expected}, got {placement.verdict}: {placement.reason}")
            warm = warm_up(instance, placement, option, warmup, timeout_s=request.ready_timeout_s)
        except AttemptFailed as failed:
            if instance is not None:
                backend.stop(instance)
            attempt = Attempt(option.quant, option.n_ctx, option.n_gpu_layers, failed.outcome, failed.detail,
                              str(instance.log_path) if instance and instance.log_path else None)  # fmt: skip
            attempts.append(attempt)
            if on_attempt is not None:
                on_attempt(attempt)
            if not attempt.steps_down:
                raise RunFailed(f"{option.quant} at {option.n_ctx} tokens: {attempt.outcome}: {attempt.detail}",
                                attempts=attempts) from None  # fmt: skip
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
    raise NoFitError(f"{why}; tried {tried}", plan=current or plan, attempts=attempts)


def _log_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


# ---------------------------------------------------------------------------------------------------------
# Warm-up: prove it generates; `full` also fills the context once (compute-buffer growth, late OOM), and the
# server's own count of the prompt tokens it processed proves the fill


def warm_up(
    instance: Instance, placement: Placement, option: Option, mode: Warmup, *, timeout_s: float
) -> dict[str, Any]:
    """Run the warm-up; AttemptFailed when the server fails it: out of memory or a crash (memory failures), a
    timeout, or a request it rejects or a fill it did not process (`rejected`: no smaller configuration fixes it)."""
    if mode == "none":
        return {"mode": "none"}
    started = time.monotonic()
    report: dict[str, Any] = {"mode": mode}
    from launcher.speed import PP_TOKENS, measured_speed

    ollama = instance.backend == "ollama"
    # llama.cpp's servers are asked to go on past an end-of-text token: the decode rate is over that many tokens
    # every time, not over however few a model says hello in
    extra = None if ollama else {"ignore_eos": True}
    hello = _ask(instance, "Say hello.", max_tokens=SHORT_REPLY_TOKENS, timeout_s=timeout_s, extra=extra)
    report["short_reply"] = hello.text
    # the server's own decode speed (the short prompt's prefill says little; the full fill's says more). A full
    # warm-up (a calibration's) keeps the fastest of a few: one request's rate wanders by 5-6% on this project's
    # 2-core test machine (the same 16 tokens read 112-142 t/s a dozen times in a row), a busy spell only ever slows
    # it, and a calibration drawn from one slow request misprices every later plan by as much. A short one (every
    # load `serve` makes on demand) times one: a swap waits for it
    samples = [measured_speed(hello, ollama=ollama).tg_per_s]
    while mode == "full" and len(samples) < DECODE_SAMPLES:
        again = _ask(instance, "Say hello.", max_tokens=SHORT_REPLY_TOKENS, timeout_s=timeout_s, extra=extra)
        samples.append(measured_speed(again, ollama=ollama).tg_per_s)
    report["measured_tg_per_s"] = _fastest(samples)
    if len(samples) > 1:
        report["decode_samples"] = [_rounded(rate) for rate in samples]
    report["short_prompt_tokens"] = hello.prompt_tokens
    if mode == "full":
        n_slot = placement.n_ctx_per_slot or option.n_ctx // max(1, option.estimate.settings.n_parallel)
        tokens = max(16, n_slot - 96)  # room for the chat template and the reply
        shallow = min(PP_TOKENS, tokens // 2)
        if shallow >= 2 * OFFLOAD_BATCH:
            # a prompt of a few hundred tokens at an empty context, in another word than the fill's (none of it is
            # answered from the prompt cache, nor is the fill from it): prefill where the matmuls take most of the
            # time, which prices them more surely than the fill, mostly attention on a CPU. The fastest of a few,
            # each in a word of its own for the same reason
            timed: list[tuple[float, int]] = []
            for word in SHALLOW_WORDS[:DECODE_SAMPLES]:
                text, _ = filler(instance, shallow, timeout_s=timeout_s, word=word)
                first = _ask(instance, text, max_tokens=1, timeout_s=timeout_s)
                evaluated = _evaluated(first, ollama=ollama)
                rate = measured_speed(first, ollama=ollama).pp_per_s
                if evaluated >= OFFLOAD_BATCH and rate:
                    timed.append((rate, evaluated))
            if timed:
                rate, evaluated = max(timed)
                report["shallow_prompt_tokens"] = evaluated
                report["measured_pp_per_s_shallow"] = _rounded(rate)
                report["prefill_samples_shallow"] = [_rounded(r) for r, _ in timed]
        prompt, counted = filler(instance, tokens, timeout_s=timeout_s)
        # tokens decoded after the fill: decode at depth (what separates attention from reading weights)
        filled = _ask(instance, prompt, max_tokens=DEEP_REPLY_TOKENS, timeout_s=timeout_s, extra=extra)
        processed = filled.prompt_tokens
        if processed is None:
            raise AttemptFailed(
                "rejected",
                f"{instance.server} did not say how many prompt tokens it processed (no usage.prompt_tokens, "
                "timings.prompt_n or prompt_eval_count): the fill is unproven",
            )
        if counted is not None and processed < counted:
            raise AttemptFailed(
                "rejected",
                f"{instance.server} processed {processed} prompt tokens of the {counted} sent: the context was not "
                "filled (a chat template that drops the message?)",
                log_tail=_tail(instance),
            )
        report["filled_tokens"] = processed
        report["sent_tokens"] = counted
        report["full_reply"] = filled.text
        filled_speed = measured_speed(filled, ollama=ollama)
        report["measured_pp_per_s"] = _rounded(filled_speed.pp_per_s)
        if (filled.completion_tokens or 0) >= MIN_TIMED_TOKENS:  # fewer: a rate over one or two gaps means little
            # the fastest of a few, as at the short prompt (the two are solved together: one slow sample of either
            # would misprice attention): the same prompt again, answered from the server's prompt cache, decodes from
            # the same depth. A server that evaluated it again instead is not asked a third time
            deep = [filled_speed.tg_per_s]
            for _ in range(DECODE_SAMPLES - 1):
                again = _ask(instance, prompt, max_tokens=DEEP_REPLY_TOKENS, timeout_s=timeout_s, extra=extra)
                if (again.completion_tokens or 0) >= MIN_TIMED_TOKENS:  # (Ollama may stop at an end-of-text)
                    deep.append(measured_speed(again, ollama=ollama).tg_per_s)
                if _evaluated(again, ollama=ollama) > 3 * DEEP_PROMPT_WORDS:
                    break
            report["measured_tg_per_s_at_fill"] = _fastest(deep)
            report["decode_samples_at_fill"] = [_rounded(rate) for rate in deep]
        # prefill at depth: the fill's prompt with its last words changed, all before them answered from the server's
        # prompt cache; with the fill's own prefill (every depth from 0) it separates prefill's attention from its
        # matmuls. As long as the fill: no more room needed
        words = prompt.split(" ")
        changed = " ".join(words[:-DEEP_PROMPT_WORDS] + ["world"] * DEEP_PROMPT_WORDS)
        if counted is not None and len(words) > 2 * DEEP_PROMPT_WORDS and _tokens(instance, changed) <= counted:
            # (no longer than the fill, by the server's own tokenizer: it fits where the fill did)
            deeper = _ask(instance, changed, max_tokens=1, timeout_s=timeout_s)
            evaluated = _evaluated(deeper, ollama=ollama)
            reused = OFFLOAD_BATCH <= evaluated <= 3 * DEEP_PROMPT_WORDS
            if reused:  # the server answered the prefix from its cache: the changed words' prefill alone
                report["deep_prompt_tokens"] = evaluated
                report["measured_pp_per_s_at_fill"] = _rounded(measured_speed(deeper, ollama=ollama).pp_per_s)
    proc = instance.process
    if proc is not None and proc.poll() is not None:
        raise _warmup_failure(instance, f"the server exited (status {proc.returncode})", status=None)
    report["seconds"] = round(time.monotonic() - started, 3)
    return report


def _evaluated(answer: ChatReply, *, ollama: bool) -> int:
    """The prompt tokens the server evaluated for `answer` (those it answered from its prompt cache not counted)."""
    count = answer.prompt_tokens if ollama else answer.timings.get("prompt_n")  # llama-server: a float
    return int(count) if isinstance(count, (int, float)) and not isinstance(count, bool) else 0


SHORT_REPLY_TOKENS = 16  # the short warm-up: enough tokens for the server's decode speed to mean something
DECODE_SAMPLES = 3  # short decodes a full warm-up times, the fastest kept (and shallow prefills, and decodes at fill)
SHALLOW_WORDS = ("story", "river", "garden")  # a shallow prefill's filler each: none answered from the prompt cache
MIN_TIMED_TOKENS = 8  # a decode rate over fewer generated tokens is not kept
DEEP_REPLY_TOKENS = 32  # decoded after the full fill: a rate steady enough to calibrate attention by
DEEP_PROMPT_WORDS = 64  # the fill's last words, changed: prefill at depth, the rest from the prompt cache
OFFLOAD_BATCH = 32  # a prompt batch this big runs as prefill does (llama.cpp offloads host weights' matmuls from 32)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _fastest(rates: list[float | None]) -> float | None:
    """The fastest of a warm-up's timings of one figure (None where none was timed), rounded."""
    return _rounded(max((rate for rate in rates if rate), default=None))


def speed_report(result: RunResult, machine: HardwareSnapshot) -> dict[str, Any]:
    """Predicted decode and prefill tokens/s (launcher.speed) beside what the warm-up measured, the measured /
    predicted ratios the next plan on this machine is calibrated by (decode; with `--warmup full` also attention,
    from decode after the fill, and prefill, from the fill), and the finding when a load on a GPU decodes or fills
    far below its prediction or its log shows more graph splits than a full offload gives (compute that probably ran
    on the CPU). Where the plan was calibrated by earlier runs, each prediction's calibrated figure (what the plan
    itself predicted) is beside it as calibrated_*; the new ratios are taken against the uncalibrated ones."""
    from launcher.speed import MODEL_VERSION, Times, machine_speeds, predict, rates, solve_ratios, times
    from launcher.verify import full_offload_splits, splits_finding

    option = result.option
    devices = machine_speeds(machine, [option])
    warmup = result.warmup
    factors = option.calibration  # what the plan's figures were scaled by; None: uncalibrated
    at_depth = predict(option, devices, option.n_ctx // max(1, result.plan.policy.n_parallel))
    measured_tg = warmup.get("measured_tg_per_s")
    filled = warmup.get("filled_tokens")
    report: dict[str, Any] = {
        "predicted_tg_per_s": None,
        "predicted_pp_per_s": None,
        "predicted_tg_per_s_at_depth": _rounded(at_depth.tg_per_s),
        "predicted_pp_per_s_at_depth": _rounded(at_depth.pp_per_s),
        "measured_tg_per_s": measured_tg,
        "measured_pp_per_s": warmup.get("measured_pp_per_s"),
        "tg_ratio": None,
        "model_version": MODEL_VERSION,  # the form of prediction the ratios were measured against
        "graph_splits": result.placement.graph_splits,
        "full_offload_splits": full_offload_splits(result.placement),
        "finding": None,
    }

    def predicted(key: str, parts: Times | None, *, decode: bool) -> None:
        """The prediction for one measured point under `key`, and the plan's calibrated one beside it."""

        def figure(scale: Calibration | None) -> float | None:
            if parts is None:
                return None
            speed = rates(parts, scale)
            return _rounded(speed.tg_per_s if decode else speed.pp_per_s)

        report[key] = figure(None)
        if factors is not None:
            report[key.replace("predicted_", "calibrated_", 1)] = figure(factors)

    empty = times(option, devices, 0)
    predicted("predicted_tg_per_s", empty, decode=True)
    predicted("predicted_pp_per_s", empty, decode=False)
    if factors is not None:
        report["calibration"] = factors.note()
    short_depth = warmup.get("short_prompt_tokens") or 0
    short = times(option, devices, short_depth)
    if measured_tg and short is not None:
        deep = fill = deep_fill = shallow = None
        if filled:
            at_fill = times(option, devices, filled)  # decode right after the fill
            fill_parts = times(option, devices, 0, n_prompt=filled)  # the fill: every depth from 0
            # the changed words come after the cached prefix: the prompt's last `more` tokens, from filled - more
            more: int = warmup.get("deep_prompt_tokens") or 0
            deeper_parts = times(option, devices, filled - more, n_prompt=more) if more else None
            predicted("predicted_pp_per_s_fill", fill_parts, decode=False)
            first: int = warmup.get("shallow_prompt_tokens") or 0  # a prompt at an empty context
            shallow_parts = times(option, devices, 0, n_prompt=first) if first else None
            if shallow_parts is not None and warmup.get("measured_pp_per_s_shallow"):
                report["measured_pp_per_s_shallow"] = warmup["measured_pp_per_s_shallow"]
                report["predicted_pp_per_s_shallow"] = _rounded(rates(shallow_parts).pp_per_s)
                shallow = (shallow_parts, report["measured_pp_per_s_shallow"])
            predicted("predicted_tg_per_s_at_fill", at_fill, decode=True)
            report["measured_tg_per_s_at_fill"] = warmup.get("measured_tg_per_s_at_fill")
            report["measured_pp_per_s_at_fill"] = warmup.get("measured_pp_per_s_at_fill")
            if at_fill is not None and report["measured_tg_per_s_at_fill"]:
                deep = (at_fill, report["measured_tg_per_s_at_fill"])
            if fill_parts is not None and report["measured_pp_per_s"]:
                fill = (fill_parts, report["measured_pp_per_s"])
            if deeper_parts is not None and report["measured_pp_per_s_at_fill"]:
                deep_fill = (deeper_parts, report["measured_pp_per_s_at_fill"])
                predicted("predicted_pp_per_s_at_fill", deeper_parts, decode=False)
        report.update(solve_ratios((short, measured_tg), deep, fill, deep_fill, shallow))
    findings = []
    on_gpu = any(d.is_gpu and d.model_bytes for d in result.placement.devices)
    if on_gpu and report["tg_ratio"] is not None and report["tg_ratio"] < SLOW_DECODE_RATIO:
        findings.append(
            f"slow: decode {measured_tg} tokens/s, predicted {report['predicted_tg_per_s']}: probable CPU fallback"
        )
    # independent of the measured speed: a small model can decode fast enough on the CPU to pass the ratio
    measured_pp = report["measured_pp_per_s"]
    predicted_pp = report.get("predicted_pp_per_s_fill") or report["predicted_pp_per_s"]
    if on_gpu and measured_pp and predicted_pp and measured_pp / predicted_pp < SLOW_PREFILL_RATIO:
        findings.append(f"slow: prefill {measured_pp} tokens/s, predicted {predicted_pp}: probable CPU fallback")
    converted = fa_converted(result)
    report["fa_converted"] = converted
    if converted is not None and on_gpu:
        have = f" (this build has {result.placement.fa_quants})" if result.placement.fa_quants else ""
        findings.append(f"slow: no FlashAttention kernel for K/V types {converted}{have}: llama.cpp converts K and "
                        "V to f16 every step; plan with a pair the build compiles")  # fmt: skip
    split = splits_finding(result.placement)
    if split is not None:
        findings.append(split)
    report["finding"] = "; ".join(findings) or None
    return report


def _planned_tg(speed: Mapping[str, Any]) -> float | None:
    """Decode tokens/s as the plan predicted it: calibrated by this machine's runs where it was."""
    calibrated = speed.get("calibrated_tg_per_s")
    return calibrated if calibrated is not None else speed.get("predicted_tg_per_s")


def fa_converted(result: RunResult) -> str | None:
    """The K-V pair the server said it has no FlashAttention kernel for ("q8_0-f16"), from the load or from the
    warm-up after it (llama.cpp warns at the first attention it runs); None when it did not say so."""
    if result.placement.fa_converted:
        return result.placement.fa_converted
    path = result.instance.log_path
    if path is None:
        return None
    from launcher.llamalog import parse

    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - LOG_TAIL_BYTES))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    return parse(text).fa_converted


LOG_TAIL_BYTES = 1 << 20  # the warm-up's lines are at the end of the server's log

SLOW_DECODE_RATIO = 0.6  # a GPU load decoding under this share of its prediction is a finding, not a success
SLOW_PREFILL_RATIO = 0.3  # prefill is compute-bound and varies more: only far below its prediction is a finding


def _ask(instance: Instance, content: str, *, max_tokens: int, timeout_s: float,
         extra: dict[str, Any] | None = None) -> ChatReply:  # fmt: skip
    """One chat request, with the server's own token counts; AttemptFailed as warm_up classifies it."""
    from launcher.chat import ChatError, reply

    try:
        return reply(instance, [{"role": "user", "content": content}], max_tokens=max_tokens, timeout_s=timeout_s,
                     extra=extra)  # fmt: skip
    except ChatError as exc:
        raise _warmup_failure(instance, str(exc), status=exc.status) from None


def _tokens(instance: Instance, text: str) -> float:
    """The server's token count of `text`; infinite where it cannot say (nothing is sent then)."""
    from launcher.chat import ChatError, count_tokens

    try:
        count = count_tokens(instance, text)
    except ChatError:
        return math.inf
    return math.inf if count is None else count


def filler(instance: Instance, tokens: int, *, timeout_s: float, word: str = "hello") -> tuple[str, int | None]:
    """A prompt of about `tokens` tokens for this server's tokenizer (a word is not always one token), measured
    with the server's own tokenizer where it has one; and that count (None without a tokenizer endpoint)."""
    from launcher.chat import ChatError, count_tokens

    def count(text: str) -> int | None:
        try:
            return count_tokens(instance, text, timeout_s=timeout_s)
        except ChatError as exc:
            raise _warmup_failure(instance, str(exc), status=exc.status) from None

    words = tokens
    sample = 256
    counted = count(word + f" {word}" * (sample - 1))
    if counted:
        words = max(1, tokens * sample // counted)
    prompt = word + f" {word}" * (words - 1)
    total = count(prompt) if counted else None
    while total is not None and words > 1 and total > tokens:
        words = words * 9 // 10  # a tokenizer that merges runs unevenly: trim until it fits
        prompt = word + f" {word}" * (words - 1)
        total = count(prompt)
    return prompt, total


def _tail(instance: Instance, lines: int = 12) -> list[str]:
    from launcher.backends.process import tail

    return tail(instance.log_path, lines)


def _warmup_failure(instance: Instance, detail: str, *, status: int | None) -> AttemptFailed:
    """Why a warm-up request failed: out of memory (the reply or the log says so), the server died (a crash while
    allocating), a timeout, or a request the running server rejected (an HTTP error with the server still up)."""
    from launcher.verify import oom_line

    lines = _tail(instance, 40)
    proc = instance.process
    died = proc is not None and proc.poll() is not None
    oom = oom_line([detail, *lines])
    if oom is not None:
        return AttemptFailed("oom", f"out of memory during warm-up: {oom.strip()[:300]}", log_tail=lines[-12:])
    if died:
        return AttemptFailed("crash", f"the server died during warm-up: {detail}", log_tail=lines[-12:])
    if status is None and "timed out" in detail.lower():
        return AttemptFailed("timeout", f"warm-up timed out: {detail}", log_tail=lines[-12:])
    return AttemptFailed("rejected", f"the server is up but rejected the warm-up request: {detail}",
                         log_tail=lines[-12:])  # fmt: skip


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
        "speed": dict(result.speed),  # predicted and measured tokens/s: the next plan's calibration
        "fa_quants": p.fa_quants,  # a CUDA build's FlashAttention K-V pairs: the next plan keeps to them
    }


def remember(machine: HardwareSnapshot, result: RunResult, model: str) -> Path:
    """Append the verified result to this machine's record, under `model` (launcher.record.model_key)."""
    from launcher.record import append

    return append(machine, record_entry(result, model))
