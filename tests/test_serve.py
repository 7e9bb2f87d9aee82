"""`fitquant serve` for real, one endpoint in front of models loaded on demand: what the start refuses (a model that
cannot fit the empty machine alone, pinned models that cannot fit together, a listen address beyond loopback
without a key), pinned models verified before READY=1 and never evicted, a ttl unloading an idle model, SIGHUP
reloading the profile, SIGTERM stopping cleanly with exit 0, the `hardware-changed` event between two starts, and a
load on the RPC stand-in GPU that runs out of memory handled as `run` handles it. The embedded SmolLM2 and Gemma 3
270M on the built llama-server; systemd's notify socket is a real unix datagram socket the test binds."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import needs_llama_cpp
from processes import gone
from router_fixtures import ServeProcess, free_port
from rpc_device import built_binaries, rpc_server
from test_run_rpc import RPC_LIMIT_STEP_DOWN

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


# --- shared pieces ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_quants(corpus_root: Path) -> Path:
    """stepdown-llama at Q8_0 and Q4_K_M (tests/stepdown_model.py): quants tens of MiB apart, small tensors."""
    import stepdown_model

    needs_llama_cpp()
    return stepdown_model.build(corpus_root)


class Notify:
    """systemd's side of sd_notify: a unix datagram socket serve's NOTIFY_SOCKET points at."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.said: list[str] = []

    def next(self, timeout: float = 120) -> str:
        self.sock.settimeout(timeout)
        message = self.sock.recv(4096).decode()
        self.said.append(message)
        return message

    def until(self, head: str, timeout: float = 120) -> list[str]:
        """Every message up to and including the next whose first line is `head`."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.1, deadline - time.monotonic()))
            got.append(message)
            if message.split("\n")[0] == head:
                return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Notify]:
    listener = Notify(tmp_path / "notify.sock")
    yield listener
    listener.close()


def _serve(profile: Path, tmp_path: Path, *, notify: Notify | None = None, **env: str) -> ServeProcess:
    extra = {"NOTIFY_SOCKET": str(notify.path)} if notify is not None else {}
    return ServeProcess(profile, home=tmp_path / "fitquant-home", env={**extra, **env})


def _serve_once(profile: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`fitquant serve` that is expected to stop at its start."""
    from processes import built_llama_server

    env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "NOTIFY_SOCKET")}
    env["FITQUANT_HOME"] = str(tmp_path / "fitquant-home")
    env["FITQUANT_LLAMA_SERVER"] = str(built_llama_server())
    return subprocess.run([sys.executable, "-m", "launcher", "serve", "--profile", str(profile)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)  # fmt: skip


def _chat(serve: ServeProcess, model: str, **kw: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, **kw}
    return httpx.post(serve.url + "/v1/chat/completions", json=body, timeout=180)


def _ready_pid(serve: ServeProcess, model: str, *, after: int = 0, timeout: float = 180) -> int:
    return int(serve.wait_for(rf"ready model={model} .*pid=(\d+)", after=after, timeout=timeout).group(1))


def _stopped_cleanly(serve: ServeProcess, pids: set[int]) -> None:
    """SIGTERM: exit status 0 (a clean stop for systemd), the `stopped` event, and no model server left."""
    pids = pids | serve.server_pids()
    assert serve.stop() == 0, serve.log()
    serve.wait_for(r"^fitquant: stopped", timeout=10)
    left = [pid for pid in pids if not gone(pid)]
    assert not left, f"SIGTERM left model servers {left} behind"


def _profile(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def _llamacpp_profile(path: Path, *models: str, ram: str, machine: str = "roomy-box", port: int | None = None,
                      extra: str = "") -> Path:  # fmt: skip
    """A profile on llama.cpp with `ram` for models, no reserve, on a free loopback port; each model an entry's
    fields ("model: X, context: 1024, alias: smol"), `extra` a line of its own before them (`router: {...}`)."""
    listen = f"127.0.0.1:{port if port is not None else free_port()}"
    head = f"machine: {machine}\nbackend: llamacpp\nram: {ram}\nreserve: 0\nlisten: {listen}\n"
    entries = "".join(f"  - {{{m}}}\n" for m in models)
    return _profile(path, head + (extra + "\n" if extra else "") + "models:\n" + entries)


# --- what the start refuses ------------------------------------------------------------------------------------


def test_a_model_that_cannot_fit_the_empty_machine_alone_is_refused_naming_it_and_what_would_fit(
    tmp_path: Path, gemma3_270m_path: Path, smollm2: Path
) -> None:
    # Gemma 3 270M at 4096 tokens needs about 286 MiB; 272 MiB holds its weights and a 256-token cache only
    port = free_port()
    profile = _llamacpp_profile(
        tmp_path / "alone.yaml",
        f"model: {smollm2}, context: 1024, alias: smol",
        f"model: {gemma3_270m_path}, context: 4096, alias: gemma",
        ram="272MiB",
        machine="small-box",
        port=port,
    )
    done = _serve_once(profile, tmp_path)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"ServeError: profile model 'gemma' does not fit entirely: .*only \d+ tokens fit, with Q4_K_M; "
                        r"Q4_K_M at 4096 tokens would need [\d.]+ MiB on one device .*", last), done.stderr  # fmt: skip
    # refused while planning: nothing listened, no model server was started
    assert not re.search(r"^fitquant: (listening|loading|ready) ", done.stderr, re.M), done.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_pinned_models_that_do_not_fit_together_are_refused_naming_them(
    tmp_path: Path, gemma3_270m_path: Path, smollm2: Path
) -> None:
    # each fits 350 MiB alone (about 118 MiB and 279 MiB planned), not both
    profile = _llamacpp_profile(
        tmp_path / "pins.yaml",
        f"model: {smollm2}, context: 1024, alias: smol, pin: true",
        f"model: {gemma3_270m_path}, context: 1024, alias: gemma, pin: true",
        ram="350MiB",
        machine="small-box",
    )
    done = _serve_once(profile, tmp_path)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"ServeError: the pinned models \(smol, gemma\) need \S+ MiB together on CPU, 350\.0 MiB is "
                        r"usable; pin fewer of them", last), done.stderr  # fmt: skip
    assert "fitquant: loading" not in done.stderr


