"""fitquant verify: read a llama.cpp load log and say where the model landed (and, given the model, what the plan
predicted for the same settings)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from launcher.cli import options
from launcher.cli.render import print_json

if TYPE_CHECKING:
    from launcher.estimate import GPU, Settings
    from launcher.model import ModelFacts
    from launcher.verify import Placement

# llama.cpp device name prefix -> the estimate's backend (launcher.estimate.RUNTIME_OVERHEAD_BYTES keys)
_BACKENDS = (("CUDA", "cuda"), ("ROCm", "rocm"), ("HIP", "rocm"), ("Metal", "metal"), ("MTL", "metal"),
             ("RPC", "rpc"), ("Vulkan", "vulkan"))  # fmt: skip


def _expected(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    from launcher.verify import EXIT_STATUS

    if value is None:
        return ()
    verdicts = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in verdicts if v not in EXIT_STATUS]
    if unknown or not verdicts:
        raise click.BadParameter(f"{', '.join(unknown) or value!r} is not a verdict; use {', '.join(EXIT_STATUS)}")
    return verdicts


@click.command()
@click.argument("log", metavar="LOG|-")
@click.option("--model", help="The GGUF the log loaded (path or URL): exact host allowance and the prediction beside.")
@click.option("--ctx", "n_ctx", callback=options.context,
              help="Context to predict for (32768, 32k). Default: the log's n_ctx.")  # fmt: skip
@click.option("--expect", metavar="VERDICT[,VERDICT]", callback=_expected,
              help="Verdicts that exit 0 (default: gpu): gpu, spill, cpu-only, oom, incomplete.")  # fmt: skip
@options.json_option("Print the placement as JSON (sizes in bytes).")
@click.pass_context
def verify(
    ctx: click.Context, log: str, model: str | None, n_ctx: int | None, expect: tuple[str, ...], as_json: bool
) -> None:
    """Say where a model landed from llama.cpp's load log: 100% GPU, spill, CPU only or out of memory.

    LOG is a llama-server / llama-cli / Ollama log file, or - for standard input. The last model load in it
    decides. With --model, the plan's per-device prediction for the log's settings is shown beside the measurement.

    Exit status: 0 for a 100% GPU load (or a verdict --expect names), 3 spill, 4 CPU only, 5 out of memory,
    6 incomplete (the log does not show the load, or cannot tell); 1 a fitquant error, 2 a usage error.
    """
    from launcher.verify import exit_status, placement_from_log

    text = _read_log(log)
    placement = placement_from_log(text) if model is None else _with_prediction(text, model, n_ctx)
    if as_json:
        print_json(placement.to_json())
    else:
        from launcher.cli.render import render_placement

        render_placement(placement)
        click.echo(f"reason: {placement.reason}")
        from launcher.verify import splits_finding

        split = splits_finding(placement)  # all on the GPU by memory, yet compute moved to the CPU
        if split is not None:
            click.echo(split)
        if placement.errors:
            click.echo("failing lines:")
            for line in placement.errors:
                click.echo(f"  {line}")
    ctx.exit(exit_status(placement.verdict, expect))


def _read_log(log: str) -> str:
    from launcher.errors import VerifyError

    try:
        with click.open_file(log, encoding="utf-8", errors="replace") as f:  # "-" is standard input
            text: str = f.read()
            return text
    except OSError as exc:
        raise VerifyError(f"cannot read the log {log}: {exc.strerror or exc}") from None


def _with_prediction(text: str, model: str, n_ctx: int | None) -> Placement:
    from launcher import read_model_facts
    from launcher.estimate import estimate
    from launcher.verify import attach_prediction, placement_from_log

    facts = read_model_facts(model)
    placement = placement_from_log(text, token_embd_bytes=facts.input_bytes)
    gpus = _gpus(placement)
    result = estimate(facts, _settings(facts, placement, text, n_ctx, bool(gpus)), gpus=gpus)
    return attach_prediction(placement, result.devices)


def _gpus(placement: Placement) -> list[GPU]:
    """One estimate GPU per measured GPU device, split by the weights each one holds (as llama.cpp split them)."""
    from launcher.estimate import GPU

    gpus = []
    for device in placement.gpu_devices:
        backend = next((b for prefix, b in _BACKENDS if device.name.startswith(prefix)), "cuda")
        gpus.append(GPU(device.name, split_weight=float(max(device.model_bytes, 1)), backend=backend))
    return gpus


def _settings(facts: ModelFacts, placement: Placement, text: str, n_ctx: int | None, has_gpu: bool) -> Settings:
    """The configuration the log shows: offloaded layers, KV types, flash attention, context, slots, batches."""
    from launcher import llamalog
    from launcher.estimate import KV_CACHE_TYPES, default_settings
    from launcher.verify import strip_header

    log = llamalog.parse(strip_header(text))
    flash = {True: "on", False: "off"}.get(placement.flash_attn) if placement.flash_attn is not None else None
    # a full offload with more host weights than the embeddings is MoE experts kept on the CPU (--cpu-moe)
    full = placement.layers_on_gpu is not None and placement.layers_on_gpu == placement.layers_total
    cpu_moe = placement.verdict == "spill" and full and facts.expert_count > 0
    return default_settings(
        facts, has_gpu=has_gpu, n_ctx=n_ctx or placement.n_ctx,
        n_gpu_layers=placement.layers_on_gpu if has_gpu else 0,
        type_k=placement.type_k if placement.type_k in KV_CACHE_TYPES else None,
        type_v=placement.type_v if placement.type_v in KV_CACHE_TYPES else None,
        flash_attn=flash, n_parallel=placement.n_slots, kv_unified=log.kv_unified,
        n_batch=log.n_batch, n_ubatch=log.n_ubatch, cpu_moe=cpu_moe or None,
    )  # fmt: skip
