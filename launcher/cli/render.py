"""Rendering for people: rich tables, memory bars, notes; and JSON for programs.

rich is imported inside each function so that `fitquant --help` stays instant.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from launcher.estimate import MemoryEstimate
    from launcher.hardware import HardwareSnapshot
    from launcher.model import ModelFacts
    from launcher.plan import Option, Plan
    from launcher.verify import Placement


def error_line(exc: Exception) -> None:
    """`ErrorType: message` on stderr, naming the documented error type, never a private subclass of it."""
    from rich.console import Console
    from rich.markup import escape

    name = next(cls.__name__ for cls in type(exc).__mro__ if not cls.__name__.startswith("_"))
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]{name}[/red]: {escape(str(exc))}")


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def render_chips(chips: Sequence[Mapping[str, Any]]) -> None:
    """The chip table (`hw --chips`): the names --gpu-name takes, with the figures a plan's speed starts from."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"The chip table: {len(chips)} GPUs", title_justify="left")
    for column in ("name", "backend", "GB/s", "TFLOPS", "PCIe GB/s"):
        table.add_column(column, justify="left" if column in ("name", "backend") else "right", no_wrap=True)
    for chip in chips:
        link = chip["host_link_bytes_per_s"]
        memory = f" {chip['memory']}" if chip["memory"] else ""
        table.add_row(chip["name"], chip["backend"], f"{chip['bandwidth_bytes_per_s'] / 1e9:g}{memory}",
                      "?" if chip["flops"] is None else f"{chip['flops'] / 1e12:g}",
                      "unified" if link is None else f"{link / 1e9:.1f}")  # fmt: skip
    console = Console(highlight=False)
    console.print(table)
    console.print("GB/s: memory bandwidth (HBM: decoded at its own efficiency); TFLOPS: dense FP16 (Apple's FP32: "
                  "its GPUs run FP16 at the same rate); PCIe GB/s: the link to the host, one way. Any unique part of a "
                  "name will do: --gpu-name 'RTX 4070 Ti', a profile's chip: 'M3 Max (40-core GPU)'.")  # fmt: skip


def render_hardware(snapshot: HardwareSnapshot, speed: Mapping[str, Mapping[str, Any]] | None = None) -> None:
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
    if speed:
        console.print("Speed figures (what predicted tokens/s start from):")
        for name, figures in speed.items():
            console.print(f"  {name}: {escape(_speed_line(figures))}")
    for note in snapshot.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")


SOURCES = {
    "NVML": "the driver's clocks and bus (NVML)",
    "profile": "the profile",
    "table": "the chip table",
    "measured": "measured on this host, cached",
}


def _speed_line(figures: Mapping[str, Any]) -> str:
    """'1008 GB/s memory, 165.2 TFLOPS FP16 (the chip table)', or why a GPU has none."""
    bandwidth, flops = figures.get("bandwidth_bytes_per_s"), figures.get("flops")
    if not bandwidth:
        return (f"{figures.get('name') or '?'}: unknown (not in the chip table; a profile's device can give "
                "'bandwidth' and 'flops')")  # fmt: skip
    precision = str(figures.get("flops_precision", "")).upper()
    compute = f"{flops / 1e12:.1f} TFLOPS {precision}" if flops and flops >= 1e12 else (
        f"{flops / 1e9:.0f} GFLOPS {precision}" if flops else "FLOPS unknown")  # fmt: skip
    return f"{bandwidth / 1e9:.1f} GB/s memory, {compute} ({SOURCES.get(figures.get('source') or '', '?')})"


def render_facts(facts: ModelFacts, data: dict[str, Any]) -> None:
    """The inspect table: what a header means for memory."""
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


def render_estimate(result: MemoryEstimate) -> None:
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


_BAR_PARTS = (("weights", "cyan"), ("KV", "magenta"), ("compute", "yellow"), ("runtime", "white"))
_BAR_MIN, _BAR_MAX = 4, 40  # cells


def _bar(option: Option, budget_bytes: int, width: int) -> str:
    """A stacked bar of what the option needs on its busiest device against that device's budget."""
    est = option.estimate
    device = max(est.devices, key=lambda d: d.total_bytes)
    values = (
        device.weights_bytes,
        device.kv_bytes + device.recurrent_bytes,
        device.compute_bytes + device.output_bytes,
        device.overhead_bytes,
    )
    scale = max(budget_bytes, device.total_bytes, 1)
    out, used = "", 0
    for value, (_, color) in zip(values, _BAR_PARTS, strict=True):
        cells = round(value / scale * width)
        cells = min(cells, width - used)
        if cells:
            out += f"[{color}]{'█' * cells}[/{color}]"
            used += cells
    out += "[dim]" + "·" * (width - used) + "[/dim]"
    return out + ("[red]▶[/red]" if device.total_bytes > budget_bytes else " ")


