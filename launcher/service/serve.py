"""`fitquant serve --profile P`: every model of a machine profile, fitted together, launched, verified and kept
running.

Everything a model goes through is `fitquant run`'s own path (launcher.run): the backend and the machine
(`run_machine`: probed, or the profile's devices, its reserve applied once), the policy with the backend's memory
defaults, what was measured before, the fit (`plan_runs`: all the models together, in the profile's order, each
on what the ones before it take; one that does not fit stops the start with its name), then `start_planned`
(fetch, start, ready, verify, warm up, step down on memory failures only, record, register). The supervisor only
says what changed since the last verified start of the profile (another fingerprint, or less free memory than
that start needed), supervises and reloads.

Each server is supervised: a
server that dies is started again with a growing pause, and verified again. SIGTERM stops everything. SIGHUP
reads the profile again and restarts only the models whose entry changed (all of them when a machine-wide
setting changed); a profile that no longer reads is reported and the running models are kept.

The log is one event per line on stderr (`event key=value ...`), which journald keeps as is; readiness goes
to systemd through NOTIFY_SOCKET (launcher.service.notify).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import BackendError, NoFitError, ProfileError
from launcher.paths import state_dir

if TYPE_CHECKING:
    from launcher.backends.base import Backend
    from launcher.hardware.types import HardwareSnapshot
    from launcher.plan import Plan
    from launcher.profiles import ModelEntry, Profile
    from launcher.run import RunResult, RunSpec

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
HEALTHY_AFTER_S = 600.0  # a model that ran this long starts its next restart from the first pause again
POLL_S = 0.2


class ServeError(BackendError):
    """The profile's models cannot be served as asked."""


def log_event(event: str, **fields: Any) -> None:
    """One line per event: `fitquant: event key=value ...`, values quoted only when they need it."""
    parts = [event]
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if not text or any(c.isspace() or c in '"=' for c in text):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    print("fitquant: " + " ".join(parts), file=sys.stderr, flush=True)


@dataclass
class Served:
    """One model of the profile and the server that runs it now (None between a crash and its restart)."""

    entry: ModelEntry
    identity: str  # the entry and the machine-wide settings it was started with: what a reload compares
    plan: Plan
    result: RunResult | None = None
    started_at: float = 0.0  # monotonic
    restarts: int = 0
    next_try: float = 0.0  # monotonic; when a dead server is started again
    pause_s: float = BACKOFF_FIRST_S


