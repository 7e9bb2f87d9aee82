"""Machine profiles: the schema, its one-line errors (file, line, field), the search path, `profile init` /
`show` / `validate`, and `plan --profile` answering for the machine a profile describes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher.cli import main
from launcher.errors import ProfileError
from launcher.hardware import describe_machine
from launcher.profiles import (
    find_profile,
    load_profile,
    parse_profile,
    profile_api_key,
    profile_hardware,
    profile_machine,
    profile_plan,
    profile_policy,
    profile_text,
    user_profile_path,
    write_profile,
)

GiB = 1024**3
MiB = 1024**2
REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "profiles"
EXAMPLE_NAMES = ("rtx3060-12g", "2x3090-home-server", "macbook-m2-32g", "cpu-only")


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def write(tmp_path: Path, text: str, name: str = "box.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- the examples


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_profiles_example_validates(name: str):
    profile = load_profile(EXAMPLES / f"{name}.yaml")
    assert profile.machine == name
    assert profile.models, "every example shows at least one model"
    assert profile_hardware(profile) is not None  # each describes its machine, so it plans from anywhere


def test_profiles_examples_describe_their_machines():
    rtx = profile_hardware(load_profile(EXAMPLES / "rtx3060-12g.yaml"))
    assert rtx is not None and rtx.described
    assert [(d.kind, d.name, d.total_bytes, d.free_bytes) for d in rtx.devices] == [
        ("cuda", "NVIDIA GeForce RTX 3060", 12 * GiB, 12 * GiB)
    ]
    assert rtx.ram_total_bytes == 32 * GiB

    server = load_profile(EXAMPLES / "2x3090-home-server.yaml")
    machine, reserve = profile_machine(server)
    assert reserve == 1 * GiB  # the smallest reserve is the Policy's; GPU0 keeps 512 MiB more
    assert [d.free_bytes for d in machine.devices] == [24 * GiB - 512 * MiB, 24 * GiB]
    assert server.api_key_file == "/etc/fitquant/api-key" and server.listen == "0.0.0.0:8080" and not server.loopback
    assert [(m.name, m.pin, m.preload, m.ttl, m.embeddings) for m in server.models] == [
        ("chat", True, False, None, False),
        ("coder", False, True, 1800.0, False),
        ("embed", False, False, None, True),
    ]
    assert [(p.url, p.api_key_env) for p in server.peers] == [("http://192.168.1.21:8080", "FITQUANT_MAC_KEY")]

    mac = profile_hardware(load_profile(EXAMPLES / "macbook-m2-32g.yaml"))
    assert mac is not None
    (gpu,) = mac.devices
    assert gpu.kind == "metal" and gpu.unified and 16 * GiB < (gpu.total_bytes or 0) < 32 * GiB
    assert gpu.name == "Apple M2 (10-core GPU)"  # its `chip`: the speed table's figures for it
    assert mac.ram_total_bytes == 32 * GiB

    cpu = profile_hardware(load_profile(EXAMPLES / "cpu-only.yaml"))
    assert cpu is not None and cpu.devices == () and cpu.ram_available_bytes == 24 * GiB


def test_profiles_validate_command_accepts_the_examples():
    files = [str(EXAMPLES / f"{name}.yaml") for name in EXAMPLE_NAMES]
    code, out, err = run("profile", "validate", *files)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"ok: {files[0]} (machine rtx3060-12g, 2 models)",
        f"ok: {files[1]} (machine 2x3090-home-server, 3 models)",
        f"ok: {files[2]} (machine macbook-m2-32g, 1 model)",  # its chip named: nothing to say
        f"ok: {files[3]} (machine cpu-only, 1 model)",
    ]


def test_profiles_chip_names_a_macs_chip_and_gpu_bin(tmp_path: Path):
    from launcher.speed import machine_speeds

    mac = profile_hardware(parse_profile("machine: mac\nunified: 36GiB\nchip: m3 max (30-core gpu)\n"))
    assert mac is not None and mac.devices[0].name == "Apple M3 Max (30-core GPU)"
    speed = machine_speeds(mac)["GPU0"]
    assert (speed.bandwidth_bytes_per_s, speed.backend) == (300e9, "metal")  # the 30-core bin's narrower bus
    unnamed = tmp_path / "unnamed.yaml"
    unnamed.write_text("machine: mac\nunified: 36GiB\n")
    code, out, _ = run("profile", "validate", str(unnamed))
    assert code == 0 and "GPU0 (Apple GPU (described)) is not in the chip table" in out  # no chip: no speed

    cases = {
        "machine: mac\nunified: 36GiB\nchip: M3 Max\n": "line 3: 'chip' is not one chip of the speed table: GPU "
        "name 'M3 Max' matches 2 chips (Apple M3 Max (30-core GPU); Apple M3 Max (40-core GPU)); name one of them",
        "machine: mac\nunified: 36GiB\nchip: M9 Hyper\n": "line 3: 'chip' is not one chip of the speed table: GPU "
        "name 'M9 Hyper' is not in the chip table (`fitquant hw --chips` lists all ",
        "machine: mac\nram: 36GiB\nchip: M3 Max (40-core GPU)\n": "line 3: 'chip' names a Mac's chip and GPU bin; "
        "give it with unified (a GPU under devices: is named by its own name)",
        "machine: mac\nunified: 36GiB\nchip: 42\n": "line 3: 'chip' must be a valid string, got 42",
        "machine: mac\nunified: 36GiB\nchip: ''\n": "line 3: 'chip' must have at least 1 character",
        "machine: mac\nunified: 36GiB\nchip: [M3, Max]\n": "line 3: 'chip' must be a valid string",
        f"machine: mac\nunified: 36GiB\nchip: {'M' * 100_000}\n": "line 3: 'chip' is not one chip of the speed "
        "table: GPU name 'MMMMM",
        'machine: mac\nunified: 36GiB\nchip: "M3\\e[2J Max"\n': "GPU name 'M3\\x1b[2J Max' is not in the chip table",
    }
    for text, message in cases.items():
        with pytest.raises(ProfileError) as caught:
            parse_profile(text)
        assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
        assert len(str(caught.value)) < 1500 and "\x1b" not in str(caught.value)  # one line, shown not sent


def test_profiles_init_names_a_macs_chip_where_the_speed_table_has_it():
    def mac(name: str):
        machine = describe_machine(unified=32 * GiB)
        return machine.model_copy(update={"devices": (machine.devices[0].model_copy(update={"name": name}),)})

    text = profile_text("mac", mac("Apple M2 Pro (19-core GPU)"))
    assert '\nchip: "M2 Pro (19-core GPU)"  # the chip and its GPU bin' in text
    assert profile_hardware(parse_profile(text)).devices[0].name == "Apple M2 Pro (19-core GPU)"  # type: ignore[union-attr]
    for name in ("Apple M5 Max (40-core GPU)", "Apple M2 Pro"):  # a chip the table lacks; a bin ioreg did not give
        text = profile_text("mac", mac(name))
        assert "\nchip:" not in text and f"# {name} is not in the speed table" in text
        parse_profile(text)  # still a valid profile


def test_profiles_validate_names_a_gpu_whose_speed_plans_cannot_know(tmp_path: Path):
    named = tmp_path / "named.yaml"
    named.write_text("machine: box\ndevices:\n  - {name: RTX 3060, kind: cuda, memory: 12GiB}\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("machine: box\ndevices:\n  - {name: Mystery GPU, kind: cuda, memory: 12GiB}\n"
                       "  - {name: Own Figures, kind: cuda, memory: 12GiB, bandwidth: 500GB/s}\n")  # fmt: skip
    code, out, err = run("profile", "validate", str(named), str(unknown))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"ok: {named} (machine box, 0 models)",  # a short name the table knows: nothing to say
        f"ok: {unknown} (machine box, 0 models)",
        f"note: {unknown}: GPU0 (Mystery GPU) is not in the chip table and has no 'bandwidth': its plans predict no "
        "speed; describe it under devices: with 'bandwidth' and 'flops', or with a chip name `fitquant plan "
        "--gpu-name` accepts",
    ]


# ---------------------------------------------------------------------------------------------- bad profiles

BOMB = "machine: x\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)

BAD = {
    "wrong type": ("machine: box\ndefaults:\n  parallel: two\n",
                   "line 3: 'defaults.parallel' must be a valid integer, got 'two'"),
    "wrong type (a YAML boolean)": ("machine: no\n",
                                    "line 1: 'machine' must be a valid string, got False (YAML reads a bare "
                                    "yes/no/on/off as true/false: quote it)"),
    "unknown key": ("machine: box\nmodels:\n  - model: qwen3:14b\n    ctx: 32k\n",
                    "line 4: 'models[0].ctx' is not a profile setting here; known: model, context, min_quant, "
                    "vision, alias, port, pin, preload, ttl, embeddings"),
    "negative size": ("machine: box\nreserve: -1GiB\n", "line 2: 'reserve' must not be negative, got '-1GiB'"),
    "negative size (a number)": ("machine: box\nram: -5\n", "line 2: 'ram' must not be negative, got -5"),
    "zero device memory": ("machine: box\ndevices:\n  - {name: a, kind: cuda, memory: 0GiB}\n",
                           "line 3: 'devices[0].memory' must be more than 0, got '0GiB'"),
    "bad unit": ("machine: box\nreserve:\n  GPU0: 2GX\n",
                 "line 3: 'reserve.GPU0' must be a size like 1GiB or 512MiB, got '2GX'"),
    "bad context": ("machine: box\nmodels:\n  - model: m\n    context: 32q\n",
                    "line 4: 'models[0].context' must be a context length like 32768 or 32k (more than 0), "
                    "got '32q'"),
    "duplicate ports": ("machine: box\nmodels:\n  - {model: a, port: 9001}\n  - {model: b, port: 9001}\n",
                        "line 4: 'models[1].port' 9001 is already the port of models[0]"),
    "duplicate aliases": ("machine: box\nmodels:\n  - {model: a, alias: chat}\n  - {model: b, alias: chat}\n",
                          "line 4: 'models[1].alias' 'chat' already names models[0]; give each model its own alias"),
    "unknown backend": ("machine: box\nbackend: vllm\n",
                        "line 2: 'backend' must be 'auto', 'llamacpp' or 'ollama', got 'vllm'"),
    "unknown device kind": ("machine: box\ndevices:\n  - {name: a, kind: tpu, memory: 8GiB}\n",
                            "line 3: 'devices[0].kind' must be 'cuda', 'rocm', 'metal', 'vulkan', 'cpu' or 'rpc', "
                            "got 'tpu'"),
    "not YAML": ("machine: box\n  reserve: [1GiB\n", "line 2: not valid YAML: mapping values are not allowed here"),
    "not a mapping": ("- machine: box\n", "line 1: is a list, not a profile (key: value lines: machine: NAME)"),
    "empty": ("# nothing\n", "is empty; a profile needs at least 'machine: NAME'"),
    "a key twice": ("machine: box\nlisten: a:1\nlisten: b:1\n", "line 3: 'listen' is given twice (first on line 2)"),
    "missing machine": ("listen: 127.0.0.1:8080\n", "line 1: 'machine' is required"),
    "alias bomb": (BOMB, "line 6: expands to more than 10000 values (YAML aliases)"),
    "recursive alias": ("machine: box\nrpc: &r [*r]\n", "line 2: the alias *r refers to itself"),
    "literal api key": ("machine: box\nlisten: 0.0.0.0:8080\napi_key: sk-very-secret\n",
                        "line 3: 'api_key' would hold an API key, and a profile never does: name an environment "
                        "variable (api_key_env: FITQUANT_API_KEY) or a file (api_key_file: PATH)"),
    "literal key in a model": ("machine: box\nmodels:\n  - model: a\n    token: abc\n",
                               "line 4: 'models[0].token' would hold an API key, and a profile never does: name an "
                               "environment variable (api_key_env: FITQUANT_API_KEY) or a file (api_key_file: PATH)"),
    "bad quant": ("machine: box\ndefaults:\n  min_quant: Q9_Z\n",
                  "line 3: 'defaults.min_quant' must be a quant fitquant knows, like Q4_K_M or Q8_0, got 'Q9_Z'"),
    "quantized V without flash attention": ("machine: box\ndefaults:\n  kv: q8_0\n  flash_attn: off\n",
                                            "line 4: 'defaults.flash_attn' is off, but a quantized V cache needs "
                                            "flash attention (llama.cpp refuses it otherwise); use kv: f16"),
    "bad rpc": ("machine: box\nrpc: [192.168.1.20]\n",
                "line 2: 'rpc[0]' must be HOST:PORT like 192.168.1.20:50052, got '192.168.1.20'"),
    "reserve for no device": ("machine: box\ndevices:\n  - {name: a, kind: cuda, memory: 8GiB}\nreserve:\n  GPU1: 2GiB\n",
                              "line 5: 'reserve.GPU1' names no device; use CPU, GPU0, a, default"),
    "llama_server with ollama": ("machine: box\nbackend: ollama\nllama_server: /bin/llama-server\n",
                                 "line 3: 'llama_server' is a llama.cpp setting; the backend is ollama"),
    "two errors": ("machine: box\ndefaults: {parallel: x}\nbackend: x\n",
                   "line 2: 'defaults.parallel' must be a valid integer, got 'x' (and 1 more)"),
    "absurd device memory": ("machine: box\ndevices:\n  - {name: a, kind: cuda, memory: 99999999999999999999999GiB}\n",
                             "line 3: 'devices[0].memory' must be at most 1 PiB, got '99999999999999999999999GiB'"),
    "absurd ram (a number)": ("machine: box\nram: 99999999999999999999999\n",
                              "line 2: 'ram' must be at most 1 PiB, got 99999999999999999999999"),
    "absurd reserve": ("machine: box\nreserve: {default: 1GiB, GPU0: 2048TiB}\n",
                       "line 2: 'reserve.GPU0' must be at most 1 PiB, got '2048TiB'"),
    "absurd context": ("machine: box\nmodels:\n  - {model: m, context: 99999999999999999999}\n",
                       "line 3: 'models[0].context' must be at most 16777216 tokens (16M), got 99999999999999999999"),
    "absurd context (text)": ("machine: box\nmodels:\n  - {model: m, context: 17M}\n",
                              "line 3: 'models[0].context' must be at most 16777216 tokens (16M), got '17M'"),
    "a 5000-digit size": (f"machine: box\nram: '{'9' * 5000}'\n",
                          "line 2: 'ram' must be a size like 1GiB or 512MiB, got '99999999999999999999999999999999999...'"),
    "host is replaced by listen": ("machine: box\nhost: 0.0.0.0\n",
                                   "line 2: 'host' is replaced by 'listen' (HOST:PORT of fitquant serve's one endpoint); "
                                   "model servers bind 127.0.0.1"),
    "listen without a port": ("machine: box\nlisten: 0.0.0.0\n",
                              "line 2: 'listen' must be HOST:PORT like 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080, "
                              "got '0.0.0.0'"),
    "listen a bare port": ("machine: box\nlisten: 8080\n",
                           "line 2: 'listen' must be HOST:PORT like 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080, "
                           "got 8080"),
    "listen IPv6 without brackets": ("machine: box\nlisten: '::1:8080'\n",
                                     "line 2: 'listen' must be HOST:PORT like 127.0.0.1:8080, 0.0.0.0:8080 or "
                                     "[::1]:8080, got '::1:8080'"),
    "listen port 0": ("machine: box\nlisten: 127.0.0.1:0\n",
                      "line 2: 'listen' must be HOST:PORT like 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080, "
                      "got '127.0.0.1:0'"),
    "model port is listen's": ("machine: box\nlisten: 0.0.0.0:9000\nmodels:\n  - model: m\n    port: 9000\n",
                               "line 5: 'models[0].port' 9000 is the port of listen (0.0.0.0:9000); give the model's "
                               "own server another port, or leave port out"),
    "model port is the default listen's": ("machine: box\nmodels:\n  - {model: m, port: 8080}\n",
                                           "line 3: 'models[0].port' 8080 is the port of listen (127.0.0.1:8080); "
                                           "give the model's own server another port, or leave port out"),
    "ttl on a pinned model": ("machine: box\nmodels:\n  - model: m\n    pin: true\n    ttl: 5m\n",
                              "line 5: 'models[0].ttl' is set, but a pinned model is never unloaded; drop ttl or pin"),
    "bad ttl": ("machine: box\nmodels:\n  - model: m\n    ttl: later\n",
                "line 4: 'models[0].ttl' must be a duration like 30s or 10m, got 'later'"),
    "pin not a boolean": ("machine: box\nmodels:\n  - model: m\n    pin: 'yes'\n",
                          "line 4: 'models[0].pin' must be a valid boolean, got 'yes'"),
    "bad duration": ("machine: box\nrouter:\n  drain: soon\n",
                     "line 3: 'router.drain' must be a duration like 30s or 10m, got 'soon'"),
    "negative duration": ("machine: box\nrouter:\n  min_residency: -5s\n",
                          "line 3: 'router.min_residency' must not be negative, got '-5s'"),
    "negative duration (a number)": ("machine: box\nrouter:\n  max_wait: -1\n",
                                     "line 3: 'router.max_wait' must not be negative, got -1"),
    "absurd duration": ("machine: box\nrouter:\n  swap_after: 87601h\n",
                        "line 3: 'router.swap_after' must be at most 10 years, got '87601h'"),
    "queue of 0": ("machine: box\nrouter:\n  max_queue: 0\n",
                   "line 3: 'router.max_queue' must be greater than or equal to 1, got 0"),
    "queue too long": ("machine: box\nrouter:\n  max_queue: 10001\n",
                       "line 3: 'router.max_queue' must be less than or equal to 10000, got 10001"),
    "body limit of 0": ("machine: box\nrouter:\n  max_body: 0MiB\n",
                        "line 3: 'router.max_body' must be more than 0, got '0MiB'"),
    "unknown router key": ("machine: box\nrouter:\n  queue: 5\n",
                           "line 3: 'router.queue' is not a profile setting here; known: min_residency, max_queue, "
                           "max_wait, swap_after, drain, max_body, body_timeout"),
    "insecure not a boolean": ("machine: box\ninsecure: 'true'\n",
                               "line 2: 'insecure' must be a valid boolean, got 'true'"),
    "peer not http": ("machine: box\npeers:\n  - ftp://192.168.1.21\n",
                      "line 3: 'peers[0].url' must be an http(s) URL like http://192.168.1.20:8080, "
                      "got 'ftp://192.168.1.21'"),
    "peer with a bad port": ("machine: box\npeers:\n  - url: http://a:99999\n",
                             "line 3: 'peers[0].url' must be an http(s) URL like http://192.168.1.20:8080, "
                             "got 'http://a:99999'"),
    "peer with credentials": ("machine: box\npeers:\n  - http://me:s3cret@192.168.1.21:8080\n",
                              "line 3: 'peers[0].url' must not hold credentials; name the peer's key with api_key_env"),
    "peer with a query": ("machine: box\npeers:\n  - http://a:8080/?key=1\n",
                          "line 3: 'peers[0].url' must be a plain base URL without ?query or #fragment, "
                          "got 'http://a:8080/?key=1'"),
    "peer twice": ("machine: box\npeers:\n  - http://a:8080\n  - url: http://a:8080/\n",
                   "line 4: 'peers[1]' 'http://a:8080' is already peers[0]"),
    "peer not a URL or mapping": ("machine: box\npeers:\n  - 5\n",
                                  "line 3: 'peers[0]' must be a URL like http://192.168.1.20:8080 or a mapping with "
                                  "url:, got 5"),
    "peer key env not a name": ("machine: box\npeers:\n  - url: http://a:8080\n    api_key_env: my key\n",
                                "line 4: 'peers[0].api_key_env' must be an environment variable name (letters, digits "
                                "and _, not first a digit), got 'my key'"),
    "peer without url": ("machine: box\npeers:\n  - api_key_env: K\n",
                         "line 3: 'peers[0].url' is required"),
    "origin with a path": ("machine: box\norigins:\n  - https://chat.example.com/app\n",
                           "line 3: 'origins[0]' must be a web page's origin like https://chat.example.com or "
                           "http://localhost:3000 (scheme://host[:port], no path; * matches any part), got "
                           "'https://chat.example.com/app'"),
    "origin without a scheme": ("machine: box\norigins: [chat.example.com]\n",
                                "line 2: 'origins[0]' must be a web page's origin like https://chat.example.com or "
                                "http://localhost:3000 (scheme://host[:port], no path; * matches any part), got "
                                "'chat.example.com'"),
    "origins not a list": ("machine: box\norigins: https://chat.example.com\n",
                           "line 2: 'origins' must be a valid list, got 'https://chat.example.com'"),
    "origin a number": ("machine: box\norigins: [42]\n",
                        "line 2: 'origins[0]' must be a web page's origin like https://chat.example.com or "
                        "http://localhost:3000 (scheme://host[:port], no path; * matches any part), got 42"),
    "origin beyond any browser's": ("machine: box\norigins: [https://" + "a" * 300 + ".example]\n",
                                    "line 2: 'origins[0]' must be a web page's origin like https://chat.example.com "
                                    "or http://localhost:3000 (scheme://host[:port], no path; * matches any part), "
                                    "got 'https://aaaaaaaaaaaaaaaaaaaaaaaaaaa...'"),
    "origin of many stars": ("machine: box\norigins: ['http://*a*a*.example:*']\n",
                             "line 2: 'origins[0]' may hold at most two *, as in http://*.example.com:*, got "
                             "'http://*a*a*.example:*'"),
    "host empty": ("machine: box\nhosts: ['']\n",
                   "line 2: 'hosts[0]' must be a host name like llm.home.arpa or *.home.arpa (no scheme, no port), "
                   "got ''"),
    "host with a port": ("machine: box\nhosts:\n  - llm.home.arpa:8080\n",
                         "line 3: 'hosts[0]' must be a host name like llm.home.arpa or *.home.arpa (no scheme, no "
                         "port), got 'llm.home.arpa:8080'"),
    "host with a scheme": ("machine: box\nhosts:\n  - http://llm.home.arpa\n",
                           "line 3: 'hosts[0]' must be a host name like llm.home.arpa or *.home.arpa (no scheme, no "
                           "port), got 'http://llm.home.arpa'"),
    "nested 400 levels": ("machine: box\nx:\n" + "".join("  " * i + "  a:\n" for i in range(400)) + "  " * 401 + "1\n",
                          "line 51: nests more than 50 levels deep; a profile needs a few"),
    "nested 400 lists": ("machine: box\nx:\n" + "".join("  " * i + "- \n" for i in range(400)),
                         "line 52: nests more than 50 levels deep; a profile needs a few"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(BAD))
def test_profiles_bad_profile_is_one_line_naming_file_line_and_field(tmp_path: Path, kind: str):
    text, expected = BAD[kind]
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    where = f"profile {path} " if expected.startswith("line ") else f"profile {path}: "  # no line for an empty file
    assert str(caught.value) == where + expected
    code, out, err = run("profile", "validate", str(path))
    assert (code, out) == (1, "")
    assert err.splitlines() == [f"ProfileError: {caught.value}"]


def test_profiles_alias_bomb_is_refused_before_it_expands():
    import time

    deeper = BOMB + "j: &j [" + ", ".join(["*i"] * 9) + "]\n"  # 10^10 values if expanded
    start = time.perf_counter()
    with pytest.raises(ProfileError, match="expands to more than 10000 values"):
        parse_profile(deeper)
    assert time.perf_counter() - start < 1.0


def test_profiles_a_few_aliases_and_merge_keys_are_fine():
    profile = parse_profile(
        "machine: box\nmodels:\n  - &base {model: a, context: 8k, vision: true}\n  - <<: *base\n    model: b\n"
    )
    assert [(m.model, m.context, m.vision) for m in profile.models] == [("a", 8192, True), ("b", 8192, True)]


@pytest.mark.parametrize(
    "nested",
    ["[" * 100_000 + "]" * 100_000, "{a: " * 100_000 + "1" + "}" * 100_000, "[{a: " * 50_000 + "1" + "}]" * 50_000],
)
def test_profiles_deep_flow_nesting_is_one_line_not_a_recursion_error(nested: str):
    with pytest.raises(ProfileError) as caught:
        parse_profile(f"machine: box\nrpc: {nested}\n", source="deep.yaml")
    assert str(caught.value) == "profile deep.yaml line 2: nests more than 50 levels deep; a profile needs a few"


def test_profiles_too_many_aliases_are_refused():
    text = "machine: box\nx: &x 1\nrpc: [" + ", ".join(["*x"] * 101) + "]\n"
    with pytest.raises(ProfileError, match=r"line 3: uses more than 100 YAML aliases"):
        parse_profile(text, source="many.yaml")


def test_profiles_missing_file(tmp_path: Path):
    path = tmp_path / "absent.yaml"
    code, _, err = run("profile", "validate", str(path))
    assert code == 1
    assert err.strip() == f"ProfileError: profile {path}: no such file"


def test_profiles_directory_where_a_file_should_be(tmp_path: Path):
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    code, _, err = run("profile", "validate", str(folder))
    assert code == 1
    assert err.strip() == f"ProfileError: profile {folder}: is a directory, not a profile file"


def test_profiles_binary_file_is_not_a_profile(tmp_path: Path):
    path = tmp_path / "model.yaml"
    path.write_bytes(b"GGUF\x03\x00\x00\x00\xff\xfe")
    with pytest.raises(ProfileError, match=r"^profile .*model.yaml: not a text file \(byte 8 is not UTF-8\)$"):
        load_profile(path)


def test_profiles_control_characters_are_not_yaml(tmp_path: Path):
    path = write(tmp_path, "machine: box\x00\n")
    with pytest.raises(ProfileError, match=r"^profile .*box.yaml: not valid YAML: unacceptable character"):
        load_profile(path)


def test_profiles_huge_file_is_not_read(tmp_path: Path):
    path = write(tmp_path, "machine: box\n" + "#" * (1024 * 1024) + "\n")
    with pytest.raises(ProfileError, match=r"larger than 1.0 MiB; not a profile$"):
        load_profile(path)


def test_profiles_unreadable_file(tmp_path: Path):
    """chmod 000 stops a normal user; root reads through it, so as root the check runs as `nobody`."""
    folder = Path(tempfile_dir())
    path = folder / "locked.yaml"
    path.write_text("machine: box\n")
    path.chmod(0)
    expected = f"ProfileError: profile {path}: cannot be read (permission denied)"
    try:
        if os.geteuid() != 0:
            code, _, err = run("profile", "validate", str(path))
            assert code == 1
            assert err.strip() == expected
            return
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root, where chmod 000 does not stop reads, and setpriv is not installed")
        result = subprocess.run(
            [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "launcher",
             "profile", "validate", str(path)],
            capture_output=True, text=True, cwd=REPO, timeout=60,
            env={**os.environ, "FITQUANT_HOME": str(folder / "home"), "HOME": str(folder)},
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip() == expected
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def tempfile_dir() -> str:
    """A folder anyone may enter (pytest's tmp_path is private to its owner)."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="fitquant-profile-")
    os.chmod(folder, 0o755)
    return folder


# ---------------------------------------------------------------------------------------------- the schema


def test_profiles_sizes_contexts_and_yaml_booleans():
    profile = parse_profile(
        "machine: box\ndevices:\n  - {name: a, kind: rocm, memory: 16GiB}\n  - {name: b, kind: rocm, memory: 8192MiB}\n"
        "ram: 64GB\nreserve: 512MiB\ndefaults: {kv: F16, flash_attn: off, parallel: 4}\n"
        "models:\n  - {model: m, context: 32k, min_quant: q5_k_m, port: 9000}\n"
    )
    assert [d.memory for d in profile.devices or []] == [16 * GiB, 8 * GiB]
    assert profile.ram == 64 * 1000**3 and profile.reserve == 512 * MiB
    assert (profile.defaults.kv, profile.defaults.flash_attn, profile.defaults.parallel) == ("f16", "off", 4)
    (entry,) = profile.models
    assert (entry.context, entry.min_quant, entry.port, entry.name) == (32768, "Q5_K_M", 9000, "m")
    assert profile.listen == "127.0.0.1:8080" and profile.backend == "auto"


def test_profiles_router_settings_default_to_the_documented_values():
    profile = parse_profile("machine: box\nmodels:\n  - model: m\n")
    r = profile.router
    assert (r.min_residency, r.max_queue, r.max_wait, r.swap_after, r.drain, r.max_body) == (
        30.0, 64, 600.0, 10.0, 30.0, 8 * MiB
    )  # fmt: skip
    assert (profile.listen, profile.listen_host, profile.listen_port, profile.loopback) == (
        "127.0.0.1:8080", "127.0.0.1", 8080, True
    )  # fmt: skip
    assert (profile.insecure, profile.peers) == (False, [])
    (entry,) = profile.models
    assert (entry.pin, entry.preload, entry.ttl, entry.embeddings, entry.port) == (False, False, None, False, None)


def test_profiles_router_settings_and_model_flags_parse_durations_and_sizes():
    profile = parse_profile(
        "machine: box\nlisten: 0.0.0.0:11434\ninsecure: true\n"
        "router: {min_residency: 1m30s, max_queue: 10000, max_wait: 90, swap_after: 500ms, drain: 0, max_body: 1MiB}\n"
        "models:\n  - {model: a, pin: true, port: 9000}\n  - {model: b, preload: true, ttl: 1h}\n"
        "  - {model: c, ttl: 2.5, embeddings: true}\n"
    )
    r = profile.router
    assert (r.min_residency, r.max_queue, r.max_wait, r.swap_after, r.drain, r.max_body) == (
        90.0, 10000, 90.0, 0.5, 0.0, MiB
    )  # fmt: skip
    assert [(m.pin, m.preload, m.ttl, m.embeddings, m.port) for m in profile.models] == [
        (True, False, None, False, 9000), (False, True, 3600.0, False, None), (False, False, 2.5, True, None)
    ]  # fmt: skip
    assert (profile.listen_host, profile.listen_port, profile.loopback, profile.insecure) == (
        "0.0.0.0", 11434, False, True
    )  # fmt: skip


@pytest.mark.parametrize(
    ("listen", "host", "port", "loopback"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080, True),
        ("127.0.0.2:80", "127.0.0.2", 80, True),
        ("localhost:8080", "localhost", 8080, True),
        ("'[::1]:8080'", "::1", 8080, True),
        ("'[::]:8080'", "::", 8080, False),
        ("0.0.0.0:65535", "0.0.0.0", 65535, False),
        ("192.168.1.20:8080", "192.168.1.20", 8080, False),
        ("home-server.lan:8080", "home-server.lan", 8080, False),  # a name may resolve to anything
    ],
)
def test_profiles_listen_splits_into_host_port_and_loopback(listen: str, host: str, port: int, loopback: bool):
    profile = parse_profile(f"machine: box\nlisten: {listen}\n")
    assert (profile.listen_host, profile.listen_port, profile.loopback) == (host, port, loopback)


