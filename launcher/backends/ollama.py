"""The Ollama backend: a plan's model run on an Ollama server through the official `ollama` package.

- `OllamaBackend`: the server at OLLAMA_HOST (read by launcher.ollama_host, as the official client reads it); when
  none answers and an `ollama` binary is on PATH, fitquant starts its own `ollama serve` on a free 127.0.0.1 port
  with the plan's environment (OLLAMA_KV_CACHE_TYPE, OLLAMA_FLASH_ATTENTION, OLLAMA_NUM_PARALLEL), in its own process
  group and tied to fitquant's life (launcher.backends.process), and stops it with the instance.
  Registry names (and `hf.co/...` names) are pulled, a local GGUF is uploaded as a blob and created as
  `fitquant/<file stem>:<quant>`; the model is loaded by a prompt-less /api/generate with `num_ctx` and `num_gpu`,
  and where it landed is read from /api/ps (launcher.verify.placement_from_ollama).
- What is pure lives in `launcher.backends.ollama_form` and is re-exported here: the plan's Ollama form
  (`ollama_form`, which `launch_form` returns), model names, and the KV cache type inferred from a measured size
  (Ollama's is global to its server and reported by no API).

Errors of the `ollama` client (ResponseError, its ConnectionError) and of httpx (through launcher.http.translate)
are turned into one-line BackendError / AttemptFailed here; load failures are classified as oom / crash / timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.backends.base import AttemptFailed, Instance, LaunchRequest, ServerMemory
from launcher.backends.ollama_form import (
    KV_TYPES,
    create_file_name,
    infer_kv_type,
    keep_alive_value,
    kv_type_note,
    kv_type_sizes,
    local_model_name,
    ollama_form,
    same_model,
)
from launcher.errors import BackendError

if TYPE_CHECKING:
    import subprocess

    import httpx
    import ollama

    from launcher.catalog.types import Candidate
    from launcher.plan import Option, Plan
    from launcher.verify import Placement

__all__ = [
    "KV_TYPES",
    "OllamaBackend",
    "OllamaError",
    "PullProgress",
    "infer_kv_type",
    "keep_alive_value",
    "kv_type_sizes",
    "local_model_name",
    "ollama_form",
    "same_model",
]

SERVE_TIMEOUT_S = 60.0  # our own `ollama serve` answers GET / within this
PROBE_TIMEOUT_S = 3.0  # "does a server answer here?"
API_TIMEOUT_S = 30.0  # /api/ps, /api/version, unload
PULL_READ_TIMEOUT_S = 300.0  # between two lines of a pull or create stream
UNLOAD_TIMEOUT_S = 30.0  # an unload is an expiry: /api/ps is polled until the model is gone
STOP_TIMEOUT_S = 10.0
_TRANSPORT = ("connect", "cut_short", "transport")


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _scrubbed(text: str) -> str:
    from launcher.http import scrub

    return scrub(_one_line(text), secrets=[os.environ.get("OLLAMA_API_KEY", "")])


# ---------------------------------------------------------------------------------------------------------------
# Errors


class OllamaError(BackendError):
    """An Ollama call failed. `kind`: "response" (the server answered an error: `status` is its HTTP status, -1 for
    an error line mid-stream), "connect" (no server), or launcher.http's failure kind (timeout, cut_short, ...);
    `error` is the server's or transport's own text."""

    def __init__(self, message: str, *, kind: str, status: int | None = None, error: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.error = error


@contextlib.contextmanager
def _api(base: str, what: str) -> Iterator[None]:
    """Run Ollama client calls; their failures become one-line OllamaErrors naming `what` and the server."""
    import ollama

    from launcher.http import HttpFailure, translate

    try:
        with translate():
            yield
    except ollama.ResponseError as exc:
        text = _scrubbed(str(exc.error))
        status = exc.status_code
        shown = f" (HTTP {status})" if status and status > 0 else ""
        raise OllamaError(
            f"Ollama {what} at {base}: {text}{shown}", kind="response", status=status, error=text
        ) from None
    except ConnectionError:  # the client's own: connection refused
        raise OllamaError(
            f"no Ollama server answers at {base} ({what})", kind="connect", error="connection refused"
        ) from None
    except HttpFailure as failure:
        text = _scrubbed(failure.text)
        raise OllamaError(f"Ollama {what} at {base}: {text}", kind=failure.kind, error=text) from None
    except ValueError as exc:  # a body that is not the JSON the client expects (pydantic, json)
        text = _scrubbed(f"{type(exc).__name__}: {exc}")
        raise OllamaError(f"Ollama {what} at {base}: unexpected answer ({text})", kind="body", error=text) from None


# ---------------------------------------------------------------------------------------------------------------
# Pull progress


class PullProgress:
    """A rich progress bar per layer of an Ollama pull (on stderr by default); status lines printed above them.

    `layers` keeps digest -> (total, completed) as the stream reported them; `completed` may be absent at first.
    """

    def __init__(self, name: str, *, console: Any = None) -> None:
        from launcher.fetch import download_progress

        self.name = name
        self.layers: dict[str, tuple[int, int]] = {}
        self.statuses: list[str] = []
        self._progress = download_progress(console, description="{task.description}")
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> PullProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, status: str, digest: str | None, total: int | None, completed: int | None) -> None:
        if digest and total:
            done = completed or 0
            self.layers[digest] = (total, done)
            task = self._tasks.get(digest)
            if task is None:
                short = digest.removeprefix("sha256:")[:12]
                task = self._tasks[digest] = self._progress.add_task(f"{self.name} {short}", total=total)
            self._progress.update(task, total=total, completed=done)
            return
        if not self.statuses or self.statuses[-1] != status:
            self.statuses.append(status)
            self._progress.console.print(f"{self.name}: {status}", highlight=False, markup=False)


# ---------------------------------------------------------------------------------------------------------------
# The backend


@dataclass
class _OwnServer:
    """An `ollama serve` fitquant started."""

    process: subprocess.Popen[bytes]
    base: str
    env: dict[str, str]  # the plan's server environment it was started with
    log_path: Path
    binary: str
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class OllamaBackend:
    """An Ollama server (OLLAMA_HOST's, else one fitquant starts) running a plan's model with its options."""

    name = "ollama"

    def __init__(self, host: str | None = None, binary: str | None = None) -> None:
        from launcher.ollama_host import ollama_base_url

        self._host_error: str | None = None
        try:
            self.base_url = ollama_base_url(host)
        except BackendError as exc:
            self.base_url, self._host_error = "", str(exc)
        self._binary = binary
        self._own: _OwnServer | None = None
        self._created: dict[str, dict[str, str]] = {}  # local models created here: name -> files

    # -- the protocol ----------------------------------------------------------------------------------------

    def launch_form(self, plan: Plan, *, host: str = "127.0.0.1", port: int = 8080) -> dict[str, Any]:
        return ollama_form(plan)

    def server_memory(self) -> ServerMemory:
        """Ollama's runner (upstream llama-server): one logits row per slot, a SWA cache of the window, host
        weights repacked for the CPU as llama.cpp does by default."""
        return ServerMemory(cpu_repack=True)

    def unavailable(self) -> str | None:
        if self._host_error:
            return self._host_error
        if self._own is not None and self._own.alive:
            return None
        if self._answers(self.base_url) or self._find_binary() is not None:
            return None
        return self._unavailable_line()

    def fetch(self, candidate: Candidate, *, vision: bool = False, progress: bool = True) -> Candidate:
        """The candidate as a model the Ollama server has (`ollama_model` set): already there (ollama-local),
        pulled by the server (its registry's names and hf.co/<user>/<repo>:<quant>), or created from a single GGUF
        file (a local one, else one launcher.fetch downloads first: a URL, a Hugging Face file at another revision).
        """
        if candidate.source == "ollama-local" and candidate.ollama_model:
            return candidate
        name = candidate.ollama_model
        pull = bool(name) and (candidate.source == "ollama" or str(name).lower().startswith("hf.co/"))
        if not pull and len(candidate.files) != 1:
            raise BackendError(
                f"Ollama cannot create a model from {len(candidate.files)} split GGUF files ({candidate.model} "
                f"{candidate.quant}); merge them (llama-gguf-split --merge) or use --backend llamacpp"
            )
        if self._host_error:
            raise BackendError(self._host_error)
        if not pull and not candidate.files[0].local_path:
            from launcher.fetch import fetch_candidate

            if self.unavailable() is not None:  # say so before downloading gigabytes for no server
                raise BackendError(self._unavailable_line())
            candidate = fetch_candidate(candidate, vision=vision, progress=progress)
        started = self._own is None or not self._own.alive
        try:
            if pull:
                assert name is not None
                self.pull(name, progress=progress)
                return candidate
            return replace(candidate, ollama_model=self.create_model(candidate, vision=vision))
        except BaseException:
            if started:
                self.close()  # a server started for this fetch does not outlive its failure
            raise

    def start(self, plan: Plan, option: Option, request: LaunchRequest, *, log_dir: Path) -> Instance:
        """Ensure a server (ours with the plan's environment when none answers), then load the model with the
        plan's num_ctx (per slot) and num_gpu. AttemptFailed: oom, crash, timeout; BackendError otherwise."""
        from urllib.parse import urlsplit

        if request.api_key:
            raise BackendError(
                "Ollama serves without an API key, so --api-key / FITQUANT_API_KEY cannot protect it; "
                "use --backend llamacpp for a key-protected server"
            )
        form = ollama_form(plan, option)
        name = option.candidate.ollama_model
        if not name:
            raise BackendError(f"{option.quant} is not on the Ollama server yet: fetch it first")
        options = dict(form["options"])
        keep = keep_alive_value(request.keep_alive)
        base, own = self._ensure_server(form["env"], log_dir)
        try:
            if name in self._created:  # ours: the model carries the plan's parameters for a later `ollama run`
                self._create(base, name, self._created[name], parameters=options)
            self._load(base, name, options, keep, timeout_s=request.ready_timeout_s, own=own)
            version = self._version(base)
        except BaseException:
            if own is not None:
                self.close()
            raise
        from launcher.plan import layer_split

        split = urlsplit(base)
        return Instance(
            backend=self.name,
            server="ollama",
            version=version,
            endpoint=f"{base}/v1",
            model_name=name,
            pid=own.process.pid if own is not None else None,
            log_path=own.log_path if own is not None else None,
            process=own.process if own is not None else None,
            host=split.hostname or "127.0.0.1",
            port=split.port,
            extra={
                "base_url": base,
                "options": options,
                "keep_alive": keep,
                "own_server": own is not None,
                "server_env": dict(form["env"]) if own is not None else None,
                # the plan's layer split (GPU name, weight, backend), for the KV type diagnosis; plain JSON
                "gpus": [
                    {"name": g.name, "split_weight": g.split_weight, "backend": g.backend}
                    for g in layer_split(plan.budgets)
                ],
            },
        )

    def wait_ready(self, instance: Instance, timeout_s: float) -> None:
        """Return once the model is listed by /api/ps; AttemptFailed crash (our server exited) or timeout."""
        import tenacity

        from launcher.backends.process import poll_until

        base = instance.extra.get("base_url") or instance.endpoint.removesuffix("/v1")

        def probe() -> str | None:
            proc = instance.process
            if proc is not None and proc.poll() is not None:
                raise self._exited(instance, f"ollama serve exited (status {proc.returncode}) while loading")
            try:
                listed = self._ps_entry(base, instance.model_name) is not None
            except OllamaError as exc:
                return str(exc)
            return None if listed else f"{instance.model_name} is not in /api/ps yet"

        why = poll_until(probe, timeout_s=timeout_s, wait=tenacity.wait_exponential(multiplier=0.05, max=1.0))
        if why is not None:
            raise AttemptFailed(
                "timeout", f"Ollama did not list {instance.model_name} within {timeout_s:.0f} s ({why})",
                log_tail=self._tail(instance.log_path),
            )  # fmt: skip

    def placement(self, instance: Instance, option: Option) -> Placement:
        """Where /api/ps says the model landed, with the plan's prediction beside it, and the server's KV cache
        type inferred from the measured size (instance.extra["kv_type_inferred"], ["kv_type_note"])."""
        from launcher.verify import placement_from_ollama

        base = instance.extra.get("base_url") or instance.endpoint.removesuffix("/v1")
        try:
            entry = self._ps_entry(base, instance.model_name)
        except OllamaError as exc:
            raise AttemptFailed("crash", str(exc), log_tail=self._tail(instance.log_path)) from None
        if entry is None:
            raise AttemptFailed(
                "crash", f"{instance.model_name} is no longer loaded in the Ollama server at {base}",
                log_tail=self._tail(instance.log_path),
            )  # fmt: skip
        per_slot = (instance.extra.get("options") or {}).get("num_ctx")
        placement: Placement = placement_from_ollama(entry, expected_ctx=per_slot)
        if placement.n_ctx_per_slot is None and entry.get("context_length"):
            placement.n_ctx_per_slot = int(entry["context_length"])  # Ollama's num_ctx is per slot
        if placement.n_slots is None:
            placement.n_slots = option.estimate.settings.n_parallel
        _attach_prediction(placement, option)
        self._diagnose_kv(instance, option, placement, int(entry.get("size") or 0))
        return placement

    def stop(self, instance: Instance) -> None:
        """Unload the model (keep_alive 0, then /api/ps until it is gone) and stop our own server; idempotent."""
        if instance.extra.get("stopped"):
            return
        instance.extra["stopped"] = True
        base = instance.extra.get("base_url") or instance.endpoint.removesuffix("/v1")
        proc = instance.process
        if proc is None or proc.poll() is None:
            with contextlib.suppress(OllamaError):
                self._unload(base, instance.model_name)
        if instance.extra.get("own_server") and proc is not None:
            from launcher.backends.process import stop_process

            stop_process(proc, timeout_s=STOP_TIMEOUT_S)
            if self._own is not None and self._own.process is proc:
                self._own = None

    # -- more than the protocol ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the `ollama serve` fitquant started, if any."""
        own, self._own = self._own, None
        if own is not None:
            from launcher.backends.process import stop_process

            stop_process(own.process, timeout_s=STOP_TIMEOUT_S)

    def pull(
        self,
        name: str,
        *,
        progress: bool = True,
        on_progress: Callable[[ollama.ProgressResponse], None] | None = None,
        console: Any = None,
    ) -> str:
        """`ollama pull name` through the API (NDJSON stream), with a progress bar per layer on stderr when it is
        a terminal (or on `console`); `on_progress` sees every line. Returns the final status ("success")."""
        base, _ = self._ensure_server(None, None)
        client = self._client(base, read_s=PULL_READ_TIMEOUT_S)
        show = console is not None or (progress and sys.stderr.isatty())
        bar = PullProgress(name, console=console) if show else None
        last = None
        try:
            with _api(base, f"pull {name}"), bar if bar is not None else contextlib.nullcontext():
                for part in client.pull(name, stream=True):
                    last = part.status
                    if on_progress is not None:
                        on_progress(part)
                    if bar is not None:
                        bar.update(part.status or "", part.digest, part.total, part.completed)
        except OllamaError as exc:
            if "file does not exist" in exc.error or re.search(r"manifest.*not found", exc.error):
                raise BackendError(
                    f"unknown model {name}: the Ollama registry has no such model or tag ({exc.error})"
                ) from None
            raise BackendError(f"ollama pull {name}: {exc.error}" if exc.kind == "response" else str(exc)) from None
        if last != "success":
            raise BackendError(f"ollama pull {name} ended without success (last status: {last})")
        return last

    def create_model(
        self, candidate: Candidate, *, vision: bool = False, parameters: Mapping[str, Any] | None = None
    ) -> str:
        """Upload the candidate's local GGUF (and its projector, for vision) as blobs and create the Ollama model
        `local_model_name(candidate)` from them; returns that name."""
        if len(candidate.files) != 1:
            raise BackendError(
                f"Ollama cannot create a model from {len(candidate.files)} split GGUF files ({candidate.model}); "
                "merge them (llama-gguf-split --merge) or use --backend llamacpp"
            )
        model_file = candidate.files[0]
        if not model_file.local_path:
            raise BackendError(f"{candidate.model} {candidate.quant} is not on this machine yet; fetch it first")
        base, _ = self._ensure_server(None, None)
        files = {create_file_name(model_file): self._upload(base, Path(model_file.local_path), model_file.sha256)}
        projector = candidate.projector
        if vision and projector is not None and projector.local_path:
            key = create_file_name(projector)
            key = key if key not in files else f"mmproj-{key}"
            files[key] = self._upload(base, Path(projector.local_path), projector.sha256)
        name = local_model_name(candidate)
        self._create(base, name, files, parameters=parameters)
        self._created[name] = files
        return name

    # -- the server ------------------------------------------------------------------------------------------

    def _find_binary(self) -> str | None:
        if self._binary:
            found = shutil.which(self._binary)
            if found:
                return found
            return self._binary if os.path.isfile(self._binary) and os.access(self._binary, os.X_OK) else None
        return shutil.which("ollama")

    def _unavailable_line(self) -> str:
        if self._binary:
            return (f"no Ollama server answers at {self.base_url} and {self._binary} is not an executable; "
                    "install Ollama or set OLLAMA_HOST")  # fmt: skip
        return (f"no Ollama server answers at {self.base_url} and no `ollama` binary is on PATH; "
                "install Ollama or set OLLAMA_HOST")  # fmt: skip

    def _http(self, base: str, *, read_s: float = API_TIMEOUT_S, connect_s: float = PROBE_TIMEOUT_S) -> httpx.Client:
        from launcher.http import make_client

        return make_client(timeout_s=read_s, connect_timeout_s=connect_s, trust_env=not _loopback(base))

    def _client(self, base: str, *, read_s: float | None = API_TIMEOUT_S) -> ollama.Client:
        import httpx
        import ollama

        timeout = httpx.Timeout(read_s, connect=PROBE_TIMEOUT_S * 2)
        return ollama.Client(host=base, timeout=timeout, trust_env=not _loopback(base))

    def _answers(self, base: str) -> bool:
        """Whether an Ollama server answers GET /api/version at `base`."""
        from launcher.http import HttpFailure, translate

        if not base:
            return False
        try:
            with translate(), self._http(base, read_s=PROBE_TIMEOUT_S) as http:
                r = http.get(f"{base}/api/version")
        except HttpFailure:
            return False
        return r.status_code == 200

    def _version(self, base: str) -> str | None:
        from launcher.http import HttpFailure, translate

        try:
            with translate(), self._http(base) as http:
                r = http.get(f"{base}/api/version")
            return str(r.json().get("version")) if r.status_code == 200 else None
        except (HttpFailure, ValueError, AttributeError):
            return None

    def _ensure_server(self, env: Mapping[str, str] | None, log_dir: Path | None) -> tuple[str, _OwnServer | None]:
        """The base URL of the server to use, and our own server when it is one we started. `env` None: any
        environment will do (fetching); else our own server must run with it (restarted if it does not)."""
        if self._host_error:
            raise BackendError(self._host_error)
        own = self._own
        if own is not None and own.alive and (env is None or own.env == dict(env)):
            return own.base, own
        if own is not None:
            self.close()
        if self._answers(self.base_url):
            return self.base_url, None
        binary = self._find_binary()
        if binary is None:
            raise BackendError(self._unavailable_line())
        self._own = self._serve(binary, dict(env or {}), log_dir)
        return self._own.base, self._own

    def _serve(self, binary: str, env: dict[str, str], log_dir: Path | None) -> _OwnServer:
        """Start `ollama serve` on a free 127.0.0.1 port with `env`, and wait until GET / answers."""
        import tenacity

        from launcher.backends.process import free_port, poll_until, spawn, stop_process
        from launcher.http import HttpFailure, translate

        if log_dir is None:
            from launcher.paths import state_dir

            log_dir = state_dir() / "logs"
        port = free_port("127.0.0.1")
        child_env = {**os.environ, **env, "OLLAMA_HOST": f"127.0.0.1:{port}"}
        log_path = log_dir / f"ollama-serve-{port}-{int(time.time() * 1000)}.log"
        proc = spawn([binary, "serve"], env=child_env, log_path=log_path)
        base = f"http://127.0.0.1:{port}"
        own = _OwnServer(proc, base, dict(env), log_path, binary)

        def probe() -> str | None:
            if proc.poll() is not None:
                lines = self._tail(log_path)
                last = f": {_one_line(lines[-1], 300)}" if lines else ""
                raise BackendError(f"{binary} serve exited (status {proc.returncode}) before answering{last}")
            try:
                with translate(), self._http(base, read_s=PROBE_TIMEOUT_S, connect_s=1.0) as http:
                    r = http.get(f"{base}/")
            except HttpFailure as exc:
                return str(exc)
            return None if r.status_code == 200 else f"GET / answered {r.status_code}"

        try:
            why = poll_until(probe, timeout_s=SERVE_TIMEOUT_S, wait=tenacity.wait_exponential(multiplier=0.05, max=0.5))
        except BaseException:
            stop_process(proc, timeout_s=STOP_TIMEOUT_S)
            raise
        if why is not None:
            stop_process(proc, timeout_s=STOP_TIMEOUT_S)
            raise BackendError(f"{binary} serve did not answer at {base} within {SERVE_TIMEOUT_S:.0f} s ({why})")
        return own

    # -- models ----------------------------------------------------------------------------------------------

    def _upload(self, base: str, path: Path, sha256: str | None) -> str:
        """The blob digest of `path` on the server, uploading it unless the server has it (HEAD first)."""
        from launcher.http import HttpFailure, translate

        digest = f"sha256:{sha256.removeprefix('sha256:')}" if sha256 else _file_digest(path)
        try:
            with translate(), self._http(base) as http:
                present = http.head(f"{base}/api/blobs/{digest}").status_code == 200
        except HttpFailure as exc:
            raise BackendError(f"Ollama blob check at {base}: {_scrubbed(exc.text)}") from None
        if present:
            return digest
        client = self._client(base, read_s=PULL_READ_TIMEOUT_S)
        try:
            with _api(base, f"upload of {path.name}"):
                uploaded = client.create_blob(path)
        except OllamaError as exc:
            raise BackendError(str(exc)) from None
        if uploaded != digest:
            raise BackendError(f"{path} does not match its published sha256 ({digest}, the file is {uploaded})")
        return uploaded

    def _create(self, base: str, name: str, files: dict[str, str], *, parameters: Mapping[str, Any] | None) -> None:
        client = self._client(base, read_s=PULL_READ_TIMEOUT_S)
        last = None
        try:
            with _api(base, f"create {name}"):
                for part in client.create(model=name, files=files, parameters=parameters, stream=True):
                    last = part.status
        except OllamaError as exc:
            raise BackendError(f"ollama create {name}: {exc.error}" if exc.kind == "response" else str(exc)) from None
        if last != "success":
            raise BackendError(f"ollama create {name} ended without success (last status: {last})")

    def _load(
        self,
        base: str,
        name: str,
        options: dict[str, Any],
        keep: float | str | None,
        *,
        timeout_s: float,
        own: _OwnServer | None,
    ) -> None:
        """A prompt-less /api/generate: loads `name` with `options`. Failures classified for the run loop."""
        client = self._client(base, read_s=timeout_s)
        try:
            with _api(base, f"load of {name}"):
                client.generate(model=name, keep_alive=keep, options=options)
        except OllamaError as exc:
            tail = self._tail(own.log_path if own else None)
            if exc.kind == "timeout":
                with contextlib.suppress(OllamaError):
                    self._unload(base, name, wait=False)
                raise AttemptFailed("timeout", f"Ollama did not load {name} within {timeout_s:.0f} s",
                                    log_tail=tail) from None  # fmt: skip
            if exc.kind in _TRANSPORT:
                died = own is not None and not own.alive
                why = f"ollama serve exited (status {own.process.returncode})" if died and own else exc.error
                raise AttemptFailed("crash", f"the Ollama server at {base} stopped answering while loading {name} "
                                    f"({why})", log_tail=tail) from None  # fmt: skip
            if exc.kind == "response" and (exc.status is None or exc.status < 0 or exc.status >= 500):
                from launcher.verify import oom_line  # the one classifier (Ollama's llm/status.go texts included)

                if oom_line(exc.error.splitlines()) is not None:
                    raise AttemptFailed("oom", f"Ollama ran out of memory loading {name}: {exc.error}",
                                        log_tail=tail) from None  # fmt: skip
                raise AttemptFailed("crash", f"Ollama failed to load {name}: {exc.error}", log_tail=tail) from None
            if exc.status == 404:
                raise BackendError(f"model {name} is not on the Ollama server at {base} ({exc.error})") from None
            raise BackendError(str(exc)) from None

    def _unload(self, base: str, name: str, *, wait: bool = True) -> None:
        """generate(keep_alive=0), then /api/ps until the model is gone (an unload is an expiry, not immediate)."""
        client = self._client(base, read_s=API_TIMEOUT_S)
        with _api(base, f"unload of {name}"):
            client.generate(model=name, keep_alive=0)
        if not wait:
            return
        deadline = time.monotonic() + UNLOAD_TIMEOUT_S
        delay = 0.02
        while self._ps_entry(base, name) is not None:
            if time.monotonic() > deadline:
                raise OllamaError(f"Ollama at {base} still lists {name} {UNLOAD_TIMEOUT_S:.0f} s after unloading it",
                                  kind="timeout")  # fmt: skip
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _ps_entry(self, base: str, name: str) -> dict[str, Any] | None:
        """The /api/ps entry of `name` as a JSON object, or None when it is not loaded."""
        client = self._client(base, read_s=API_TIMEOUT_S)
        with _api(base, "/api/ps"):
            listed = client.ps()
        for m in listed.models:
            if same_model(m.model or m.name or "", name) or same_model(m.name or "", name):
                entry: dict[str, Any] = m.model_dump(mode="json", exclude_none=True)
                return entry
        return None

    # -- diagnosis -------------------------------------------------------------------------------------------

    def _diagnose_kv(self, instance: Instance, option: Option, placement: Placement, measured: int) -> None:
        from launcher.estimate import GPU

        split = instance.extra.get("gpus")
        gpus = [GPU(str(g["name"]), float(g["split_weight"]), str(g["backend"])) for g in split] if split else None
        sizes = kv_type_sizes(option, gpus)
        inferred = infer_kv_type(measured, sizes)
        planned = option.estimate.settings.type_k
        note = None
        if inferred is not None:
            note = kv_type_note(measured, sizes, inferred, planned, own_server=bool(instance.extra.get("own_server")))
        instance.extra["kv_type_sizes"] = sizes
        instance.extra["kv_type_inferred"] = inferred
        instance.extra["kv_type_note"] = note
        if note is not None and note not in placement.errors:
            placement.errors.append(note)

    # -- logs ------------------------------------------------------------------------------------------------

    @staticmethod
    def _tail(path: Path | None) -> list[str]:
        from launcher.backends.process import tail

        return tail(path)

    def _exited(self, instance: Instance, detail: str) -> AttemptFailed:
        lines = self._tail(instance.log_path)
        from launcher.verify import oom_line

        oom = oom_line(lines)
        if oom is not None:
            return AttemptFailed("oom", f"{detail}: {_one_line(oom, 300)}", log_tail=lines)
        return AttemptFailed("crash", detail, log_tail=lines)


def _attach_prediction(placement: Placement, option: Option) -> None:
    """The plan's figures beside the measured ones (launcher.verify.attach_prediction). Ollama reports one GPU
    total and one CPU total, so the plan's GPU devices are summed, kind by kind, into one."""
    from launcher.verify import attach_prediction

    planned = option.estimate.devices
    kinds = ("weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "output_bytes")
    gpus = [d for d in planned if d.name != "CPU"]
    merged: list[dict[str, Any]] = []
    if gpus:
        merged.append({"name": "GPU", **{k: sum(getattr(d, k) for d in gpus) for k in kinds}})
    merged += [{"name": "CPU", **{k: getattr(d, k) for k in kinds}} for d in planned if d.name == "CPU"]
    attach_prediction(placement, merged)


def _file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            sha.update(chunk)
    return f"sha256:{sha.hexdigest()}"


def _loopback(base: str) -> bool:
    from urllib.parse import urlsplit

    host = (urlsplit(base).hostname or "").lower()
    return host in ("localhost", "0.0.0.0", "::", "::1") or host.startswith("127.")
