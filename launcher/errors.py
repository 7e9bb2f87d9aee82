"""fitquant's exceptions. Every error a user can cause or meet is one of these.

    FitquantError
     ├── HardwareError     a device probe failed in a way that matters (not "no GPU": that is a result)
     ├── GGUFFormatError   a GGUF header is truncated, corrupt, hostile or unreadable (names file and offset)
     ├── ModelError        a header is valid GGUF but not a model fitquant can size
     ├── CatalogError      a model reference cannot be resolved to candidates
     ├── EstimateError     a configuration cannot be estimated (bad setting for this model)
     ├── NoFitError        nothing fits; carries the rejected candidates and reasons
     ├── EngineError       llama.cpp could not measure or load the model
     ├── FetchError        a model file could not be downloaded or did not match its published hash
 ├── BackendError      a runtime (Ollama, llama-server) failed to start or answer
     │    └── RunFailed    a launch ended for a cause no smaller configuration fixes (carries the attempts)
     ├── VerifyError       a launch could not be verified
     ├── ProfileError      a profile file is invalid (names file, line and field)
     └── ServiceError      a service unit could not be written or installed

Other libraries' exceptions are translated into these once, at the module that calls them.
The CLI prints `ErrorType: message` on one line and exits 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from launcher.attempts import Attempt


class FitquantError(Exception):
    """Base of every error fitquant raises on purpose."""


class HardwareError(FitquantError):
    """Raised when a device probe fails in a way the user must know about."""


class GGUFFormatError(FitquantError):
    """Raised when a GGUF header cannot be read; the message names the source and the byte offset."""

    def __init__(self, message: str, *, source: str | None = None, offset: int | None = None) -> None:
        self.source = source
        self.offset = offset
        where = ""
        if source is not None:
            where = f"{source}"
            if offset is not None:
                where += f" at byte {offset}"
            where += ": "
        super().__init__(f"{where}{message}")


class ModelError(FitquantError):
    """Raised when a GGUF file is well-formed but lacks what sizing the model needs."""


class CatalogError(FitquantError):
    """Raised when a model reference cannot be resolved to candidate files."""


class EstimateError(FitquantError):
    """Raised when a configuration is invalid for the model (e.g. quantized V cache without flash attention)."""


class NoFitError(FitquantError):
    """Raised when nothing fits; `plan` is the refused Plan: every candidate with its reason, and the alternatives;
    `attempts` the launches tried before giving up (empty when nothing was started)."""

    # `plan: Any`, not launcher.plan.Plan: the errors are the bottom layer and import nothing above them (the plan
    # raises them). A caller that needs the type narrows it: `isinstance(exc.plan, Plan)`.
    def __init__(self, message: str, *, plan: Any, attempts: Sequence[Attempt] = ()) -> None:
        super().__init__(message)
        self.plan = plan
        self.attempts: list[Attempt] = list(attempts)

    @property
    def candidates(self) -> list[Any]:
        """The refused plan's options (launcher.plan.Option) at the target context, best quality first."""
        candidates: list[Any] = self.plan.candidates
        return candidates


class EngineError(FitquantError):
    """Raised when llama.cpp cannot load or measure a model."""


class FetchError(FitquantError):
    """Raised when a model file cannot be downloaded, does not fit on disk, or fails its hash check."""


class BackendError(FitquantError):
    """Raised when a runtime fails to start, answer or load a model."""


class RunFailed(BackendError):
    """Raised when a launch ended for a cause no smaller configuration fixes (the server rejected a request, or
    was not ready in time); `attempts` are every launch tried, the last one saying why."""

    def __init__(self, message: str, *, attempts: Sequence[Attempt] = ()) -> None:
        super().__init__(message)
        self.attempts: list[Attempt] = list(attempts)


class VerifyError(FitquantError):
    """Raised when a launched model's placement cannot be established."""


class ProfileError(FitquantError):
    """Raised when a profile file is invalid; the message names file, line and field."""


class ServiceError(FitquantError):
    """Raised when a service unit cannot be written or installed."""
