"""fitquant plan and quants: every quant of a model, and the best one for a machine."""

from __future__ import annotations

import click

from launcher.cli import options
from launcher.cli.render import print_json
from launcher.cli.run import _rpc_list
from launcher.defaults import DEFAULT_PLAN_CONTEXT, DEFAULT_SERVER_PORT


@click.command()
@click.argument("model", required=False)
@click.option("--ctx", "n_ctx", callback=options.context, default=str(DEFAULT_PLAN_CONTEXT), show_default=True,
              help="Target context in tokens: 32768, 32k, 128K.")  # fmt: skip
@options.kv_options
@options.parallel_option("Parallel sequences (slots); the context is shared between them.")
@options.gpu_options
@options.gpu_name_option
@options.ram_option
@options.reserve_option
@click.option(
    "--min-quant", callback=options.quality_floor, help="Quality floor, e.g. Q4_K_M (default: by model size)."
)
@click.option("--strict", is_flag=True, help="Accept nothing but a full fit at the target context.")
@click.option("--min-speed", "min_speed", type=click.FloatRange(min=0, min_open=True, max=1e6), metavar="T",
              help="The best quant predicted to decode T tokens/s or more at the target context.")  # fmt: skip
@click.option("--prefer", type=click.Choice(["quality", "speed"]), default="quality", show_default=True,
              help="quality: the best quant that fits; speed: the fastest above the quality floor.")  # fmt: skip
@click.option("--vision/--no-vision", default=False, help="Count the vision projector (mmproj) when there is one.")
@click.option("--engine/--no-engine", default=True, show_default=True,
              help="Confirm the choice with a llama.cpp dry run when llama-cpp-python is installed.")  # fmt: skip
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_SERVER_PORT, show_default=True,
              help="llama-server port.")  # fmt: skip
@click.option("--rpc", callback=_rpc_list, metavar="HOST:PORT[,HOST:PORT]",
              help="llama.cpp RPC servers whose devices join this machine, planned like GPUs.")  # fmt: skip
@click.option("--profile", "profile_ref", metavar="PATH|NAME",
              help="Plan for the machine a profile describes: its devices, reserve, defaults and models; "
                   "flags given here still win.")  # fmt: skip
@options.json_option("Print the Plan as JSON (docs/plan.schema.json).")
def plan(
    model: str | None,
    n_ctx: int,
    kv: str,
    kv_k: str | None,
    kv_v: str | None,
    n_parallel: int,
    vram: list[int] | None,
    ram: int | None,
    unified: int | None,
    gpu_name: list[str] | None,
    reserve: int,
    min_quant: str | None,
    strict: bool,
    min_speed: float | None,
    prefer: str,
    vision: bool,
    engine: bool,
    port: int,
    rpc: tuple[str, ...],
    profile_ref: str | None,
    as_json: bool,
) -> None:
    """Choose the best quant, context and offload for this machine, explain why, and show how to launch it.

    MODEL: a local .gguf file or folder of quants, hf.co/user/repo, an Ollama name (qwen3:14b), or
    nothing for the embedded default model.
    """
    from launcher.backends import launch_forms
    from launcher.errors import NoFitError
    from launcher.plan import Plan, Policy

    policy = Policy(n_ctx=n_ctx, type_k=kv_k or kv, type_v=kv_v or kv, n_parallel=n_parallel, reserve_bytes=reserve,
                    min_quant=min_quant, strict=strict, vision=vision, min_tg_per_s=min_speed,
                    prefer=prefer)  # fmt: skip
    if rpc and profile_ref is not None:
        raise click.UsageError(
            "--rpc and --profile: give the RPC servers in the profile's rpc: list, or drop --profile"
        )
    if profile_ref is None:
        # the machine `run` would plan for; RPC devices described by --vram, else as llama-server lists them
        from launcher.run import choose_backend, run_machine

        lister = choose_backend("llamacpp", rpc=rpc) if rpc and vram is None else None
        try:
            machine, _ = run_machine(lister, vram=vram, ram=ram, unified=unified, rpc=rpc, gpu_names=gpu_name)
        except ValueError as exc:  # a described machine that cannot be: --vram and --unified together, ...
            raise click.UsageError(str(exc)) from None
    else:
        from launcher.cli.profile import with_profile

        model, policy, machine, port, rpc = with_profile(profile_ref, model, policy, port)

    def show(result: Plan) -> None:
        forms = launch_forms(result, port=port)
        if rpc and forms.get("llama_server_argv"):
            from launcher.backends.llamacpp import with_rpc

            forms["llama_server_argv"] = with_rpc(forms["llama_server_argv"], rpc)
        if as_json:
            print_json(result.to_json(launch_forms=forms))
        else:
            from launcher.cli.render import render_plan

            render_plan(result, forms=forms)

    from launcher.run import RunSpec, plan_runs, planning_backend

    # planned as `run` plans it: what the server it would start does by default that changes memory (logits rows,
    # SWA cache, repacking), a K/V pair its build runs on the GPU, what was measured here before
    backend = planning_backend("llamacpp" if rpc else "auto")
    try:
        [result] = plan_runs([RunSpec(model, policy, confirm=engine)], backend=backend, machine=machine)
    except NoFitError as refused:
        show(refused.plan)  # what was refused and why, then the error line
        raise
    show(result)


@click.command()
@click.argument("model", required=False)
@options.json_option()
@click.option("--refresh", is_flag=True, help="List the model's source again instead of using the cached listing.")
@click.option("--offline", is_flag=True, help="Use only cached listings and headers (no network).")
def quants(model: str | None, as_json: bool, refresh: bool, offline: bool) -> None:
    """List every quant of a model: size, bits per weight, quality rank, KLD (headers only, no download).

    MODEL is an Ollama name (qwen3:14b), a Hugging Face repository (user/repo or hf.co/user/repo[:QUANT]),
    ollama://name[:tag] for a local Ollama server, or a local .gguf file, split set or folder;
    without it, the embedded default model.
    """
    from launcher.catalog import candidates_to_json, list_candidates

    data = candidates_to_json(model, list_candidates(model, refresh=refresh, offline=offline))
    if as_json:
        print_json(data)
        return
    from launcher.cli.render import render_quants

    render_quants(data)
