"""The models behind `fitquant serve`'s one endpoint: loaded on demand, evicted by measured memory, every load
verified through the run path (launcher.run).

    Pool.prepare()        plan every profile model on the empty machine (one that cannot fit alone, or pinned
                          models that cannot fit together, stop the start, naming what would fit)
    await acquire(alias)  a Lease on a verified server: at once when the model is loaded; else queued (bounded)
                          until the loader has loaded it
    release(lease)        the request ended: the model's in-flight count drops, idle models may be evicted
    await load / unload   the admin routes, keep_alive 0, ttl expiry, reload

A model's cost is its plan's bytes per budget (GPU0, GPU1, ... or CPU on a machine without a GPU), then, once
verified here, what was measured (the record's needs). What a budget has free is its usable size on the empty
machine less what the resident models cost; on a probed NVIDIA machine it is read again from NVML before each
load, so memory other processes took counts against it. One load at a time: a single loader task takes the queued
model whose oldest request is oldest (requests grouped by model), asks launcher.service.admission what to evict
(least recently used idle, unpinned models; never one with a request in flight), stops them, waits until their
memory is free, and loads through `start_planned` with one attempt. A load that spills or runs out of memory is
stopped, one more idle model is evicted (or, with none left, the next smaller configuration is planned), and it is
tried once more; a second failure answers the queued requests with 503 and the reason.

Requests for a loaded model never wait behind a load, except that a loaded model whose memory another queued
model has waited for longer than `router.swap_after` stops taking new requests until it is swapped out (the bound
that keeps either from starving). Blocking work (planning, starting, verifying, stopping) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from launcher.errors import BackendError, FitquantError, NoFitError, RunFailed
from launcher.service.events import log_event
from launcher.units import shown_value

if TYPE_CHECKING:
    from launcher.backends.base import Backend, Instance
    from launcher.hardware.types import HardwareSnapshot
    from launcher.plan import Plan
    from launcher.profiles import ModelEntry, Profile
    from launcher.profiles.schema import RouterSettings
    from launcher.run import RunResult, RunSpec
    from launcher.service.metrics import RouterMetrics
    from launcher.service.ollama_api import ModelInfo

State = Literal["unloaded", "loading", "ready", "stopping"]
FREED_TIMEOUT_S = 30.0  # how long a stopped server's GPU memory may take to show as free again


class Refused(FitquantError):
    """A request the pool cannot serve now: `status` (404, 503, 502) and a one-line reason."""

    def __init__(self, status: int, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class ServeError(BackendError):
    """The profile's models cannot be served as asked."""


@dataclass
class Lease:
    """One request's hold on a verified server: where to send it. release() it when the request ends."""

    alias: str
    instance: Instance
    generation: int  # which load of the model this is (a crash and reload make another)
    released: bool = False

    @property
    def base_url(self) -> str:
        return self.instance.endpoint.removesuffix("/v1")


@dataclass
class Model:
    """One profile model as the router holds it."""

    entry: ModelEntry
    spec: RunSpec
    plan: Plan  # planned on the empty machine
    cost: dict[str, int]  # bytes per budget: the plan's, then measured here
    info: ModelInfo | None = None
    state: State = "unloaded"
    result: RunResult | None = None
    generation: int = 0
    in_flight: int = 0
    last_used: float = 0.0
    loaded_at: float = 0.0
    waiters: deque[tuple[asyncio.Future[Lease], float]] = field(default_factory=deque)
    keep_alive_s: float | None = None  # the last request's keep_alive (None: the profile's ttl; inf: forever)
    drain_from: float | None = None  # monotonic: since when another queued model has waited for its memory
    last_error: str | None = None
    load_s: float | None = None

    @property
    def alias(self) -> str:
        return self.entry.name

    @property
    def ttl_s(self) -> float | None:
        """How long it may stay idle: the last request's keep_alive, else the profile's ttl; None: for ever."""
        ttl = self.keep_alive_s if self.keep_alive_s is not None else self.entry.ttl
        return None if self.entry.pin or ttl is None or math.isinf(ttl) else ttl

    @property
    def expires_at(self) -> float | None:
        """Monotonic seconds at which it unloads if still idle; None: loaded for ever, or not loaded."""
        ttl = self.ttl_s
        return None if self.state != "ready" or ttl is None else self.last_used + ttl


