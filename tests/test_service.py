"""`fitquant service`: the systemd unit and the Ollama drop-in (checked by systemd-analyze itself), installing and
uninstalling them safely, and the readiness notification over a real datagram socket."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher.cli import main
from launcher.errors import ServiceError
from launcher.service import install as install_mod
from launcher.service import notify
from launcher.service.install import (
    install_service,
    profile_service,
    service_status,
    uninstall_service,
    unit_spec,
    write_atomic,
)
from launcher.service.units import (
    MARKER,
    UnitSpec,
    exec_arg,
    ollama_dropin_env,
    parse_systemd_version,
    quoted,
    render_ollama_dropin,
    render_unit,
)

MAX_EXPOSURE = 4.0  # `systemd-analyze security`: 4.0 or lower is "OK" or better

PROFILE = """\
machine: test-box
backend: {backend}
defaults: {{kv: q8_0, parallel: 2}}
models:
  - {{model: qwen3:14b, context: 32k, port: 8081}}
  - {{model: gemma3:4b, context: 8k, port: 8082}}
"""


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit folders and the Hugging Face cache in tmp_path: a test never writes into the real home."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI: systemd-analyze is missing; scripts/setup test installs Debian's systemd package")
        pytest.skip("systemd-analyze is not installed (scripts/setup test installs it)")
    return found


def analyze(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    runtime = tmp_path / "runtime"  # the user manager's runtime folder, which --user needs even offline
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run([systemd_analyze(), *args], capture_output=True, text=True, env=env, timeout=120)


def fitquant_command() -> tuple[str, ...]:
    """The real fitquant of this environment: systemd-analyze verify checks that ExecStart's binary exists."""
    script = Path(sys.executable).parent / "fitquant"
    return (str(script),) if script.is_file() else (sys.executable, "-m", "launcher")


def write_profile(tmp_path: Path, backend: str = "llamacpp", extra: str = "") -> Path:
    path = tmp_path / "profiles" / "home server.yaml"  # a space: the unit must quote it
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PROFILE.format(backend=backend) + extra)
    return path


def exposure(output: str) -> float:
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    assert match, output
    return float(match.group(1))


# ---------------------------------------------------------------------------------------------------------------
# systemd checks the files


