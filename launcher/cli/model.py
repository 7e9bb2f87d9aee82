"""fitquant inspect and estimate: one model file, its facts and its memory at one configuration."""

from __future__ import annotations

import click

from launcher.cli import options
from launcher.cli.render import print_json
from launcher.defaults import DEFAULT_UBATCH


@click.command()
@click.argument("model", required=False)
@options.json_option("Print machine-readable JSON.")
def inspect(model: str | None, as_json: bool) -> None:
    """Show what a GGUF model's header means for memory (no download: header only).

    MODEL is a local .gguf path or an http(s) URL; without it, the embedded default model.
    """
    from launcher import read_model_facts
    from launcher.model import facts_to_json

    facts = read_model_facts(model)
    data = facts_to_json(facts)
    if as_json:
        print_json(data)
        return
    from launcher.cli.render import render_facts

    render_facts(facts, data)


@click.command()
@click.argument("model", required=False)
@click.option(
    "--ctx", "n_ctx", callback=options.context, help="Context in tokens: 32768, 32k, 128K. Default: the model's."
)
@options.kv_options
@click.option("--ngl", callback=options.layer_count,
              help="Layers to offload to the GPU: a number or 'all'. Default: all with a GPU.")  # fmt: skip
@options.parallel_option("Parallel sequences (slots).")
@click.option("--kv-unified/--no-kv-unified", default=None,
              help="One KV buffer shared by all slots (llama-server's default with several slots).")  # fmt: skip
@click.option("--flash-attn", type=click.Choice(["on", "off", "auto"]),
              help="Flash attention. Default: on for a quantized V cache (which needs it), else auto.")  # fmt: skip
@click.option("--swa-full", is_flag=True, help="Full-size cache for sliding-window layers.")
@click.option("--ubatch", "n_ubatch", type=click.IntRange(min=1), default=DEFAULT_UBATCH, show_default=True,
              help="Physical batch size (n_ubatch).")  # fmt: skip
@click.option("--all-logits", is_flag=True,
              help="Logits for every prompt token (the llama.cpp library's default, llama-cpp-python's server) "
                   "rather than one per slot (llama-server).")  # fmt: skip
@options.gpu_options
@options.reserve_option
@options.json_option()
def estimate(
    model: str | None,
    n_ctx: int | None,
    kv: str,
    kv_k: str | None,
    kv_v: str | None,
    ngl: int | None,
    n_parallel: int,
    kv_unified: bool | None,
    flash_attn: str | None,
    swa_full: bool,
    n_ubatch: int,
    all_logits: bool,
    vram: list[int] | None,
    unified: int | None,
    reserve: int,
    as_json: bool,
) -> None:
    """Estimate the memory a llama.cpp configuration needs, per device and per component.

    MODEL is a local .gguf path or an http(s) URL; without it, the embedded default model. With several
    GPUs, layers are split by each GPU's memory less --reserve, as `fitquant plan` tells llama.cpp to.
    """
    from launcher import read_model_facts
    from launcher.estimate import default_settings
    from launcher.estimate import estimate as estimate_bytes
    from launcher.hardware import resolve_machine
    from launcher.plan import budgets_for, layer_split

    facts = read_model_facts(model)
    try:
        machine = resolve_machine(vram=vram, unified=unified)
    except ValueError as exc:  # a described machine that cannot be: --vram and --unified together
        raise click.UsageError(str(exc)) from None
    gpus = layer_split(budgets_for(machine.devices, ram_available_bytes=None, reserve_bytes=reserve))
    settings = default_settings(
        facts, has_gpu=bool(gpus), n_ctx=n_ctx, type_k=kv_k or kv, type_v=kv_v or kv, flash_attn=flash_attn,
        n_gpu_layers=ngl, n_parallel=n_parallel, kv_unified=kv_unified, swa_full=swa_full, n_ubatch=n_ubatch,
        n_outputs_max=0 if all_logits else n_parallel,
    )  # fmt: skip
    result = estimate_bytes(facts, settings, gpus=gpus)
    if as_json:
        print_json(result.to_json())
        return
    from launcher.cli.render import render_estimate

    render_estimate(result)
