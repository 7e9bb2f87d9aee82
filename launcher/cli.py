"""The `fitquant` command: parse arguments, call the library, render a table or JSON.

This is the only module that imports click or rich or calls sys.exit. Library imports happen
inside commands so that `fitquant --help` stays instant.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from launcher.errors import FitquantError


class _Group(click.Group):
    """Turns every FitquantError into one red line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FitquantError as exc:
            if ctx.params.get("debug"):
                raise
            _error_line(exc)
            sys.exit(1)


def _error_line(exc: Exception) -> None:
    from rich.console import Console
    from rich.markup import escape

    # Name the documented error type, never a module's private subclass of it.
    name = next(cls.__name__ for cls in type(exc).__mro__ if not cls.__name__.startswith("_"))
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]{name}[/red]: {escape(str(exc))}")


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fitquant")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
def main(debug: bool) -> None:
    """Pick the best GGUF quant that fits entirely on this machine's GPU, start it, verify it."""


def _vram_sizes(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[int] | None:
    """--vram 12GiB or 24GiB,24GiB: one size per GPU, in bytes."""
    from launcher.hardware import parse_vram_list

    if value is None:
        return None
    try:
        return parse_vram_list(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _byte_size(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    """--ram 64GiB, --unified 32GiB: a positive size in bytes."""
    from launcher.units import parse_bytes

    if value is None:
        return None
    try:
        size = parse_bytes(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if size <= 0:
        raise click.BadParameter(f"{value!r} is not a usable size; it must be more than 0")
    return size


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (sizes in bytes).")
@click.option("--doctor", is_flag=True, help="Print every probe's raw readings as JSON, for bug reports.")
@click.option("--vram", callback=_vram_sizes, help="Describe GPUs instead of probing: 12GiB, or 24GiB,24GiB for two.")
@click.option("--ram", callback=_byte_size, help="Describe the host's RAM instead of probing: 64GiB.")
@click.option("--unified", callback=_byte_size, help="Describe an Apple Silicon Mac's unified memory: 32GiB.")
def hw(as_json: bool, doctor: bool, vram: list[int] | None, ram: int | None, unified: int | None) -> None:
    """Show the GPUs, the memory free on each now, RAM and CPU of this machine, or of a described one."""
    from launcher.hardware import collect_readings, describe_machine, detect_hardware

    described = vram is not None or ram is not None or unified is not None
    if doctor:
        if described:
            raise click.UsageError("--doctor reads this machine; it cannot be combined with --vram, --ram or --unified")
        _print_json(collect_readings())
        return
    if described:
        try:
            snapshot = describe_machine(vram=vram, ram=ram, unified=unified)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    else:
        snapshot = detect_hardware(probe_backends=True)
    if as_json:
        _print_json(snapshot.to_json())
        return
    _render_hardware(snapshot)


def _render_hardware(snapshot: Any) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from launcher.units import format_bytes

    def size(value: int | None) -> str:
        return "?" if value is None else format_bytes(value)

    console = Console(highlight=False)
    title = "Described machine" if snapshot.described else "This machine"
    if snapshot.devices:
        table = Table(title=title, title_justify="left")
        optional = {"compute": "compute_capability", "driver": "driver"}
        shown = [name for name, field in optional.items() if any(getattr(d, field) for d in snapshot.devices)]
        for column in ["#", "kind", "name", "total", "free", "used", "memory", *shown]:
            numeric = column in ("total", "free", "used")
            table.add_column(column, justify="right" if numeric else "left", no_wrap=numeric)
        for device in snapshot.devices:
            table.add_row(
                str(device.index), device.kind, escape(device.name), size(device.total_bytes),
                size(device.free_bytes), size(device.used_bytes),
                "unified" if device.unified else "dedicated",
                *(escape(getattr(device, optional[name]) or "") for name in shown),
            )  # fmt: skip
        console.print(table)
        for device in snapshot.devices:
            for process in device.processes or ():
                console.print(
                    f"  GPU {device.index}: pid {process.pid} {escape(process.name or '?')} "
                    f"holds {size(process.used_bytes)}"
                )
    else:
        console.print(f"{title}: no GPU")
    ram_total, ram_available = size(snapshot.ram_total_bytes), size(snapshot.ram_available_bytes)
    console.print(f"RAM: {ram_total} total, {ram_available} available")
    cpu = snapshot.cpu
    if cpu.model or cpu.logical_cores:
        cores = f"{cpu.physical_cores or '?'} cores, {cpu.logical_cores or '?'} threads"
        console.print(f"CPU: {escape(cpu.model or 'unknown')} ({cores})")
    if snapshot.backends is not None:
        offload = {True: "yes", False: "no (CPU-only build)", None: "not installed"}
        console.print(f"llama-cpp-python GPU offload: {offload[snapshot.backends.llama_cpp_gpu_offload]}")
        ollama = snapshot.backends.ollama
        console.print(f"Ollama: {ollama.version} at {ollama.url}" if ollama else "Ollama: not answering")
    for note in snapshot.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")


def _context(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    from launcher.units import parse_context

    if value is None:
        return None
    try:
        return parse_context(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _ngl(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    if value.lower() in ("all", "-1"):
        return -1
    try:
        number = int(value)
    except ValueError:
        number = -2
    if number < 0:
        raise click.BadParameter(f"{value!r} is not a layer count; write a number like 20, or 'all'")
    return number


_KV_TYPES = click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"])


@main.command()
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(model: str | None, as_json: bool) -> None:
    """Show what a GGUF model's header means for memory (no download: header only).

    MODEL is a local .gguf path or an http(s) URL; without it, the embedded default model.
    """
    from launcher import read_model_facts
    from launcher.model import facts_to_json

    facts = read_model_facts(model)
    data = facts_to_json(facts)
    if as_json:
        _print_json(data)
        return
    from rich.console import Console
    from rich.table import Table

    from launcher.units import format_bytes

    table = Table(title=f"{facts.source}", show_header=False, title_justify="left")
    rows = [
        ("architecture", f"{facts.architecture}" + ("" if facts.known else " (unknown: approximate)")),
        ("parameters", f"{facts.n_params / 1e9:.3f} B"),
        ("file type", str(data["file_type"])),
        ("tensor bytes", format_bytes(facts.tensor_bytes_total)),
        ("layers", str(facts.n_layer) + (f" ({facts.n_layer_nextn} MTP)" if facts.n_layer_nextn else "")),
        ("embedding / vocab", f"{facts.n_embd} / {facts.n_vocab}"),
        ("KV heads", _compact(facts.n_head_kv)),
        ("head size K / V", f"{facts.head_dim_k} / {facts.head_dim_v}"),
        ("training context", str(facts.n_ctx_train)),
    ]
    if facts.swa_type != "none":
        rows.append(("sliding window", f"{facts.sliding_window} ({facts.swa_type}) on {len(facts.swa_layers)} layers"))
    if facts.is_mla:
        rows.append(("MLA", f"K-only cache, kv_lora_rank {facts.kv_lora_rank}"))
    if facts.expert_count:
        rows.append(("experts", f"{facts.expert_used_count} of {facts.expert_count} per token"))
    if facts.recurrent_layers:
        rows.append(("recurrent layers", f"{len(facts.recurrent_layers)} (state {facts.n_embd_r}+{facts.n_embd_s})"))
    for key, value in rows:
        table.add_row(key, value)
    console = Console()
    console.print(table)
    for note in facts.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


def _compact(values: list[int]) -> str:
    if values and all(v == values[0] for v in values):
        return f"{values[0]} (all {len(values)} layers)"
    return ",".join(str(v) for v in values)


@main.command()
@click.argument("model", required=False)
@click.option("--ctx", "n_ctx", callback=_context, help="Context in tokens: 32768, 32k, 128K. Default: the model's.")
@click.option("--kv", "kv", type=_KV_TYPES, default="q8_0", show_default=True, help="KV cache type for K and V.")
@click.option("--kv-k", "kv_k", type=_KV_TYPES, help="K cache type (overrides --kv).")
@click.option("--kv-v", "kv_v", type=_KV_TYPES, help="V cache type (overrides --kv).")
@click.option("--ngl", callback=_ngl, help="Layers to offload to the GPU: a number or 'all'. Default: all with a GPU.")
@click.option("--parallel", "n_parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Parallel sequences (slots).")  # fmt: skip
@click.option("--kv-unified/--no-kv-unified", default=None,
              help="One KV buffer shared by all slots (llama-server's default with several slots).")  # fmt: skip
@click.option("--flash-attn", type=click.Choice(["on", "off", "auto"]), default="auto", show_default=True)
@click.option("--swa-full", is_flag=True, help="Full-size cache for sliding-window layers.")
@click.option("--ubatch", "n_ubatch", type=click.IntRange(min=1), default=512, show_default=True,
              help="Physical batch size (n_ubatch).")  # fmt: skip
@click.option("--vram", callback=_vram_sizes, help="Describe GPUs instead of probing: 12GiB, or 24GiB,24GiB.")
@click.option("--unified", callback=_byte_size, help="Describe an Apple Silicon Mac's unified memory: 32GiB.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (sizes in bytes).")
def estimate(
    model: str | None,
    n_ctx: int | None,
    kv: str,
    kv_k: str | None,
    kv_v: str | None,
    ngl: int | None,
    n_parallel: int,
    kv_unified: bool | None,
    flash_attn: str,
    swa_full: bool,
    n_ubatch: int,
    vram: list[int] | None,
    unified: int | None,
    as_json: bool,
) -> None:
    """Estimate the memory a llama.cpp configuration needs, per device and per component.

    MODEL is a local .gguf path or an http(s) URL; without it, the embedded default model.
    """
    from launcher import read_model_facts
    from launcher.estimate import Settings
    from launcher.estimate import estimate as estimate_bytes

    facts = read_model_facts(model)
    gpus = _gpus(vram, unified)
    settings = Settings(
        n_ctx=n_ctx or facts.n_ctx_train or 4096,
        type_k=kv_k or kv,
        type_v=kv_v or kv,
        flash_attn=flash_attn,
        n_gpu_layers=(-1 if gpus else 0) if ngl is None else ngl,
        n_parallel=n_parallel,
        kv_unified=(n_parallel > 1) if kv_unified is None else kv_unified,
        swa_full=swa_full,
        n_ubatch=n_ubatch,
    )
    result = estimate_bytes(facts, settings, gpus=gpus)
    if as_json:
        _print_json(result.to_json())
        return
    _render_estimate(result)


def _gpus(vram: list[int] | None, unified: int | None) -> list:
    """GPUs to place layers on: described with --vram/--unified, else probed (none on a CPU-only machine)."""
    from launcher.estimate import GPU
    from launcher.hardware import resolve_machine

    snapshot = resolve_machine(vram=vram, unified=unified)
    # Layers split by free memory, as llama.cpp does without --tensor-split (src/llama-model.cpp).
    return [GPU(f"GPU{d.index}", split_weight=d.free_bytes or 1, backend=d.kind) for d in snapshot.devices]


def _render_estimate(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from launcher.units import format_bytes

    s = result.settings
    title = (
        f"{result.model}\n{result.architecture}, ctx {result.n_ctx}"
        + (f" ({s.n_parallel} slots)" if s.n_parallel > 1 else "")
        + f", KV {s.type_k}/{s.type_v}, flash attention {'on' if result.flash_attn else 'off'}"
    )
    table = Table(title=title, title_justify="left")
    columns = [
        ("weights", "weights_bytes"),
        ("KV cache", "kv_bytes"),
        ("recurrent", "recurrent_bytes"),
        ("compute", "compute_bytes"),
        ("output", "output_bytes"),
        ("runtime", "overhead_bytes"),
        ("total", "total_bytes"),
    ]
    # Leave out components this configuration does not have (recurrent state, runtime overhead on CPU).
    columns = [(label, attr) for label, attr in columns if label in ("weights", "total") or getattr(result, attr)]
    table.add_column("device")
    for label, _ in columns:
        table.add_column(label, justify="right")
    for d in result.devices:
        table.add_row(d.name, *(format_bytes(getattr(d, attr)) for _, attr in columns))
    if len(result.devices) > 1:
        table.add_row("all", *(format_bytes(getattr(result, attr)) for _, attr in columns), style="bold")
    console = Console()
    console.print(table)
    for cache in result.kv_caches:
        console.print(
            f"KV cache {cache.kind}: {cache.cells} cells x {cache.n_stream} stream(s), {len(cache.layers)} layers, "
            f"K {format_bytes(cache.k_bytes)}, V {format_bytes(cache.v_bytes)}"
        )
    console.print(f"compute buffer: {result.compute_source}")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


def _reserve_size(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    from launcher.units import parse_bytes

    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.argument("model", required=False)
@click.option("--ctx", "n_ctx", callback=_context, default="8192", show_default=True,
              help="Target context in tokens: 32768, 32k, 128K.")  # fmt: skip
@click.option("--kv", "kv", type=_KV_TYPES, default="q8_0", show_default=True, help="KV cache type for K and V.")
@click.option("--kv-k", "kv_k", type=_KV_TYPES, help="K cache type (overrides --kv).")
@click.option("--kv-v", "kv_v", type=_KV_TYPES, help="V cache type (overrides --kv).")
@click.option("--parallel", "n_parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Parallel sequences (slots); the context is shared between them.")  # fmt: skip
@click.option("--vram", callback=_vram_sizes, help="Describe GPUs instead of probing: 12GiB, or 24GiB,24GiB.")
@click.option("--ram", callback=_byte_size, help="Describe the host's RAM instead of probing: 64GiB.")
@click.option("--unified", callback=_byte_size, help="Describe an Apple Silicon Mac's unified memory: 32GiB.")
@click.option("--reserve", callback=_reserve_size, default="1GiB", show_default=True,
              help="Memory to keep free on every device.")  # fmt: skip
@click.option("--min-quant", help="Quality floor, e.g. Q4_K_M (default: by model size).")
@click.option("--strict", is_flag=True, help="Accept nothing but a full fit at the target context.")
@click.option("--vision/--no-vision", default=False, help="Count the vision projector (mmproj) when there is one.")
@click.option("--engine/--no-engine", default=True, show_default=True,
              help="Confirm the choice with a llama.cpp dry run when llama-cpp-python is installed.")  # fmt: skip
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="llama-server port.")
@click.option("--json", "as_json", is_flag=True, help="Print the Plan as JSON (docs/plan.schema.json).")
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
    reserve: int,
    min_quant: str | None,
    strict: bool,
    vision: bool,
    engine: bool,
    port: int,
    as_json: bool,
) -> None:
    """Choose the best quant, context and offload for this machine, explain why, and show how to launch it.

    MODEL: a local .gguf file or folder of quants, hf.co/user/repo, an Ollama name (qwen3:14b), or
    nothing for the embedded default model.
    """
    from launcher.errors import NoFitError
    from launcher.fit import fit
    from launcher.hardware import resolve_machine
    from launcher.plan import Policy

    if min_quant is not None:
        from launcher.quants import known_labels, normalize_label

        min_quant = normalize_label(min_quant)
        if min_quant not in known_labels():
            raise click.BadParameter(
                f"{min_quant!r} is not a quant fitquant knows, e.g. Q4_K_M", param_hint="'--min-quant'"
            )
    kv_k, kv_v = kv_k or kv, kv_v or kv
    policy = Policy(
        n_ctx=n_ctx,
        type_k=kv_k,
        type_v=kv_v,
        flash_attn="on" if kv_v not in ("f32", "f16", "bf16") else "auto",
        n_parallel=n_parallel,
        reserve_bytes=reserve,
        min_quant=min_quant,
        strict=strict,
        vision=vision,
    )
    machine = resolve_machine(vram=vram, ram=ram, unified=unified)
    result = fit(model, policy, machine=machine, confirm=engine)
    if as_json:
        _print_json(result.to_json(port=port))
    else:
        _render_plan(result, port=port)
    if result.chosen is None:
        raise NoFitError(result.reason, candidates=result.candidates)


def _bar(option: Any, budget_bytes: int, width: int = 24) -> str:
    """A stacked bar of what the option needs on its busiest device against that device's budget."""
    est = option.estimate
    device = max(est.devices, key=lambda d: d.total_bytes)
    parts = [
        (device.weights_bytes, "█", "cyan"),
        (device.kv_bytes + device.recurrent_bytes, "█", "magenta"),
        (device.compute_bytes + device.output_bytes, "█", "yellow"),
        (device.overhead_bytes, "█", "white"),
    ]
    scale = max(budget_bytes, device.total_bytes, 1)
    out, used = "", 0
    for value, char, color in parts:
        cells = round(value / scale * width)
        cells = min(cells, width - used)
        if cells:
            out += f"[{color}]{char * cells}[/{color}]"
            used += cells
    out += "[dim]" + "·" * (width - used) + "[/dim]"
    return out + ("[red]▶[/red]" if device.total_bytes > budget_bytes else " ")


def _render_plan(result: Any, *, port: int) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from launcher.plan import llama_server_argv, ollama_config, shell_line
    from launcher.units import format_bytes

    console = Console()
    budget = max((b.usable_bytes for b in result.budgets), default=0)
    where = ", ".join(f"{b.name} {format_bytes(b.usable_bytes)} usable" for b in result.budgets)
    table = Table(title=f"{result.model} at {result.policy.n_ctx} tokens on {where}", title_justify="left")
    for column in ("quant", "file", "bpw", "needs", "weights KV compute runtime", "fits"):
        table.add_column(column, justify="right" if column in ("file", "bpw", "needs") else "left")
    for option in result.candidates:
        chosen = result.chosen is not None and option.quant == result.chosen.quant
        bpw = option.candidate.bits_per_weight
        fits = "[green]yes[/green]" if option.fits else "[red]no[/red]"
        if option.fits and not option.above_floor:
            fits = "[yellow]below floor[/yellow]"
        table.add_row(
            ("▶ " if chosen else "  ") + option.quant,
            format_bytes(option.candidate.size_bytes),
            f"{bpw:.2f}" if bpw else "-",
            format_bytes(max(option.needs.values())),
            _bar(option, budget),
            fits,
            style="bold green" if chosen and result.mode in ("gpu", "cpu") else ("bold" if chosen else None),
        )
    console.print(table)
    console.print(f"[bold]{escape(result.reason)}[/bold]")
    for option in result.alternatives:
        console.print(f"  alternative: {option.quant} at {option.n_ctx} tokens, {option.n_gpu_layers} layers on GPU"
                      f"{' (experts on CPU)' if option.cpu_moe else ''}: {escape(option.reason)}")  # fmt: skip
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if result.chosen is None:
        return
    figures = result.chosen.figures
    console.print(f"figures for the choice: {'measured by llama.cpp (dry run)' if figures == 'engine' else 'estimate'}")
    console.print("\n[bold]llama-server[/bold]")
    console.print(escape(shell_line(llama_server_argv(result, port=port))), soft_wrap=True)
    config = ollama_config(result)
    console.print("\n[bold]Ollama[/bold]")
    env = " ".join(f"{k}={v}" for k, v in config["env"].items())
    console.print(escape(f"{env} ollama serve"), soft_wrap=True)
    console.print(escape(f"model {config['model']}  options {config['options']}"), soft_wrap=True)
    console.print(escape(config["modelfile"].rstrip()))
    for note in config["notes"]:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")


@main.command()
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (sizes in bytes).")
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
        _print_json(data)
        return
    _render_quants(data)


def _render_quants(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from launcher.units import format_bytes

    rows = data["candidates"]
    table = Table(title=escape(data["model"] or "embedded default model"), title_justify="left")
    for name, justify in (("quant", "left"), ("size", "right"), ("bits/weight", "right"), ("quality", "right"),
                          ("KLD", "right"), ("source", "left")):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=name == "source")  # type: ignore[arg-type]
    for row in rows:
        bpw, rank, kld, source = row["bits_per_weight"], row["quality_rank"], row["kld"], row["source"]
        if source.startswith("ollama") and row["ollama_model"]:
            source = f"{source} {row['ollama_model']}"  # the tag to pull
        table.add_row(
            escape(row["quant"]),
            format_bytes(row["size_bytes"]) + (f" ({len(row['files'])} files)" if len(row["files"]) > 1 else ""),
            "?" if bpw is None else f"{bpw:.2f}",
            "?" if rank is None else f"{rank:g}",
            "" if kld is None else f"{kld:.4f}",
            escape(source),
        )
    console = Console()
    console.print(table)
    projectors = {r["projector"]["name"]: r["projector"]["size_bytes"] for r in rows if r["projector"]}
    for name, size in projectors.items():
        console.print(f"vision projector: {escape(name)} ({format_bytes(size)}), used with every quant")
    for note in dict.fromkeys(n for r in rows for n in r["notes"]):
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