def test_profiles_peers_take_a_url_or_a_mapping():
    profile = parse_profile(
        "machine: box\npeers:\n  - http://192.168.1.21:8080/\n  - url: https://gpu-box.lan\n    api_key_env: GPU_KEY\n"
        "  - 'http://[fd00::2]:8080'\n"
    )
    assert [(p.url, p.api_key_env) for p in profile.peers] == [
        ("http://192.168.1.21:8080", None), ("https://gpu-box.lan", "GPU_KEY"), ("http://[fd00::2]:8080", None)
    ]  # fmt: skip


def test_profiles_init_text_documents_the_router_defaults():
    # the template's commented router block, uncommented, is what a profile gets without it
    text = profile_text("desk", fake_machine())
    block = text[text.index("# router:") :].splitlines()
    uncommented = "\n".join(line.replace("# ", "", 1) for line in block)
    documented = parse_profile("machine: desk\n" + uncommented + "\n").router
    assert documented == parse_profile("machine: desk\n").router
    assert "\nlisten: 127.0.0.1:8080" in text and "\nhost:" not in text


def test_profiles_vulkan_devices_are_accepted_but_not_planned_yet(tmp_path: Path):
    from typing import get_args

    from launcher.hardware.types import DeviceKind

    if "vulkan" in get_args(DeviceKind):
        pytest.skip("the planner knows Vulkan devices now")
    path = write(tmp_path, "machine: box\ndevices:\n  - {name: Arc A770, kind: vulkan, memory: 16GiB}\n")
    profile = load_profile(path)
    with pytest.raises(ProfileError, match=rf"^profile {path} line 3: 'devices\[0\].kind' vulkan devices are not "):
        profile_hardware(profile)