class Pool:
    def __init__(
        self,
        profile: Profile,
        *,
        backend: Backend,
        machine: HardwareSnapshot,
        reserve: int | None,
        metrics: RouterMetrics | None = None,
        probe_free: Callable[[], dict[str, int] | None] | None = None,
    ) -> None:
        self.profile = profile
        self.backend = backend
        self.machine = machine
        self.reserve = reserve
        self.metrics = metrics
        self.models: dict[str, Model] = {}
        self.usable: dict[str, int] = {}  # each budget's usable bytes on the empty machine
        self._probe_free = probe_free
        self._wake: asyncio.Event | None = None
        self._loader: asyncio.Task[None] | None = None
        self._closing = False
        self._starting: set[asyncio.Future[Any]] = set()  # loads running in worker threads
        self._load_lock: asyncio.Lock | None = None

    # --- start -------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Plan every model on the empty machine (blocking: dry runs). ServeError names a model that cannot fit
        alone, or pinned models that cannot fit together, and what would."""
        self.models = {m.alias: m for m in self.plan_entries(self.profile.models)}

    def plan_entries(self, entries: list[ModelEntry]) -> list[Model]:
        """Each entry planned alone on the empty machine (blocking); the pinned ones (these and those already
        held) must also fit together."""
        from launcher.run import plan_runs
        from launcher.units import format_bytes

        planned: list[Model] = []
        for entry in entries:
            spec = self._spec(entry)
            try:
                [plan] = plan_runs([spec], backend=self.backend, machine=self.machine, entirely=True)
            except NoFitError as exc:
                # what would fit, when the reason alone does not say it ("Q4_K_M ... would need 286.5 MiB ...")
                needs = [n for n in (exc.plan.notes if exc.plan is not None else []) if "would need" in n]
                raise ServeError(f"profile model {exc}" + (f"; {needs[0]}" if needs else "")) from None
            assert plan.chosen is not None
            model = Model(entry, spec, plan, self._planned_cost(plan), info=_info(entry, plan))
            planned.append(model)
            self.usable = {b.name: b.usable_bytes for b in plan.budgets}
            log_event("planned", model=entry.name, quant=plan.chosen.quant, ctx=plan.chosen.n_ctx,
                      layers_on_gpu=plan.chosen.n_gpu_layers, needs=_bytes_text(model.cost))  # fmt: skip
        new = {m.alias for m in planned}
        pinned = [m for m in planned if m.entry.pin]
        pinned += [m for m in self.models.values() if m.entry.pin and m.alias not in new]
        total: dict[str, int] = {}
        for m in pinned:
            for budget, n in m.cost.items():
                total[budget] = total.get(budget, 0) + n
        for budget, n in total.items():
            usable = self.usable.get(budget, 0)
            if len(pinned) > 1 and n > usable:
                names = ", ".join(m.alias for m in pinned)
                raise ServeError(f"the pinned models ({names}) need {format_bytes(n)} together on {budget}, "
                                 f"{format_bytes(usable)} is usable; pin fewer of them")  # fmt: skip
        return planned

    async def remove(self, alias: str, reason: str) -> None:
        """Take `alias` out of the pool: unloaded once its requests end, its queued requests answered 503."""
        model = self.models.get(alias)
        if model is None:
            return
        if model.state == "ready":
            await self.unload(alias, reason)
        self._fail_waiters(model, Refused(503, f"{alias} was {reason}", retry_after_s=1))
        del self.models[alias]

    @property
    def settings(self) -> RouterSettings:
        """The profile's `router:` section (durations in seconds): a reload's new values apply at once."""
        return self.profile.router

    def _spec(self, entry: ModelEntry) -> RunSpec:
        from launcher.backends.base import LaunchRequest
        from launcher.profiles import profile_policy
        from launcher.run import RunSpec

        policy = profile_policy(self.profile, entry, reserve_bytes=self.reserve)
        # a private server: loopback only, with a key of its own that only the router (and fitquant's instance
        # record, 0600) holds. Loopback alone does not keep it private: every local user and process, and any web
        # page a browser on this machine opens (llama-server allows every CORS origin), can reach 127.0.0.1, and
        # would bypass the router's own key. Ollama takes no key: its server is the user's, shared, as it is.
        # A load that neither comes up nor fails holds the one load slot: bounded like a queued request's wait.
        key = secrets.token_urlsafe(32) if self.backend.name == "llamacpp" else None
        request = LaunchRequest(host="127.0.0.1", port=entry.port, api_key=key, own_key=key is not None,
                                rpc=tuple(self.profile.rpc), embeddings=entry.embeddings, alias=entry.name,
                                ready_timeout_s=self.settings.max_wait)  # fmt: skip
        return RunSpec(entry.model, policy, request, name=entry.name, warmup=self.profile.defaults.warmup,
                       max_attempts=1, via=_client_url(self.profile.listen))  # fmt: skip

    def _planned_cost(self, plan: Plan) -> dict[str, int]:
        assert plan.chosen is not None
        budgets = {b.name for b in plan.budgets}
        return {k: v for k, v in plan.chosen.needs.items() if k in budgets and v > 0}

    async def start(self) -> None:
        """Start the loader; load the pinned and preloaded models (pinned first), each verified."""
        self._wake = asyncio.Event()
        self._load_lock = asyncio.Lock()
        self._loader = asyncio.create_task(self._load_loop(), name="fitquant-loader")
        for model in sorted(self.models.values(), key=lambda m: not m.entry.pin):
            if model.entry.pin or model.entry.preload:
                await self.load(model.alias)

    # --- requests ----------------------------------------------------------------------------------------------
    def get(self, alias: str) -> Model | None:
        return self.models.get(alias)

    def try_lease(self, alias: str, *, keep_alive_s: float | Literal["unset"] | None = "unset") -> Lease | None:
        """A lease at once when `alias` is loaded and takes requests now; None when acquire() must wait."""
        model = self.models.get(alias)
        if model is None or self._closing or model.state != "ready" or self.serving_blocked(model):
            return None
        # as in Ollama, each request sets the expiry: one without keep_alive goes back to the profile's ttl
        model.keep_alive_s = None if keep_alive_s == "unset" else keep_alive_s
        return self._lease(model)

    async def acquire(self, alias: str, *, keep_alive_s: float | Literal["unset"] | None = "unset") -> Lease:
        """A lease on `alias`'s verified server; queued (bounded, max_wait) while it loads. Refused: 404 for a
        model the profile does not name, 503 when the queue is full, the wait too long, or the load failed."""
        model = self.models.get(alias)
        if model is None:
            raise Refused(404, f"model {shown_value(alias)} is not served here; GET /v1/models lists the models")
        if self._closing:
            raise Refused(503, "fitquant serve is stopping", retry_after_s=5)
        lease = self.try_lease(alias, keep_alive_s=keep_alive_s)
        if lease is not None:
            return lease
        model.keep_alive_s = None if keep_alive_s == "unset" else keep_alive_s
        queued = sum(len(m.waiters) for m in self.models.values())
        if queued >= self.settings.max_queue:
            raise Refused(503, f"{queued} requests are waiting for models to load (router.max_queue); try again",
                          retry_after_s=self._retry_after())  # fmt: skip
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Lease] = loop.create_future()
        model.waiters.append((future, time.monotonic()))
        self._gauge_queue(model)
        self._kick()
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.settings.max_wait)
        except asyncio.TimeoutError:
            self._forget(model, future)
            raise Refused(503, f"{alias} was not loaded within {self.settings.max_wait:g} s (router.max_wait)",
                          retry_after_s=self._retry_after()) from None  # fmt: skip
        except asyncio.CancelledError:
            # the client left: out of the queue, and a lease handed to it meanwhile goes back
            self._forget(model, future)
            raise

    def _forget(self, model: Model, future: asyncio.Future[Lease]) -> None:
        for item in list(model.waiters):
            if item[0] is future:
                model.waiters.remove(item)
        self._gauge_queue(model)
        if not future.done():
            future.cancel()
        elif not future.cancelled() and future.exception() is None:
            self.release(future.result())

    def _lease(self, model: Model) -> Lease:
        assert model.result is not None
        model.in_flight += 1
        model.last_used = time.monotonic()
        if self.metrics is not None:
            self.metrics.in_flight(model.alias, model.in_flight)
        return Lease(model.alias, model.result.instance, model.generation)

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        model = self.models.get(lease.alias)
        if model is None or model.generation != lease.generation:
            return
        model.in_flight = max(0, model.in_flight - 1)
        now = time.monotonic()
        model.last_used = now
        if self.metrics is not None:
            self.metrics.in_flight(model.alias, model.in_flight)
        self._kick()

    def _retry_after(self) -> float:
        loads = [m.load_s for m in self.models.values() if m.load_s]
        return max(1.0, round(max(loads) if loads else 10.0))

    def note_failure(self, lease: Lease) -> None:
        """A request's upstream failed: if the server died, the model is marked not loaded at once."""
        model = self.models.get(lease.alias)
        if model is not None and model.generation == lease.generation:
            self._check_crash(model)

    # --- admin -------------------------------------------------------------------------------------------------
    async def load(self, alias: str) -> Model:
        """Load `alias` (queued like a request) and return it verified; Refused as acquire."""
        lease = await self.acquire(alias)
        self.release(lease)
        return self.models[alias]

    async def unload(self, alias: str, reason: str, *, wait_s: float | None = None) -> bool:
        """Stop `alias` once its requests have ended (waiting at most `wait_s`, default router.drain); False when
        it was not loaded."""
        model = self.models.get(alias)
        if model is None:
            raise Refused(404, f"model {shown_value(alias)} is not served here; GET /v1/models lists the models")
        deadline = time.monotonic() + (self.settings.drain if wait_s is None else wait_s)
        assert self._load_lock is not None
        async with self._load_lock:
            while model.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if model.state != "ready":
                return False
            await self._stop(model, reason)
        self._kick()
        return True

    async def close(self) -> None:
        """Refuse the queue, wait for requests in flight (router.drain at most), stop every server."""
        self._closing = True
        for model in self.models.values():
            while model.waiters:
                future, _ = model.waiters.popleft()
                if not future.done():
                    future.set_exception(Refused(503, "fitquant serve is stopping", retry_after_s=5))
        deadline = time.monotonic() + self.settings.drain
        while any(m.in_flight for m in self.models.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._loader is not None:
            self._loader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loader
        # a load that was starting in a worker thread: wait for it (bounded) and stop what it started
        from launcher.run import stop

        for work in list(self._starting):
            try:
                result = await asyncio.wait_for(asyncio.shield(work), self.settings.drain)
            except BaseException:  # it failed, or is still starting: its own cleanup (or our exit) ends it
                continue
            with contextlib.suppress(Exception):
                await asyncio.to_thread(stop, result, self.backend)
        for model in self.models.values():
            if model.result is not None:
                await self._stop(model, "fitquant serve is stopping")

    def stop_now(self) -> None:
        """Stop every server at once (blocking): the last resort on the way out."""
        from launcher.run import stop

        for model in self.models.values():
            if model.result is not None:
                with contextlib.suppress(Exception):
                    stop(model.result, self.backend)
                model.result, model.state = None, "unloaded"

    # --- upkeep ------------------------------------------------------------------------------------------------
    async def upkeep(self) -> None:
        """Notice dead servers, and unload idle models past their ttl or keep_alive."""
        from launcher.service.admission import expired

        for model in self.models.values():
            if model.state == "ready":
                self._check_crash(model)
        ready = [r for r in self._residents() if self.models[r.name].state == "ready"]
        for name in expired(ready, {r.name: self.models[r.name].ttl_s for r in ready}, time.monotonic()):
            model = self.models[name]
            why = "keep_alive" if model.keep_alive_s is not None else "ttl"
            assert self._load_lock is not None
            async with self._load_lock:
                if model.state == "ready" and not model.in_flight:
                    await self._stop(model, f"idle past its {why}", metric_reason=why)
        self._kick()

    def _check_crash(self, model: Model) -> None:
        if model.state != "ready" or model.result is None:
            return
        proc = model.result.instance.process
        if proc is None or proc.poll() is None:
            return
        from launcher import instances

        log_event("crashed", model=model.alias, status=proc.returncode, log=model.result.instance.log_path,
                  action="the next request loads it again, verified")  # fmt: skip
        if model.result.instance_name:
            instances.remove(model.result.instance_name)
        model.result, model.state, model.drain_from = None, "unloaded", None
        model.generation += 1
        model.in_flight = 0  # the dead server's leases are of the old generation: their release counts nothing
        if self.metrics is not None:
            self.metrics.loaded(model.alias, False)
            self.metrics.in_flight(model.alias, 0)
        self._kick()

    # --- the loader --------------------------------------------------------------------------------------------
    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _load_loop(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()
            try:
                await self._serve_queue()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loader must outlive any one load's surprise
                log_event("loader-error", error=f"{type(exc).__name__}: {exc}")

    async def _serve_queue(self) -> None:
        from launcher.service.admission import next_group

        assert self._load_lock is not None
        tried: set[str] = set()
        while not self._closing:
            # a model that became ready (or the waiters of a draining one that is loaded again) gets its queue
            for model in self.models.values():
                if model.state == "ready" and not self.serving_blocked(model) and model.waiters:
                    self._hand_out(model)
            waiting = [(m.alias, t) for m in self.models.values() if m.state == "unloaded" and m.alias not in tried
                       for f, t in m.waiters if not f.done()]  # fmt: skip
            alias = next_group(waiting)
            if alias is None:
                return
            tried.add(alias)
            async with self._load_lock:
                done = await self._admit_and_load(self.models[alias])
            if not done:
                continue  # it waits for memory: let a smaller queued model that fits go meanwhile

    def _hand_out(self, model: Model) -> None:
        while model.waiters:
            future, _ = model.waiters.popleft()
            if not future.done():
                future.set_result(self._lease(model))
        self._gauge_queue(model)

    def _fail_waiters(self, model: Model, error: Refused) -> None:
        while model.waiters:
            future, _ = model.waiters.popleft()
            if not future.done():
                future.set_exception(error)
        self._gauge_queue(model)

    def _residents(self) -> list[Any]:
        from launcher.service.admission import Resident

        return [
            Resident(
                m.alias,
                dict(m.cost),
                m.last_used,
                m.loaded_at,
                m.in_flight,
                m.entry.pin,
                busy=m.state in ("loading", "stopping"),
            )
            for m in self.models.values()
            if m.state != "unloaded"
        ]

    def free(self) -> dict[str, int]:
        """Bytes free per budget now: live from NVML where the machine was probed, else by what residents cost."""
        held: dict[str, int] = {}
        for m in self.models.values():
            if m.state != "unloaded":
                for budget, n in m.cost.items():
                    held[budget] = held.get(budget, 0) + n
        live = self._probe_free() if self._probe_free is not None else None
        out = {}
        for budget, usable in self.usable.items():
            left = usable - held.get(budget, 0)
            if live is None or budget not in live:
                out[budget] = left
            elif budget == "CPU":  # RAM available now also counts page cache, and misses what a load maps later
                out[budget] = min(left, live[budget])
            else:
                out[budget] = live[budget]  # NVML: what every process, ours included, left free
        return out

    async def _admit_and_load(self, model: Model) -> bool:
        """Evict what must go and load `model`; False when it has to wait for memory held by busy models."""
        from launcher.service.admission import admit

        now = time.monotonic()
        decision = admit(model.alias, model.cost, self.free(), self._residents(), now=now,
                         min_residency_s=self.settings.min_residency, total=self.usable)  # fmt: skip
        for other in self.models.values():  # only the blockers of the model now waiting are drained
            if decision.action != "wait" or other.alias not in decision.blockers:
                other.drain_from = None
        if decision.action == "refuse":
            log_event("refused", model=model.alias, reason=decision.reason)
            self._fail_waiters(model, Refused(503, decision.reason, retry_after_s=self._retry_after()))
            return True
        if decision.action == "wait":
            for name in decision.blockers:
                blocker = self.models[name]
                if blocker.drain_from is None:
                    blocker.drain_from = now
            log_event("waiting", model=model.alias, reason=decision.reason, blockers=",".join(decision.blockers))
            self._schedule_recheck()
            return False
        for name in decision.victims:
            await self._stop(self.models[name], f"evicted for {model.alias}: {decision.reason}",
                             metric_reason="memory")  # fmt: skip
        await self._load(model)
        return True

    def _schedule_recheck(self) -> None:
        # min residency or swap_after may end while nothing else happens: look again shortly
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, self._kick)

    def serving_blocked(self, model: Model) -> bool:
        """Whether new requests for a loaded model queue instead (another model has waited past swap_after)."""
        return model.drain_from is not None and time.monotonic() - model.drain_from >= self.settings.swap_after

    async def _load(self, model: Model, *, retry: bool = True) -> None:
        from launcher.run import record_entry, start_planned
        from launcher.units import format_bytes

        free = self.free()  # before it counts as held
        model.state, model.last_error = "loading", None
        started = time.monotonic()
        log_event("loading", model=model.alias, quant=model.plan.chosen.quant if model.plan.chosen else None,
                  needs=_bytes_text(model.cost), free=_bytes_text(free))  # fmt: skip
        attempts: list[Any] = []

        def on_attempt(a: Any) -> None:
            attempts.append(a)
            log_event("attempt", model=model.alias, quant=a.quant, ctx=a.n_ctx, outcome=a.outcome, detail=a.detail)

        work = asyncio.ensure_future(asyncio.to_thread(start_planned, model.spec, model.plan, backend=self.backend,
                                                       machine=self.machine, on_attempt=on_attempt))  # fmt: skip
        self._starting.add(work)
        work.add_done_callback(self._starting.discard)
        try:
            result = await asyncio.shield(work)
        except (NoFitError, RunFailed, BackendError) as exc:
            model.state = "unloaded"
            outcome = attempts[-1].outcome if attempts else "failed"
            outcome = outcome if outcome in ("oom", "spill") else "failed"
            if self.metrics is not None:
                self.metrics.load(model.alias, outcome, time.monotonic() - started, None)
            memory = outcome in ("oom", "spill")
            if memory and retry:
                again = await self._after_memory_failure(model)
                if again is not None:
                    model.plan = again
                    model.cost = self._planned_cost(again)
                    await self._load(model, retry=False)
                    return
            free_text = _bytes_text(self.free())
            reason = (f"{model.alias} could not be loaded: {exc}; it needed {_bytes_text(model.cost)}, "
                      f"{free_text} was free")  # fmt: skip
            model.last_error = reason
            log_event("load-failed", model=model.alias, error=str(exc), needed=_bytes_text(model.cost), free=free_text)
            self._fail_waiters(model, Refused(503, reason, retry_after_s=self._retry_after()))
            return
        model.result, model.state = result, "ready"
        model.generation += 1
        model.loaded_at = model.last_used = time.monotonic()
        model.load_s = round(model.loaded_at - started, 3)
        model.drain_from = None
        budgets = set(self.usable)
        measured = {k: v for k, v in record_entry(result, "").get("needs_bytes", {}).items() if k in budgets and v}
        if measured:
            model.cost = measured  # what this machine measured, from now on
        verify_s = result.warmup.get("seconds")
        if self.metrics is not None:
            self.metrics.load(model.alias, "verified", model.load_s, verify_s)
            self.metrics.loaded(model.alias, True)
            speed = result.speed or {}
            for phase, key in (("decode", "measured_tg_per_s"), ("prefill", "measured_pp_per_s")):
                value = speed.get(key) or result.warmup.get(key)
                if value:
                    self.metrics.tokens(model.alias, phase, float(value))
        inst = result.instance
        log_event("ready", model=model.alias, quant=result.option.quant, ctx=result.option.n_ctx,
                  endpoint=inst.endpoint, pid=inst.pid, verdict=result.placement.verdict, load_s=model.load_s,
                  warmup_s=verify_s, holds=_bytes_text(model.cost),
                  free=", ".join(f"{b} {format_bytes(n)}" for b, n in self.free().items()))  # fmt: skip
        self._hand_out(model)

    async def _after_memory_failure(self, model: Model) -> Plan | None:
        """After a spill or an out-of-memory: evict one more idle model and plan again, or (none left) the next
        smaller configuration; None when neither exists."""
        from launcher.run import next_plan
        from launcher.service.admission import Resident

        idle = [r for r in self._residents() if isinstance(r, Resident) and not r.pinned and not r.busy
                and not r.in_flight and r.name != model.alias]  # fmt: skip
        if idle:
            victim = min(idle, key=lambda r: r.last_used)
            await self._stop(self.models[victim.name], f"evicted after {model.alias} ran out of memory",
                             metric_reason="memory")  # fmt: skip
            log_event("retry", model=model.alias, after="evicting one more idle model")
            return model.plan
        assert model.plan.chosen is not None
        smaller = next_plan(model.plan, model.plan.chosen)
        if smaller is not None and smaller.chosen is not None:
            log_event("retry", model=model.alias, after="stepping down", quant=smaller.chosen.quant,
                      ctx=smaller.chosen.n_ctx)  # fmt: skip
        return smaller

    async def _stop(self, model: Model, reason: str, *, metric_reason: str = "admin") -> None:
        from launcher.run import stop

        if model.result is None:
            model.state = "unloaded"
            return
        result = model.result
        model.state = "stopping"
        log_event("unloading", model=model.alias, reason=reason, pid=result.instance.pid)
        before = self._probe_free() if self._probe_free is not None else None
        try:
            await asyncio.to_thread(stop, result, self.backend)
        finally:
            model.result, model.state, model.drain_from = None, "unloaded", None
            model.generation += 1
            model.in_flight = 0  # requests still running (an unload past its drain) end against the old generation
        if before is not None:
            await self._wait_freed(before, model.cost)
        if self.metrics is not None:
            self.metrics.eviction(model.alias, metric_reason)
            self.metrics.loaded(model.alias, False)
        # its requests still queued go back to the loader (their model loads again after this one)
        self._kick()

    async def _wait_freed(self, before: Mapping[str, int], cost: Mapping[str, int]) -> None:
        """Until the stopped server's memory shows as free again (NVML lags the process's exit), bounded."""
        assert self._probe_free is not None
        deadline = time.monotonic() + FREED_TIMEOUT_S
        while time.monotonic() < deadline:
            now = await asyncio.to_thread(self._probe_free)
            # GPU budgets only: a stopped server's mapped weights stay in the page cache, counted as available RAM
            gpus = {b: n for b, n in cost.items() if b != "CPU"}
            if now is None or all(now.get(b, 0) >= before.get(b, 0) + int(n * 0.9) for b, n in gpus.items()):
                return
            await asyncio.sleep(0.2)
        log_event("memory-not-freed", after_s=FREED_TIMEOUT_S, expected=_bytes_text(cost))

    def _gauge_queue(self, model: Model) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth(model.alias, sum(1 for f, _ in model.waiters if not f.done()))

    # --- views -------------------------------------------------------------------------------------------------
    def running(self) -> dict[str, Any]:
        """GET /running: per model its state, quant, context, verdict, bytes predicted vs measured per device,
        last use and requests in flight; and each budget's usable and free bytes."""
        now_wall, now = time.time(), time.monotonic()
        out = []
        for m in self.models.values():
            r = m.result
            chosen = r.option if r is not None else m.plan.chosen
            row: dict[str, Any] = {
                "model": m.alias,
                "reference": m.entry.model,
                "state": m.state,
                "pinned": m.entry.pin,
                "quant": chosen.quant if chosen else None,
                "n_ctx": chosen.n_ctx if chosen else None,
                "verdict": r.placement.verdict if r is not None else None,
                "predicted_bytes": dict(chosen.needs) if chosen else {},
                "cost_bytes": dict(m.cost),
                "measured": [d.to_json() for d in r.placement.devices] if r is not None else [],
                "in_flight": m.in_flight,
                "queued": sum(1 for f, _ in m.waiters if not f.done()),
                "last_used": (now_wall - (now - m.last_used)) if m.last_used else None,
                "expires_in_s": round(m.expires_at - now, 1) if m.expires_at is not None else None,
                "pid": r.instance.pid if r is not None else None,
                "endpoint": r.instance.endpoint if r is not None else None,
                "load_s": m.load_s,
                "speed": dict(r.speed) if r is not None else {},
                "last_error": m.last_error,
            }
            out.append(row)
        return {"models": out, "usable_bytes": dict(self.usable), "free_bytes": self.free()}


def _info(entry: ModelEntry, plan: Plan) -> ModelInfo | None:
    from launcher.service.ollama_api import model_info_from

    assert plan.chosen is not None
    try:
        return model_info_from(entry.name, plan.chosen.candidate, plan.chosen.n_ctx, embeddings=entry.embeddings)
    except Exception as exc:  # a listing detail must not stop the service
        log_event("warning", model=entry.name, message=f"no Ollama listing details: {exc}")
        return None


def _client_url(listen: str) -> str:
    """The OpenAI base URL this machine's clients reach serve at: its `listen`, an unspecified address (all
    interfaces) as loopback."""
    host, _, port = listen.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    return f"http://{host}:{port}/v1"


def _bytes_text(per_budget: Mapping[str, int]) -> str:
    from launcher.units import format_bytes

    return ", ".join(f"{b} {format_bytes(n)}" for b, n in sorted(per_budget.items())) or "nothing"


def identity(entry: ModelEntry) -> str:
    return json.dumps(entry.model_dump(mode="json"), sort_keys=True)


__all__ = ["Lease", "Model", "Pool", "Refused", "ServeError"]