@dataclass
class Supervisor:
    path: Path
    profile: Profile
    api_key: str | None = None
    on_ready: Callable[[str], None] = lambda text: None
    served: dict[str, Served] = field(default_factory=dict)
    backend: Backend | None = None
    machine: HardwareSnapshot | None = None
    reserve: int | None = None  # the profile's common reserve (run_machine): every model's Policy keeps it

    # --- start -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.backend, self.machine, self.reserve = self._backend_and_machine(self.profile)
        self._say_what_changed()
        plans = self._plan_together(self.profile.models, self.machine)
        for entry, plan in plans:
            self._launch(entry, plan)
        self._save_state()
        self.on_ready(self._status())

    def _backend_and_machine(self, profile: Profile) -> tuple[Backend, HardwareSnapshot, int | None]:
        """The run path's backend and machine for the profile (its reserve applied once, in run_machine)."""
        from launcher.run import backend_and_machine

        return backend_and_machine(profile.backend, llama_server=profile.llama_server, ollama_host=profile.ollama_host,
                                   profile=profile)  # fmt: skip

    def _say_what_changed(self) -> None:
        from launcher.record import fingerprint, machine_identity
        from launcher.units import format_bytes

        assert self.machine is not None
        last = _read_state(self.path)
        if last is None:
            log_event("plan", reason="first verified start of this profile on this machine")
            return
        now = fingerprint(self.machine)
        if last.get("fingerprint") != now:
            before = _describe(last.get("identity", {}))
            after = _describe(machine_identity(self.machine))
            log_event("hardware-changed", before=before, now=after, action="planning again for this hardware")
            return
        needs: dict[str, int] = {}
        for model in last.get("models", {}).values():
            for budget, n in model.get("needs_bytes", {}).items():
                needs[budget] = needs.get(budget, 0) + int(n)
        for budget, needed in sorted(needs.items()):
            free = _free_bytes(self.machine, budget)
            if free is not None and free < needed:
                needed_text = format_bytes(needed)
                log_event("memory-changed", device=budget, free=format_bytes(free), last_start_needed=needed_text,
                          action="planning again for what is free now")  # fmt: skip

    def _spec(self, entry: ModelEntry) -> RunSpec:
        """What the run path takes for one model of the profile."""
        from launcher.backends.base import LaunchRequest
        from launcher.profiles import profile_policy
        from launcher.run import RunSpec

        policy = profile_policy(self.profile, entry, reserve_bytes=self.reserve)
        request = LaunchRequest(host=self.profile.host, port=entry.port, api_key=self.api_key,
                                rpc=tuple(self.profile.rpc))  # fmt: skip
        return RunSpec(entry.model, policy, request, name=entry.name, warmup=self.profile.defaults.warmup)

    def _plan_together(self, entries: list[ModelEntry], machine: HardwareSnapshot) -> list[tuple[ModelEntry, Plan]]:
        """Each model's plan on what the ones before it leave; a model that does not fit entirely stops it all."""
        from launcher.run import plan_runs

        try:
            plans = plan_runs([self._spec(e) for e in entries], backend=self.backend, machine=machine, entirely=True)
        except NoFitError as exc:
            raise ServeError(f"profile model {exc}") from None
        for entry, plan in zip(entries, plans, strict=True):
            assert plan.chosen is not None
            log_event("planned", model=entry.name, quant=plan.chosen.quant, ctx=plan.chosen.n_ctx,
                      layers_on_gpu=plan.chosen.n_gpu_layers, mode=plan.mode)  # fmt: skip
        return list(zip(entries, plans, strict=True))

    # --- launch ------------------------------------------------------------------------------------------
    def _launch(self, entry: ModelEntry, plan: Plan, served: Served | None = None) -> Served:
        from launcher.run import exposure_warning, start_planned

        assert self.backend is not None and self.machine is not None
        spec = self._spec(entry)
        warning = exposure_warning(spec.request)
        if warning:
            log_event("warning", model=entry.name, message=warning)
        log_event("starting", model=entry.name, quant=plan.chosen.quant if plan.chosen else None)
        result = start_planned(
            spec, plan, backend=self.backend, machine=self.machine,
            on_attempt=lambda a: log_event("attempt", model=entry.name, quant=a.quant, ctx=a.n_ctx,
                                           outcome=a.outcome, detail=a.detail),
        )  # fmt: skip
        # held at once, so that a SIGTERM from here on stops this server too
        if served is None:
            served = Served(entry, _identity(entry), result.plan)
            self.served[entry.name] = served
        served.plan, served.result = result.plan, result
        served.started_at = time.monotonic()
        self._save_state()
        inst = result.instance
        log_event("ready", model=entry.name, quant=result.option.quant, ctx=result.option.n_ctx,
                  endpoint=inst.endpoint, pid=inst.pid, verdict=result.placement.verdict,
                  placement=result.placement.reason)  # fmt: skip
        return served

    def _stop(self, served: Served, why: str) -> None:
        from launcher.run import stop

        if served.result is not None and self.backend is not None:
            log_event("stopping", model=served.entry.name, reason=why, pid=served.result.instance.pid)
            stop(served.result, self.backend)
            served.result = None

    def stop_all(self, why: str) -> None:
        for served in list(self.served.values()):
            self._stop(served, why)

    # --- supervise ---------------------------------------------------------------------------------------
    def check(self) -> None:
        """Notice servers that died and start them again when their pause is over."""
        now = time.monotonic()
        for served in self.served.values():
            result = served.result
            if result is not None:
                proc = result.instance.process
                if proc is None or proc.poll() is None:
                    continue
                ran = now - served.started_at
                if ran >= HEALTHY_AFTER_S:
                    served.pause_s = BACKOFF_FIRST_S
                log_event("crashed", model=served.entry.name, status=proc.returncode, ran_s=round(ran, 1),
                          restart_in_s=served.pause_s, log=result.instance.log_path)  # fmt: skip
                self._stop(served, "it exited")
                served.next_try = now + served.pause_s
                served.pause_s = min(BACKOFF_MAX_S, served.pause_s * 2)
                continue
            if now < served.next_try:
                continue
            served.restarts += 1
            try:
                self._launch(served.entry, served.plan, served)
            except (BackendError, NoFitError) as exc:
                log_event("restart-failed", model=served.entry.name, error=str(exc), retry_in_s=served.pause_s)
                served.next_try = time.monotonic() + served.pause_s
                served.pause_s = min(BACKOFF_MAX_S, served.pause_s * 2)
        self._save_state()

    # --- reload ------------------------------------------------------------------------------------------
    def reload(self) -> None:
        """Read the profile again and apply only what changed."""
        from launcher.profiles import load_profile

        try:
            profile = load_profile(self.path)
        except ProfileError as exc:
            log_event("reload-refused", error=str(exc), action="keeping the running models")
            self.on_ready(self._status())
            return
        old_globals, new_globals = _globals(self.profile), _globals(profile)
        wanted = {entry.name: entry for entry in profile.models}
        if old_globals != new_globals:
            log_event("reload", change="machine-wide settings", action="restarting every model")
            self.stop_all("the profile's machine-wide settings changed")
            self.served.clear()
            self.profile = profile
            self.start()
            return
        self.profile = profile
        gone = [s for name, s in self.served.items() if name not in wanted or s.identity != _identity(wanted[name])]
        for served in gone:
            self._stop(served, "its profile entry changed" if served.entry.name in wanted else "it left the profile")
            del self.served[served.entry.name]
        fresh = [entry for name, entry in wanted.items() if name not in self.served]
        if not fresh and not gone:
            log_event("reload", change="none")
            self.on_ready(self._status())
            return
        assert self.machine is not None
        # what the running models take stays taken (a described machine does not see it in its free memory)
        from launcher.fit import less_free

        remaining = self._backend_and_machine(profile)[1] if not self.machine.described else self.machine
        if self.machine.described or not remaining.devices:
            for served in self.served.values():
                if served.result is not None:
                    remaining = less_free(remaining, served.result.option.needs)
        for entry, plan in self._plan_together(fresh, remaining):
            self._launch(entry, plan)
        self._save_state()
        self.on_ready(self._status())

    # --- state -------------------------------------------------------------------------------------------
    def _status(self) -> str:
        up = [s for s in self.served.values() if s.result is not None]
        return f"{len(up)} of {len(self.served)} models verified and serving"

    def _save_state(self) -> None:
        from launcher.record import fingerprint, machine_identity

        assert self.machine is not None
        models = {
            name: {
                "quant": s.result.option.quant,
                "n_ctx": s.result.option.n_ctx,
                "needs_bytes": dict(s.result.option.needs),
            }
            for name, s in self.served.items()
            if s.result is not None
        }
        state = {"profile": str(self.path), "fingerprint": fingerprint(self.machine),
                 "identity": machine_identity(self.machine), "models": models, "time": time.time()}  # fmt: skip
        from launcher.paths import write_private

        write_private(_state_path(self.path), json.dumps(state, indent=2))