def test_profiles_policy_from_defaults_and_entry():
    profile = parse_profile(
        "machine: box\ndefaults: {kv: q4_0, parallel: 2, min_quant: Q5_K_M}\n"
        "models:\n  - {model: m, context: 16k, vision: true}\n  - {model: n, min_quant: Q8_0}\n"
    )
    first = profile_policy(profile, profile.models[0])
    assert (first.n_ctx, first.type_k, first.type_v, first.flash_attn) == (16384, "q4_0", "q4_0", "on")
    assert (first.n_parallel, first.min_quant, first.vision, first.reserve_bytes) == (2, "Q5_K_M", True, GiB)
    second = profile_policy(profile, profile.models[1], n_ctx=4096, type_k="f16", type_v="f16")
    assert (second.n_ctx, second.min_quant, second.flash_attn) == (4096, "Q8_0", "auto")


def test_profiles_plan_inputs_resolve_an_alias_and_let_explicit_choices_win():
    profile = parse_profile(
        "machine: box\ndevices: [{name: g, kind: cuda, memory: 12GiB}]\nreserve: {g: 2GiB}\n"
        "models:\n  - {model: 'qwen3:14b', context: 32k, alias: chat, port: 8090}\n"
    )
    inputs = profile_plan(profile, "chat")
    assert (inputs.model, inputs.port, inputs.policy.n_ctx) == ("qwen3:14b", 8090, 32768)
    assert inputs.policy.reserve_bytes == 2 * GiB and inputs.machine.devices[0].free_bytes == 12 * GiB
    given = profile_plan(profile, "other:1b", overrides={"reserve_bytes": 0, "n_ctx": 4096},
                         machine=describe_machine(vram=[8 * GiB]))  # fmt: skip
    assert (given.model, given.port, given.policy.n_ctx, given.policy.reserve_bytes) == ("other:1b", None, 4096, 0)
    assert given.machine.devices[0].total_bytes == 8 * GiB


