"""How one launch attempt ended: the data `run`, `serve` and the errors they raise share (a leaf module).

- verified: ready, placed as planned, warmed up.
- oom, spill, crash: memory failures (the load or the warm-up ran out of memory, the model landed partly on the
  CPU against the plan, the server died while loading or allocating): the run path steps down to the next
  configuration (a lower quant above the floor, or a smaller context) and tries again.
- timeout: the server was not ready in time. rejected: the server is up but refused a request (an HTTP error, a
  tokenizer that cannot encode the prompt) or did not process the whole warm-up prompt. Neither is a memory
  failure: no quant or context fixes it, so the run ends there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Outcome = Literal["verified", "oom", "spill", "crash", "timeout", "rejected"]

#: The outcomes a smaller configuration can fix.
STEP_DOWN_OUTCOMES: frozenset[str] = frozenset({"oom", "spill", "crash"})


@dataclass(frozen=True)
class Attempt:
    """One launch of one configuration, and how it ended."""

    quant: str
    n_ctx: int
    n_gpu_layers: int
    outcome: Outcome
    detail: str
    log_path: str | None = None

    @property
    def steps_down(self) -> bool:
        return self.outcome in STEP_DOWN_OUTCOMES

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
