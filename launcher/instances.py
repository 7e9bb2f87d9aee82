"""What fitquant started and is still running: one JSON file per instance in `state_dir()/instances`.

`fitquant run` writes its instance when the model is verified and removes it when it stops; `fitquant ps`
lists those whose processes still live (and drops the rest), `fitquant stop` ends them by signalling the
`fitquant run` that owns each (which stops its server in order), or the server itself if that is gone.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.paths import state_dir


@dataclass(frozen=True)
class RunningInstance:
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

    @property
    def uptime_s(self) -> float:
        return max(0.0, time.time() - self.started)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "uptime_s": round(self.uptime_s, 1)}


def instances_dir() -> Path:
    return state_dir() / "instances"


def instance_name(model: str, quant: str, port: int | None) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", f"{model.rsplit('/', 1)[-1].removesuffix('.gguf')}-{quant}".lower()).strip("-")
    return f"{stem}-{port}" if port else stem


def save(instance: RunningInstance) -> Path:
    """Write atomically (a reader never sees half a file)."""
    directory = instances_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{instance.name}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(instance), indent=2))
    os.replace(tmp, path)
    return path


def remove(name: str) -> None:
    (instances_dir() / f"{name}.json").unlink(missing_ok=True)


def running() -> list[RunningInstance]:
    """Instances whose owner or server still runs, oldest first; the records of the others are removed."""
    from launcher.backends.process import pid_alive

    out = []
    directory = instances_dir()
    if not directory.is_dir():
        return []
    for path in sorted(directory.glob("*.json")):
        try:
            instance = RunningInstance(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if pid_alive(instance.owner_pid) or (instance.pid is not None and pid_alive(instance.pid)):
            out.append(instance)
        else:
            path.unlink(missing_ok=True)
    return sorted(out, key=lambda i: i.started)
