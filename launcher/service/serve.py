"""`fitquant serve --profile P`: one endpoint for every model of a machine profile.

The router (launcher.service.router) listens on the profile's `listen` address; the pool (launcher.service.pool)
loads each model on demand through `fitquant run`'s own path (plan, start, verify, warm up), on a private 127.0.0.1
port, and evicts idle models by measured memory. At start every model is planned on the empty machine (one that
cannot fit alone stops the start, naming what would fit), the pinned and preloaded models are loaded and verified,
and then systemd hears READY=1.

SIGHUP reads the profile again: a profile that no longer reads is reported and everything keeps running; models
whose entry changed or that left the profile are unloaded once their requests end, new ones are planned (and
loaded when pinned or preloaded); a change of the machine-wide settings replaces the whole pool (`listen` needs a
restart). SIGTERM (or Ctrl-C) stops taking requests, lets those in flight finish for `router.drain` at most, stops
every model server and exits 0.

The log is one event per line on stderr (`fitquant: event key=value ...`), which journald keeps as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import ProfileError
from launcher.paths import state_dir
from launcher.service.events import log_event
from launcher.service.pool import Pool, ServeError, identity

if TYPE_CHECKING:
    from launcher.profiles import Profile
    from launcher.service.router import BrowserRules, Peer, Router

__all__ = ["ServeError", "log_event", "serve"]


def serve(ref: str, *, api_key_file: Path | None = None) -> None:
    """Serve the profile's models on its one address until SIGTERM; SIGHUP reloads the profile. Raises
    ProfileError/ServeError (one line) for what stops the start."""
    from launcher.profiles import find_profile, load_profile, profile_api_key
    from launcher.run import read_api_key

    path = find_profile(ref).resolve()
    profile = load_profile(path)
    api_key = read_api_key(api_key_file) if api_key_file is not None else profile_api_key(profile)
    check_exposure(profile, api_key)
    _run(_Service(path, profile, api_key, api_key_file=api_key_file).run())


UPKEEP_S = 1.0  # how often serve looks for crashed servers and idle models past their ttl (a wakeup each time)
KEEP_ALIVE_S = 75  # longer than clients keep idle connections (httpx: 5 s), so they never race the server's close


def _run(main: Any) -> None:
    """asyncio.run, on uvloop where it is installed (a faster loop: what the router adds per request and per
    streamed chunk is mostly the event loop's own work)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def _freeze_heap() -> None:
    """Collect once and move everything start-up made (modules, the app, the pool) out of the collector's sight:
    a full collection then scans only what requests made, not the whole heap (35 ms measured: a p99 spike)."""
    gc.collect()
    gc.freeze()


def _browser_rules(profile: Profile) -> BrowserRules:
    from launcher.service.router import BrowserRules

    return BrowserRules(listen=profile.listen, loopback=profile.loopback, origins=tuple(profile.origins),
                        hosts=tuple(profile.hosts))  # fmt: skip


def check_exposure(profile: Profile, api_key: str | None) -> None:
    """A `listen` beyond this machine needs an API key, or the profile's explicit `insecure: true`."""
    if api_key or profile.insecure or profile.loopback:
        return
    raise ServeError(
        f"profile {profile.source}: 'listen' {profile.listen} is reachable beyond this machine and no API key is set; "
        "set api_key_env or api_key_file (or pass --api-key-file), bind 127.0.0.1, or say insecure: true"
    )


def _peers(profile: Profile) -> list[Peer]:
    import os

    from launcher.service.router import Peer

    return [Peer(p.url.rstrip("/"), os.environ.get(p.api_key_env) if p.api_key_env else None)
            for p in profile.peers]  # fmt: skip


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only for a socket that says it is TCP,
    # and without it every answer waits out the client's delayed ACK (about 40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        raise ServeError(f"cannot listen on {host}:{port}: {why}; change 'listen' in the profile") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class _Service:
    def __init__(self, path: Path, profile: Profile, api_key: str | None, *, api_key_file: Path | None = None) -> None:
        self.path = path
        self.profile = profile
        self.api_key = api_key
        self.api_key_file = api_key_file  # --api-key-file: read again on reload, as the profile's key is
        self.ready = False
        self.pool: Pool | None = None
        self.router: Router | None = None

    async def _new_pool(self, profile: Profile) -> Pool:
        from launcher.run import backend_and_machine
        from launcher.service.metrics import RouterMetrics

        backend, machine, reserve = await asyncio.to_thread(
            backend_and_machine, profile.backend, llama_server=profile.llama_server,
            ollama_host=profile.ollama_host, profile=profile)  # fmt: skip
        self.metrics = getattr(self, "metrics", None) or RouterMetrics()
        pool = Pool(profile, backend=backend, machine=machine, reserve=reserve,
                    metrics=self.metrics, probe_free=_live_free(machine, profile, reserve))  # fmt: skip
        _say_what_changed(self.path, machine)
        await asyncio.to_thread(pool.prepare)
        return pool

    async def run(self) -> None:
        import uvicorn

        from launcher.service import notify, splice
        from launcher.service.router import Router

        log_event("serve", profile=self.path, machine=self.profile.machine, models=len(self.profile.models),
                  listen=self.profile.listen)  # fmt: skip
        self.pool = await self._new_pool(self.profile)
        drain_s = self.profile.router.drain
        self.router = Router(self.pool, api_key=self.api_key, peers=_peers(self.profile), metrics=self.metrics,
                             max_body=self.profile.router.max_body, body_timeout_s=self.profile.router.body_timeout,
                             ready=lambda: self.ready, browser_rules=_browser_rules(self.profile))  # fmt: skip
        host, port = self.profile.listen_host, self.profile.listen_port
        sock = _bind(host, port)
        # no proxy-header rewriting (nothing sits in front of it by default), no per-response Server/Date headers
        # the http protocol: uvicorn's httptools one, which lets the router splice streams (launcher.service.splice)
        config = uvicorn.Config(self.router.app(), http=splice.protocol_class(), log_level="warning",
                                access_log=False, lifespan="off",
                                proxy_headers=False, server_header=False, date_header=False,
                                timeout_graceful_shutdown=int(drain_s) + 1,
                                timeout_keep_alive=KEEP_ALIVE_S)  # fmt: skip
        server = _quiet_server(config)
        stop, hup, signalled = asyncio.Event(), asyncio.Event(), asyncio.Event()

        def on_signal(event: asyncio.Event) -> None:
            event.set()
            signalled.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, stop)
        loop.add_signal_handler(signal.SIGHUP, on_signal, hup)
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="fitquant-http")
        try:
            while not server.started and not serving.done():
                await asyncio.sleep(0.01)
            log_event("listening", address=f"http://{self.profile.listen}", auth="api key" if self.api_key else "none")
            await self.pool.start()
            _freeze_heap()
            self.ready = True
            self._save_state()
            _notify(notify.ready, self._status())
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(signalled.wait(), timeout=UPKEEP_S)
                signalled.clear()
                if serving.done():
                    raise ServeError("the HTTP server stopped unexpectedly")
                if hup.is_set() and not stop.is_set():
                    hup.clear()
                    _notify(notify.reloading, "reading the profile again")
                    await self.reload()
                    _notify(notify.ready, self._status())
                await self.pool.upkeep()
        finally:
            _notify(notify.stopping, "draining requests, stopping every model")
            log_event("stopping", reason="signal" if stop.is_set() else "error", drain_s=drain_s)
            self.pool._closing = True
            server.exit()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(serving, drain_s + 5)
            try:
                await asyncio.wait_for(self.pool.close(), drain_s + 60)
            except BaseException:
                self.pool.stop_now()
                raise
            finally:
                await self.router.aclose()
                log_event("stopped")

    def _status(self) -> str:
        assert self.pool is not None
        loaded = sum(1 for m in self.pool.models.values() if m.state == "ready")
        return f"listening on {self.profile.listen}: {len(self.pool.models)} models, {loaded} loaded and verified"

    async def reload(self) -> None:
        """Read the profile again and apply what changed; a profile that no longer reads changes nothing."""
        from launcher.errors import BackendError
        from launcher.profiles import load_profile, profile_api_key
        from launcher.run import read_api_key

        assert self.pool is not None and self.router is not None
        try:
            profile = load_profile(self.path)
            # the key too (a rotated key file, another variable): a key that no longer reads changes nothing
            api_key = read_api_key(self.api_key_file) if self.api_key_file is not None else profile_api_key(profile)
            check_exposure(profile, api_key)
        except (ProfileError, ServeError, BackendError) as exc:
            log_event("reload-refused", error=str(exc), action="keeping the running models")
            return
        if api_key != self.api_key:
            self.api_key = api_key
            self.router.set_api_key(api_key)
            log_event("reload", change="api key", auth="api key" if api_key else "none")
        rules, current = _browser_rules(profile), self.router.browser_rules
        if (rules.origins, rules.hosts) != (current.origins, current.hosts):
            current.origins, current.hosts = rules.origins, rules.hosts
            log_event("reload", change="origins and hosts", origins=len(rules.origins), hosts=len(rules.hosts))
        if profile.listen != self.profile.listen:
            log_event("reload-partial", change="listen", action=f"still on {self.profile.listen}; restart to move")
        old, new = _machine_wide(self.profile), _machine_wide(profile)
        if old != new:
            log_event("reload", change="machine-wide settings", action="replacing every model")
            try:
                fresh = await self._new_pool(profile)
            except (ServeError, ProfileError) as exc:
                log_event("reload-refused", error=str(exc), action="keeping the running models")
                return
            await self.pool.close()
            self.pool, self.profile = fresh, profile
            self.router.pool = fresh
            self.router.peers.peers = _peers(profile)
            await fresh.start()
            self._save_state()
            return
        await self._reload_models(profile)

    async def _reload_models(self, profile: Profile) -> None:
        assert self.pool is not None
        pool = self.pool
        wanted = {entry.name: entry for entry in profile.models}
        gone = [m for alias, m in pool.models.items()
                if alias not in wanted or identity(m.entry) != identity(wanted[alias])]  # fmt: skip
        fresh = [e for alias, e in wanted.items() if alias not in pool.models or any(m.alias == alias for m in gone)]
        if not gone and not fresh:
            log_event("reload", change="none")
            self.profile = profile
            return
        pool.profile = profile
        self.profile = profile
        try:
            added = await asyncio.to_thread(pool.plan_entries, fresh)
        except ServeError as exc:
            log_event("reload-refused", error=str(exc), action="keeping the running models")
            return
        for model in gone:
            why = "its profile entry changed" if model.alias in wanted else "it left the profile"
            await pool.remove(model.alias, why)
        for model in added:
            pool.models[model.alias] = model
            log_event("reload", model=model.alias, change="added" if model.alias not in [g.alias for g in gone]
                      else "changed")  # fmt: skip
        for model in added:
            if model.entry.pin or model.entry.preload:
                await pool.load(model.alias)
        self._save_state()

    def _save_state(self) -> None:
        from launcher.paths import write_private
        from launcher.record import fingerprint, machine_identity

        assert self.pool is not None
        machine = self.pool.machine
        models = {m.alias: {"quant": m.plan.chosen.quant if m.plan.chosen else None,
                            "n_ctx": m.plan.chosen.n_ctx if m.plan.chosen else None, "needs_bytes": dict(m.cost)}
                  for m in self.pool.models.values()}  # fmt: skip
        state = {"profile": str(self.path), "fingerprint": fingerprint(machine),
                 "identity": machine_identity(machine), "models": models, "time": time.time()}  # fmt: skip
        write_private(_state_path(self.path), json.dumps(state, indent=2))


