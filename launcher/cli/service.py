"""fitquant service install, uninstall and status: a systemd unit that runs `fitquant serve --profile P`.

The profile is read and checked here (launcher.profiles) and named in the unit by its absolute path; `serve`
reads it again at every start. Its backend, API key file or variable, and (for Ollama) its defaults and models
decide the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from launcher.service import ServiceStatus

F = TypeVar("F", bound=Callable[..., Any])


def _scope_options(default: str | None) -> Callable[[F], F]:
    """--user (the default for install/uninstall) or --system; status shows both when neither is given."""

    # no default at all when there is none: click would turn default=False into the string "False"
    user = click.option("--user", "scope", flag_value="user", help="A user unit in ~/.config/systemd/user.")
    if default == "user":
        user = click.option("--user", "scope", flag_value="user", default=True,
                            help="A user unit in ~/.config/systemd/user (the default).")  # fmt: skip
    system = click.option("--system", "scope", flag_value="system",
                          help="A system unit in /etc/systemd/system (as root; serve runs as you).")  # fmt: skip

    def apply(func: F) -> F:
        return user(system(func))

    return apply


@click.group()
def service() -> None:
    """Run a profile's models as a systemd service that survives reboots."""


@service.command()
@click.option("--profile", "profile", required=True, metavar="NAME|PATH",
              help="The machine profile `fitquant serve` runs: a file, or a name on the search path.")  # fmt: skip
@_scope_options("user")
@click.option("--backend", type=click.Choice(["llamacpp", "ollama"]),
              help="The backend, for a profile whose backend is auto; ollama also writes the drop-in.")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Print the files and where they would go; write nothing.")
@click.option("--force", is_flag=True, help="Replace files of the same name that fitquant did not write.")
def install(profile: str, scope: str, backend: str | None, dry_run: bool, force: bool) -> None:
    """Write the unit that runs `fitquant serve --profile P` (and, for Ollama, its drop-in); print the systemctl
    commands to run. The profile is checked first; the unit names it by its absolute path."""
    from launcher.service import install_service, profile_service

    planned = profile_service(profile, scope="system" if scope == "system" else "user", backend=backend)
    result = install_service(planned.spec, ollama_env=planned.ollama_env, force=force, dry_run=dry_run)
    for f in result.files:
        if dry_run:
            click.echo(f"# {f.path}")
            click.echo(f.text)
        else:
            click.echo(f"{'replaced' if f.path in result.replaced else 'wrote'} {f.path}")
    for folder in result.created_dirs:
        click.echo(f"created {folder}")
    if dry_run:
        click.echo("dry run: nothing was written")
    click.echo("then run:" if dry_run else "now run:")
    for command in result.commands:
        click.echo(f"  {command}")
    for note in [*planned.notes, *result.notes]:
        click.echo(f"note: {note}")


@service.command()
@_scope_options("user")
def uninstall(scope: str) -> None:
    """Remove fitquant's unit and drop-in (and the links that enabled it); leave every other file."""
    from launcher.service import uninstall_service

    result = uninstall_service("system" if scope == "system" else "user")
    for path in result.removed:
        click.echo(f"removed {path}")
    for path, why in result.kept:
        click.echo(f"kept {path}: {why}")
    if not result.removed and not result.kept:
        click.echo("nothing to remove: fitquant's unit is not installed here")
    if result.commands:
        click.echo("now run:")
        for command in result.commands:
            click.echo(f"  {command}")


@service.command()
@_scope_options(None)
def status(scope: str | None) -> None:
    """Which of fitquant's files are installed, and whether the service is running."""
    from launcher.service import service_status

    for each in (scope,) if scope else ("user", "system"):
        _render_status(service_status("system" if each == "system" else "user"))


def _render_status(state: ServiceStatus) -> None:
    click.echo(f"{state.scope} units:")
    for f in state.files:
        if not f.exists:
            line = "not installed"
        elif f.ours:
            line = "written by fitquant" + ("" if f.enabled is None else ", enabled" if f.enabled else ", not enabled")
        else:
            line = "present, not written by fitquant"
        click.echo(f"  {f.path}: {line}")
    ctl = "systemctl --user" if state.scope == "user" else "systemctl"
    click.echo(f"  {ctl} is-active fitquant.service: {state.active or f'unknown ({state.active_note})'}")


@click.command()
@click.option("--profile", "profile_ref", required=True, metavar="PATH|NAME",
              help="The profile whose models to serve: a path, or a name in ./profiles or your config.")  # fmt: skip
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the API key clients must send (else the profile's).")  # fmt: skip
def serve(profile_ref: str, api_key_file: Path | None) -> None:
    """Serve every model of a profile, fitted together, verified, restarted after a crash, until SIGTERM.

    SIGHUP reads the profile again and restarts only what changed. One event per line on stderr; readiness
    goes to systemd (Type=notify) when every model is verified.
    """
    from launcher.service.serve import serve as run_serve

    run_serve(profile_ref, api_key_file=api_key_file)