def test_a_listen_address_beyond_loopback_needs_an_api_key_or_insecure(tmp_path: Path) -> None:
    port = free_port()
    base = f"machine: open-box\nbackend: llamacpp\nram: 1GiB\nlisten: 0.0.0.0:{port}\nmodels: []\n"
    done = _serve_once(_profile(tmp_path / "open.yaml", base), tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ServeError: profile {tmp_path / 'open.yaml'}: 'listen' 0.0.0.0:{port} is reachable "
                           "beyond this machine and no API key is set; ")  # fmt: skip
    assert "insecure: true" in last and "Traceback" not in done.stderr
    # the explicit opt-out serves without a key
    with _serve(_profile(tmp_path / "insecure.yaml", base + "insecure: true\n"), tmp_path) as serve:
        serve.wait_healthy(timeout=60)
        serve.wait_for(rf"listening address=http://0\.0\.0\.0:{port} auth=none")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200
        assert serve.stop() == 0
    # with a key it serves, and asks for the key
    with _serve(_profile(tmp_path / "keyed.yaml", base + "api_key_env: H5_KEY\n"), tmp_path, H5_KEY="s3cret") as serve:
        serve.wait_healthy(timeout=60)
        serve.wait_for(r"listening .* auth=\"api key\"")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 401
        ok = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"x-api-key": "s3cret"}, timeout=5)
        assert ok.status_code == 200
        assert serve.stop() == 0


# --- pin, ttl --------------------------------------------------------------------------------------------------