def _quiet_server(config: Any) -> Any:
    """uvicorn's Server without its own signal handling and without its tick: serve installs SIGTERM/SIGINT/SIGHUP
    itself (uvicorn's would re-raise SIGTERM on the way out, and a clean stop must exit 0) and tells it when to stop
    (`exit()`)."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self._exit = asyncio.Event()

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        async def main_loop(self) -> None:
            # uvicorn's own loop wakes 10 times a second to see whether to stop and to refresh its Date header. serve
            # sends no Date header and says when to stop (exit), so this waits for that: on a machine whose cores the
            # model servers keep busy, each wakeup is time taken from decoding
            await self.on_tick(0)  # the default headers, once
            while not self.should_exit:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._exit.wait(), timeout=5.0)  # should_exit set by uvicorn itself

        def exit(self) -> None:
            self.should_exit = True
            self._exit.set()

    return Server(config)


def _notify(send: Any, text: str) -> None:
    from launcher.errors import ServiceError

    try:
        send(text)
    except ServiceError as exc:
        log_event("notify-failed", error=str(exc))


def _machine_wide(profile: Profile) -> str:
    """The settings every model depends on: anything but the model list, the machine's name, where it listens,
    its peers, the pages and names it answers, its key, and the router's own settings."""
    exclude = {"models", "machine", "listen", "peers", "insecure", "origins", "hosts", "api_key_env", "api_key_file",
               "router"}  # fmt: skip
    return json.dumps(profile.model_dump(mode="json", exclude=exclude), sort_keys=True)


