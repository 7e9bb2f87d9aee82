"""fitquant as a systemd service: the unit that runs `fitquant serve --profile P`, the Ollama drop-in, installing
them, and the readiness notification serve sends.

    units.py     render_unit(spec), render_ollama_dropin(env), ollama_dropin_env(...): pure text, systemd escaping
    install.py   profile_service(profile, scope=...), install_service(spec, ...), uninstall_service(scope),
                 service_status(scope): the files
    notify.py    ready(), status(), reloading(), stopping(), watchdog(), extend_timeout(): sd_notify, written directly

    service = profile_service("profiles/home.yaml", scope="user")   # the profile, checked, and its unit
    result = install_service(service.spec, ollama_env=service.ollama_env, dry_run=True)
    # result.files: what would be written where; result.commands: the systemctl commands to run
"""

from __future__ import annotations

from launcher.service.install import (
    FileState,
    InstallResult,
    ProfileService,
    ServiceFile,
    ServiceStatus,
    UninstallResult,
    install_service,
    profile_service,
    service_files,
    service_status,
    uninstall_service,
    unit_dir,
    unit_spec,
)
from launcher.service.units import UnitSpec, ollama_dropin_env, render_ollama_dropin, render_unit

__all__ = [
    "FileState",
    "InstallResult",
    "ProfileService",
    "ServiceFile",
    "ServiceStatus",
    "UninstallResult",
    "UnitSpec",
    "install_service",
    "ollama_dropin_env",
    "profile_service",
    "render_ollama_dropin",
    "render_unit",
    "service_files",
    "service_status",
    "uninstall_service",
    "unit_dir",
    "unit_spec",
]
