"""Putting fitquant's systemd files in place, taking them away, and saying what is there.

- `unit_spec(profile, scope=...)` gathers what the unit needs from this machine: the fitquant executable, the
  account (system units), the cache and state folders serve writes, the FITQUANT_* settings, the API key file.
- `service_files(spec, ...)` renders the unit (and, for the Ollama backend, the drop-in) at their paths.
- `install_service(spec, ...)` writes them atomically (a temporary file in the same folder, then a rename), refusing to
  replace a file fitquant did not write unless `force`; a dry run writes nothing.
- `uninstall_service(scope)` removes fitquant's files and the `*.wants/` links `systemctl enable` made for them, and
  nothing else; `service_status(scope)` reports the files and, where systemctl answers, `systemctl is-active`.

This module never runs systemctl to change anything: it returns the commands to run (enabling a server is the
user's decision, and there may be no systemd running where the files are written). OSError from the file system
and from running systemctl is translated into ServiceError (or an unknown state) here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from launcher.errors import ServiceError
from launcher.service.units import (
    API_KEY_CREDENTIAL,
    DEFAULT_DRAIN_S,
    NOTIFY_RELOAD_SINCE,
    OLLAMA_DROPIN,
    UNIT_NAME,
    Scope,
    UnitSpec,
    is_fitquant_text,
    parse_systemd_version,
    render_ollama_dropin,
    render_unit,
)

if TYPE_CHECKING:
    from launcher.profiles import Profile

__all__ = [
    "SYSTEM_CREDENTIALS_DIR",
    "SYSTEM_UNIT_DIR",
    "FileState",
    "InstallResult",
    "ProfileService",
    "ServiceFile",
    "ServiceStatus",
    "UninstallResult",
    "fitquant_command",
    "install_service",
    "installed_systemd_version",
    "profile_service",
    "read_key_source",
    "service_environment",
    "service_files",
    "service_status",
    "uninstall_service",
    "unit_dir",
    "unit_spec",
    "write_atomic",
    "write_credential",
]

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
# Root's copies of API keys for system units (LoadCredential=): 0700 folder, 0600 files, written by install.
SYSTEM_CREDENTIALS_DIR = Path("/etc/fitquant/credentials")
MAX_KEY_BYTES = 64 * 1024  # an API key is a line; a larger "key file" is something else
SYSTEMCTL_TIMEOUT_S = 10.0
# Passed from the installing shell into the unit, so that the service finds what `fitquant run` finds here.
_PASSED = ("OLLAMA_HOST", "HF_ENDPOINT")
# Folder settings: passed only when the service runs as the installing user (under sudo they are root's).
_PASSED_SAME_USER = ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "HF_HOME", "HF_HUB_CACHE", "OLLAMA_MODELS")
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
_STATES = {"active", "inactive", "failed", "activating", "deactivating", "reloading", "refreshing", "maintenance"}


@dataclass(frozen=True)
class ServiceFile:
    """One file fitquant writes: where, what, and which kind."""

    path: Path
    text: str
    kind: Literal["unit", "ollama-dropin"]


@dataclass
class InstallResult:
    files: list[ServiceFile]
    written: bool  # False for a dry run
    replaced: list[Path] = field(default_factory=list)  # files that were there before (fitquant's, or --force)
    created_dirs: list[Path] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # to run next, in order
    notes: list[str] = field(default_factory=list)


@dataclass
class UninstallResult:
    removed: list[Path] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)  # (path, why it was left)
    commands: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FileState:
    path: Path
    kind: Literal["unit", "ollama-dropin"]
    exists: bool
    ours: bool | None  # None: absent or unreadable
    enabled: bool | None = None  # units: a `*.wants/` link exists


@dataclass(frozen=True)
class ServiceStatus:
    scope: Scope
    files: list[FileState]
    active: str | None  # `systemctl is-active`: active, inactive, failed, ...; None when systemctl cannot say
    active_note: str | None = None  # why it is None


# ---------------------------------------------------------------------------------------------------------------
# What the unit needs from this machine


def unit_dir(scope: Scope, *, environ: Mapping[str, str] | None = None) -> Path:
    """~/.config/systemd/user (XDG_CONFIG_HOME respected) for user units, /etc/systemd/system for system units."""
    if scope == "system":
        return SYSTEM_UNIT_DIR
    env = os.environ if environ is None else environ
    config = env.get("XDG_CONFIG_HOME", "").strip()
    base = Path(config) if config and Path(config).is_absolute() else Path.home() / ".config"
    return base / "systemd" / "user"


def fitquant_command(argv0: str | None = None) -> tuple[str, ...]:
    """How the unit starts fitquant: the running `fitquant` script, else the one on PATH, else this Python with
    `-m launcher` (not resolved: a virtual environment's python is a symlink that must stay one)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if argv0 and Path(argv0).name == "fitquant":
        path = Path(argv0).resolve()
        if path.is_file() and os.access(path, os.X_OK):
            return (str(path),)
    found = shutil.which("fitquant")
    if found:
        return (str(Path(found).resolve()),)
    return (str(Path(sys.executable).absolute()), "-m", "launcher")


def service_environment(environ: Mapping[str, str] | None = None, *, same_user: bool = True) -> dict[str, str]:
    """The settings the unit passes on: FITQUANT_* (no key, token, secret or password: the API key travels as a
    credential), OLLAMA_HOST, HF_ENDPOINT, and the folder settings when the service runs as this user; and
    PYTHONUNBUFFERED so that every log line reaches the journal when it is written."""
    env = os.environ if environ is None else environ
    passed = {}
    for key, value in env.items():
        fitquant = key.startswith("FITQUANT_") and not any(word in key for word in _SECRET_WORDS)
        if value and (fitquant or key in _PASSED or (same_user and key in _PASSED_SAME_USER)):
            passed[key] = value
    passed["PYTHONUNBUFFERED"] = "1"
    return passed


def unit_spec(
    profile: Path,
    *,
    scope: Scope = "user",
    backend: str = "llamacpp",
    api_key_file: Path | None = None,
    pass_environment: Sequence[str] = (),
    user: str | None = None,
    command: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    credentials_dir: Path | None = None,
    drain_s: float = DEFAULT_DRAIN_S,
    systemd_version: int | None = None,
) -> UnitSpec:
    """The unit for `fitquant serve --profile PROFILE` on this machine. A system unit runs as `user` (default: the
    user who ran sudo, else the current one), with that user's cache and state folders writable, and loads the
    API key from root's copy in `credentials_dir` (default SYSTEM_CREDENTIALS_DIR), which install writes. `drain_s`
    is the profile's router.drain (the stop timeout follows it); `systemd_version` picks how reload is declared
    (default: the installed systemd's; unknown: the form every version takes)."""
    from launcher import __version__

    env = dict(os.environ if environ is None else environ)
    if scope == "system":
        user = user or _invoking_user(env)
        home = _home_of(user)
    else:
        user, home = None, Path.home()
    same_user = home == Path.home()
    writable, optional = _writable_dirs(env, home=home, same_user=same_user, ollama=backend == "ollama")
    key_file = api_key_file.expanduser().absolute() if api_key_file else None
    key_source = None
    if key_file is not None and scope == "system":
        key_source, key_file = key_file, (credentials_dir or SYSTEM_CREDENTIALS_DIR) / API_KEY_CREDENTIAL
    return UnitSpec(
        command=tuple(command) if command else fitquant_command(),
        profile=profile.expanduser().absolute(),
        scope=scope,
        user=user,
        writable_paths=writable,
        optional_writable_paths=optional,
        environment=service_environment(env, same_user=same_user),
        api_key_file=key_file,
        api_key_source=key_source,
        pass_environment=tuple(pass_environment),
        extra_devices=("/dev/dxg",) if Path("/dev/dxg").exists() else (),  # WSL's GPU, by path: it has no major name
        wants_ollama=backend == "ollama",
        version=__version__,
        drain_s=drain_s,
        notify_reload=(systemd_version or installed_systemd_version() or 0) >= NOTIFY_RELOAD_SINCE,
    )


def installed_systemd_version(run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> int | None:
    """The version of the systemd whose systemctl is on PATH (`systemctl --version`); None when there is none or it
    does not answer."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return None
    try:
        done = run([systemctl, "--version"], capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_systemd_version(done.stdout or "") if done.returncode == 0 else None


@dataclass(frozen=True)
class ProfileService:
    """What installing a profile's service takes: the unit, the Ollama drop-in's environment (None: no drop-in),
    and what the user should know."""

    spec: UnitSpec
    ollama_env: dict[str, str] | None
    notes: list[str]


def profile_service(
    ref: str | os.PathLike[str],
    *,
    scope: Scope = "user",
    backend: str | None = None,
    user: str | None = None,
    command: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    credentials_dir: Path | None = None,
    systemd_version: int | None = None,
) -> ProfileService:
    """Read and check the profile `ref` (a path, or a name on the profile search path) and derive its service: the
    backend (`backend` may only confirm the profile's, or choose for `auto`), the API key's file (a credential of
    a system unit) or variable (PassEnvironment=), and for Ollama the server environment of the profile's defaults
    and models; the stop timeout follows the profile's router.drain. `user`, `command`, `environ`, `credentials_dir`,
    `systemd_version`: as for unit_spec. Raises ProfileError for a bad profile, ServiceError for settings the unit or
    Ollama cannot take."""
    from launcher.defaults import DEFAULT_PLAN_CONTEXT
    from launcher.profiles import find_profile, load_profile
    from launcher.service.units import ollama_dropin_env

    path = find_profile(ref)
    profile = load_profile(path)
    if backend is not None and profile.backend not in ("auto", backend):
        raise ServiceError(f"profile {path} runs the {profile.backend} backend, not {backend}")
    chosen = backend or profile.backend
    notes: list[str] = []
    api_key_file = None
    if profile.api_key_file is not None:
        api_key_file = Path(profile.api_key_file).expanduser()
        if not api_key_file.is_absolute():
            api_key_file = path.parent / api_key_file  # as the profile loader reads it: from the profile's folder
        if not api_key_file.is_file():
            raise profile.error(("api_key_file",), f"{api_key_file} is not a file")
    if profile.api_key_env is not None:
        manager = "systemctl --user" if scope == "user" else "systemctl"
        notes.append(
            f"the API key comes from ${profile.api_key_env} in the service manager's environment "
            f"(`{manager} set-environment`, or environment.d); api_key_file keeps it in a file instead"
        )
    ollama_env = None
    if chosen == "ollama":
        d = profile.defaults
        contexts = [entry.context or DEFAULT_PLAN_CONTEXT for entry in profile.models]
        ollama_env = ollama_dropin_env(
            kv_type=d.kv,
            flash_attn=d.flash_attn != "off",
            # Ollama's context is per request, i.e. per slot: the largest model context shared by the slots
            context_length=max(contexts) // d.parallel if contexts else None,
            num_parallel=d.parallel,
            max_loaded_models=len(profile.models) or None,  # every model of the profile stays loaded together
            # several GPUs: fitquant's plans spread layers over them; Ollama would otherwise put a model on one
            sched_spread=_gpu_count(profile) > 1,
        )
    elif chosen == "auto":
        notes.append("the profile's backend is auto: no Ollama drop-in is written (--backend ollama writes one)")
    passed = (profile.api_key_env,) if profile.api_key_env else ()
    spec = unit_spec(path, scope=scope, backend=chosen, api_key_file=api_key_file, pass_environment=passed,
                     user=user, command=command, environ=environ, credentials_dir=credentials_dir,
                     drain_s=profile.router.drain, systemd_version=systemd_version)  # fmt: skip
    return ProfileService(spec, ollama_env, notes)


def service_files(
    spec: UnitSpec, *, directory: Path | None = None, ollama_env: Mapping[str, str] | None = None
) -> list[ServiceFile]:
    """The unit, and the Ollama drop-in when `ollama_env` is given, at their paths under `directory` (default: the
    scope's unit folder)."""
    base = directory or unit_dir(spec.scope)
    files = [ServiceFile(base / UNIT_NAME, render_unit(spec), "unit")]
    if ollama_env is not None:
        dropin = render_ollama_dropin(ollama_env, version=spec.version)
        files.append(ServiceFile(base / OLLAMA_DROPIN, dropin, "ollama-dropin"))
    return files


def _invoking_user(env: Mapping[str, str]) -> str:
    sudo_user = env.get("SUDO_USER")
    if os.geteuid() == 0 and sudo_user and sudo_user != "root":
        return sudo_user
    return pwd.getpwuid(os.geteuid()).pw_name


def _home_of(user: str) -> Path:
    try:
        return Path(pwd.getpwnam(user).pw_dir)
    except KeyError:
        raise ServiceError(f"there is no user {user!r} on this machine") from None


def _writable_dirs(
    env: Mapping[str, str], *, home: Path, same_user: bool, ollama: bool
) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """The folders serve writes: fitquant's cache and state, and the Hugging Face hub cache (downloads); for the
    Ollama backend, Ollama's own folders when it has them (a server fitquant starts itself writes there)."""
    from launcher import paths

    if env.get("FITQUANT_HOME"):
        root = Path(env["FITQUANT_HOME"]).expanduser().absolute()
        cache, state = root / "cache", root / "state"
    elif same_user:
        cache, state = paths.cache_dir(), paths.state_dir()
    else:  # another account's XDG defaults, as platformdirs gives them to a service with no XDG variables
        cache, state = home / ".cache" / "fitquant", home / ".local" / "state" / "fitquant"
    writable = [cache, state, _hf_hub_cache(env if same_user else {}, home)]
    optional = [home / ".ollama"] if ollama else []
    if ollama and same_user and env.get("OLLAMA_MODELS"):
        optional.append(Path(env["OLLAMA_MODELS"]).expanduser())
    return tuple(p.absolute() for p in writable), tuple(p.absolute() for p in optional)


def _hf_hub_cache(env: Mapping[str, str], home: Path) -> Path:
    """Where huggingface_hub puts downloads (its constants.HF_HUB_CACHE, from these variables)."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    cache = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else home / ".cache"
    return cache / "huggingface" / "hub"


# ---------------------------------------------------------------------------------------------------------------
# Install, uninstall, status


def install_service(
    spec: UnitSpec,
    *,
    directory: Path | None = None,
    ollama_env: Mapping[str, str] | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> InstallResult:
    """Write the unit for `spec` (and the Ollama drop-in for `ollama_env`) into `directory` (default: the scope's
    unit folder), each atomically, and create the folders the unit makes writable (systemd refuses to start a unit
    whose ReadWritePaths= are missing), owned by the unit's user. Refuses (ServiceError, nothing written) when a
    file exists that fitquant did not write, unless `force`. A dry run renders and checks, and writes nothing."""
    files = service_files(spec, directory=directory, ollama_env=ollama_env)
    foreign = [f.path for f in files if _exists(f.path) and not _ours(f.path)]
    if foreign and not force:
        names = ", ".join(str(p) for p in foreign)
        raise ServiceError(
            f"{names} exists and was not written by fitquant; move it away, or pass --force to replace it"
        )
    key = None
    if spec.scope == "system" and spec.api_key_source is not None and spec.api_key_file is not None:
        key = read_key_source(spec.api_key_source, user=spec.user)  # refused before anything is written
    result = InstallResult(files=files, written=not dry_run, replaced=[f.path for f in files if _exists(f.path)])
    result.commands = _commands(spec.scope, "install", ollama=ollama_env is not None)
    if key is not None:
        result.notes.append(f"the API key of {spec.api_key_source} is copied to {spec.api_key_file} (root's, 0600), "
                            "which the unit loads: install again after changing the key")  # fmt: skip
    if spec.scope == "user":
        user = pwd.getpwuid(os.geteuid()).pw_name
        result.notes.append(f"a user service starts at boot only with lingering on: loginctl enable-linger {user}")
    if dry_run:
        return result
    if key is not None:
        assert spec.api_key_file is not None
        write_credential(spec.api_key_file, key)
    for f in files:
        try:
            write_atomic(f.path, f.text)
        except ServiceError as exc:
            if spec.scope == "system" and isinstance(exc.__cause__, PermissionError):
                raise ServiceError(f"{exc} (a system unit is installed as root: run this with sudo)") from exc
            raise
    result.created_dirs = _make_dirs(spec.writable_paths, owner=spec.user)
    return result


def uninstall_service(
    scope: Scope, *, directory: Path | None = None, credentials_dir: Path | None = None
) -> UninstallResult:
    """Remove fitquant's unit and drop-in from the scope's unit folder, with the `*.wants/` links that enabled the
    unit, and for a system unit root's copy of the API key (in `credentials_dir`; by default
    SYSTEM_CREDENTIALS_DIR when `directory` is the default too); leave every file fitquant did not write, saying so."""
    base = directory or unit_dir(scope)
    result = UninstallResult()
    if credentials_dir is None and directory is None and scope == "system":
        credentials_dir = SYSTEM_CREDENTIALS_DIR
    if credentials_dir is not None and scope == "system":
        credential = credentials_dir / API_KEY_CREDENTIAL
        if _exists(credential):  # only fitquant writes in its credentials folder
            _remove(credential)
            result.removed.append(credential)
    unit, dropin = base / UNIT_NAME, base / OLLAMA_DROPIN
    for path in (unit, dropin):
        if not _exists(path):
            continue
        if not _ours(path):
            result.kept.append((path, "not written by fitquant"))
            continue
        if path == unit:
            for link in sorted(base.glob(f"*.wants/{UNIT_NAME}")):
                if link.is_symlink():
                    _remove(link)
                    result.removed.append(link)
        _remove(path)
        result.removed.append(path)
    if dropin in result.removed:
        _remove_empty_dir(dropin.parent)
    if result.removed:
        result.commands = _commands(scope, "uninstall", ollama=dropin in result.removed)
    return result


def service_status(
    scope: Scope, *, directory: Path | None = None, run: Callable[..., subprocess.CompletedProcess[str]] | None = None
) -> ServiceStatus:
    """Which of fitquant's files exist in the scope's unit folder, whether they are fitquant's, whether the unit is
    enabled, and `systemctl [--user] is-active fitquant.service` where systemctl can answer."""
    base = directory or unit_dir(scope)
    unit, dropin = base / UNIT_NAME, base / OLLAMA_DROPIN
    enabled = any(link.is_symlink() for link in base.glob(f"*.wants/{UNIT_NAME}"))
    files = [
        FileState(unit, "unit", _exists(unit), _ours(unit) if _exists(unit) else None, enabled),
        FileState(dropin, "ollama-dropin", _exists(dropin), _ours(dropin) if _exists(dropin) else None),
    ]
    active, note = _is_active(scope, run or subprocess.run)
    return ServiceStatus(scope, files, active, note)


def write_atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    """Write `text` to `path` through a temporary file in the same folder, fsync'd and renamed over it: a reader
    sees the old file or the new one, never a part of either. Creates the folder when missing."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # unit files are read by the service manager and by `systemctl cat`
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise ServiceError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def read_key_source(path: Path, *, user: str | None) -> bytes:
    """The API key in `path`, read as a system unit's install reads it (as root, from a path the user names): a
    regular file, not a symbolic link, owned by the service's account `user` (default: this one), at most
    MAX_KEY_BYTES. Anything else is refused (ServiceError): root would hand that file to the user's service."""
    shown = f"api_key_file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ServiceError(f"{shown} is a symbolic link; a system service takes the key from a regular file "
                               "its user owns (point api_key_file at the file itself)") from None  # fmt: skip
        raise ServiceError(f"{shown} cannot be read ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ServiceError(f"{shown} is not a regular file")
        owner = user or pwd.getpwuid(os.geteuid()).pw_name
        try:
            owner_uid = pwd.getpwnam(owner).pw_uid
        except KeyError:
            raise ServiceError(f"there is no user {owner!r} on this machine") from None
        if info.st_uid != owner_uid:
            raise ServiceError(f"{shown} is owned by uid {info.st_uid}, not by {owner}, the account the service runs "
                               f"as; chown it to {owner} (it is copied for the service at install)")  # fmt: skip
        data = os.read(fd, MAX_KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_BYTES:
        raise ServiceError(f"{shown} is larger than {MAX_KEY_BYTES // 1024} KiB; not an API key")
    if not data.strip():
        raise ServiceError(f"{shown} is empty")
    return data


def write_credential(path: Path, key: bytes) -> None:
    """Write root's copy of an API key: mode 0600 in a 0700 folder of this account's, atomically, never through a
    symbolic link (the folder must be a real one; a link at `path` itself is replaced, not followed)."""
    folder = path.parent
    tmp: str | None = None
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise ServiceError(f"{folder} is not a folder of this account's (a symbolic link?); remove it")
        os.chmod(folder, 0o700)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")  # O_EXCL, mode 0600
        with os.fdopen(fd, "wb") as handle:
            handle.write(key)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # rename(2) replaces a link at `path`; it never writes through one
        tmp = None
        _fsync_dir(folder)
    except OSError as exc:
        raise ServiceError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _ours(path: Path) -> bool:
    """Whether fitquant wrote the file: its first line is the marker. A file that cannot be read is not ours."""
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return is_fitquant_text(handle.readline())
    except OSError:
        return False


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ServiceError(f"cannot remove {path}: {exc.strerror or exc}") from exc


def _remove_empty_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (another drop-in), or already gone: leave it
        path.rmdir()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _make_dirs(paths: Sequence[Path], *, owner: str | None) -> list[Path]:
    """Create the missing folders (and parents), chowned to `owner` when root creates them for another user."""
    uid_gid: tuple[int, int] | None = None
    if owner and os.geteuid() == 0:
        entry = pwd.getpwnam(owner)
        uid_gid = (entry.pw_uid, entry.pw_gid) if entry.pw_uid != 0 else None
    created: list[Path] = []
    try:
        for path in paths:
            missing = [p for p in (path, *path.parents) if not p.exists()]
            for folder in reversed(missing):
                folder.mkdir(mode=0o700)
                if uid_gid:
                    os.chown(folder, *uid_gid)
                created.append(folder)
    except OSError as exc:
        raise ServiceError(f"cannot create {exc.filename}: {exc.strerror or exc}") from exc
    return created


def _systemctl(scope: Scope) -> str:
    return "systemctl --user" if scope == "user" else "systemctl"


def _commands(scope: Scope, action: Literal["install", "uninstall"], *, ollama: bool) -> list[str]:
    ctl = _systemctl(scope)
    if action == "install":
        commands = [f"{ctl} daemon-reload"]
        if ollama:
            commands.append(f"{ctl} restart ollama.service")
        return [*commands, f"{ctl} enable --now {UNIT_NAME}"]
    commands = [f"{ctl} stop {UNIT_NAME}", f"{ctl} daemon-reload"]
    return commands + ([f"{ctl} restart ollama.service"] if ollama else [])


def _is_active(scope: Scope, run: Callable[..., subprocess.CompletedProcess[str]]) -> tuple[str | None, str | None]:
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return None, "systemctl is not installed"
    argv = [systemctl, *(["--user"] if scope == "user" else []), "is-active", UNIT_NAME]
    try:
        done = run(argv, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"systemctl did not answer: {exc}"
    answer = (done.stdout or "").strip().splitlines()
    if answer and answer[0] in _STATES:
        return answer[0], None
    error = (done.stderr or "").strip().splitlines()
    return None, error[0] if error else f"systemctl is-active exited with {done.returncode}"


def _gpu_count(profile: Profile) -> int:
    """The GPUs of the profile's machine: the devices it describes, else this machine's (the service runs here)."""
    from launcher.hardware import detect_hardware
    from launcher.profiles import profile_hardware

    machine = profile_hardware(profile) or detect_hardware()
    return sum(1 for d in machine.devices if d.kind not in ("cpu", "rpc"))
