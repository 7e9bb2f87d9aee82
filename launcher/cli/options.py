"""Option groups the commands share: the machine, the KV cache, the context, JSON output.

Callbacks turn text into library values (bytes, tokens, layer counts) and bad text into click's
BadParameter (exit 2). Defaults come from the library (launcher.estimate, launcher.plan), never from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from launcher.defaults import DEFAULT_KV_TYPE, DEFAULT_RESERVE_BYTES

F = TypeVar("F", bound=Callable[..., Any])

KV_TYPES = click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"])


T = TypeVar("T")


def _parsed(parse: Callable[[str], T], value: str | None) -> T | None:
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def vram_sizes(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[int] | None:
    """--vram 12GiB or 24GiB,24GiB: one size per GPU, in bytes."""
    from launcher.hardware import parse_vram_list

    return _parsed(parse_vram_list, value)


def gpu_names(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[str] | None:
    """--gpu-name 'RTX 4090' or 'RTX 4090,RTX 3090': the chip table's name of each described GPU."""
    from launcher.speed import table_gpu
    from launcher.units import shown_value

    if value is None:
        return None
    items = [item.strip() for item in value.split(",")]
    if not all(items):
        raise click.BadParameter(f"{shown_value(value)} has an empty item; write one name, or one per GPU: "
                                 "'RTX 4090,RTX 3090'")  # fmt: skip
    return [name for item in items if (name := _parsed(table_gpu, item))]


def byte_size(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    """--ram 64GiB, --unified 32GiB: a positive size in bytes."""
    from launcher.units import parse_bytes

    size: int | None = _parsed(parse_bytes, value)
    if size is not None and size <= 0:
        raise click.BadParameter(f"{value!r} is not a usable size; it must be more than 0")
    return size


def reserve_size(_ctx: click.Context, _param: click.Parameter, value: str) -> int | None:
    """--reserve 1GiB: bytes to keep free on every device (0 allowed)."""
    from launcher.units import parse_bytes

    return _parsed(parse_bytes, value)


def context(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    """--ctx 32768, 32k, 128K: tokens."""
    from launcher.units import parse_context

    return _parsed(parse_context, value)


def layer_count(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    """--ngl 20 or all (-1)."""
    if value is None:
        return None
    if value.lower() in ("all", "-1"):
        return -1
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise click.BadParameter(f"{value!r} is not a layer count; write a number like 20, or 'all'")
    return number


def quality_floor(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """--min-quant Q4_K_M: a quant label fitquant knows, normalized."""
    from launcher.plan import quality_floor_label

    return _parsed(quality_floor_label, value)


def _apply(func: F, options: list[Callable[[F], F]]) -> F:
    for option in reversed(options):
        func = option(func)
    return func


def json_option(help: str = "Print machine-readable JSON (sizes in bytes).") -> Callable[[F], F]:
    return click.option("--json", "as_json", is_flag=True, help=help)


def gpu_options(func: F) -> F:
    """--vram and --unified: describe the GPUs instead of probing them."""
    return _apply(func, [
        click.option("--vram", callback=vram_sizes, help="Describe GPUs instead of probing: 12GiB, or 24GiB,24GiB."),
        click.option("--unified", callback=byte_size, help="Describe an Apple Silicon Mac's unified memory: 32GiB."),
    ])  # fmt: skip


def gpu_name_option(func: F) -> F:
    """--gpu-name: which chips the described GPUs are, for the speed figures a plan predicts from."""
    return click.option("--gpu-name", "gpu_name", callback=gpu_names,
                        help="Name the described GPUs, for their speed figures: 'RTX 4090', one per --vram size "
                             "('RTX 4090,RTX 3090'), or a Mac's chip with --unified ('M3 Max (40-core GPU)')."
                        )(func)  # fmt: skip


def ram_option(func: F) -> F:
    return click.option("--ram", callback=byte_size, help="Describe the host's RAM instead of probing: 64GiB.")(func)


def reserve_option(func: F) -> F:
    from launcher.units import format_bytes

    default = format_bytes(DEFAULT_RESERVE_BYTES)
    return click.option("--reserve", callback=reserve_size, default=default, show_default=True,
                        help="Memory to keep free on every device.")(func)  # fmt: skip


def kv_options(func: F) -> F:
    """--kv, --kv-k, --kv-v: the KV cache types (K and V may differ)."""
    return _apply(func, [
        click.option("--kv", "kv", type=KV_TYPES, default=DEFAULT_KV_TYPE, show_default=True,
                     help="KV cache type for K and V."),
        click.option("--kv-k", "kv_k", type=KV_TYPES, help="K cache type (overrides --kv)."),
        click.option("--kv-v", "kv_v", type=KV_TYPES, help="V cache type (overrides --kv)."),
    ])  # fmt: skip


def parallel_option(help: str) -> Callable[[F], F]:
    return click.option("--parallel", "n_parallel", type=click.IntRange(min=1), default=1, show_default=True,
                        help=help)  # fmt: skip