@pytest.mark.parametrize("scope", ["system", "user"])
def test_service_unit_passes_systemd_analyze_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scope: str):
    key = tmp_path / "api key"
    key.write_text("sekrit-value\n")
    monkeypatch.setenv("FITQUANT_LLAMA_SERVER", "/opt/llama $HOME/100%/llama-server")  # specifiers and variables
    monkeypatch.setenv("FITQUANT_API_KEY", "sekrit-value")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hugging face"))  # a writable path that must be quoted
    profile = write_profile(tmp_path, backend="ollama", extra=f"api_key_file: {key}\n")
    credentials = tmp_path / "etc-fitquant" / "credentials"
    planned = profile_service(profile, scope=scope, command=fitquant_command(),  # type: ignore[arg-type]
                              credentials_dir=credentials)  # fmt: skip
    result = install_service(planned.spec, directory=tmp_path / "units", ollama_env=planned.ollama_env)
    unit = (tmp_path / "units" / "fitquant.service").read_text()
    assert "sekrit-value" not in unit  # neither the file's key nor FITQUANT_API_KEY is written into the unit
    if scope == "system":  # the key travels as a credential, read by systemd as root from root's own copy
        assert f"LoadCredential=fitquant-api-key:{credentials}/fitquant-api-key\n" in unit
        assert " --api-key-file %d/fitquant-api-key\n" in unit
        assert (credentials / "fitquant-api-key").read_text() == "sekrit-value\n"
    else:  # a user service reads the profile's api_key_file itself: it is the user's own file
        assert "LoadCredential" not in unit
        assert "--api-key-file" not in unit
    assert 'Environment="FITQUANT_LLAMA_SERVER=/opt/llama $HOME/100%%/llama-server"' in unit
    assert f'"{tmp_path}/hugging face/hub"' in unit
    done = analyze(*(["--user"] if scope == "user" else []), "verify", str(result.files[0].path), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == ""  # systemd-analyze warns about bad keys and values without failing


def test_service_unit_verify_catches_a_broken_unit(tmp_path: Path):
    """The check above means something: a unit whose ExecStart is missing fails verify."""
    spec = UnitSpec(command=(str(tmp_path / "no-such-fitquant"),), profile=tmp_path / "p.yaml", version="0")
    path = tmp_path / "fitquant.service"
    path.write_text(render_unit(spec))
    done = analyze("verify", str(path), tmp_path=tmp_path)
    assert done.returncode != 0
    assert "no-such-fitquant" in done.stdout + done.stderr


@pytest.mark.parametrize("scope", ["system", "user"])
def test_service_unit_security_exposure_at_most_4(tmp_path: Path, scope: str):
    profile = write_profile(tmp_path, extra=f"api_key_file: {tmp_path / 'profiles' / 'home server.yaml'}\n")
    planned = profile_service(profile, scope=scope, command=fitquant_command(),  # type: ignore[arg-type]
                              credentials_dir=tmp_path / "credentials")  # fmt: skip
    result = install_service(planned.spec, directory=tmp_path / "units")
    user = ["--user"] if scope == "user" else []
    done = analyze(*user, "security", "--offline=true", str(result.files[0].path), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    score = exposure(done.stdout)
    print(f"systemd-analyze {' '.join([*user, 'security'])} --offline=true fitquant.service ({scope}): {score}")
    assert score <= MAX_EXPOSURE, done.stdout


def test_ollama_dropin_passes_systemd_analyze_verify(tmp_path: Path):
    profile = write_profile(tmp_path, backend="ollama")
    planned = profile_service(profile, command=fitquant_command())
    assert planned.ollama_env == {
        "OLLAMA_CONTEXT_LENGTH": "16384",  # the largest context (32k) over 2 slots: Ollama's num_ctx is per slot
        "OLLAMA_FLASH_ATTENTION": "1",
        "OLLAMA_KV_CACHE_TYPE": "q8_0",
        "OLLAMA_MAX_LOADED_MODELS": "2",
        "OLLAMA_NUM_PARALLEL": "2",
    }
    units = tmp_path / "units"
    install_service(planned.spec, directory=units, ollama_env=planned.ollama_env)
    dropin = units / "ollama.service.d" / "fitquant.conf"
    assert dropin.read_text().splitlines()[2:] == [
        "",
        "[Service]",
        'Environment="OLLAMA_CONTEXT_LENGTH=16384"',
        'Environment="OLLAMA_FLASH_ATTENTION=1"',
        'Environment="OLLAMA_KV_CACHE_TYPE=q8_0"',
        'Environment="OLLAMA_MAX_LOADED_MODELS=2"',
        'Environment="OLLAMA_NUM_PARALLEL=2"',
    ]
    # verify reads a unit's drop-ins from beside it: a stand-in for Ollama's own unit carries ours
    (units / "ollama.service").write_text(f"[Service]\nExecStart={shutil.which('true') or '/bin/true'} serve\n")
    done = analyze("verify", str(units / "ollama.service"), str(units / "fitquant.service"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == ""
    # ... and a mistake in a drop-in there is reported, so the clean run above did read ours
    (units / "ollama.service.d" / "zz-broken.conf").write_text("[Service]\nEnvironmnt=X=1\n")
    done = analyze("verify", str(units / "ollama.service"), tmp_path=tmp_path)
    assert "zz-broken.conf" in done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def test_service_unit_golden_text():
    spec = UnitSpec(
        command=("/opt/fit quant/bin/fitquant",),
        profile=Path("/home/ann/profiles/home.yaml"),
        scope="system",
        user="ann",
        writable_paths=(Path("/home/ann/.cache/fitquant"), Path("/home/ann/.local/state/fitquant")),
        optional_writable_paths=(Path("/home/ann/my models"),),
        environment={"FITQUANT_HOME": "/srv/fit%quant", "PYTHONUNBUFFERED": "1"},
        api_key_file=Path("/etc/fitquant/api-key"),
        pass_environment=("MY_KEY",),
        wants_ollama=True,
        version="0.1.0",
    )
    assert render_unit(spec) == GOLDEN_UNIT


GOLDEN_UNIT = """\
# Written by fitquant 0.1.0 (fitquant service install), which rewrites it; `fitquant service uninstall` removes it.
# Keep local changes in a drop-in of your own (systemctl edit).

[Unit]
Description=fitquant: the models of home.yaml
After=network-online.target ollama.service
Wants=network-online.target ollama.service
StartLimitIntervalSec=10min
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
ExecStart="/opt/fit quant/bin/fitquant" serve --profile /home/ann/profiles/home.yaml --api-key-file %d/fitquant-api-key
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=10s
TimeoutStartSec=1h
KillMode=mixed
TimeoutStopSec=60s
SuccessExitStatus=143
User=ann
Environment="FITQUANT_HOME=/srv/fit%%quant"
Environment="PYTHONUNBUFFERED=1"
PassEnvironment=MY_KEY
LoadCredential=fitquant-api-key:/etc/fitquant/api-key
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
UMask=0077
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateMounts=yes
ProtectProc=invisible
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
DevicePolicy=closed
DeviceAllow=char-nvidiactl rw
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia rw
DeviceAllow=char-nvidia-uvm rw
DeviceAllow=char-nvidia-caps rw
DeviceAllow=char-kfd rw
DeviceAllow=char-drm rw
ReadWritePaths=/home/ann/.cache/fitquant /home/ann/.local/state/fitquant -"/home/ann/my models"

[Install]
WantedBy=multi-user.target
"""


def test_service_unit_on_systemd_253_uses_notify_reload_and_the_profiles_drain():
    # systemd >= 253 sends the SIGHUP itself and waits for serve's READY=1: no ExecReload= (the other lines as golden)
    base = dict(command=("/usr/bin/fitquant",), profile=Path("/p.yaml"), version="0")
    old = render_unit(UnitSpec(**base)).splitlines()  # type: ignore[arg-type]
    new = render_unit(UnitSpec(**base, notify_reload=True, drain_s=90.5)).splitlines()  # type: ignore[arg-type]
    assert [line for line in old if line not in new] == [
        "Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "TimeoutStopSec=60s"
    ]  # fmt: skip
    assert [line for line in new if line not in old] == ["Type=notify-reload", "TimeoutStopSec=121s"]


@pytest.mark.parametrize(("version", "form"), [(252, "Type=notify\n"), (253, "Type=notify-reload\n"), (None, None)])
def test_service_profile_service_picks_reload_by_systemd_version_and_stops_after_the_drain(
    tmp_path: Path, version: int | None, form: str | None
):
    profile = write_profile(tmp_path, extra="router:\n  drain: 2m\n")
    planned = profile_service(profile, command=("/usr/bin/fitquant",), systemd_version=version)
    unit = render_unit(planned.spec)
    assert "\nTimeoutStopSec=150s\n" in unit and "\nSuccessExitStatus=143\n" in unit
    if form is None:  # the installed systemd's: the one systemd-analyze verify (above) checks the unit with
        installed = install_mod.installed_systemd_version()
        form = "Type=notify-reload\n" if (installed or 0) >= 253 else "Type=notify\n"
    assert f"\n{form}" in unit
    assert ("ExecReload=/bin/kill -HUP $MAINPID\n" in unit) == (form == "Type=notify\n")


def test_service_unit_default_drain_is_the_profiles():
    from launcher.profiles.schema import RouterSettings
    from launcher.service.units import DEFAULT_DRAIN_S

    assert RouterSettings().drain == DEFAULT_DRAIN_S  # a UnitSpec built without a profile stops like a default one


def test_service_unit_refuses_a_drain_no_stop_timeout_should_take():
    spec = UnitSpec(command=("/usr/bin/fitquant",), profile=Path("/p.yaml"), drain_s=25 * 3600.0)
    with pytest.raises(ServiceError, match=r"^the drain time must be 0 to 24h, not 90000.0 s \(the profile's router"):
        render_unit(spec)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("systemd 252 (252.38-1~deb12u1)\n+PAM +AUDIT +SELINUX\n", 252),
        ("systemd 256 (256.7-1-arch)\n", 256),
        ("systemd 253\n", 253),
        ("", None),
        ("systemctl: command not found\n", None),
        ("systemd two-five-three\n", None),
    ],
)
def test_service_parse_systemd_version(text: str, version: int | None):
    assert parse_systemd_version(text) == version


def test_service_installed_systemd_version_reads_systemctl():
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        assert install_mod.installed_systemd_version() is None
        return
    first = subprocess.run([systemctl, "--version"], capture_output=True, text=True, check=True).stdout.split()
    assert install_mod.installed_systemd_version() == int(first[1])


@pytest.mark.parametrize(
    ("arg", "written"),
    [
        ("/usr/bin/fitquant", "/usr/bin/fitquant"),
        ("serve", "serve"),
        ("/a b/c", '"/a b/c"'),
        ("100%", "100%%"),
        ("$HOME", "$$HOME"),
        ('say "hi"\\', '"say \\"hi\\"\\\\"'),
        ("", '""'),
        (";", '";"'),
        ("a\nb", '"a\\nb"'),
    ],
)
def test_service_exec_arg_escapes_for_systemd(arg: str, written: str):
    assert exec_arg(arg) == written


def test_service_quoted_value_escapes_for_systemd():
    assert quoted('K=a b%c"d\\e\tf') == '"K=a b%%c\\"d\\\\e\\tf"'


def test_service_unit_refuses_what_systemd_cannot_take(tmp_path: Path):
    base = UnitSpec(command=("/usr/bin/fitquant",), profile=Path("/p.yaml"))
    with pytest.raises(ServiceError, match="absolute path of fitquant"):
        render_unit(UnitSpec(command=("fitquant",), profile=Path("/p.yaml")))
    with pytest.raises(ServiceError, match="absolute path of the profile"):
        render_unit(UnitSpec(command=("/usr/bin/fitquant",), profile=Path("p.yaml")))
    with pytest.raises(ServiceError, match="User="):
        render_unit(UnitSpec(command=base.command, profile=base.profile, scope="system"))
    with pytest.raises(ServiceError, match="not an environment variable name"):
        render_unit(UnitSpec(command=base.command, profile=base.profile, environment={"A B": "1"}))
    with pytest.raises(ServiceError, match="control characters"):
        render_unit(UnitSpec(command=base.command, profile=base.profile, writable_paths=(Path("/a\nb"),)))


def test_service_ollama_env_checks_settings():
    assert ollama_dropin_env() == {"OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_FLASH_ATTENTION": "1"}
    assert ollama_dropin_env(kv_type="f16", flash_attn=False)["OLLAMA_FLASH_ATTENTION"] == "0"
    with pytest.raises(ServiceError, match="needs flash attention"):
        ollama_dropin_env(kv_type="q4_0", flash_attn=False)
    with pytest.raises(ServiceError, match="one of f16, q8_0, q4_0"):
        ollama_dropin_env(kv_type="q5_1")
    with pytest.raises(ServiceError, match="OLLAMA_NUM_PARALLEL must be at least 1"):
        ollama_dropin_env(num_parallel=0)


def test_service_ollama_dropin_takes_a_plans_environment():
    """The drop-in renders the environment ollama_form(plan) gives, unchanged."""
    env = {"OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_FLASH_ATTENTION": "1", "OLLAMA_NUM_PARALLEL": "1"}
    text = render_ollama_dropin(env, version="0.1.0")
    assert text.startswith(f"{MARKER} 0.1.0 ")
    assert 'Environment="OLLAMA_NUM_PARALLEL=1"' in text


def test_service_environment_passes_settings_not_secrets():
    env = {"FITQUANT_HOME": "/srv/fq", "FITQUANT_API_KEY": "k", "FITQUANT_HF_TOKEN": "t", "HF_TOKEN": "t",
           "OLLAMA_HOST": "127.0.0.1:11434", "XDG_CACHE_HOME": "/c", "PATH": "/bin"}  # fmt: skip
    assert install_mod.service_environment(env) == {
        "FITQUANT_HOME": "/srv/fq", "OLLAMA_HOST": "127.0.0.1:11434", "XDG_CACHE_HOME": "/c", "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    assert "XDG_CACHE_HOME" not in install_mod.service_environment(env, same_user=False)


def test_service_unit_spec_writable_dirs_follow_fitquant_home(tmp_path: Path):
    spec = unit_spec(tmp_path / "p.yaml", command=("/usr/bin/fitquant",))
    home = Path(os.environ["FITQUANT_HOME"])
    assert spec.writable_paths == (home / "cache", home / "state", tmp_path / "hf" / "hub")
    assert spec.environment["FITQUANT_HOME"] == str(home)


def test_service_fitquant_command_prefers_the_running_script(tmp_path: Path):
    script = tmp_path / "bin" / "fitquant"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert install_mod.fitquant_command(str(script)) == (str(script.resolve()),)
    command = install_mod.fitquant_command("/no/such/pytest")
    assert Path(command[0]).is_absolute()
    assert command[0].endswith("fitquant") or command[1:] == ("-m", "launcher")


# ---------------------------------------------------------------------------------------------------------------
# Install, uninstall, status


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_service_install_dry_run_writes_nothing(tmp_path: Path):
    profile = write_profile(tmp_path, backend="ollama")
    before = sorted(p for p in tmp_path.rglob("*"))
    code, out, err = run_cli("service", "install", "--profile", str(profile), "--dry-run")
    assert code == 0, err
    unit_path = tmp_path / "config" / "systemd" / "user" / "fitquant.service"
    assert f"# {unit_path}\n{MARKER}" in out
    assert f"# {unit_path.parent / 'ollama.service.d' / 'fitquant.conf'}\n" in out
    assert f"ExecStart={exec_arg(install_mod.fitquant_command()[0])}" in out
    assert "dry run: nothing was written" in out
    assert "systemctl --user daemon-reload" in out
    assert "systemctl --user restart ollama.service" in out
    assert "systemctl --user enable --now fitquant.service" in out
    assert sorted(p for p in tmp_path.rglob("*")) == before  # no unit, no folder, no cache directory


def test_service_install_writes_and_replaces_its_own_unit(tmp_path: Path):
    profile = write_profile(tmp_path)
    code, out, err = run_cli("service", "install", "--profile", str(profile))
    assert code == 0, err
    unit_path = tmp_path / "config" / "systemd" / "user" / "fitquant.service"
    assert f"wrote {unit_path}" in out
    assert unit_path.read_text().startswith(MARKER)
    assert oct(unit_path.stat().st_mode & 0o777) == "0o644"
    assert (Path(os.environ["FITQUANT_HOME"]) / "state").is_dir()  # ReadWritePaths= must exist at start
    assert not (unit_path.parent / "ollama.service.d").exists()  # llamacpp: no drop-in
    code, out, _ = run_cli("service", "install", "--profile", str(profile))
    assert code == 0
    assert f"replaced {unit_path}" in out


def test_service_install_refuses_a_unit_fitquant_did_not_write(tmp_path: Path):
    profile = write_profile(tmp_path)
    unit_path = tmp_path / "config" / "systemd" / "user" / "fitquant.service"
    unit_path.parent.mkdir(parents=True)
    unit_path.write_text("[Service]\nExecStart=/usr/local/bin/mine\n")
    code, _, err = run_cli("service", "install", "--profile", str(profile))
    assert code == 1
    assert err == (f"ServiceError: {unit_path} exists and was not written by fitquant; move it away, or pass --force "
                   "to replace it\n")  # fmt: skip
    assert unit_path.read_text() == "[Service]\nExecStart=/usr/local/bin/mine\n"
    assert not (Path(os.environ["FITQUANT_HOME"]) / "state").exists()  # refused before anything was done
    code, _, _ = run_cli("service", "install", "--profile", str(profile), "--force")
    assert code == 0
    assert unit_path.read_text().startswith(MARKER)


def test_service_install_checks_the_profile(tmp_path: Path):
    code, _, err = run_cli("service", "install", "--profile", str(tmp_path / "missing.yaml"))
    assert code == 1
    assert err.startswith("ProfileError: profile ")
    profile = write_profile(tmp_path)  # backend llamacpp
    code, _, err = run_cli("service", "install", "--profile", str(profile), "--backend", "ollama")
    assert code == 1
    assert err == f"ServiceError: profile {profile} runs the llamacpp backend, not ollama\n"
    assert not (tmp_path / "config").exists()


def test_service_api_key_env_is_passed_by_name_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME_SERVER_KEY", "sekrit-value")
    profile = write_profile(tmp_path, extra="api_key_env: HOME_SERVER_KEY\n")
    planned = profile_service(profile, command=("/usr/bin/fitquant",))
    text = render_unit(planned.spec)
    assert "PassEnvironment=HOME_SERVER_KEY" in text
    assert "sekrit-value" not in text
    assert any("HOME_SERVER_KEY" in note for note in planned.notes)


def test_service_write_atomic_never_leaves_a_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "units" / "fitquant.service"
    write_atomic(target, "old\n")

    def fail(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    for step in ("fsync", "replace"):
        with monkeypatch.context() as patch:
            patch.setattr(install_mod.os, step, fail)
            with pytest.raises(ServiceError, match=f"cannot write {target}: No space left on device"):
                write_atomic(target, "new\n" * 1000)
        assert target.read_text() == "old\n"
        assert sorted(p.name for p in target.parent.iterdir()) == ["fitquant.service"]  # no temporary file left
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n"


def test_service_uninstall_removes_only_fitquants_files(tmp_path: Path):
    units = tmp_path / "config" / "systemd" / "user"
    profile = write_profile(tmp_path, backend="ollama")
    planned = profile_service(profile, command=("/usr/bin/fitquant",))
    install_service(planned.spec, ollama_env=planned.ollama_env)
    wants = units / "default.target.wants"
    wants.mkdir()
    (wants / "fitquant.service").symlink_to(units / "fitquant.service")  # what `systemctl --user enable` makes
    (wants / "other.service").symlink_to(units / "other.service")
    (units / "other.service").write_text("[Service]\nExecStart=/bin/true\n")
    (units / "ollama.service.d" / "mine.conf").write_text("[Service]\nEnvironment=OLLAMA_DEBUG=1\n")
    assert service_status("user").files[0].enabled is True

    code, out, _ = run_cli("service", "uninstall")
    assert code == 0
    assert out.splitlines() == [
        f"removed {wants / 'fitquant.service'}",
        f"removed {units / 'fitquant.service'}",
        f"removed {units / 'ollama.service.d' / 'fitquant.conf'}",
        "now run:",
        "  systemctl --user stop fitquant.service",
        "  systemctl --user daemon-reload",
        "  systemctl --user restart ollama.service",
    ]
    left = sorted(str(p.relative_to(units)) for p in units.rglob("*"))
    assert left == ["default.target.wants", "default.target.wants/other.service", "ollama.service.d",
                    "ollama.service.d/mine.conf", "other.service"]  # fmt: skip

    # a fitquant.service someone else wrote stays, with its links
    (units / "fitquant.service").write_text("[Service]\nExecStart=/bin/true\n")
    (wants / "fitquant.service").symlink_to(units / "fitquant.service")
    result = uninstall_service("user")
    assert result.removed == []
    assert result.kept == [(units / "fitquant.service", "not written by fitquant")]
    assert (wants / "fitquant.service").is_symlink()


def test_service_uninstall_removes_an_emptied_dropin_folder(tmp_path: Path):
    units = tmp_path / "units"
    planned = profile_service(write_profile(tmp_path, backend="ollama"), command=("/usr/bin/fitquant",))
    install_service(planned.spec, directory=units, ollama_env=planned.ollama_env)
    result = uninstall_service("user", directory=units)
    assert len(result.removed) == 2
    assert list(units.iterdir()) == []


def test_service_status_reports_files_and_systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    units = tmp_path / "units"
    calls: list[list[str]] = []

    def fake_systemctl(argv: list[str], **_kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 3, stdout="inactive\n", stderr="")

    monkeypatch.setattr(install_mod.shutil, "which", lambda name: f"/usr/bin/{name}")
    state = service_status("user", directory=units, run=fake_systemctl)
    assert [(f.exists, f.ours) for f in state.files] == [(False, None), (False, None)]
    assert (state.active, calls) == ("inactive", [["/usr/bin/systemctl", "--user", "is-active", "fitquant.service"]])

    planned = profile_service(write_profile(tmp_path), command=("/usr/bin/fitquant",))
    install_service(planned.spec, directory=units)
    (units / "ollama.service.d").mkdir()
    (units / "ollama.service.d" / "fitquant.conf").write_text("[Service]\n")

    def no_systemd(argv: list[str], **_kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 1, stdout="", stderr="Failed to connect to bus: No medium found\n")

    state = service_status("system", directory=units, run=no_systemd)
    assert [(f.exists, f.ours, f.enabled) for f in state.files] == [(True, True, False), (True, False, None)]
    assert (state.active, state.active_note) == (None, "Failed to connect to bus: No medium found")

    monkeypatch.setattr(install_mod.shutil, "which", lambda name: None)
    assert service_status("user", directory=units).active_note == "systemctl is not installed"


def test_service_status_cli_without_systemd_says_why(tmp_path: Path):
    code, out, _ = run_cli("service", "status", "--user")
    assert code == 0
    unit_path = tmp_path / "config" / "systemd" / "user" / "fitquant.service"
    assert out.splitlines()[:2] == ["user units:", f"  {unit_path}: not installed"]
    assert out.splitlines()[3].startswith("  systemctl --user is-active fitquant.service: ")
    code, out, _ = run_cli("service", "status")  # neither flag: both scopes
    assert code == 0
    assert [line for line in out.splitlines() if not line.startswith(" ")] == ["user units:", "system units:"]


# ---------------------------------------------------------------------------------------------------------------
# Readiness: sd_notify over a real datagram socket


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_service_notify_sends_datagrams(notify_socket: socket.socket):
    assert notify.ready("2 models verified") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=2 models verified"
    assert notify.status("loading\nqwen3:14b") is True
    assert notify_socket.recv(4096) == b"STATUS=loading qwen3:14b"  # STATUS= stays one line
    assert notify.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"
    assert notify.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert notify.extend_timeout(90)
    assert notify_socket.recv(4096) == b"EXTEND_TIMEOUT_USEC=90000000"
    assert notify.reloading()
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", notify_socket.recv(4096))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux's")
def test_service_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch):
    name = f"fitquant-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready() is True
        assert sock.recv(4096) == b"READY=1"


def test_service_notify_without_systemd_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert notify.ready("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    with pytest.raises(ServiceError, match=r"cannot notify systemd at .*gone\.sock"):
        notify.ready()
    assert notify.ready(environ={}) is False


# ---------------------------------------------------------------------------------------------------------------
# The API key of a system unit: root's own copy, never a path the user controls


def _system_with_key(tmp_path: Path, key: Path) -> tuple[UnitSpec, Path]:
    profile = write_profile(tmp_path, extra=f"api_key_file: {key}\n")
    credentials = tmp_path / "etc" / "fitquant" / "credentials"
    planned = profile_service(profile, scope="system", command=fitquant_command(), credentials_dir=credentials)
    return planned.spec, credentials


def test_service_system_key_is_copied_root_only_and_the_unit_loads_the_copy(tmp_path: Path):
    key = tmp_path / "api-key"
    key.write_text("the-key\n")
    spec, credentials = _system_with_key(tmp_path, key)
    copy = credentials / "fitquant-api-key"
    assert spec.api_key_source == key and spec.api_key_file == copy
    dry = install_service(spec, directory=tmp_path / "units", dry_run=True)
    assert not copy.exists() and not credentials.exists()  # a dry run writes nothing
    assert f"the API key of {key} is copied to {copy} (root's, 0600), which the unit loads" in " ".join(dry.notes)
    install_service(spec, directory=tmp_path / "units")
    assert copy.read_bytes() == b"the-key\n"
    assert copy.stat().st_mode & 0o777 == 0o600 and credentials.stat().st_mode & 0o777 == 0o700
    assert copy.stat().st_uid == os.geteuid()
    unit = (tmp_path / "units" / "fitquant.service").read_text()
    assert f"LoadCredential=fitquant-api-key:{copy}\n" in unit and str(key) not in unit
    # a link planted where the copy goes is replaced, never written through
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    copy.unlink()
    copy.symlink_to(victim)
    install_service(spec, directory=tmp_path / "units")
    assert victim.read_text() == "untouched" and not copy.is_symlink() and copy.read_bytes() == b"the-key\n"
    removed = uninstall_service("system", directory=tmp_path / "units", credentials_dir=credentials)
    assert copy in removed.removed and not copy.exists()


def test_service_system_key_file_that_is_a_symlink_is_refused(tmp_path: Path):
    """A symlink to /etc/shadow (here: a stand-in root may read) would hand that file to the user's service."""
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$hash:19000:0:99999:7:::\n")
    key = tmp_path / "api-key"
    key.symlink_to(secret)
    spec, credentials = _system_with_key(tmp_path, key)
    for dry_run in (True, False):
        with pytest.raises(ServiceError) as caught:
            install_service(spec, directory=tmp_path / "units", dry_run=dry_run)
        assert str(caught.value) == (f"api_key_file {key} is a symbolic link; a system service takes the key from a "
                                     "regular file its user owns (point api_key_file at the file itself)")  # fmt: skip
    assert not credentials.exists() and not (tmp_path / "units").exists()  # refused before anything was written


def test_service_system_key_file_not_a_regular_file_is_refused(tmp_path: Path):
    key = tmp_path / "api-key-fifo"  # profile_service refuses it already; install checks again as it reads
    os.mkfifo(key)
    spec = unit_spec(write_profile(tmp_path), scope="system", api_key_file=key, command=fitquant_command(),
                     credentials_dir=tmp_path / "credentials")  # fmt: skip
    with pytest.raises(ServiceError, match=r"api-key-fifo is not a regular file$"):
        install_service(spec, directory=tmp_path / "units")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another account takes root")
def test_service_system_key_file_owned_by_another_account_is_refused(tmp_path: Path):
    key = tmp_path / "api-key"
    key.write_text("not-yours\n")
    os.chown(key, 65534, 65534)  # nobody's, while the service runs as this (root) account
    spec, credentials = _system_with_key(tmp_path, key)
    with pytest.raises(ServiceError) as caught:
        install_service(spec, directory=tmp_path / "units")
    assert str(caught.value) == (
        f"api_key_file {key} is owned by uid 65534, not by {spec.user}, the account the "
        f"service runs as; chown it to {spec.user} (it is copied for the service at install)"
    )
    assert not credentials.exists()