def test_a_pinned_model_is_verified_before_ready_and_never_evicted(
    tmp_path: Path, gemma3_270m_path: Path, smollm2: Path, notify: Notify
) -> None:
    # 350 MiB holds smol (pinned) or gemma, not both: gemma could only load by evicting the pinned model
    profile = _llamacpp_profile(
        tmp_path / "pinned.yaml",
        f"model: {smollm2}, context: 1024, alias: smol, pin: true",
        f"model: {gemma3_270m_path}, context: 1024, alias: gemma",
        ram="350MiB",
        machine="small-box",
        extra="router: {min_residency: 0s}",
    )
    with _serve(profile, tmp_path, notify=notify) as serve:
        # /health says "starting" until the pinned model is verified: its first "ok" already counts it loaded
        deadline = time.monotonic() + 180
        health = None
        while time.monotonic() < deadline:
            try:
                health = httpx.get(serve.url + "/health", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.05)
                continue
            if health.status_code == 200:
                break
            assert health.status_code == 503 and health.json() == {"status": "starting"}
            time.sleep(0.05)
        assert health is not None and health.status_code == 200, serve.log()
        assert health.json() == {"status": "ok", "models": 2, "loaded": 1}
        # systemd hears READY=1 once the pinned model is verified (and not before)
        message = notify.next()
        assert message.startswith("READY=1\n") and "1 loaded and verified" in message, message
        row = serve.model_row("smol")
        assert row["state"] == "ready" and row["verdict"] == "cpu-only" and row["pinned"] is True
        pid = _ready_pid(serve, "smol")
        # gemma would need the pinned model's memory: refused with the reason, the pinned model untouched
        answer = _chat(serve, "gemma")
        assert answer.status_code == 503, answer.text
        reason = answer.json()["error"]["message"]
        assert "gemma" in reason and "pinned smol holds" in reason, reason
        assert answer.headers.get("retry-after")
        assert serve.model_row("smol")["pid"] == pid
        assert _chat(serve, "smol").status_code == 200
        assert not serve.events("unloading"), serve.log()
        _stopped_cleanly(serve, {pid})
    assert notify.until("STOPPING=1", timeout=10)


def test_an_ollama_keep_alive_below_zero_keeps_a_model_past_its_ttl(tmp_path: Path, smollm2: Path) -> None:
    """As in Ollama, a negative keep_alive keeps the model loaded for ever; the next request without one goes back
    to the profile's ttl."""
    profile = _llamacpp_profile(
        tmp_path / "forever.yaml",
        f"model: {smollm2}, context: 1024, alias: smol, ttl: 2s",
        ram="2GiB",
    )
    with _serve(profile, tmp_path) as serve:
        serve.wait_healthy()
        body = {"model": "smol", "prompt": "Hi", "stream": False, "keep_alive": -1, "options": {"num_predict": 2}}
        assert httpx.post(serve.url + "/api/generate", json=body, timeout=180).status_code == 200
        pid = _ready_pid(serve, "smol")
        ps = httpx.get(serve.url + "/api/ps", timeout=10).json()["models"]
        assert ps[0]["expires_at"].startswith("2318-"), ps  # Ollama's "for ever"
        assert serve.model_row("smol")["expires_in_s"] is None
        time.sleep(4)  # twice the ttl
        assert serve.model_row("smol")["state"] == "ready" and not serve.events("unloading"), serve.log()
        assert _chat(serve, "smol").status_code == 200  # no keep_alive: the profile's ttl again
        serve.wait_for(r'unloading model=smol reason="idle past its ttl"', timeout=30)
        assert gone(pid)
        _stopped_cleanly(serve, {pid})


