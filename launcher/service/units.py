"""The systemd unit that runs `fitquant serve --profile P`, and the Ollama drop-in: pure text from plain data.

`render_unit(spec)` gives `fitquant.service`; `render_ollama_dropin(env)` gives `ollama.service.d/fitquant.conf`
from the server environment a plan renders (`launcher.backends.ollama_form.ollama_form(plan)["env"]`) or from
`ollama_dropin_env(...)`. Both start with MARKER, which is how fitquant knows a file is its own.

Values are written with systemd's own escaping (systemd.syntax(7), systemd.service(7) "Command lines"): a
backslash, a double quote and control characters are C-escaped inside double quotes, `%` (specifiers) is doubled
everywhere, `$` (variable expansion) is doubled on command lines.

`systemctl reload` sends serve a SIGHUP (it re-reads the profile): Type=notify-reload where the installed systemd has
it (253 and later), else Type=notify with ExecReload=. A stop gives serve the profile's router.drain and a margin
(TimeoutStopSec=) before SIGKILL.

The hardening is what `systemd-analyze security` asks for, less what would break GPU access; every setting
left out says why beside the others (see _HARDENING).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from launcher.errors import ServiceError

__all__ = [
    "API_KEY_CREDENTIAL",
    "GPU_DEVICES",
    "MARKER",
    "NOTIFY_RELOAD_SINCE",
    "OLLAMA_DROPIN",
    "UNIT_NAME",
    "Scope",
    "UnitSpec",
    "exec_arg",
    "is_fitquant_text",
    "ollama_dropin_env",
    "parse_systemd_version",
    "quoted",
    "render_ollama_dropin",
    "render_unit",
]

Scope = Literal["user", "system"]

UNIT_NAME = "fitquant.service"
OLLAMA_DROPIN = "ollama.service.d/fitquant.conf"  # relative to the unit directory of the scope
MARKER = "# Written by fitquant"
API_KEY_CREDENTIAL = "fitquant-api-key"  # LoadCredential= id; serve reads it at %d/<id>

# The GPU device nodes, by the driver names of /proc/devices (DeviceAllow=char-NAME allows the whole major;
# names absent on a machine match nothing, silently). Compute needs no display nodes (nvidia-modeset, fb).
GPU_DEVICES = (
    "char-nvidiactl",  # /dev/nvidiactl
    "char-nvidia-frontend",  # /dev/nvidiaN (proprietary modules)
    "char-nvidia",  # /dev/nvidiaN (the open kernel modules register this name)
    "char-nvidia-uvm",  # /dev/nvidia-uvm, /dev/nvidia-uvm-tools: CUDA's unified memory
    "char-nvidia-caps",  # /dev/nvidia-caps/*: MIG instances
    "char-kfd",  # /dev/kfd: ROCm
    "char-drm",  # /dev/dri/card*, renderD*: ROCm, Vulkan, Intel
)

START_TIMEOUT = "1h"  # a first start may download and load several models; serve may extend it (EXTEND_TIMEOUT_USEC)
RESTART_DELAY = "10s"
DEFAULT_DRAIN_S = 30.0  # the profile's router.drain default (RouterSettings)
STOP_MARGIN_S = 30  # beyond the drain: stopping every model server (SIGTERM, then SIGKILL after its own grace)
NOTIFY_RELOAD_SINCE = 253  # the systemd version that has Type=notify-reload

# Settings that do not depend on the machine or the profile. Left out on purpose:
# - PrivateDevices=, PrivateUsers= (system units): PrivateDevices hides /dev/nvidia*, /dev/kfd and /dev/dri.
#   PrivateUsers is left out because a GPU driver that cannot use its devices inside a user namespace fails
#   silently (it reports no GPU and serve would plan for the CPU), which fitquant cannot check when it writes
#   the unit; the device list and the settings below contain the service instead. (User units run in a user
#   namespace anyway: systemd implies PrivateUsers= for the sandboxing settings of user services.)
# - MemoryDenyWriteExecute=: its seccomp filter refuses every mprotect() that adds PROT_EXEC and every writable
#   executable mapping; the native runtimes serve loads (CUDA/ROCm user-space drivers and their JIT, llama.cpp,
#   libffi closures behind ctypes callbacks) are not fitquant's to audit, and a refusal is a crash at model load.
# - ProcSubset=pid: CUDA reads /proc/driver/nvidia*, and the hardware probe reads /proc/meminfo and /proc/cpuinfo.
# - SystemCallFilter=~@resources: llama.cpp's --prio, --cpu-mask and NUMA placement, and the GPU runtimes' thread
#   affinity, use setpriority(), sched_setaffinity(), mbind() and set_mempolicy().
# - RemoveIPC=: a system unit runs as a real user, whose other sessions' IPC objects it would delete on stop.
# - PrivateNetwork=, IPAddressDeny=: the service is a network server.
_HARDENING = (
    ("NoNewPrivileges", "yes"),
    ("CapabilityBoundingSet", ""),
    ("AmbientCapabilities", ""),
    ("UMask", "0077"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "read-only"),
    ("PrivateTmp", "yes"),
    ("PrivateMounts", "yes"),
    ("ProtectProc", "invisible"),
    ("ProtectKernelTunables", "yes"),
    # Kernel modules cannot be loaded from the service: nvidia-uvm must be loaded at boot (the driver's udev
    # rules or nvidia-persistenced do this; `nvidia-modprobe -u -c0` otherwise).
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("ProtectClock", "yes"),
    ("ProtectHostname", "yes"),
    ("RestrictNamespaces", "yes"),
    ("RestrictRealtime", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("LockPersonality", "yes"),
    # AF_NETLINK: getifaddrs() (interface addresses) and the GPU runtimes' device queries
    ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK"),
    ("SystemCallArchitectures", "native"),
    ("SystemCallFilter", "@system-service"),
    ("SystemCallFilter", "~@privileged"),
    # a refused system call fails with EPERM (which the runtimes report) instead of killing the server with SIGSYS
    ("SystemCallErrorNumber", "EPERM"),
    ("DevicePolicy", "closed"),
)


@dataclass(frozen=True)
class UnitSpec:
    """What the unit says: how to start fitquant, where it may write, and what it is given."""

    command: tuple[str, ...]  # fitquant itself: its absolute path, or (python, "-m", "launcher")
    profile: Path  # absolute
    scope: Scope = "user"
    user: str | None = None  # system units: the account serve runs as (User=); None for user units
    writable_paths: tuple[Path, ...] = ()  # cache and state: must exist when the service starts
    optional_writable_paths: tuple[Path, ...] = ()  # made writable when they exist (`-` prefix)
    environment: Mapping[str, str] = field(default_factory=dict)
    # System units load api_key_file as a credential (never copied into the unit): install copies the profile's
    # key file, api_key_source, there first, so that systemd (root) never reads a path the user controls.
    api_key_file: Path | None = None
    api_key_source: Path | None = None
    pass_environment: tuple[str, ...] = ()  # variables taken from the service manager's environment (PassEnvironment=)
    devices: tuple[str, ...] = GPU_DEVICES
    extra_devices: tuple[str, ...] = ()  # device paths present on this machine, e.g. /dev/dxg (WSL)
    wants_ollama: bool = False  # the Ollama backend: start after ollama.service
    version: str = ""
    drain_s: float = DEFAULT_DRAIN_S  # the profile's router.drain: in-flight requests may finish this long on stop
    notify_reload: bool = False  # Type=notify-reload (systemd >= 253) instead of Type=notify with ExecReload=


def render_unit(spec: UnitSpec) -> str:
    """The text of fitquant.service for `spec`."""
    if not spec.command or not Path(spec.command[0]).is_absolute():
        raise ServiceError(f"the unit needs the absolute path of fitquant, not {spec.command[:1]!r}")
    if not spec.profile.is_absolute():
        raise ServiceError(f"the unit needs the absolute path of the profile, not {str(spec.profile)!r}")
    if spec.scope == "system" and not spec.user:
        raise ServiceError("a system unit needs the account fitquant serve runs as (User=)")
    argv = " ".join(exec_arg(arg) for arg in (*spec.command, "serve", "--profile", str(spec.profile)))
    if spec.api_key_file is not None and spec.scope == "system":
        # systemd (as root) copies the key into the service's credentials directory, %d, readable by the service
        # alone, at every start: from root's own copy (install writes it), never from the user's file, which a
        # symlink could turn into any file root may read. A user service reads the profile's api_key_file itself:
        # it is the user's own file (and systemd < 252 refuses credentials in user services).
        argv += f" --api-key-file %d/{API_KEY_CREDENTIAL}"
    ollama = ["ollama.service"] if spec.wants_ollama else []
    lines = [
        _header(spec.version, "fitquant service install"),
        "[Unit]",
        f"Description={_specifiers(_printable(f'fitquant: the models of {spec.profile.name}'))}",
        f"After={' '.join(['network-online.target', *ollama])}",
        f"Wants={' '.join(['network-online.target', *ollama])}",
        # give up after 5 failed starts in 10 minutes (a broken profile), instead of loading models forever
        "StartLimitIntervalSec=10min",
        "StartLimitBurst=5",
        "",
        "[Service]",
        # serve sends READY=1 once the pinned models are verified; only serve itself may notify, not its servers.
        # On SIGHUP serve reloads the profile, between RELOADING=1 (with MONOTONIC_USEC) and READY=1: the protocol
        # of Type=notify-reload (systemd >= 253), which sends the SIGHUP and waits for READY=1, so `systemctl reload`
        # returns once the profile is in effect. Older systemd (Debian 12 has 252) cannot parse that type: there
        # ExecReload= sends the signal itself, and the reload finishes after systemctl returns.
        f"Type={'notify-reload' if spec.notify_reload else 'notify'}",
        "NotifyAccess=main",
        f"ExecStart={argv}",
        *([] if spec.notify_reload else ["ExecReload=/bin/kill -HUP $MAINPID"]),  # $MAINPID: systemd expands it
        "Restart=on-failure",
        f"RestartSec={RESTART_DELAY}",
        f"TimeoutStartSec={START_TIMEOUT}",
        # SIGTERM to serve alone, which drains requests in flight (router.drain), then stops its servers by
        # process group; SIGKILL to whatever is left after the drain and a margin
        "KillMode=mixed",
        f"TimeoutStopSec={_stop_timeout(spec.drain_s)}s",
        # serve exits 0 after a drain; 143 (128 + SIGTERM) is a stop too, should the signal end it first
        "SuccessExitStatus=143",
    ]
    if spec.user:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?", spec.user):
            raise ServiceError(f"{spec.user!r} is not a user name systemd accepts")
        lines.append(f"User={spec.user}")
    lines.extend(_environment(spec.environment))
    if spec.pass_environment:
        for name in spec.pass_environment:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ServiceError(f"{name!r} is not an environment variable name")
        lines.append(f"PassEnvironment={' '.join(spec.pass_environment)}")
    if spec.api_key_file is not None and spec.scope == "system":
        # LoadCredential= takes the rest of the line as the path, unquoted: only specifiers need escaping
        lines.append(f"LoadCredential={API_KEY_CREDENTIAL}:{_specifiers(_plain_path(spec.api_key_file))}")
    lines.extend(f"{key}={value}" for key, value in _HARDENING)
    lines.extend(f"DeviceAllow={device} rw" for device in (*spec.devices, *spec.extra_devices))
    writable = [_path(p) for p in spec.writable_paths] + [f"-{_path(p)}" for p in spec.optional_writable_paths]
    if writable:
        lines.append(f"ReadWritePaths={' '.join(writable)}")
    lines += ["", "[Install]", f"WantedBy={'multi-user.target' if spec.scope == 'system' else 'default.target'}"]
    return "\n".join(lines) + "\n"


def _stop_timeout(drain_s: float) -> int:
    if not 0 <= drain_s <= 24 * 3600:  # systemd takes longer, but a stop that may take a day is a mistake
        raise ServiceError(f"the drain time must be 0 to 24h, not {drain_s!r} s (the profile's router.drain)")
    return math.ceil(drain_s) + STOP_MARGIN_S


def parse_systemd_version(text: str) -> int | None:
    """The version from `systemctl --version`'s first line ('systemd 252 (252.38-1~deb12u1)' -> 252); None when
    the text is not that."""
    match = re.match(r"\s*systemd\s+([0-9]+)\b", text)
    return int(match.group(1)) if match else None


def ollama_dropin_env(
    *,
    kv_type: str = "q8_0",
    flash_attn: bool = True,
    context_length: int | None = None,
    num_parallel: int | None = None,
    max_loaded_models: int | None = None,
    sched_spread: bool = False,
) -> dict[str, str]:
    """The Ollama server environment for a profile's settings: the same keys `ollama_form(plan)["env"]` renders for
    one plan (KV type, flash attention, the default context OLLAMA_CONTEXT_LENGTH in tokens per request, slots, and
    OLLAMA_SCHED_SPREAD when a plan spans several GPUs, which Ollama would otherwise put on one), plus how many models
    stay loaded. The batch is no server setting: the model fitquant derives carries it (num_batch)."""
    from launcher.backends.ollama_form import KV_TYPES

    if kv_type not in KV_TYPES:
        raise ServiceError(f"Ollama's KV cache type is one of {', '.join(KV_TYPES)}, not {kv_type!r}")
    if kv_type != "f16" and not flash_attn:
        raise ServiceError(
            f"a {kv_type} KV cache needs flash attention: llama.cpp refuses a quantized V cache without it and "
            "Ollama passes the type as it is, so the load fails; set flash attention on or use f16"
        )
    env = {"OLLAMA_KV_CACHE_TYPE": kv_type, "OLLAMA_FLASH_ATTENTION": "1" if flash_attn else "0"}
    for key, value in (
        ("OLLAMA_CONTEXT_LENGTH", context_length),
        ("OLLAMA_NUM_PARALLEL", num_parallel),
        ("OLLAMA_MAX_LOADED_MODELS", max_loaded_models),
    ):
        if value is not None:
            if value < 1:
                raise ServiceError(f"{key} must be at least 1, not {value}")
            env[key] = str(value)
    if sched_spread:
        env["OLLAMA_SCHED_SPREAD"] = "1"
    return env


def render_ollama_dropin(env: Mapping[str, str], *, version: str = "") -> str:
    """The text of ollama.service.d/fitquant.conf: `[Service]` with one Environment= line per variable."""
    if not env:
        raise ServiceError("the Ollama drop-in needs at least one variable")
    lines = [_header(version, "fitquant service install --backend ollama"), "[Service]", *_environment(env)]
    return "\n".join(lines) + "\n"


def is_fitquant_text(text: str) -> bool:
    """Whether a unit file's text is one fitquant wrote (its first line is MARKER ...)."""
    return text.startswith(MARKER)


