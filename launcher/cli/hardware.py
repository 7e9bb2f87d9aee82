"""fitquant hw: the machine's devices and memory, probed or described."""

from __future__ import annotations

import click

from launcher.cli import options
from launcher.cli.render import print_json


@click.command()
@options.json_option()
@click.option("--doctor", is_flag=True,
              help="Print every probe's raw readings as JSON, for bug reports, and whether the llama.cpp server found "
                   "here can reach this machine's GPUs.")  # fmt: skip
@click.option("--chips", is_flag=True,
              help="List the chip table: every GPU name --gpu-name and a profile's chip take, with its bandwidth, "
                   "FLOPS and host link.")  # fmt: skip
@options.gpu_options
@options.gpu_name_option
@options.ram_option
def hw(
    as_json: bool,
    doctor: bool,
    chips: bool,
    vram: list[int] | None,
    ram: int | None,
    unified: int | None,
    gpu_name: list[str] | None,
) -> None:
    """Show the GPUs, the memory free on each now, RAM and CPU of this machine, or of a described one."""
    from launcher.hardware import collect_readings, describe_machine, detect_hardware

    described = vram is not None or ram is not None or unified is not None or gpu_name is not None
    if chips:
        if described or doctor:
            raise click.UsageError("--chips lists the chip table; it cannot be combined with other options but --json")
        from launcher.cli.render import render_chips
        from launcher.speed import chip_table

        table = chip_table()
        print_json(table) if as_json else render_chips(table)
        return
    if doctor:
        if described:
            raise click.UsageError(
                "--doctor reads this machine; it cannot be combined with --vram, --ram, --unified or --gpu-name"
            )
        from launcher.run import gpu_reach

        report = collect_readings()
        # the finding `run` would refuse with: a llama.cpp server that cannot reach this machine's GPUs
        report["llama_cpp_server"] = gpu_reach(detect_hardware())
        print_json(report)
        return
    if described:
        try:
            snapshot = describe_machine(vram=vram, ram=ram, unified=unified, gpu_names=gpu_name)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    else:
        snapshot = detect_hardware(probe_backends=True)
    from launcher.speed import machine_speeds, speed_figures

    # the figures every speed prediction starts from (this host's measured once, then cached)
    figures = speed_figures(snapshot, machine_speeds(snapshot))
    if as_json:
        print_json({**snapshot.to_json(), "speed": figures})
        return
    from launcher.cli.render import render_hardware

    render_hardware(snapshot, figures)