def test_a_model_idle_past_its_ttl_is_unloaded(tmp_path: Path, smollm2: Path) -> None:
    profile = _llamacpp_profile(
        tmp_path / "ttl.yaml",
        f"model: {smollm2}, context: 1024, alias: smol, ttl: 2s",
        ram="2GiB",
    )
    with _serve(profile, tmp_path) as serve:
        serve.wait_healthy()
        assert serve.model_row("smol")["state"] == "unloaded"  # no preload: loaded by its first request
        assert _chat(serve, "smol").status_code == 200
        answered = time.monotonic()
        pid = _ready_pid(serve, "smol")
        serve.wait_for(r'unloading model=smol reason="idle past its ttl"', timeout=30)
        idle = time.monotonic() - answered
        assert 1.5 <= idle <= 6, f"unloaded after {idle:.1f} s idle; the ttl is 2 s"
        assert gone(pid)
        deadline = time.monotonic() + 10  # "stopping" until the stop's worker thread has returned (after the exit)
        while serve.model_row("smol")["state"] == "stopping" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert serve.model_row("smol")["state"] == "unloaded"
        # the next request loads it again, verified
        mark = serve.mark()
        assert _chat(serve, "smol").status_code == 200
        _ready_pid(serve, "smol", after=mark)
        _stopped_cleanly(serve, {pid})


# --- SIGHUP, SIGTERM -------------------------------------------------------------------------------------------


def test_sighup_reloads_the_profile_and_a_broken_one_is_refused(
    tmp_path: Path, gemma3_270m_path: Path, smollm2: Path, notify: Notify
) -> None:
    head = f"""machine: reload-box
backend: llamacpp
ram: 2GiB
reserve: 0
listen: 127.0.0.1:{free_port()}
models:
"""
    first = head + (f"  - {{model: {smollm2}, context: 1024, alias: smol, preload: true}}\n"
                    f"  - {{model: {gemma3_270m_path}, context: 1024, alias: gemma}}\n")  # fmt: skip
    # smol's entry changes (its context), gemma leaves, smol-short arrives
    second = head + (f"  - {{model: {smollm2}, context: 2048, alias: smol, preload: true}}\n"
                     f"  - {{model: {smollm2}, context: 512, alias: smol-short}}\n")  # fmt: skip
    profile = _profile(tmp_path / "reload.yaml", first)
    with _serve(profile, tmp_path, notify=notify) as serve:
        assert notify.next().startswith("READY=1\n")
        old = _ready_pid(serve, "smol")
        models = httpx.get(serve.url + "/v1/models", timeout=5).json()["data"]
        assert [m["id"] for m in models] == ["smol", "gemma"]

        profile.write_text(second)
        mark = serve.mark()
        serve.send_signal(signal.SIGHUP)
        reloading, ready = notify.next(), notify.next(180)
        assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", reloading.split("\nSTATUS=")[0]), reloading
        assert ready.startswith("READY=1\n"), ready
        serve.wait_for(r'unloading model=smol reason="its profile entry changed"', after=mark)
        serve.wait_for(r"planned model=smol quant=\S+ ctx=2048 ", after=mark)
        new = _ready_pid(serve, "smol", after=mark)
        assert new != old and gone(old)
        assert serve.events("reload", after=mark), serve.log()
        models = httpx.get(serve.url + "/v1/models", timeout=5).json()["data"]
        assert sorted(m["id"] for m in models) == ["smol", "smol-short"]
        assert _chat(serve, "gemma").status_code == 404
        assert serve.model_row("smol")["n_ctx"] == 2048

        # a profile that no longer parses is reported; serving goes on with what runs
        profile.write_text(second + "bogus: 1\n")
        mark = serve.mark()
        serve.send_signal(signal.SIGHUP)
        serve.wait_for(r"reload-refused .*bogus.* action=\"keeping the running models\"", after=mark)
        assert notify.next().startswith("RELOADING=1") and notify.next().startswith("READY=1")
        assert _chat(serve, "smol").status_code == 200
        assert serve.model_row("smol")["pid"] == new
        _stopped_cleanly(serve, {old, new})
    assert notify.until("STOPPING=1", timeout=10)