# ---------------------------------------------------------------------------------------------------------------
# systemd escaping

_C_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _specifiers(text: str) -> str:
    """`%` starts a specifier (%h, %n, ...) in almost every setting: a literal one is written `%%`."""
    return text.replace("%", "%%")


def quoted(value: str) -> str:
    """One word of Environment= or ExecStart= as systemd reads it back: in double quotes with C escapes
    (control characters as \\xNN), specifiers doubled."""
    escaped = "".join(_C_ESCAPES.get(c, f"\\x{ord(c):02x}" if _CONTROL.match(c) else c) for c in value)
    return '"' + _specifiers(escaped) + '"'


def exec_arg(arg: str) -> str:
    """One argument of ExecStart= as systemd reads it back: `%` doubled (specifiers) and `$` doubled (variable
    expansion); quoted when it holds anything but plain path characters, or is empty."""
    text = _specifiers(arg) if re.fullmatch(r"[A-Za-z0-9_@%+=:,./$-]+", arg) else quoted(arg)
    return text.replace("$", "$$")


def _environment(env: Mapping[str, str]) -> list[str]:
    for key in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ServiceError(f"{key!r} is not an environment variable name")
    return [f"Environment={quoted(f'{key}={value}')}" for key, value in sorted(env.items())]


def _plain_path(path: Path) -> str:
    text = str(path)
    if not path.is_absolute():
        raise ServiceError(f"systemd needs an absolute path, not {text!r}")
    if _CONTROL.search(text):
        raise ServiceError(f"systemd cannot name a path with control characters: {text!r}")
    return text


def _path(path: Path) -> str:
    """An absolute path in a path-list setting (ReadWritePaths=): such lists are unquoted but not C-unescaped, so a
    path with spaces is double-quoted with only `\\` and `"` escaped."""
    text = _specifiers(_plain_path(path))
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _printable(text: str) -> str:
    return _CONTROL.sub("?", text)


def _header(version: str, how: str) -> str:
    written_by = f"{MARKER} {version}".rstrip()
    return (f"{written_by} ({how}), which rewrites it; `fitquant service uninstall` removes it.\n"
            "# Keep local changes in a drop-in of your own (systemctl edit).\n")  # fmt: skip
