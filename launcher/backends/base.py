"""The one small protocol every runtime implements, and the data that crosses it.

A backend renders its own launch form of a plan (pure), fetches the chosen files, starts a server,
waits until it is ready, reads back where the model landed (a Placement, launcher.verify) and stops it.
`launcher.run` drives the loop; backends never decide what to run, only how.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from launcher.attempts import Outcome
from launcher.errors import BackendError

if TYPE_CHECKING:
    from launcher.catalog.types import Candidate
    from launcher.plan import Option, Plan
    from launcher.verify import Placement

__all__ = ["AttemptFailed", "Backend", "Instance", "LaunchRequest", "Outcome", "ServerMemory"]


class AttemptFailed(BackendError):
    """A launch that did not end in a verified, ready server: why (`outcome`), one line (`detail`), and the
    last lines of the server's log when there is one."""

    def __init__(self, outcome: Outcome, detail: str, *, log_tail: list[str] | None = None) -> None:
        super().__init__(detail)
        self.outcome: Outcome = outcome
        self.detail = detail
        self.log_tail = list(log_tail or [])


@dataclass(frozen=True)
class ServerMemory:
    """What a backend's server does by default that changes memory; the plan counts it (Policy.for_server)."""

    all_logits: bool = False  # logits for every prompt token (llama-cpp-python) instead of one row per slot
    swa_full: bool = False  # a full-size sliding-window cache (llama.cpp's library default; llama-server turns it off)
    cpu_repack: bool = False  # host-resident weights also copied into a CPU_REPACK buffer (llama.cpp's extra buffer
    # types on x86 and ARM hosts): counted on the CPU for the types this host's CPU repacks
    batch_is_ubatch: bool = False  # the logical batch equals the micro-batch (Ollama passes -b = -ub = num_batch)
    loads_projector: bool = False  # the vision projector is loaded whenever the model has one (Ollama), not on ask


@dataclass(frozen=True)
class LaunchRequest:
    """How the user wants the server exposed; the plan says what runs."""

    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port
    api_key: str | None = field(default=None, repr=False)  # passed to the server, never printed
    # the key is fitquant's own (a router's private server), not the user's: the instance record keeps it, so
    # fitquant's own tools (`fitquant bench`) can reach the server, while no one else on the machine can
    own_key: bool = False
    rpc: tuple[str, ...] = ()  # llama.cpp RPC servers, host:port
    ready_timeout_s: float = 600.0
    keep_alive: str = "-1"  # Ollama: keep the model loaded while fitquant runs it
    embeddings: bool = False  # llama.cpp: the server also answers /v1/embeddings (Ollama always does)
    alias: str | None = None  # llama.cpp: the model name the server answers with (default: the file's path)


@dataclass
class Instance:
    """A server fitquant started (or, for Ollama, a model it loaded into a server)."""

    backend: str  # entry-point name: "llamacpp", "ollama"
    server: str  # what runs it: "llama-server", "llama-cpp-python", "ollama"
    version: str | None
    endpoint: str  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1
    model_name: str  # the `model` field a chat request names
    pid: int | None  # the server process, when fitquant started one
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int | None = None
    api_key: str | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific state (e.g. Ollama's own server)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@runtime_checkable
class Backend(Protocol):
    """A runtime fitquant can launch a plan on. Registered under the entry-point group `fitquant.backends`."""

    name: str

    def launch_form(self, plan: Plan, *, host: str = "127.0.0.1", port: int = 8080) -> Any:
        """This backend's form of the plan's chosen option (pure: what the plan JSON shows)."""
        ...

    def unavailable(self) -> str | None:
        """None when this backend can run here, else one line saying why not and what to install."""
        ...

    def server_memory(self) -> ServerMemory:
        """What this backend's server does by default that changes memory (pure once the server is found)."""
        ...

    def fetch(self, candidate: Candidate, *, vision: bool = False, progress: bool = True) -> Candidate:
        """The candidate with every file it needs present locally (or in the runtime's own store), verified."""
        ...

    def start(self, plan: Plan, option: Option, request: LaunchRequest, *, log_dir: Path) -> Instance:
        """Start serving `option` (a configuration of `plan`). Raises AttemptFailed or BackendError."""
        ...

    def wait_ready(self, instance: Instance, timeout_s: float) -> None:
        """Return once the server answers; raise AttemptFailed (crash, oom, timeout) otherwise."""
        ...

    def placement(self, instance: Instance, option: Option) -> Placement:
        """Where the model landed, with the plan's prediction beside each measured figure."""
        ...

    def stop(self, instance: Instance) -> None:
        """Stop the server (or unload the model); idempotent, never raises for a process already gone."""
        ...
