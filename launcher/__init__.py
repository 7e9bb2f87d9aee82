"""fitquant: run the best GGUF quant of a model that fits entirely on this machine's GPU.

The library is the product; the `fitquant` command is a thin shell over it. Pipeline verbs are
exported here and imported lazily so that `import launcher` (and `fitquant --help`) stays instant.
"""

from __future__ import annotations

__version__ = "0.1.0"


def read_model_facts(model: str | None = None):  # -> launcher.model.ModelFacts
    """Header and facts of a model: a local GGUF path, an http(s) URL, or None for the embedded default."""
    from launcher.gguf import read_header
    from launcher.model import model_facts

    if model is None:
        from launcher.embedded import embedded_model_path

        model = str(embedded_model_path())
    return model_facts(read_header(model))


def estimate_memory(model: str | None = None, settings=None, *, gpus=None):  # -> MemoryEstimate
    """Estimate the bytes per device of running `model` with `settings` (launcher.estimate.Settings)."""
    from launcher.estimate import Settings, estimate

    facts = read_model_facts(model)
    return estimate(facts, settings or Settings(n_ctx=facts.n_ctx_train or 4096), gpus=gpus)