def _live_free(machine: Any, profile: Profile, reserve: int | None) -> Any:
    """Free bytes per budget read again before each load, so memory other processes took counts: per GPU from NVML
    on a probed NVIDIA machine; on a probed machine without a GPU, the RAM available now (the pool takes the smaller
    of that and what its own models leave). None for a described machine and RPC devices: counted by cost."""
    if machine.described or any(d.kind != "cuda" for d in machine.devices):
        return None
    if not machine.devices:

        def ram() -> dict[str, int] | None:
            import psutil

            return {"CPU": max(0, psutil.virtual_memory().available - profile.reserve_of("CPU"))}

        return ram

    def probe() -> dict[str, int] | None:
        from launcher.hardware import detect_hardware

        try:
            now = detect_hardware()
        except Exception:
            return None
        out = {}
        for d in now.devices:
            if d.free_bytes is None:
                return None
            keep = profile.reserve_of(f"GPU{d.index}", d.name)
            out[f"GPU{d.index}"] = max(0, d.free_bytes - keep)
        return out

    return probe


def _say_what_changed(path: Path, machine: Any) -> None:
    from launcher.record import fingerprint, machine_identity

    last = _read_state(path)
    if last is None:
        log_event("plan", reason="first start of this profile on this machine")
        return
    if last.get("fingerprint") != fingerprint(machine):
        log_event("hardware-changed", before=_describe(last.get("identity", {})),
                  now=_describe(machine_identity(machine)), action="planning again for this hardware")  # fmt: skip


def _describe(identity: dict[str, Any]) -> str:
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
