"""Backends: the runtimes a plan is launched on, behind one small protocol (base.Backend).

    base.py         the protocol, LaunchRequest, Instance, AttemptFailed
    llamacpp.py     llama-server, or llama-cpp-python's OpenAI-compatible server
    ollama.py       an Ollama server, through the `ollama` package
    ollama_form.py  the plan's Ollama form, model names, the server's KV type from a measured size (pure)
    process.py      child processes that never outlive fitquant
    builds.py       where scripts/build-llama-cpp caches llama-server and ggml-rpc-server

`launch_forms(plan)` renders every built-in backend's `launch_form` for the plan JSON.

Others add a backend with an entry point in the group `fitquant.backends` naming a class (or factory)
whose instances follow base.Backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from launcher.errors import BackendError

if TYPE_CHECKING:
    from launcher.backends.base import Backend
    from launcher.plan import Plan

ENTRY_POINT_GROUP = "fitquant.backends"
# ours, also when the package's entry points are not installed (running from a source tree)
_BUILTIN = {
    "llamacpp": "launcher.backends.llamacpp:LlamaCppBackend",
    "ollama": "launcher.backends.ollama:OllamaBackend",
}


def backend_names() -> list[str]:
    """Every backend name: ours first, then those other packages register."""
    from importlib.metadata import entry_points

    names = list(_BUILTIN)
    names += sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in _BUILTIN)
    return names


def load_backend(name: str, **options: object) -> Backend:
    """An instance of the backend registered as `name`; BackendError naming the known ones otherwise."""
    from importlib import import_module
    from importlib.metadata import entry_points

    target = next((ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name), None)
    target = target or _BUILTIN.get(name)
    if target is None:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(backend_names())}")
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise BackendError(f"backend {name!r} ({target}) cannot be loaded: {exc}") from None
    backend: Backend = factory(**options)
    return backend


#: The backend whose launch form each of the plan JSON's launch-form keys holds (launcher.plan.LAUNCH_FORM_KEYS).
PLAN_JSON_FORMS = {"llama_server_argv": "llamacpp", "ollama": "ollama"}


def launch_forms(plan: Plan, *, host: str = "127.0.0.1", port: int = 8080) -> dict[str, Any]:
    """How each runtime starts the plan's choice, under its plan JSON key: `plan.to_json(launch_forms=...)`.

    Each form is its backend's `launch_form` (pure: constructing a backend probes no server and finds no binary);
    empty when nothing is chosen.
    """
    if plan.chosen is None:
        return {}
    return {key: load_backend(name).launch_form(plan, host=host, port=port) for key, name in PLAN_JSON_FORMS.items()}
