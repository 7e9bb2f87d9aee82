"""The Ollama backend: a plan's model run on an Ollama server through the official `ollama` package.

- `OllamaBackend`: the server at OLLAMA_HOST (read by launcher.ollama_host, as the official client reads it); when
  none answers and an `ollama` binary is on PATH, fitquant starts its own `ollama serve` on a free 127.0.0.1 port
  with the plan's environment (OLLAMA_KV_CACHE_TYPE, OLLAMA_FLASH_ATTENTION, OLLAMA_NUM_PARALLEL,
  OLLAMA_CONTEXT_LENGTH, OLLAMA_KEEP_ALIVE, OLLAMA_SCHED_SPREAD on several GPUs), in its own process group and tied
  to fitquant's life (launcher.backends.process), and stops it with the instance.
  Registry names (and `hf.co/...` names) are pulled; a local GGUF (or every shard of a split set) is uploaded as
  blobs and created once as `fitquant/<file stem>:<quant>` (a record of what was created, since Ollama rewrites
  the whole GGUF on every create from files). The model served is derived from that one (`/api/create` with
  `from` and `parameters` num_ctx, num_gpu, num_batch: no blob copied), so that a request without options, as
  every OpenAI-style one is, loads what was verified instead of reloading with Ollama's defaults (server/sched.go
  needsReload). It is loaded by a prompt-less /api/generate; where it landed is read from our own server's log
  (the `starting llama-server cmd=...` line, then llama.cpp's lines: launcher.verify.placement_from_ollama_log),
  else from /api/ps (launcher.verify.placement_from_ollama), compared with the plan's GPU side at a full offload.
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
    derived_model_name,
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
    from launcher.llamalog import OllamaLaunch
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

    # -- the protocol ----------------------------------------------------------------------------------------

    def launch_form(self, plan: Plan, *, host: str = "127.0.0.1", port: int = 8080) -> dict[str, Any]:
        return ollama_form(plan)

    def server_memory(self) -> ServerMemory:
        """Ollama's runner (upstream llama-server): one logits row per slot, a SWA cache of the window, host
        weights repacked for the CPU as llama.cpp does by default, the batch given as the micro-batch (-b = -ub =
        num_batch), and the vision projector loaded whenever the model has one."""
        return ServerMemory(cpu_repack=True, batch_is_ubatch=True, loads_projector=True)

    def unavailable(self) -> str | None:
        if self._host_error:
            return self._host_error
        if self._own is not None and self._own.alive:
            return None
        if self._answers(self.base_url) or self._find_binary() is not None:
            return None
        return self._unavailable_line()

    def server_version(self) -> str | None:
        """The version of the Ollama server a launch would use, before the launch (what the machine record keys the
        speed calibration by, as each launch's instance records it): the server fitquant runs, else the one at
        OLLAMA_HOST, else the `ollama` binary it would start (`ollama --version`); None when none says."""
        if self._host_error:
            return None
        if self._own is not None and self._own.alive:
            return self._version(self._own.base)
        if self._answers(self.base_url):
            return self._version(self.base_url)
        binary = self._find_binary()
        if binary is None:
            return None
        import subprocess

        try:
            done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S * 4)
        except (OSError, subprocess.SubprocessError):
            return None
        # "ollama version is 0.12.6", or, with no server running, "Warning: client version is 0.12.6"
        found = re.findall(r"version is\s+v?([0-9][\w.+-]{0,40})", done.stdout + done.stderr)
        return found[-1] if found else None

    def fetch(self, candidate: Candidate, *, vision: bool = False, progress: bool = True) -> Candidate:
        """The candidate as a model the Ollama server has (`ollama_model` set): already there (ollama-local),
        pulled by the server (its registry's names and hf.co/<user>/<repo>:<quant>), or created from a single GGUF
        file (a local one, else one launcher.fetch downloads first: a URL, a Hugging Face file at another revision).
        """
        if candidate.source == "ollama-local" and candidate.ollama_model:
            return candidate
        name = candidate.ollama_model
        pull = bool(name) and (candidate.source == "ollama" or str(name).lower().startswith("hf.co/"))
        if self._host_error:
            raise BackendError(self._host_error)
        if not pull and not all(f.local_path for f in candidate.files):
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
        env = dict(form["env"])
        if keep is not None:  # /v1 requests carry no keep_alive: each one resets it to the server's default
            env["OLLAMA_KEEP_ALIVE"] = _keep_alive_env(keep)
        base, own = self._ensure_server(env, log_dir)
        # The plan survives every request only when the model itself carries it: a request without num_ctx (every
        # OpenAI-style one) would reload it with the server's default context and an automatic num_gpu and batch
        # (sched.go needsReload). A derived model copies no blob: its manifest adds the parameters.
        served = derived_model_name(name, options)
        try:
            self._create(base, served, source=name, parameters=options)
            self._load(base, served, options, keep, timeout_s=request.ready_timeout_s, own=own)
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
            model_name=served,
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
                "base_model": name,
                # Ollama loads a model's projector whenever it has one; the plan counts it only for --vision
                "projector_counted": bool(plan.policy.vision and option.candidate.projector is not None),
                "server_env": env if own is not None else None,
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
        """Where the model landed, with the plan's prediction beside it. On fitquant's own `ollama serve`: from its
        log (the llama-server command line Ollama ran, then llama.cpp's offload and buffer lines), per device and
        kind. On any other server: from /api/ps, with the server's KV cache type inferred from the measured size
        (instance.extra["kv_type_inferred"], ["kv_type_note"])."""
        from launcher.verify import placement_from_ollama

        base = instance.extra.get("base_url") or instance.endpoint.removesuffix("/v1")
        if instance.extra.get("own_server") and instance.log_path is not None:
            logged = self._placement_from_log(instance, option)
            if logged is not None:
                return logged
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
        # at a full offload Ollama's `size` is the GPUs' buffers alone (llm/llama_server.go MemorySize): the host's
        # token embeddings and buffers are in no figure, so only the GPU side of the plan is compared
        size = int(entry.get("size") or 0)
        full = size > 0 and int(entry.get("size_vram") or 0) >= size
        _attach_prediction(placement, option, gpu_only=full)
        self._diagnose_kv(instance, option, placement, size, gpu_only=full)
        return placement

    def _placement_from_log(self, instance: Instance, option: Option) -> Placement | None:
        """The placement our own server's log shows for its last llama-server launch; None without such a line."""
        from launcher.llamalog import last_ollama_launch
        from launcher.verify import attach_prediction, placement_from_ollama_log

        def found_launch(text: str) -> OllamaLaunch | None:
            found = last_ollama_launch(text)
            return found[0] if found else None

        per_slot = (instance.extra.get("options") or {}).get("num_ctx")
        placement = None
        for _ in range(20):  # Ollama may still be flushing the child's output when /api/ps lists the model
            text = instance.log_path.read_text("utf-8", "replace") if instance.log_path else ""
            placement = placement_from_ollama_log(text, token_embd_bytes=option.facts.input_bytes,
                                                  expected_ctx=per_slot)  # fmt: skip
            if placement is None or placement.verdict != "incomplete":
                break  # no launch line: an Ollama before v0.30 (it logs it before the load /api/ps waited for)
            time.sleep(0.1)
        if placement is None:
            return None
        planned = option.estimate.settings.type_k
        attach_prediction(placement, option.estimate.devices, type_k=planned)
        instance.extra["kv_type_inferred"] = None
        note = None
        if placement.type_k is not None and placement.type_k != planned.lower():
            note = (f"this Ollama server ran llama-server with a {placement.type_k} KV cache although fitquant "
                    f"started it with OLLAMA_KV_CACHE_TYPE={planned} (its log's command line)")  # fmt: skip
            placement.errors.append(note)
        instance.extra["kv_type_note"] = note
        launch = found_launch(text)
        if launch is not None and launch.mmproj and not instance.extra.get("projector_counted"):
            placement.errors.append(
                "Ollama loaded this model's vision projector on its own (--mmproj): the plan did not count it; "
                "plan with --vision to count it"
            )
        if launch is not None and launch.draft:
            placement.errors.append("Ollama loaded a draft (MTP) model beside this one: the plan did not count it")
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
        """Upload the candidate's local GGUF (every shard of a split set, and its projector for vision) as blobs and
        create the Ollama model `local_model_name(candidate)` from them; returns that name. Done once: Ollama
        rewrites a whole GGUF on every create from files, so a model this server already holds from the same files
        (fitquant's record of its manifest digest, checked against /api/tags) is used as it is."""
        missing = [f.name for f in candidate.files if not f.local_path]
        if missing or not candidate.files:
            raise BackendError(f"{candidate.model} {candidate.quant} is not on this machine yet; fetch it first")
        base, _ = self._ensure_server(None, None)
        sources = list(candidate.files)
        projector = candidate.projector
        if vision and projector is not None and projector.local_path:
            sources.append(projector)
        name = local_model_name(candidate)
        stats = [_file_stat(Path(str(f.local_path))) for f in sources]
        record_key = f"{base} {name}"
        record = _created_records().get(record_key)
        listed = self._listed_digest(base, name)
        if record and listed and record.get("model_digest") == listed and record.get("stats") == stats:
            return name  # the same files, the same model: nothing to hash, upload or create
        digests = [f"sha256:{f.sha256.removeprefix('sha256:')}" if f.sha256 else _file_digest(Path(str(f.local_path)))
                   for f in sources]  # fmt: skip
        if record and listed and record.get("model_digest") == listed and record.get("sources") == digests:
            _save_created_record(record_key, {**record, "stats": stats})  # touched, not changed
            return name
        files: dict[str, str] = {}
        for f, digest in zip(sources, digests, strict=True):
            key = create_file_name(f)
            if f is projector:
                key = key if key not in files else f"mmproj-{key}"
            # a split set keeps its shard names: Ollama merges `-NNNNN-of-MMMMM.gguf` files (mergeSplitGGUFLayers)
            files[key] = self._upload(base, Path(str(f.local_path)), digest)
        self._create(base, name, files=files, parameters=parameters)
        _save_created_record(record_key, {"sources": digests, "stats": stats,
                                          "model_digest": self._listed_digest(base, name)})  # fmt: skip
        return name

    def _listed_digest(self, base: str, name: str) -> str | None:
        """The manifest digest /api/tags lists for `name`, or None when the server does not have it."""
        client = self._client(base, read_s=API_TIMEOUT_S)
        try:
            with _api(base, "/api/tags"):
                listed = client.list()
        except OllamaError:
            return None
        for m in listed.models:
            if same_model(m.model or "", name):
                return str(m.digest or "") or None
        return None

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

    def _upload(self, base: str, path: Path, digest: str) -> str:
        """The blob digest of `path` on the server, uploading it unless the server has it (HEAD first)."""
        from launcher.http import HttpFailure, translate

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

    def _create(
        self,
        base: str,
        name: str,
        *,
        files: dict[str, str] | None = None,
        source: str | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> None:
        """/api/create of `name` from uploaded blobs (`files`) or from a model the server has (`source`: only a new
        manifest, no blob copied), with `parameters` as the model's defaults."""
        client = self._client(base, read_s=PULL_READ_TIMEOUT_S)
        last = None
        try:
            with _api(base, f"create {name}"):
                for part in client.create(
                    model=name, from_=source, files=files, parameters=parameters, stream=True
                ):  # fmt: skip
                    last = part.status
        except OllamaError as exc:
            if source and exc.status == 404:
                raise BackendError(f"model {source} is not on the Ollama server at {base} ({exc.error})") from None
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

    def _diagnose_kv(
        self, instance: Instance, option: Option, placement: Placement, measured: int, *, gpu_only: bool
    ) -> None:
        from launcher.estimate import GPU

        split = instance.extra.get("gpus")
        gpus = [GPU(str(g["name"]), float(g["split_weight"]), str(g["backend"])) for g in split] if split else None
        sizes = kv_type_sizes(option, gpus, gpu_only=gpu_only)
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


def _attach_prediction(placement: Placement, option: Option, *, gpu_only: bool = False) -> None:
    """The plan's figures beside the measured ones (launcher.verify.attach_prediction). Ollama reports one GPU
    total and one CPU total, so the plan's GPU devices are summed, kind by kind, into one; `gpu_only` (a full
    offload, whose `size` leaves the host out): the GPU alone."""
    from launcher.verify import attach_prediction

    planned = option.estimate.devices
    kinds = ("weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "output_bytes")
    gpus = [d for d in planned if d.name != "CPU"]
    merged: list[dict[str, Any]] = []
    if gpus:
        merged.append({"name": "GPU", **{k: sum(getattr(d, k) for d in gpus) for k in kinds}})
    if not gpu_only:
        merged += [{"name": "CPU", **{k: getattr(d, k) for k in kinds}} for d in planned if d.name == "CPU"]
    attach_prediction(placement, merged)


def _keep_alive_env(keep: float | str) -> str:
    """A keep-alive as OLLAMA_KEEP_ALIVE reads it (envconfig.KeepAlive: a Go duration, else whole seconds)."""
    if isinstance(keep, str):
        return keep
    return str(int(keep)) if float(keep).is_integer() else f"{keep}s"


def _file_stat(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _created_records_path() -> Path:
    from launcher.paths import state_dir

    return state_dir() / "ollama-created.json"


def _created_records() -> dict[str, Any]:
    """What fitquant created on Ollama servers: "<base> <name>" -> the source files (digests, stats) and the
    model's manifest digest then. A record that does not parse is no record."""
    import json

    try:
        data = json.loads(_created_records_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_created_record(key: str, record: dict[str, Any]) -> None:
    import json

    from launcher.paths import write_private

    records = _created_records()
    records[key] = record
    with contextlib.suppress(OSError):  # a record not kept costs one more create, nothing else
        write_private(_created_records_path(), json.dumps(records, indent=1, sort_keys=True))


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
