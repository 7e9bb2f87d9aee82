"""fitquant profile init, show and validate; and `plan --profile`: a machine described by a YAML file."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from launcher.cli import options
from launcher.cli.render import print_json

if TYPE_CHECKING:
    from launcher.hardware.types import HardwareSnapshot
    from launcher.plan import Policy
    from launcher.profiles import Profile


@click.group()
def profile() -> None:
    """Machine profiles: what a machine is and what it runs (profiles/NAME.yaml or the config directory)."""


@profile.command()
@click.argument("name", required=False)
@click.option("--force", is_flag=True, help="Replace an existing profile.")
@click.option("--path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here instead of the user config directory.")  # fmt: skip
def init(name: str | None, force: bool, path: Path | None) -> None:
    """Probe this machine and write a commented profile for it (NAME: default, the host name).

    Never overwrites an existing file without --force; writes a temporary file, then renames it.
    """
    from launcher.hardware import detect_hardware
    from launcher.profiles import default_profile_name, profile_text, user_profile_path, write_profile

    name = name or default_profile_name()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise click.BadParameter(f"{name!r} is not a profile name; use letters, digits, '.', '_' and '-'")
    target = path or user_profile_path(name)
    if target.exists() and not force:  # say so before probing; write_profile checks again
        from launcher.errors import ProfileError

        raise ProfileError(f"profile {target}: exists already; --force replaces it")
    written = write_profile(target, profile_text(name, detect_hardware()), force=force)
    click.echo(f"wrote {written}")
    click.echo(f"check it with: fitquant profile validate {written}")


@profile.command()
@click.argument("name", required=False)
@click.option("--profile", "path", metavar="PATH", help="A profile file (instead of NAME).")
@options.json_option("Print the profile, its machine's fingerprint and its verified runs as JSON (bytes).")
def show(name: str | None, path: str | None, as_json: bool) -> None:
    """Show a profile and what was verified for its models on its machine.

    NAME is looked up in ./profiles/NAME.yaml, then the user config directory; default: the host name.
    """
    from launcher.hardware import detect_hardware
    from launcher.profiles import default_profile_name, find_profile, load_profile, profile_hardware, profile_records
    from launcher.record import fingerprint

    if path and name:
        raise click.UsageError("give NAME or --profile PATH, not both")
    file = find_profile(path or name or default_profile_name())
    loaded = load_profile(file)
    machine = profile_hardware(loaded) or detect_hardware()
    records = profile_records(loaded, machine)
    if as_json:
        print_json({
            "schema_version": 1,
            "path": str(file),
            "profile": loaded.model_dump(mode="json"),
            "machine": {"fingerprint": fingerprint(machine), **machine.to_json()},
            "records": records,
        })  # fmt: skip
        return
    _render_profile(loaded, machine, records)


@profile.command()
@click.argument("files", nargs=-1, required=True)
def validate(files: tuple[str, ...]) -> None:
    """Check profile files: one line each; exit status 1 when any is bad."""
    from launcher.cli.render import error_line
    from launcher.errors import ProfileError
    from launcher.profiles import load_profile, profile_hardware

    bad = 0
    for file in files:
        try:
            loaded = load_profile(file)
            machine = profile_hardware(loaded)  # what only the planner would notice (a device kind it cannot plan)
        except ProfileError as exc:
            error_line(exc)
            bad += 1
            continue
        count = len(loaded.models)
        click.echo(f"ok: {file} (machine {loaded.machine}, {count} model{'' if count == 1 else 's'})")
        if machine is not None:
            from launcher.speed import machine_speeds

            known = machine_speeds(machine)
            for device in machine.devices:
                if f"GPU{device.index}" not in known:  # valid, but its plans will show no speed: say how to give it
                    click.echo(f"note: {file}: GPU{device.index} ({device.name}) is not in the chip table and has no "
                               "'bandwidth': its plans predict no speed; describe it under devices: with 'bandwidth' "
                               "and 'flops', or with a chip name `fitquant plan --gpu-name` accepts")  # fmt: skip
    if bad:
        sys.exit(1)


# Policy fields each `plan` flag sets; a flag given on the command line wins over the profile.
_POLICY_FLAGS = {
    "n_ctx": ("n_ctx",),
    "kv": ("type_k", "type_v"),
    "kv_k": ("type_k",),
    "kv_v": ("type_v",),
    "n_parallel": ("n_parallel",),
    "reserve": ("reserve_bytes",),
    "min_quant": ("min_quant",),
    "strict": ("strict",),
    "vision": ("vision",),
    "min_speed": ("min_tg_per_s",),
    "prefer": ("prefer",),
}


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def with_profile(
    ref: str, model: str | None, policy: Policy, port: int
) -> tuple[str | None, Policy, HardwareSnapshot, int, tuple[str, ...]]:
    """`plan --profile`: the model, policy, machine, port and RPC servers the profile gives, under the flags given.
    A profile's `rpc:` servers join the machine as `run` and `serve` plan them (listed by llama-server unless the
    profile or --vram describes the devices)."""
    from launcher.hardware import resolve_machine
    from launcher.profiles import find_profile, load_profile, profile_plan

    ctx = click.get_current_context()
    overrides = {field: getattr(policy, field) for flag, fields in _POLICY_FLAGS.items()
                 if flag in ctx.params and _given(ctx, flag) for field in fields}  # fmt: skip
    profile = load_profile(find_profile(ref))
    rpc = tuple(profile.rpc)
    machine = None
    if any(_given(ctx, flag) for flag in ("vram", "ram", "unified", "gpu_name")):
        p = ctx.params
        try:
            machine = resolve_machine(vram=p.get("vram"), ram=p.get("ram"), unified=p.get("unified"),
                                      gpu_names=p.get("gpu_name"))  # fmt: skip
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    elif rpc and profile.devices is None:
        from launcher.run import choose_backend, run_machine

        machine = run_machine(choose_backend("llamacpp", llama_server=profile.llama_server, rpc=rpc), rpc=rpc)[0]
    inputs = profile_plan(profile, model, overrides=overrides, machine=machine)
    for note in inputs.notes:
        click.echo(f"note: {note}", err=True)  # stderr: stdout stays the plan (or its JSON)
    if inputs.port is not None and not _given(ctx, "port"):
        port = inputs.port
    return inputs.model, inputs.policy, inputs.machine, port, rpc


def _render_profile(loaded: Profile, machine: HardwareSnapshot, records: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from launcher.record import fingerprint
    from launcher.units import format_bytes

    console = Console(highlight=False)
    console.print(f"[bold]{escape(loaded.machine)}[/bold]  ({escape(loaded.source)})")
    where = "described by the profile, all memory free" if machine.described else "probed on this machine"
    gpus = ", ".join(f"GPU{d.index} {escape(d.name)} ({d.kind}, {format_bytes(d.total_bytes or 0)})"
                     for d in machine.devices) or "no GPU"  # fmt: skip
    ram = format_bytes(machine.ram_total_bytes) if machine.ram_total_bytes else "?"
    console.print(f"devices: {gpus}; RAM {ram} ({where})")
    reserve = loaded.reserve
    if isinstance(reserve, dict):
        shown = ", ".join(f"{escape(k)} {format_bytes(v)}" for k, v in reserve.items())
    else:
        shown = f"{format_bytes(reserve)} on every device"
    console.print(f"reserve: {shown}")
    runtime: list[str] = [loaded.backend]
    if loaded.llama_server:
        runtime.append(f"llama-server {escape(loaded.llama_server)}")
    if loaded.ollama_host:
        runtime.append(f"Ollama at {escape(loaded.ollama_host)}")
    if loaded.rpc:
        runtime.append(f"RPC {', '.join(loaded.rpc)}")
    console.print(f"backend: {', '.join(runtime)}; listens on {escape(loaded.listen)}")
    if loaded.api_key_env:
        console.print(f"API key: from the environment variable {loaded.api_key_env}")
    elif loaded.api_key_file:
        console.print(f"API key: from the file {escape(loaded.api_key_file)}")
    if loaded.origins:
        console.print(f"web pages: local ones and apps', and {escape(', '.join(loaded.origins))}")
    if loaded.hosts:
        console.print(f"host names: localhost, addresses, this machine's, and {escape(', '.join(loaded.hosts))}")
    d = loaded.defaults
    console.print(f"defaults: KV {d.kv}, flash attention {d.flash_attn or 'by KV type'}, {d.parallel} slot(s), "
                  f"floor {d.min_quant or 'by model size'}, warm-up {d.warmup}")  # fmt: skip
    if loaded.models:
        table = Table(title="Models", title_justify="left")
        for column in ("model", "context", "floor", "vision", "alias", "port"):
            table.add_column(column)
        for m in loaded.models:
            table.add_row(escape(m.model), str(m.context or "default"), m.min_quant or d.min_quant or "by size",
                          "yes" if m.vision else "no", escape(m.alias or "-"), str(m.port or "-"))  # fmt: skip
        console.print(table)
    else:
        console.print("models: none listed")
    key = fingerprint(machine)
    if not records:
        console.print(f"verified: nothing yet on this hardware (fingerprint {key}); `fitquant run` records it")
        return
    table = Table(title=f"Verified on hardware {key}", title_justify="left")
    for column in ("when", "model", "quant", "context", "verdict", "backend", "device", "predicted", "measured"):
        table.add_column(column, justify="right" if column in ("context", "predicted", "measured") else "left")
    for entry in records:
        predicted, measured = entry.get("predicted_bytes") or {}, entry.get("needs_bytes") or {}
        for i, device in enumerate(sorted(set(predicted) | set(measured)) or ["-"]):
            first = i == 0
            table.add_row(
                _when(entry.get("time")) if first else "", escape(str(entry.get("model", "?"))) if first else "",
                str(entry.get("quant", "?")) if first else "", str(entry.get("n_ctx", "?")) if first else "",
                str(entry.get("verdict", "?")) if first else "", str(entry.get("server") or entry.get("backend") or "?")
                if first else "", device, _size(predicted.get(device)), _size(measured.get(device)),
            )  # fmt: skip
    console.print(table)


def _when(value: Any) -> str:
    import time

    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(float(value)))
    except (TypeError, ValueError):
        return "?"


def _size(value: Any) -> str:
    from launcher.units import format_bytes

    return format_bytes(int(value)) if isinstance(value, (int, float)) else "-"
