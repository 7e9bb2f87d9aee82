"""fitquant: run the best GGUF quant of a model that fits entirely on this machine's GPU.

The library is the product; the `fitquant` command is a thin shell over it. The pipeline verbs and
types are exported here and imported lazily, so `import launcher` (and `fitquant --help`) stays instant.

    header = read_header("model.gguf")            # or an http(s) URL: only the header is fetched
    facts = model_facts(header)                   # what memory depends on, per layer
    result = estimate(facts, Settings(n_ctx=32768, type_k="q8_0", type_v="q8_0"), gpus=[GPU("GPU0")])
    machine = detect_hardware()                   # or describe_machine(vram=[12 * 2**30])
    plan = fit("unsloth/Qwen3-14B-GGUF", Policy(n_ctx=32768), machine=machine)  # choose, confirm, explain
    backend = choose_backend("auto")                                     # the one run path `run` and `serve` use:
    machine, _ = run_machine(backend)
    result = start(RunSpec("qwen3:14b", Policy(n_ctx=32768)), backend=backend, machine=machine)  # plan, launch,
    ...                                                                  # verify, step down, record, register
    stop(result, backend)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from launcher.version import __version__ as __version__

if TYPE_CHECKING:
    from launcher.estimate import GPU, MemoryEstimate, Settings
    from launcher.model import ModelFacts

# name -> module that defines it
_EXPORTS = {
    "read_header": "launcher.gguf",
    "parse_header": "launcher.gguf",
    "GGUFHeader": "launcher.gguf",
    "TensorInfo": "launcher.gguf",
    "model_facts": "launcher.model",
    "ModelFacts": "launcher.model",
    "estimate": "launcher.estimate",
    "Settings": "launcher.estimate",
    "GPU": "launcher.estimate",
    "MemoryEstimate": "launcher.estimate",
    "detect_hardware": "launcher.hardware",
    "describe_machine": "launcher.hardware",
    "HardwareSnapshot": "launcher.hardware",
    "measure": "launcher.measure.dryrun",
    "EngineSettings": "launcher.measure.dryrun",
    "EngineMeasurement": "launcher.measure.dryrun",
    "embedded_model_path": "launcher.embedded",
    "list_candidates": "launcher.catalog",
    "Candidate": "launcher.catalog.types",
    "fit": "launcher.fit",
    "make_plan": "launcher.plan",
    "Policy": "launcher.plan",
    "Plan": "launcher.plan",
    "RunSpec": "launcher.run",
    "RunResult": "launcher.run",
    "choose_backend": "launcher.run",
    "run_machine": "launcher.run",
    "start": "launcher.run",
    "stop": "launcher.run",
    "RunFailed": "launcher.errors",
    "CatalogError": "launcher.errors",
    "NoFitError": "launcher.errors",
    "FitquantError": "launcher.errors",
    "GGUFFormatError": "launcher.errors",
    "ModelError": "launcher.errors",
    "EstimateError": "launcher.errors",
    "HardwareError": "launcher.errors",
    "EngineError": "launcher.errors",
}

__all__ = sorted([*_EXPORTS, "read_model_facts", "estimate_memory"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'launcher' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def read_model_facts(model: str | None = None) -> ModelFacts:
    """Facts of a model: a local GGUF path, an http(s) URL (a Hub file page too), or None for the embedded model."""
    from launcher.gguf import read_header
    from launcher.http import hf_auth, is_url
    from launcher.model import model_facts

    if model is None:
        from launcher.embedded import embedded_model_path

        model = str(embedded_model_path())
    elif is_url(model):
        from launcher.catalog import file_url

        model = file_url(model)
    return model_facts(read_header(model, auth=hf_auth()))  # a URL: HF_TOKEN goes to the Hub's host only


def estimate_memory(
    model: str | None = None, settings: Settings | None = None, *, gpus: list[GPU] | None = None
) -> MemoryEstimate:
    """Bytes per device of running `model` with `settings` (default: fitquant's defaults at the model's context)."""
    from launcher.estimate import default_settings, estimate

    facts = read_model_facts(model)
    return estimate(facts, settings or default_settings(facts, has_gpu=bool(gpus)), gpus=gpus)
