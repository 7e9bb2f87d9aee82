"""What fitquant started and is still running: one JSON file per instance in `state_dir()/instances`.

`fitquant run` writes its instance when the model is verified and removes it when it stops; `fitquant ps`
lists those whose processes still live (and drops the rest), `fitquant stop` ends them by signalling the
`fitquant run` that owns each (which stops its server in order), or the server itself if that is gone.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import InitVar, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.paths import state_dir

if TYPE_CHECKING:
    from launcher.backends.process import ProcessIdentity


@dataclass(frozen=True)
class RunningInstance:
    """One running model. The pids come with what identified their processes when the record was made (start
    time, program): a pid whose process no longer matches is a stale record, never a process to signal."""

    name: str
    model: str
    quant: str
    n_ctx: int
    backend: str
    server: str
    pid: int | None  # the server
    owner_pid: int  # the `fitquant run` that started it
    endpoint: str
    verdict: str
    started: float  # seconds since the epoch
    log_path: str | None = None
    server_started: float | None = None  # the server process's start time (seconds since the epoch)
    server_command: str | None = None  # the base name of its argv[0]
    owner_started: float | None = None
    owner_command: str | None = None
    # decode tokens/s: what the warm-up measured and what the plan predicted (launcher.run.speed_report); the
    # finding when the load was slow (probable CPU fallback)
    model_name: str | None = None  # the `model` a request names (Ollama's tag; an alias)
    reference: str | None = None  # the model reference it was planned from ("": the embedded default model)
    measured_tg_per_s: float | None = None
    predicted_tg_per_s: float | None = None
    speed_finding: str | None = None
    version: str | None = None  # the server build's version (what its speed calibration is keyed by)
    via: str | None = None  # the address clients use instead of `endpoint` (a router's private server: serve's)
    # the key of a server whose key is fitquant's own (a router's private server; LaunchRequest.own_key), so
    # `fitquant bench` can reach it: in this 0600 record only, never in `ps` or any output
    api_key: str | None = field(default=None, repr=False)
    identify: InitVar[bool] = True  # fill the four above from the live processes (False: as read from a record)

    def __post_init__(self, identify: bool) -> None:
        if not identify:
            return
        from launcher.backends.process import process_identity

        # frozen: set once here, from the processes as they are when the record is made
        if self.pid is not None and self.server_started is None:
            server = process_identity(self.pid)
            if server is not None:
                object.__setattr__(self, "server_started", server.started)
                object.__setattr__(self, "server_command", server.command)
        if self.owner_started is None:
            owner = process_identity(self.owner_pid)
            if owner is not None:
                object.__setattr__(self, "owner_started", owner.started)
                object.__setattr__(self, "owner_command", owner.command)

    @property
    def server_identity(self) -> ProcessIdentity | None:
        return _identity(self.server_started, self.server_command)

    @property
    def owner_identity(self) -> ProcessIdentity | None:
        return _identity(self.owner_started, self.owner_command)

    def server_alive(self) -> bool:
        """The recorded server still runs as that same process."""
        from launcher.backends.process import is_process

        return self.pid is not None and is_process(self.pid, self.server_identity)

    def owner_alive(self) -> bool:
        """The recorded owner (`fitquant run` or `serve`) still runs as that same process."""
        from launcher.backends.process import is_process

        return is_process(self.owner_pid, self.owner_identity)

    @property
    def uptime_s(self) -> float:
        return max(0.0, time.time() - self.started)

    def to_json(self) -> dict[str, Any]:
        shown = {k: v for k, v in asdict(self).items() if k != "api_key"}
        return {**shown, "uptime_s": round(self.uptime_s, 1)}


def instances_dir() -> Path:
    return state_dir() / "instances"


def instance_name(model: str, quant: str, port: int | None) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", f"{model.rsplit('/', 1)[-1].removesuffix('.gguf')}-{quant}".lower()).strip("-")
    return f"{stem}-{port}" if port else stem


def save(instance: RunningInstance) -> Path:
    """Write atomically (a reader never sees half a file), 0600 in a 0700 folder, never through a symlink."""
    from launcher.paths import write_private

    path = instances_dir() / f"{instance.name}.json"
    write_private(path, json.dumps(asdict(instance), indent=2))
    return path


def remove(name: str) -> None:
    (instances_dir() / f"{name}.json").unlink(missing_ok=True)


def _identity(started: float | None, command: str | None) -> ProcessIdentity | None:
    from launcher.backends.process import ProcessIdentity

    return None if started is None or command is None else ProcessIdentity(started, command)


def _from_record(data: Any) -> RunningInstance:
    if not isinstance(data, dict):
        raise TypeError("not an instance record")
    known = {f.name for f in fields(RunningInstance)}
    return RunningInstance(**{k: v for k, v in data.items() if k in known}, identify=False)


@dataclass(frozen=True)
class Stale:
    """A record whose processes are gone, or whose pids now belong to other processes."""

    instance: RunningInstance
    why: str


def scan() -> tuple[list[RunningInstance], list[Stale]]:
    """The instances whose owner or server still runs as the recorded process (oldest first), and the stale
    records, which are removed. Nothing is signalled."""
    from launcher.backends.process import pid_alive

    out, stale = [], []
    directory = instances_dir()
    if not directory.is_dir():
        return [], []
    for path in sorted(directory.glob("*.json")):
        try:
            instance = _from_record(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if instance.owner_alive() or instance.server_alive():
            out.append(instance)
            continue
        reused = [str(pid) for pid in (instance.owner_pid, instance.pid) if pid is not None and pid_alive(pid)]
        if not reused:
            why = "its processes have ended"
        elif instance.owner_identity is None and instance.server_identity is None:
            why = f"it names pid {' and '.join(reused)} without the processes' identity (an older fitquant's record)"
        else:
            why = f"pid {' and '.join(reused)} is another process now"
        stale.append(Stale(instance, why))
        path.unlink(missing_ok=True)
    return sorted(out, key=lambda i: i.started), stale


def running() -> list[RunningInstance]:
    """Instances whose owner or server still runs as the recorded process, oldest first; the records of the
    others (processes gone, or pids reused by other processes) are removed."""
    return scan()[0]