def test_profiles_reserve_names_no_device_of_the_probed_machine():
    profile = parse_profile("machine: box\nreserve:\n  default: 1GiB\n  RTX 4090: 2GiB\n", source="p.yaml")
    with pytest.raises(ProfileError, match=r"^profile p.yaml line 4: 'reserve.RTX 4090' names no device of this"):
        profile_machine(profile, describe_machine(vram=[24 * GiB]))


def test_profiles_api_key_from_env_or_file_never_from_the_profile(tmp_path: Path):
    by_env = parse_profile("machine: box\napi_key_env: MY_KEY\n")
    assert profile_api_key(by_env, env={"MY_KEY": " s3cret \n"}) == "s3cret"
    with pytest.raises(ProfileError, match="'api_key_env' names MY_KEY, which is not set or empty"):
        profile_api_key(by_env, env={})
    (tmp_path / "key").write_text("k-123\n")
    by_file = load_profile(write(tmp_path, "machine: box\napi_key_file: key\n"))  # beside the profile
    assert profile_api_key(by_file) == "k-123"
    assert profile_api_key(parse_profile("machine: box\n")) is None


# ---------------------------------------------------------------------------------------------- search path


def test_profiles_search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProfileError, match=r"^profile box: none found in profiles/box.yaml or .*fitquant profile init"):
        find_profile("box")
    user = user_profile_path("box")
    user.parent.mkdir(parents=True)
    user.write_text("machine: user-box\n")
    assert find_profile("box") == user
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "box.yaml").write_text("machine: local-box\n")
    assert find_profile("box") == Path("profiles/box.yaml")  # ./profiles first
    assert load_profile(find_profile("box")).machine == "local-box"
    assert find_profile("elsewhere/box.yaml") == Path("elsewhere/box.yaml")  # a path is taken as given


