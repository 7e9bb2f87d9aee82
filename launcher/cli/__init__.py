"""The `fitquant` command: parse arguments, call the library, render a table or JSON.

    __init__.py   the group, and its one error format: `ErrorType: message` on stderr, exit 1
    options.py    option groups the commands share (machine, KV cache, context, JSON)
    render.py     rich tables, memory bars and JSON printing
    hardware.py   hw
    model.py      inspect, estimate
    plan.py       plan, quants
    run.py        run, ps, stop, bench
    verify.py     verify
    profile.py    profile init, show, validate
    service.py    service install, uninstall, status; serve

Only this package imports click or rich or calls sys.exit. Library imports happen inside commands so
that `fitquant --help` stays instant.
"""

from __future__ import annotations

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
            from launcher.cli.render import error_line

            error_line(exc)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fitquant")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
def main(debug: bool) -> None:
    """Pick the best GGUF quant that fits entirely on this machine's GPU, start it, verify it."""


def _register() -> None:
    from launcher.cli import hardware, model, plan, profile, run, service, verify

    commands = (hardware.hw, model.inspect, model.estimate, plan.plan, plan.quants, run.run, run.ps, run.stop,
                run.bench, verify.verify, profile.profile, service.service, service.serve)  # fmt: skip
    for command in commands:
        main.add_command(command)


_register()
