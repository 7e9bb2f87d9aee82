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

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]{type(exc).__name__}[/red]: {escape(str(exc))}")


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