# ---------------------------------------------------------------------------------------------- init


def fake_machine():
    return describe_machine(vram=[12 * GiB, 8 * GiB], ram=64 * GiB)


def test_profiles_init_writes_a_profile_of_this_machine(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("launcher.hardware.detect_hardware", fake_machine)
    code, out, err = run("profile", "init", "desk")
    path = user_profile_path("desk")
    assert (code, err) == (0, ""), err
    assert out.splitlines()[0] == f"wrote {path}"
    profile = load_profile(path)
    assert profile.machine == "desk" and profile.models == []
    machine = profile_hardware(profile)
    assert machine is not None
    assert [(d.name, d.kind, d.total_bytes) for d in machine.devices] == [
        ("GPU 0 (described)", "cuda", 12 * GiB), ("GPU 1 (described)", "cuda", 8 * GiB)
    ]  # fmt: skip
    assert machine.ram_total_bytes == 64 * GiB
    assert (path.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["desk.yaml"]  # no temporary file left


def test_profiles_init_on_the_real_machine_validates(tmp_path: Path):
    path = tmp_path / "here.yaml"
    code, _, err = run("profile", "init", "here", "--path", str(path))
    assert code == 0, err
    assert load_profile(path).machine == "here"


def test_profiles_init_refuses_to_overwrite_without_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("launcher.hardware.detect_hardware", fake_machine)
    path = tmp_path / "mine.yaml"
    path.write_text("machine: mine  # written by a person\n")
    code, out, err = run("profile", "init", "mine", "--path", str(path))
    assert (code, out) == (1, "")
    assert err.strip() == f"ProfileError: profile {path}: exists already; --force replaces it"
    assert path.read_text() == "machine: mine  # written by a person\n"
    code, _, err = run("profile", "init", "mine", "--path", str(path), "--force")
    assert code == 0, err
    assert "written by `fitquant profile init`" in path.read_text()


def test_profiles_write_failing_midway_leaves_the_old_file_intact(tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text("machine: old\n")
    path.chmod(0o600)
    calls = []

    def short_then_full_disk(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return os.write(fd, data[:10])  # a short write, as a full disk gives first
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    text = profile_text("new", fake_machine())
    with pytest.raises(ProfileError, match=rf"^profile {path}: cannot be written \(No space left on device\)$"):
        write_profile(path, text, force=True, write=short_then_full_disk)
    assert path.read_text() == "machine: old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["mine.yaml"]
    write_profile(path, text, force=True)
    assert load_profile(path).machine == "new"
    assert (path.stat().st_mode & 0o777) == 0o600  # a replaced file keeps its mode


def test_profiles_write_refuses_an_invalid_profile_and_a_directory(tmp_path: Path):
    with pytest.raises(ProfileError, match="'backend' must be"):
        write_profile(tmp_path / "x.yaml", "machine: x\nbackend: vllm\n")
    assert not (tmp_path / "x.yaml").exists()
    (tmp_path / "d.yaml").mkdir()
    with pytest.raises(ProfileError, match="is a directory"):
        write_profile(tmp_path / "d.yaml", "machine: x\n", force=True)


def test_profiles_init_rejects_a_name_that_is_a_path():
    code, _, err = run("profile", "init", "../evil")
    assert code == 2
    assert "'../evil' is not a profile name" in err


# ---------------------------------------------------------------------------------------------- show


def record_entry(model: str) -> dict:
    return {
        "model": model, "quant": "Q4_K_M", "n_ctx": 16384, "n_gpu_layers": 41, "cpu_moe": False,
        "settings": {}, "backend": "llamacpp", "server": "llama-server", "version": "b6510", "verdict": "gpu",
        "devices": [], "needs_bytes": {"GPU0": 10_200 * MiB}, "predicted_bytes": {"GPU0": 10_000 * MiB},
    }  # fmt: skip


def test_profiles_show_displays_the_verified_record_beside_the_profile(tmp_path: Path):
    from launcher import record

    path = tmp_path / "rtx.yaml"
    shutil.copy(EXAMPLES / "rtx3060-12g.yaml", path)
    before = path.read_bytes()
    machine = profile_hardware(load_profile(path))
    assert machine is not None
    record.append(machine, record_entry("qwen3:14b"))
    record.append(machine, record_entry("some-other:1b"))  # not a model of this profile

    code, out, err = run("profile", "show", "--profile", str(path), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["profile"]["machine"] == "rtx3060-12g"
    assert data["profile"]["devices"] == [{"name": "NVIDIA GeForce RTX 3060", "kind": "cuda", "memory": 12 * GiB}]
    assert data["machine"]["fingerprint"] == record.fingerprint(machine)
    assert [(r["model"], r["predicted_bytes"], r["needs_bytes"]) for r in data["records"]] == [
        ("qwen3:14b", {"GPU0": 10_000 * MiB}, {"GPU0": 10_200 * MiB})
    ]

    result = CliRunner().invoke(main, ["profile", "show", "--profile", str(path)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.stderr
    _, verified = result.stdout.split(f"Verified on hardware {record.fingerprint(machine)}")
    (row,) = [line for line in verified.splitlines() if "qwen3:14b" in line]
    assert all(cell in row for cell in ("Q4_K_M", "16384", "gpu", "llama-server", "GPU0", "9.8 GiB", "10.0 GiB"))
    assert "some-other:1b" not in result.stdout
    assert path.read_bytes() == before  # fitquant never writes into a profile a person wrote


def test_profiles_show_by_name_from_the_profiles_folder(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)
    code, out, err = run("profile", "show", "macbook-m2-32g")
    assert code == 0, err
    assert out.startswith("macbook-m2-32g  (profiles/macbook-m2-32g.yaml)")
    assert "verified: nothing yet on this hardware" in out


def test_profiles_show_an_unknown_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run("profile", "show", "nowhere")
    assert code == 1
    assert err.startswith("ProfileError: profile nowhere: none found in profiles/nowhere.yaml or ")


# ---------------------------------------------------------------------------------------------- plan --profile


def plan_json(*args: str, notes: list[str] | None = None) -> dict:
    code, out, err = run("plan", *args, "--no-engine", "--json")
    assert code == 0, err
    if notes is not None:
        notes.extend(err.splitlines())
    return json.loads(out)


def test_profiles_plan_answers_for_the_profiles_machine(gemma3_270m_path: Path):
    data = plan_json(str(gemma3_270m_path), "--profile", str(EXAMPLES / "rtx3060-12g.yaml"))
    assert data["budgets"] == [{"name": "GPU0", "backend": "cuda", "free_bytes": 12 * GiB, "reserve_bytes": GiB}]
    assert data["mode"] == "gpu" and data["fits_on_gpu"]
    assert data["chosen"]["quant"] == "Q4_K_M"
    policy = data["policy"]
    assert (policy["n_ctx"], policy["cache_type_k"], policy["flash_attn"], policy["reserve_bytes"]) == (
        8192, "q8_0", "on", GiB
    )  # fmt: skip


def test_profiles_plan_flags_given_win_over_the_profile(gemma3_270m_path: Path):
    data = plan_json(str(gemma3_270m_path), "--profile", str(EXAMPLES / "2x3090-home-server.yaml"),
                     "--reserve", "2GiB", "--ctx", "4k", "--vram", "6GiB")  # fmt: skip
    assert data["budgets"] == [{"name": "GPU0", "backend": "cuda", "free_bytes": 6 * GiB, "reserve_bytes": 2 * GiB}]
    assert (data["policy"]["n_ctx"], data["policy"]["n_parallel"]) == (4096, 2)  # parallel from the profile


def test_profiles_plan_per_device_reserve(gemma3_270m_path: Path):
    notes: list[str] = []
    data = plan_json(str(gemma3_270m_path), "--profile", str(EXAMPLES / "2x3090-home-server.yaml"), notes=notes)
    assert [(b["name"], b["free_bytes"], b["reserve_bytes"]) for b in data["budgets"]] == [
        ("GPU0", 24 * GiB - 512 * MiB, GiB), ("GPU1", 24 * GiB, GiB)
    ]  # fmt: skip
    assert notes == ["note: GPU0 keeps 1.5 GiB free (profile reserve): its free memory is counted 512.0 MiB lower"]


def test_profiles_plan_a_models_alias_takes_its_entry(tmp_path: Path, gemma3_270m_path: Path):
    path = write(tmp_path, f"machine: small\nunified: 8GiB\nmodels:\n  - model: {gemma3_270m_path}\n"
                           "    context: 4k\n    alias: tiny\n    port: 9123\n")  # fmt: skip
    data = plan_json("tiny", "--profile", str(path))
    assert data["model"] == str(gemma3_270m_path)
    assert data["policy"]["n_ctx"] == 4096
    assert data["budgets"][0]["backend"] == "metal"
    argv = data["llama_server_argv"]
    assert argv[argv.index("--port") + 1] == "9123"


def test_profiles_plan_cpu_only(gemma3_270m_path: Path):
    data = plan_json(str(gemma3_270m_path), "--profile", str(EXAMPLES / "cpu-only.yaml"))
    assert data["budgets"] == [{"name": "CPU", "backend": "cpu", "free_bytes": 24 * GiB, "reserve_bytes": GiB}]
    assert data["mode"] == "cpu"


def test_profiles_plan_with_a_bad_profile_is_one_error_line(tmp_path: Path):
    path = write(tmp_path, "machine: box\nreserve: lots\n")
    code, out, err = run("plan", "--profile", str(path), "--no-engine")
    assert (code, out) == (1, "")
    assert (
        err.strip() == f"ProfileError: profile {path} line 2: 'reserve' must be a size like 1GiB or 512MiB, got 'lots'"
    )


# ---------------------------------------------------------------------------------------------- the JSON schema

SCHEMA_FILE = REPO / "docs" / "profile.schema.json"


def test_profiles_committed_json_schema_is_the_generated_one():
    from launcher.profiles.schema import profile_json_schema

    committed = json.loads(SCHEMA_FILE.read_text())
    assert committed == profile_json_schema(), (
        "docs/profile.schema.json is stale; regenerate it: .venv/bin/python -c 'import json; from "
        "launcher.profiles.schema import profile_json_schema as s; print(json.dumps(s(), indent=2))' "
        "> docs/profile.schema.json"
    )


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_profiles_examples_match_the_json_schema(name: str):
    import jsonschema
    import yaml

    schema = json.loads(SCHEMA_FILE.read_text())
    data = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    jsonschema.validate(data, schema)  # sizes as text, durations, peers as URLs: what the loader takes
    for bad in ({"host": "0.0.0.0"}, {"router": {"drain": [1]}}, {"peers": [5]}, {"listen": True}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**data, **bad}, schema)