def serve(ref: str, *, api_key_file: Path | None = None) -> None:
    """Run the profile's models until SIGTERM; SIGHUP reloads the profile. Raises ProfileError/ServeError."""
    from launcher.profiles import find_profile, load_profile, profile_api_key
    from launcher.run import read_api_key
    from launcher.service import notify

    path = find_profile(ref).resolve()
    profile = load_profile(path)
    api_key = read_api_key(api_key_file) if api_key_file is not None else profile_api_key(profile)
    hup = {"pending": False}

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    def on_hup(_signum: int, _frame: Any) -> None:
        hup["pending"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    supervisor = Supervisor(path, profile, api_key, on_ready=_notify_ready)
    log_event("serve", profile=path, machine=profile.machine, models=len(profile.models))
    try:
        supervisor.start()
        while True:
            if hup["pending"]:
                hup["pending"] = False
                notify.reloading("reading the profile again")
                supervisor.reload()
            supervisor.check()
            time.sleep(POLL_S)
    finally:
        notify.stopping("stopping every model")
        supervisor.stop_all("fitquant serve is stopping")
        log_event("stopped")


# --- helpers -------------------------------------------------------------------------------------------------
def _notify_ready(text: str) -> None:
    from launcher.service import notify

    notify.ready(text)


def _identity(entry: ModelEntry) -> str:
    return json.dumps(entry.model_dump(mode="json"), sort_keys=True)


def _globals(profile: Profile) -> str:
    """The settings every model depends on: anything but the model list and the machine's name."""
    return json.dumps(profile.model_dump(mode="json", exclude={"models", "machine"}), sort_keys=True)


def _free_bytes(machine: HardwareSnapshot, budget: str) -> int | None:
    if budget == "CPU":
        return machine.ram_available_bytes
    for d in machine.devices:
        if f"GPU{d.index}" == budget:
            return d.free_bytes
    return 0  # the device is gone


def _describe(identity: Mapping[str, Any]) -> str:
    from launcher.units import format_bytes

    devices = identity.get("devices") or []
    if not devices:
        return "no GPU"
    return ", ".join(f"{d.get('name')} {format_bytes(int(d.get('total_bytes') or 0))}" for d in devices)


def _state_path(profile_path: Path) -> Path:
    import hashlib

    key = hashlib.sha256(str(profile_path).encode()).hexdigest()[:12]
    return state_dir() / "serve" / f"{profile_path.stem}-{key}.json"


def _read_state(profile_path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(_state_path(profile_path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