def test_sigterm_when_idle_exits_0_says_stopping_and_leaves_no_server(
    tmp_path: Path, smollm2: Path, notify: Notify
) -> None:
    profile = _llamacpp_profile(
        tmp_path / "stop.yaml",
        f"model: {smollm2}, context: 1024, alias: smol, preload: true",
        ram="2GiB",
        machine="stop-box",
    )
    with _serve(profile, tmp_path, notify=notify) as serve:
        assert notify.next().startswith("READY=1\n")
        pid = _ready_pid(serve, "smol")
        serve.send_signal(signal.SIGTERM)
        assert serve.proc is not None and serve.proc.wait(timeout=90) == 0, serve.log()
        assert notify.next(10).startswith("STOPPING=1")
        serve.wait_for(r'unloading model=smol reason="fitquant serve is stopping"', timeout=5)
        serve.wait_for(r"^fitquant: stopped", timeout=5)
        assert gone(pid), "SIGTERM left the model server behind"


# --- the machine between two starts, and the RPC stand-in GPU ---------------------------------------------------


def _rpc_profile(path: Path, model: Path, address: str, memory: str, port: int) -> Path:
    return _profile(
        path,
        f"""machine: rpc-box
backend: llamacpp
rpc: [{address}]
devices: [{{name: RPC0, kind: rpc, memory: {memory}}}]
ram: 8GiB
reserve: 0
listen: 127.0.0.1:{port}
models:
  - {{model: {model}, context: 1024, alias: step}}
""",
    )


def test_a_changed_described_memory_between_two_starts_is_the_hardware_changed_event(
    tmp_path: Path, two_quants: Path
) -> None:
    # planning only (no request loads the model): the RPC address needs no server behind it
    profile = tmp_path / "rpc.yaml"
    port = free_port()
    _rpc_profile(profile, two_quants, "127.0.0.1:9", "2GiB", port)
    with _serve(profile, tmp_path) as serve:
        serve.wait_healthy()  # healthy once started: the start is recorded by then
        serve.wait_for(r"plan reason=\"first start of this profile on this machine\"")
        serve.wait_for(r"planned model=step quant=Q8_0 ")
        assert not serve.events("hardware-changed")
        assert serve.stop() == 0
    _rpc_profile(profile, two_quants, "127.0.0.1:9", "64MiB", port)
    with _serve(profile, tmp_path) as serve:
        serve.wait_for(r'hardware-changed before="RPC0 2\.0 GiB" now="RPC0 64\.0 MiB" '
                       r'action="planning again for this hardware"')  # fmt: skip
        serve.wait_for(r"planned model=step quant=Q4_K_M ")
        serve.wait_healthy()
        assert serve.stop() == 0
    # the same hardware again: no event
    with _serve(profile, tmp_path) as serve:
        serve.wait_healthy()
        assert not serve.events("hardware-changed") and not serve.events("plan"), serve.log()
        assert serve.stop() == 0


def test_an_rpc_device_described_larger_than_it_allocates_steps_down_on_the_first_request(
    tmp_path: Path, two_quants: Path
) -> None:
    llama_server, _ = built_binaries()
    # described as 2 GiB, really an address space that holds Q4_K_M but not Q8_0 (tests/test_run_rpc.py)
    with rpc_server(RPC_LIMIT_STEP_DOWN) as rpc:
        profile = _rpc_profile(tmp_path / "rpc.yaml", two_quants, rpc.address, "2GiB", free_port())
        with _serve(profile, tmp_path, FITQUANT_LLAMA_SERVER=str(llama_server)) as serve:
            serve.wait_healthy()
            serve.wait_for(r"planned model=step quant=Q8_0 ")
            answer = _chat(serve, "step")
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["role"] == "assistant"
            attempt = serve.wait_for(r"attempt model=step quant=Q8_0 ctx=1024 outcome=oom detail=(.*)")
            assert "RPC0" in attempt.group(1)
            serve.wait_for(r'retry model=step after="stepping down" quant=Q4_K_M ctx=1024')
            serve.wait_for(r"attempt model=step quant=Q4_K_M ctx=1024 outcome=verified")
            pid = _ready_pid(serve, "step")
            row = serve.model_row("step")
            assert row["quant"] == "Q4_K_M" and row["verdict"] == "gpu" and row["state"] == "ready"
            _stopped_cleanly(serve, {pid})