def render_plan(result: Plan, *, forms: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from launcher.plan import shell_line
    from launcher.quants import quant_info
    from launcher.units import format_bytes

    console = Console()
    budget = max((b.usable_bytes for b in result.budgets), default=0)
    where = ", ".join(f"{b.name} {format_bytes(b.usable_bytes)} usable" for b in result.budgets)
    table = Table(title=f"{result.model} at {result.policy.n_ctx} tokens on {where}", title_justify="left")
    rows = []
    for option in result.candidates:
        chosen = result.chosen is not None and option.quant == result.chosen.quant
        bpw = option.candidate.bits_per_weight
        fits = "yes" if option.fits else "no"
        if option.fits and not option.above_floor:
            fits = "below floor"
        style = "bold green" if chosen and result.mode in ("gpu", "cpu") else ("bold" if chosen else None)
        tg = (option.speed or {}).get("tg_per_s")  # predicted decode tokens/s (launcher.speed), when known
        kld = quant_info(option.quant, bpw).kld  # published mean KLD vs FP16 (launcher/data/quants.json)
        cells = [("▶ " if chosen else "  ") + option.quant, format_bytes(option.candidate.size_bytes),
                 f"{bpw:.2f}" if bpw else "-", format_bytes(max(option.needs.values())),
                 f"{tg:.0f}" if tg is not None else "-", f"{kld:.4f}" if kld is not None else "-", fits]  # fmt: skip
        rows.append((option, cells, style))
    columns = ("quant", "file", "bpw", "needs", "t/s", "KLD", "fits")
    widths = [max([len(name), *(len(cells[i]) for _, cells, _ in rows)]) for i, name in enumerate(columns)]
    # the bar takes what the terminal has left: each column costs its width plus 3 (padding, rule), +1 border
    bar_width = max(_BAR_MIN, min(_BAR_MAX, console.width - sum(widths) - 3 * (len(columns) + 1) - 1 - 1))
    for column in (*columns[:6], "memory", "fits"):
        table.add_column(column, justify="right" if column in ("file", "bpw", "needs", "t/s", "KLD") else "left",
                         no_wrap=True)  # fmt: skip
    colors = {"yes": "green", "no": "red", "below floor": "yellow"}
    for option, cells, style in rows:
        fits = cells[6]
        table.add_row(*cells[:6], _bar(option, budget, bar_width), f"[{colors[fits]}]{fits}[/{colors[fits]}]",
                      style=style)  # fmt: skip
    console.print(table)
    console.print("memory: " + "  ".join(f"[{color}]█[/{color}] {what}" for what, color in _BAR_PARTS)
                  + "  [dim]·[/dim] free  [red]▶[/red] over budget")  # fmt: skip
    console.print(
        "t/s: predicted decode tokens per second at an empty context; KLD: the quant's published mean KL "
        "divergence vs FP16 (llama.cpp's LLaMA-3-8B scoreboard: how far the output moved, not accuracy)"
    )
    console.print(f"[bold]{escape(result.reason)}[/bold]")
    for option in result.alternatives:
        tg = (option.speed or {}).get("tg_per_s")
        speed = f", about {tg:.0f} tokens/s" if tg is not None else ""
        console.print(f"  alternative: {option.quant} at {option.n_ctx} tokens, {option.n_gpu_layers} layers on GPU"
                      f"{' (experts on CPU)' if option.cpu_moe else ''}{speed}: {escape(option.reason)}")  # fmt: skip
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if result.chosen is None:
        return
    figures = result.chosen.figures
    console.print(f"figures for the choice: {'measured by llama.cpp (dry run)' if figures == 'engine' else 'estimate'}")
    console.print("\n[bold]llama-server[/bold]")
    console.print(escape(shell_line(forms["llama_server_argv"])), soft_wrap=True)
    config = forms["ollama"]
    console.print("\n[bold]Ollama[/bold]")
    env = " ".join(f"{k}={v}" for k, v in config["env"].items())
    console.print(escape(f"{env} ollama serve"), soft_wrap=True)
    console.print(escape(f"model {config['model']}  options {config['options']}"), soft_wrap=True)
    console.print(escape(config["modelfile"].rstrip()))
    for note in config["notes"]:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")


def render_quants(data: dict[str, Any]) -> None:
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


def render_placement(placement: Placement, *, err: bool = False) -> None:
    """The verdict in one line, then predicted against measured per device and per kind, with the difference."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from launcher.verify import comparison_rows, mismatches, summary_line

    console = Console(stderr=err, highlight=False)
    colour = {"gpu": "green", "cpu-only": "yellow"}.get(placement.verdict, "red")
    console.print(f"[{colour}]{escape(summary_line(placement))}[/{colour}]")
    table = Table(box=None, pad_edge=False)
    for column in ("device", "kind", "predicted", "measured", "difference"):
        table.add_column(column, justify="left" if column in ("device", "kind") else "right")
    rows = comparison_rows(placement)
    for row in rows:
        table.add_row(*row, style="bold" if row[1] == "total" else None)
    if rows:  # a log with no buffer lines (Ollama's planner alone) has nothing to compare
        console.print(table)
    for mismatch in mismatches(placement):  # a prediction that misses is said, one line each
        console.print(f"[yellow]{escape(mismatch.line())}[/yellow]", soft_wrap=True)
