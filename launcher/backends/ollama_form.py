"""The Ollama form of a plan, and what Ollama's answers mean for it: pure functions, no server, no network.

- `ollama_form(plan, option)`: the rendering the plan JSON shows (model name, per-slot `num_ctx`, `num_gpu`,
  `num_batch` = the plan's ubatch, the server environment, a Modelfile); `OllamaBackend.launch_form` returns it.
- Names: `local_model_name` (the `fitquant/<file stem>:<quant>` a local GGUF is created under),
  `derived_model_name` (the model that carries the plan's options as its parameters), `same_model` (two spellings
  of one Ollama name), `keep_alive_value` (a keep-alive as Ollama's api.Duration reads it).
- Ollama's KV cache type is global to its server and reported by no API but its log: `kv_type_sizes` predicts
  /api/ps `size` for each cache type (the GPU side alone at a full offload), `infer_kv_type` picks the one a
  measured size matches or says it cannot tell, and `kv_type_note` says how to set the plan's type when the server
  runs another.

The server lifecycle (pull, create, load, verify, our own `ollama serve`) is `launcher.backends.ollama`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import EstimateError

if TYPE_CHECKING:
    from launcher.catalog.types import Candidate, CandidateFile
    from launcher.estimate import GPU
    from launcher.plan import Option, Plan

__all__ = [
    "KV_TYPES",
    "derived_model_name",
    "infer_kv_type",
    "keep_alive_value",
    "kv_type_note",
    "kv_type_sizes",
    "local_model_name",
    "ollama_form",
    "same_model",
]

#: Ollama's OLLAMA_KV_CACHE_TYPE values (envconfig): one type for K and V, for the whole server.
KV_TYPES = ("f16", "q8_0", "q4_0")
_NAME_PART = re.compile(r"[^a-z0-9_.-]+")


def ollama_form(plan: Plan, option: Option | None = None) -> dict[str, Any]:
    """The Ollama form of `option` (default: the plan's choice): model name, request options, server
    environment and Modelfile."""
    c = option or plan.chosen
    if c is None:
        raise ValueError("the plan has no chosen configuration")
    p = plan.policy
    first = c.candidate.files[0] if c.candidate.files else None
    name = c.candidate.ollama_model or (first.local_path if first and first.local_path else c.candidate.model)
    per_slot = c.n_ctx // max(1, p.n_parallel)
    # Ollama passes -c num_ctx x num_parallel to llama-server: num_ctx is per slot. -b and -ub are both num_batch;
    # unsent, Ollama picks 1024 above a 4096 total context and 2048 above 32768 (sched.go automaticGenerationBatch),
    # a compute buffer the plan did not count: always the plan's ubatch.
    # draft_num_predict 0: no draft or MTP model beside the main one, which Ollama loads on its own where the model
    # has one (llm/llama_server.go appendDraftArgs) and the plan does not count.
    options = {"num_ctx": per_slot, "num_gpu": c.n_gpu_layers, "num_batch": c.estimate.settings.n_ubatch,
               "draft_num_predict": 0}  # fmt: skip
    env = {
        "OLLAMA_KV_CACHE_TYPE": p.type_k,
        "OLLAMA_FLASH_ATTENTION": "1" if c.estimate.flash_attn else "0",
        "OLLAMA_NUM_PARALLEL": str(p.n_parallel),
        # a request without num_ctx (every /v1 call) gets this instead of the VRAM tier (routes.go modelOptions)
        "OLLAMA_CONTEXT_LENGTH": str(per_slot),
    }
    if sum(1 for d in c.estimate.devices if d.name != "CPU" and d.layers) > 1:
        # without it Ollama puts a model it thinks fits in 80% of one GPU there (sched.go selectLlamaServerPlacement)
        env["OLLAMA_SCHED_SPREAD"] = "1"
    notes = []
    if p.type_k != p.type_v:
        notes.append("Ollama has one KV cache type for K and V; OLLAMA_KV_CACHE_TYPE uses the K type")
    if c.cpu_moe:
        notes.append("Ollama cannot pin MoE experts to the CPU; use llama-server for this plan")
    if c.candidate.projector is not None and not p.vision:
        # llm/llama_server.go appendMMProjArgs: the projector is loaded whenever the model has one
        notes.append("Ollama loads this model's vision projector on its own, which this plan does not count; "
                     "plan with --vision to count it")  # fmt: skip
    modelfile = f"FROM {name}\n" + "".join(f"PARAMETER {k} {v}\n" for k, v in options.items())
    return {"model": name, "options": options, "env": env, "modelfile": modelfile, "notes": notes}


def derived_model_name(base: str, options: Mapping[str, Any]) -> str:
    """The name of the model fitquant derives from `base` to carry the plan's options as its parameters
    (`/api/create` with `from`, no blob copied): `fitquant/<model>:<tag>-c<num_ctx>-g<num_gpu>-b<num_batch>`, so
    that a request without options (an OpenAI-style one) loads what was verified ("qwen3:14b", 8192, 41, 512 ->
    "fitquant/qwen3:14b-c8192-g41-b512")."""
    path, tag = _canonical(base).rsplit(":", 1)
    parts = path.split("/")
    if len(parts) > 1 and "." in parts[0]:  # a host (hf.co, registry.example.com)
        parts = parts[1:]
    if len(parts) > 1 and parts[0] == "fitquant":
        parts = parts[1:]
    model = _name_part("-".join(parts)) or "model"
    letters = {"num_ctx": "c", "num_gpu": "g", "num_batch": "b"}
    suffix = _name_part("-".join(f"{letter}{options[key]}" for key, letter in letters.items() if key in options))
    head = _name_part(tag)[: max(1, 79 - len(suffix))].rstrip("-.")
    return f"fitquant/{model}:{head}-{suffix}"


# ---------------------------------------------------------------------------------------------------------------
# Names


def keep_alive_value(value: str | float | None) -> float | str | None:
    """`keep_alive` as Ollama's api.Duration reads it: a bare number is seconds (negative: forever) and must be
    sent as a JSON number, since Go's time.ParseDuration refuses "-1" without a unit; "30m", "24h" stay strings."""
    if value is None or isinstance(value, (int, float)):
        return value
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        return text


def local_model_name(candidate: Candidate) -> str:
    """The Ollama name fitquant creates a GGUF file under: `fitquant/<file stem>:<quant>`, lower case, only the
    characters Ollama's names allow, the quant dropped from the end of the stem ("Gemma-3-Q4_K_M.gguf", Q4_K_M ->
    "fitquant/gemma-3:q4_k_m")."""
    first = candidate.files[0] if candidate.files else None
    stem = create_file_name(first) if first else candidate.model
    stem = re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    stem = re.sub(r"-0*1-of-\d+$", "", stem)  # first shard of a split set
    quant = candidate.quant.lower()
    lowered = stem.lower()
    for sep in ("-", "_", "."):
        if lowered.endswith(sep + quant):
            lowered = lowered[: -len(quant) - 1]
            break
    model = _name_part(lowered) or "model"
    tag = _name_part(quant) or "latest"
    return f"fitquant/{model}:{tag}"


def create_file_name(f: CandidateFile) -> str:
    """The file's name in a /api/create `files` map: its own name (a repository path's last part) when that is a
    .gguf, else its local file's (a downloaded blob's may be `sha256-<hex>`), with .gguf added when neither has it."""
    for name in (Path(f.name).name, Path(f.local_path).name if f.local_path else ""):
        if name.lower().endswith(".gguf"):
            return name
    return f"{Path(f.local_path or f.name).name}.gguf"


def _name_part(text: str) -> str:
    part = re.sub(r"-{2,}", "-", _NAME_PART.sub("-", text.lower()))
    part = re.sub(r"^[^a-z0-9_]+", "", part)
    return part[:80].rstrip("-.")


def _canonical(name: str) -> str:
    n = name.strip().lower()
    for prefix in ("registry.ollama.ai/library/", "registry.ollama.ai/", "library/"):
        if n.startswith(prefix):
            n = n[len(prefix) :]
    if ":" not in n.rsplit("/", 1)[-1]:
        n += ":latest"
    return n


def same_model(a: str, b: str) -> bool:
    """Whether two Ollama names name one model (`llama3.2` == `llama3.2:latest` == `library/llama3.2:latest`)."""
    return _canonical(a) == _canonical(b)


# ---------------------------------------------------------------------------------------------------------------
# The server's KV cache type, from a measured size


def kv_type_sizes(
    option: Option, gpus: list[GPU] | None = None, *, types: tuple[str, ...] = KV_TYPES, gpu_only: bool = False
) -> dict[str, int]:
    """What Ollama's /api/ps `size` should be for `option` with each KV cache type (K and V alike, as Ollama sets
    them): the estimate's buffers (weights, KV cache, recurrent state, compute, output) without the runtime overhead
    no buffer holds. `gpu_only`: the GPUs' buffers alone, which is all `size` counts at a full offload (Ollama's
    MemorySize drops the host's token embeddings and buffers then). The plan's own type is always included; a type
    the model cannot take is left out."""
    from launcher.estimate import estimate

    settings = option.estimate.settings
    if gpus is None:
        gpus = _gpus_of(option)
    out: dict[str, int] = {}
    for kv_type in dict.fromkeys((settings.type_k, *types)):
        quantized = kv_type not in ("f16", "f32", "bf16")
        try:
            e = estimate(
                option.facts,
                replace(
                    settings, type_k=kv_type, type_v=kv_type, flash_attn="on" if quantized else settings.flash_attn
                ),
                gpus=gpus,
            )
        except EstimateError:
            continue
        devices = [d for d in e.devices if d.name != "CPU"] if gpu_only else e.devices
        out[kv_type] = sum(d.total_bytes - d.overhead_bytes for d in devices)
    return out


def _gpus_of(option: Option) -> list[GPU]:
    """The GPUs of the option's estimate, weighted by the layers each holds (the plan's split)."""
    from launcher.estimate import GPU

    return [
        GPU(d.name, split_weight=max(1, len(d.layers)), backend=d.backend)
        for d in option.estimate.devices
        if d.name != "CPU"
    ]


def infer_kv_type(measured: int, sizes: Mapping[str, int]) -> str | None:
    """The KV cache type whose predicted size is closest to `measured`, when the types can be told apart: the two
    closest predictions differ by at least 2% of the measurement, and the measurement lies between the predictions
    or beyond the nearest end by at most a quarter of the gap to its neighbour (farther out, a miss in the other
    buffers, compute above all, explains it as well as a cache type). None otherwise: it cannot tell."""
    if measured <= 0 or len(sizes) < 2:
        return None
    ranked = sorted(sizes.items(), key=lambda item: abs(item[1] - measured))
    (best, best_size), (_, second_size) = ranked[0], ranked[1]
    gap = abs(best_size - second_size)
    if gap < 0.02 * measured or abs(measured - best_size) > gap:
        return None
    low, high = min(sizes.values()), max(sizes.values())
    if (measured < low or measured > high) and abs(measured - best_size) > gap / 4:
        return None
    return best


def kv_type_note(
    measured: int, sizes: Mapping[str, int], inferred: str, planned: str, *, own_server: bool
) -> str | None:
    """One line saying the server's KV cache type is not the plan's and how to fix it; None when it is."""
    from launcher.units import format_bytes

    if inferred == planned:
        return None
    seen = f"measured {format_bytes(measured)} matches {inferred}'s {format_bytes(sizes[inferred])}"
    if planned in sizes:
        seen += f"; {planned} planned {format_bytes(sizes[planned])}"
    if own_server:
        return (
            f"this Ollama server runs an {inferred} KV cache although fitquant started it with "
            f"OLLAMA_KV_CACHE_TYPE={planned} ({seen}): its log names no llama-server command, so it is an Ollama "
            f"before v0.30, which ignores a {planned} cache where it cannot use flash attention; update Ollama"
        )
    setting = f"OLLAMA_KV_CACHE_TYPE={planned}"
    if planned not in ("f16", "f32", "bf16"):
        setting += " and OLLAMA_FLASH_ATTENTION=1"
    return (
        f"this Ollama server runs an {inferred} KV cache ({seen}): set {setting} in the server's environment "
        "(for the systemd service: a drop-in ollama.service.d/fitquant.conf), then restart it"
    )