# --- the metrics of what went through ----------------------------------------------------------------------------


def test_a_proxied_request_is_counted_once_in_the_metrics(tmp_path: Path, smollm2: Path) -> None:
    profile = _llamacpp_profile(
        tmp_path / "count.yaml",
        f"model: {smollm2}, context: 1024, alias: smol",
        ram="2GiB",
    )
    with _serve(profile, tmp_path) as serve:
        serve.wait_healthy()
        assert _chat(serve, "smol").status_code == 200
        with httpx.stream("POST", serve.url + "/v1/chat/completions", timeout=120, json={
                "model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                "stream": True}) as stream:  # fmt: skip
            assert stream.status_code == 200
            assert [line for line in stream.iter_lines() if line == "data: [DONE]"]
        text = httpx.get(serve.url + "/metrics", timeout=10).text
        labels = 'model="smol",route="chat/completions"'
        assert re.search(rf"^fitquant_requests_total\{{{labels},status=\"200\"\}} 2\.0$", text, re.M), text
        assert re.search(rf"^fitquant_request_duration_seconds_count\{{{labels}\}} 2\.0$", text, re.M), text
        _stopped_cleanly(serve, set())


# --- the private servers -----------------------------------------------------------------------------------------


def test_a_model_server_answers_only_with_its_own_key_which_no_output_shows(tmp_path: Path, smollm2: Path) -> None:
    """127.0.0.1 alone is not private: every local process, and any web page a browser on this machine opens
    (llama-server allows every CORS origin), can reach it, past the router's own key. Each model server takes a key
    of its own that only the router holds, and `fitquant bench` finds in the 0600 instance record."""
    import psutil

    profile = _llamacpp_profile(tmp_path / "private.yaml", f"model: {smollm2}, context: 1024, alias: smol",
                                ram="2GiB")  # fmt: skip
    with _serve(profile, tmp_path) as serve:
        serve.wait_healthy()
        assert _chat(serve, "smol").status_code == 200
        row = serve.model_row("smol")
        server = psutil.Process(row["pid"])
        key = server.environ()["LLAMA_API_KEY"]
        assert len(key) >= 40
        body = {"model": "smol", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
        url = row["endpoint"] + "/chat/completions"
        assert httpx.post(url, json=body, timeout=60).status_code == 401
        wrong = httpx.post(url, json=body, timeout=60, headers={"Authorization": "Bearer not-the-key"})
        assert wrong.status_code == 401
        assert httpx.post(url, json=body, timeout=60, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        # a key of its own per server, in no argv (`ps` shows argv to every user) and no listing
        assert key not in " ".join(server.cmdline())
        assert key not in httpx.get(serve.url + "/running", timeout=10).text
        env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "FITQUANT_API_KEY")}
        env["FITQUANT_HOME"] = str(serve.home)

        def fitquant(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True,
                                  env=env, cwd=ROOT, timeout=300)  # fmt: skip

        listed = fitquant("ps", "--json")
        assert listed.returncode == 0 and '"smol"' in listed.stdout, listed.stderr
        assert key not in listed.stdout + listed.stderr
        # what a client should be given: serve's one endpoint, not the private server's (which refuses it)
        [instance] = json.loads(listed.stdout)["instances"]
        assert (instance["via"], instance["endpoint"]) == (serve.url + "/v1", row["endpoint"])
        table = fitquant("ps")
        assert serve.url + "/v1" in table.stdout and row["endpoint"] not in table.stdout, table.stdout
        # fitquant's own tools reach it with no key given: `fitquant bench` reads the record's
        measured = fitquant("bench", "smol", "--depth", "0", "--tokens", "4", "--reps", "1", "--no-predict", "--json")
        assert measured.returncode == 0, measured.stderr
        assert key not in measured.stdout + measured.stderr
        [record] = (serve.home / "state" / "instances").glob("*.json")
        assert record.stat().st_mode & 0o777 == 0o600
        _stopped_cleanly(serve, {row["pid"]})
        assert key not in serve.log()
        logs = list((serve.home / "state" / "logs").glob("*.log"))
        assert logs and not [log for log in logs if key in log.read_text(errors="replace")]


# --- web pages ---------------------------------------------------------------------------------------------------


def test_web_pages_and_rebound_names_are_kept_out_and_an_allowed_page_gets_cors(tmp_path: Path, smollm2: Path) -> None:
    """A page a browser on the machine opens can send requests to 127.0.0.1 (a foreign Origin), and with DNS
    rebinding read the answers (a foreign Host): both get 403 before the key or the body is read, so such a page
    cannot even start a load. A page the profile allows gets CORS headers on every answer, spliced streams
    included, and its preflight is answered without the key, which browsers do not send on it."""
    port = free_port()
    listen = f"127.0.0.1:{port}"
    chat = f"http://{listen}/v1/chat/completions"
    head = "api_key_env: FQ_TEST_KEY\norigins: [https://chat.example.com]\nhosts: [llm.home.arpa]"
    profile = _llamacpp_profile(tmp_path / "pages.yaml", f"model: {smollm2}, context: 1024, alias: smol",
                                ram="2GiB", port=port, extra=head)  # fmt: skip
    key = {"Authorization": "Bearer k-123"}
    body = {"model": "smol", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
    with _serve(profile, tmp_path, FQ_TEST_KEY="k-123") as serve:
        serve.wait_healthy()
        # DNS rebinding: evil.example re-pointed at 127.0.0.1; the key would not help it, nor does it pass with one
        rebound = httpx.get(f"http://{listen}/api/tags", headers={"Host": f"evil.example:{port}", **key}, timeout=10)
        assert rebound.status_code == 403, rebound.text
        assert rebound.json()["error"] == (
            "Host 'evil.example' does not name this loopback server (the DNS rebinding guard): call it as localhost "
            f"or 127.0.0.1; a reverse proxy in front must pass Host: {listen}, or list the name under the "
            "profile's hosts:"
        )
        # a reverse proxy's name the profile lists, and localhost, pass
        for host in ("llm.home.arpa", f"localhost:{port}"):
            assert httpx.get(f"http://{listen}/api/tags", headers={"Host": host, **key}, timeout=10).status_code == 200
        # a foreign page: refused before the key is read (403, not 401), its preflight too; nothing loads
        foreign = {"Origin": "https://evil.example"}
        posted = httpx.post(chat, content=json.dumps(body), timeout=10,
                            headers={**foreign, "Content-Type": "text/plain", **key})  # fmt: skip
        assert posted.status_code == 403, posted.text
        assert posted.json()["error"]["message"] == (
            "a web page of https://evil.example may not use this server; to allow it, list the origin under the "
            "profile's origins:"
        )
        assert "access-control-allow-origin" not in posted.headers
        asked = httpx.options(chat, headers={**foreign, "Access-Control-Request-Method": "POST"}, timeout=10)
        assert asked.status_code == 403 and "access-control-allow-origin" not in asked.headers
        assert not serve.events("loading"), serve.log()
        # an allowed page: its preflight answered without the key, naming what it may send
        page = {"Origin": "https://chat.example.com"}
        asked = httpx.options(chat, timeout=10, headers={**page, "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "authorization, x-stainless-os"})  # fmt: skip
        assert asked.status_code == 204, asked.text
        assert asked.headers["access-control-allow-origin"] == "https://chat.example.com"
        assert asked.headers["access-control-allow-headers"] == "authorization, x-stainless-os"
        assert "POST" in asked.headers["access-control-allow-methods"]
        # without the key it reads the 401; with it, the answer, streamed through the splice, with CORS headers
        refused = httpx.post(chat, json=body, headers=page, timeout=10)
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == page["Origin"]
        local = {"Origin": "http://localhost:3000"}  # a page served on this machine: allowed by default
        with httpx.stream("POST", chat, json={**body, "stream": True}, headers={**local, **key}, timeout=120) as s:
            assert s.status_code == 200 and s.headers["access-control-allow-origin"] == local["Origin"]
            assert s.headers["vary"] == "Origin"
            assert "data: [DONE]" in list(s.iter_lines())
        with httpx.stream("POST", f"http://{listen}/api/chat", json={**body, "stream": True}, timeout=120,
                          headers={**page, **key}) as s:  # fmt: skip
            assert s.status_code == 200 and s.headers["access-control-allow-origin"] == page["Origin"]
            assert json.loads(list(s.iter_lines())[-1])["done"] is True
        # a request with no Origin (curl, the SDKs, a server) gets no CORS headers at all
        plain = httpx.post(chat, json=body, headers=key, timeout=120)
        assert plain.status_code == 200 and not [h for h in plain.headers if h.startswith("access-control-")]
        # SIGHUP: the profile's new origins apply to the running server
        mark = serve.mark()
        profile.write_text(profile.read_text().replace("https://chat.example.com", "https://notes.example.org"))
        serve.send_signal(signal.SIGHUP)
        serve.wait_for(r'reload change="origins and hosts" origins=1 hosts=1', after=mark, timeout=30)
        moved = httpx.get(
            f"http://{listen}/api/tags", headers={"Origin": "https://notes.example.org", **key}, timeout=10
        )
        assert moved.status_code == 200
        assert httpx.get(f"http://{listen}/api/tags", headers={**page, **key}, timeout=10).status_code == 403
        assert not serve.events("unloading", after=mark), "the models do not depend on the pages it answers"
        _stopped_cleanly(serve, set())


def test_sighup_reads_a_rotated_key_and_keeps_the_old_one_when_the_new_does_not_read(
    tmp_path: Path, smollm2: Path
) -> None:
    """`systemctl reload` after writing a new key file: the new key is required from the next request, no model
    reloads for it (a key is not what a model's memory depends on), and the key never reaches the log."""
    key_file = tmp_path / "api-key"
    key_file.write_text("first-key-0123456789\n")
    key_file.chmod(0o600)
    profile = _llamacpp_profile(tmp_path / "key.yaml", f"model: {smollm2}, context: 1024, alias: smol",
                                ram="2GiB", extra=f"api_key_file: {key_file}")  # fmt: skip

    def tags(key: str) -> int:
        return httpx.get(serve.url + "/api/tags", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code

    with _serve(profile, tmp_path) as serve:
        serve.wait_healthy()
        assert _chat(serve, "smol").status_code == 401
        assert tags("first-key-0123456789") == 200
        key_file.write_text("second-key-9876543210\n")
        mark = serve.mark()
        serve.send_signal(signal.SIGHUP)
        serve.wait_for(r'reload change="api key" auth="api key"', after=mark, timeout=30)
        assert (tags("first-key-0123456789"), tags("second-key-9876543210")) == (401, 200)
        assert not serve.events("unloading", after=mark) and not serve.events("planned", after=mark), serve.log()
        # a key file that no longer reads: reported, and the key in force stays
        key_file.write_text("")
        mark = serve.mark()
        serve.send_signal(signal.SIGHUP)
        serve.wait_for(r"reload-refused .*api-key is empty", after=mark, timeout=30)
        assert tags("second-key-9876543210") == 200
        log = serve.log()
        assert "first-key" not in log and "second-key" not in log
        _stopped_cleanly(serve, set())
