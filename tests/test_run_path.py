"""The one run path (launcher.run) that `run`, `serve` and the router share: the machine resolved once, the
backend's memory defaults counted, only memory failures stepping down, a failure line for scripts, and inputs
refused before any download. The Ollama API stub (tests/ollama_api_server.py) stands in for a GPU server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import jsonschema
import pytest
from gguf import GGMLQuantizationType as QT
from ollama_api_server import OllamaApiServer
from test_backend_ollama import make_test_plan, tiny_candidate

from launcher.backends.base import LaunchRequest, ServerMemory
from launcher.backends.llamacpp import LlamaCppBackend
from launcher.backends.ollama import OllamaBackend
from launcher.errors import BackendError, NoFitError, RunFailed
from launcher.plan import Policy, budgets_for
from launcher.profiles import parse_profile, profile_plan
from launcher.run import backend_and_machine, launch, plan_runs, read_api_key, run_machine, server_policy
from launcher.service.pool import Pool

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3


def _fitquant(args: list[str], env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launcher", *args], input=stdin, capture_output=True, text=True,
                          env=env or dict(os.environ), timeout=120, cwd=ROOT)  # fmt: skip


# --- the machine, resolved once --------------------------------------------------------------------------------

TWO_GPUS = """\
machine: two-cards
devices:
  - {kind: cuda, name: RTX 3090 A, memory: 24GiB}
  - {kind: cuda, name: RTX 3090 B, memory: 24GiB}
reserve: {default: 1GiB, GPU0: 3GiB}
models:
  - {model: MODEL, context: 4096}
"""


def test_serve_and_plan_profile_keep_each_reserve_once(tmp_path: Path) -> None:
    """A per-device reserve was subtracted twice by serve (20 GiB usable on GPU0) against once by plan --profile."""
    tiny = tiny_candidate(tmp_path)
    profile = parse_profile(TWO_GPUS.replace("MODEL", tiny.files[0].local_path or ""))
    backend = LlamaCppBackend()
    machine, reserve = run_machine(backend, profile=profile)
    pool = Pool(profile, backend=backend, machine=machine, reserve=reserve)
    pool.prepare()  # what serve plans at its start, each model on the empty machine
    [served] = pool.models.values()
    by_plan = profile_plan(profile, served.alias)
    plan_budgets = budgets_for(by_plan.machine.devices, ram_available_bytes=None,
                               reserve_bytes=by_plan.policy.reserve_bytes)  # fmt: skip
    usable = {b.name: b.usable_bytes for b in served.plan.budgets}
    assert usable == {b.name: b.usable_bytes for b in plan_budgets}
    assert usable == pool.usable == {"GPU0": 21 * GiB, "GPU1": 23 * GiB}


def test_a_profiles_ollama_host_reaches_the_backend(tmp_path: Path) -> None:
    stub = OllamaApiServer(models_dir=tmp_path / "ollama").start()
    try:
        profile = parse_profile(f"machine: m\nbackend: ollama\nollama_host: {stub.url}\nram: 8GiB\n")
        # what serve resolves for its pool (launcher.service.serve._Service._new_pool)
        backend, _machine, _reserve = backend_and_machine(profile.backend, llama_server=profile.llama_server,
                                                          ollama_host=profile.ollama_host, profile=profile)  # fmt: skip
        assert isinstance(backend, OllamaBackend)
        assert backend.base_url == stub.url
        assert ("GET", "/api/version", None) in stub.requests or any(r[1] == "/" for r in stub.requests)
    finally:
        stub.close()


def test_an_empty_api_key_file_is_refused_by_run_and_serve(tmp_path: Path) -> None:
    empty = tmp_path / "key"
    empty.write_text("  \n")
    with pytest.raises(BackendError, match="is empty"):
        read_api_key(empty)
    profile = tmp_path / "p.yaml"
    profile.write_text("machine: m\nram: 8GiB\nmodels: []\n")
    for args in (["serve", "--profile", str(profile), "--api-key-file", str(empty)],
                 ["run", "--api-key-file", str(empty), "--no-engine"]):  # fmt: skip
        done = _fitquant(args)
        assert done.returncode == 1, done
        assert done.stderr.strip().splitlines()[-1] == (
            f"BackendError: --api-key-file {empty} is empty; write the key into it, or leave the option out"
        )


# --- what the server does by default is counted ----------------------------------------------------------------


def test_each_backend_declares_its_servers_memory_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "no-builds"
    empty.mkdir()
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:/usr/bin:/bin")
    monkeypatch.setenv("FITQUANT_LLAMA_CPP_BUILDS", str(empty))
    python_server = LlamaCppBackend()
    if python_server.unavailable() is not None:
        pytest.skip(f"llama-cpp-python's server is not installed: {python_server.unavailable()}")
    assert python_server.program.kind == "llama-cpp-python"
    assert python_server.server_memory() == ServerMemory(all_logits=True, swa_full=True, cpu_repack=True)
    ollama = OllamaBackend(host="127.0.0.1:1")
    assert ollama.server_memory() == ServerMemory(cpu_repack=True, batch_is_ubatch=True, loads_projector=True)
    on_ollama = server_policy(Policy(n_ctx=4096, n_ubatch=256), ollama)
    assert on_ollama.settings().n_batch == 256 and on_ollama.vision  # -b = -ub = num_batch; the projector it loads
    assert Policy(n_ctx=4096).settings().n_batch == 2048  # llama.cpp's own batch otherwise
    policy = server_policy(Policy(n_ctx=4096), python_server)
    assert policy.all_logits and policy.swa_full
    assert policy.settings().swa_full and policy.settings().n_outputs_max == 0
    from launcher.estimate import cpu_repack_rules
    from launcher.hardware.cpu import cpu_features

    assert policy.cpu_repack == cpu_repack_rules(*cpu_features())


def test_a_full_size_swa_cache_and_cpu_repacking_are_in_the_plan(gemma3_270m_path: Path) -> None:
    """llama-cpp-python's server keeps a full-size SWA cache (its settings expose no swa_full): the plan counts it;
    llama.cpp repacks Q4_K host weights for an AVX2 CPU into a CPU_REPACK buffer: the plan counts it."""
    from launcher import read_model_facts
    from launcher.estimate import cpu_repack_rules, estimate

    facts = read_model_facts(str(gemma3_270m_path))
    window = Policy(n_ctx=4096).settings(n_gpu_layers=0)
    full = Policy(n_ctx=4096, swa_full=True).settings(n_gpu_layers=0)
    assert estimate(facts, full).kv_bytes > 2 * estimate(facts, window).kv_bytes
    rules = cpu_repack_rules(frozenset({"avx2"}), "x86_64")
    assert ("Q4_K", 8) in rules
    repacked = Policy(n_ctx=4096, cpu_repack=rules).settings(n_gpu_layers=0)
    grown = estimate(facts, repacked).weights_bytes - estimate(facts, window).weights_bytes
    assert round(grown / 2**20, 2) == 12.66  # llama-server prints "CPU_REPACK model buffer size = 12.66 MiB"
    assert cpu_repack_rules(frozenset(), "x86_64") == ()


# --- only memory failures step down ----------------------------------------------------------------------------


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[OllamaApiServer]:
    server = OllamaApiServer(models_dir=tmp_path / "ollama-models").start()
    yield server
    server.close()


def test_a_rejected_warm_up_stops_without_stepping_down(stub: OllamaApiServer, tmp_path: Path) -> None:
    backend = OllamaBackend(host=stub.url)
    folder = tmp_path / "models"
    folder.mkdir()
    plan = make_test_plan([tiny_candidate(folder, "Q8_0", QT.Q8_0), tiny_candidate(folder, "Q4_K_M", QT.Q4_K)])
    stub.chat_error = (400, '"fitquant/tiny:q8_0" does not support chat')
    with pytest.raises(RunFailed) as failed:
        launch(plan, backend, LaunchRequest(), log_dir=tmp_path / "logs", progress=False)
    assert [a.outcome for a in failed.value.attempts] == ["rejected"]
    assert "does not support chat" in str(failed.value)
    assert not isinstance(failed.value, NoFitError)
    assert stub.loaded == {}  # stopped: the model was unloaded, not kept


def test_every_attempt_rides_on_the_no_fit_error(stub: OllamaApiServer, tmp_path: Path) -> None:
    backend = OllamaBackend(host=stub.url)
    folder = tmp_path / "models"
    folder.mkdir()
    plan = make_test_plan([tiny_candidate(folder, "Q8_0", QT.Q8_0), tiny_candidate(folder, "Q4_K_M", QT.Q4_K)])
    stub.load_error = "llama runner process has terminated: cudaMalloc failed: out of memory"
    with pytest.raises(NoFitError) as failed:
        launch(plan, backend, LaunchRequest(), log_dir=tmp_path / "logs", progress=False)
    attempts = failed.value.attempts
    assert [a.outcome for a in attempts] == ["oom", "oom", "oom"] and attempts[0].quant == "Q8_0"
    assert "Q4_K_M" in {a.quant for a in attempts}
    assert "gave up after 3 attempts" in str(failed.value)


def test_the_full_warm_up_reads_the_servers_own_prompt_count(stub: OllamaApiServer, tmp_path: Path) -> None:
    backend = OllamaBackend(host=stub.url)
    folder = tmp_path / "models"
    folder.mkdir()
    plan = make_test_plan([tiny_candidate(folder, "Q4_K_M", QT.Q4_K)])
    result = launch(plan, backend, LaunchRequest(), log_dir=tmp_path / "logs", progress=False, warmup="full")
    try:
        # Ollama has no tokenizer endpoint: the fill is what the server says it evaluated (prompt_eval_count)
        fill = stub.bodies("/api/chat")[-1]["messages"][0]["content"]
        assert result.warmup["filled_tokens"] == len(fill.split()) + 4 > 1000
        assert result.warmup["sent_tokens"] is None
        # three short decodes timed, the fastest kept; the stub's answers (5 tokens: it stops, as Ollama may at an
        # end-of-text) are too short to time a decode after the fill, so that is not asked again
        chats = [b["messages"][0]["content"] for b in stub.bodies("/api/chat")]
        assert chats.count("Say hello.") == 3 and len(result.warmup["decode_samples"]) == 3
        assert chats.count(fill) == 1 and "decode_samples_at_fill" not in result.warmup
    finally:
        backend.stop(result.instance)


# --- scripts read one JSON line, and a bad server is refused before any download -------------------------------


class _Counting(BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *_args: object) -> None:
        pass


def test_a_bad_llama_server_is_refused_before_any_request(tmp_path: Path) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    not_executable = tmp_path / "llama-server"
    not_executable.write_text("#!/bin/sh\n")
    url = f"http://127.0.0.1:{httpd.server_address[1]}/models/m-Q4_K_M.gguf"
    try:
        for server, expected in ((str(not_executable), "cannot be run"), ("/bin/true", "is not llama-server")):
            done = _fitquant(["run", url, "--llama-server", server, "--no-engine", "--json"])
            assert done.returncode == 1
            assert expected in done.stderr.strip().splitlines()[-1], done.stderr
            assert "Traceback" not in done.stderr
            failure = json.loads(done.stdout.splitlines()[0])
            assert failure["ok"] is False and failure["error"]["type"] == "BackendError"
        assert _Counting.hits == []
    finally:
        httpd.shutdown()


def test_run_json_prints_its_line_on_failure_too(tmp_path: Path) -> None:
    done = _fitquant(["run", str(tmp_path / "nope.gguf"), "--no-engine", "--json"])
    assert done.returncode == 1
    line = json.loads(done.stdout.splitlines()[0])
    jsonschema.validate(line, json.loads((ROOT / "docs" / "run.schema.json").read_text()))
    assert line["ok"] is False and line["error"]["type"] == "CatalogError" and line["attempts"] == []
    assert "nope.gguf" in line["error"]["message"]


def test_plan_runs_fits_several_models_each_on_what_the_others_leave(tmp_path: Path) -> None:
    from launcher.hardware import describe_machine
    from launcher.run import RunSpec

    tiny = tiny_candidate(tmp_path)
    path = tiny.files[0].local_path
    machine = describe_machine(vram=[3 * GiB])
    spec = RunSpec(path, Policy(n_ctx=4096, reserve_bytes=GiB))
    one = plan_runs([spec], backend=None, machine=machine)[0]
    assert one.chosen is not None
    two = plan_runs([spec, spec], backend=None, machine=machine)
    first_needs = two[0].chosen.needs["GPU0"]  # type: ignore[union-attr]
    assert two[1].budgets[0].free_bytes == 3 * GiB - first_needs
    with pytest.raises(NoFitError, match=r"does not fit entirely beside"):
        plan_runs([spec] * 40, backend=None, machine=machine)


def test_a_vision_encoder_inside_the_gguf_is_counted_as_the_projector_ollama_loads(tmp_path: Path) -> None:
    """Ollama loads a projector whenever the model has one, a separate mmproj or vision tensors inside the GGUF
    (backends.md §1): the plan for Ollama counts the inline encoder on the first GPU, with its image compute."""
    from gguf_factory import header_only_gguf, write_header_only

    from launcher.catalog.types import Candidate, CandidateFile
    from launcher.gguf import read_header
    from launcher.hardware import describe_machine

    n_embd, n_ff, n_vocab = 256, 512, 2048
    values = {"llama.block_count": 2, "llama.embedding_length": n_embd, "llama.attention.head_count": 4,
              "llama.attention.head_count_kv": 4, "llama.context_length": 4096, "llama.feed_forward_length": n_ff}  # fmt: skip
    tensors = [("token_embd.weight", (n_embd, n_vocab), QT.Q8_0), ("output_norm.weight", (n_embd,), QT.F32),
               ("output.weight", (n_embd, n_vocab), QT.Q8_0)]  # fmt: skip
    for il in range(2):
        tensors += [(f"blk.{il}.attn_norm.weight", (n_embd,), QT.F32), (f"blk.{il}.ffn_norm.weight", (n_embd,), QT.F32)]
        tensors += [(f"blk.{il}.attn_{w}.weight", (n_embd, n_embd), QT.Q8_0) for w in ("q", "k", "v", "output")]
        tensors += [(f"blk.{il}.ffn_{w}.weight", (n_embd, n_ff) if w != "down" else (n_ff, n_embd), QT.Q8_0)
                    for w in ("gate", "up", "down")]  # fmt: skip
    vision = [("v.patch_embd.weight", (14, 14, 3, 1024), QT.F16), ("v.blk.0.attn_q.weight", (1024, 1024), QT.F16),
              ("mm.input_projection.weight", (1024, n_embd), QT.F16)]  # fmt: skip
    head, size = header_only_gguf("llama", values, tensors + vision)
    path = write_header_only(tmp_path / "vlm-Q8_0.gguf", head, size)
    candidate = Candidate("vlm", "local", "Q8_0", (CandidateFile(path.name, size, local_path=str(path)),),
                          header=read_header(path))  # fmt: skip
    machine = describe_machine(vram=[8 * GiB])
    ollama = OllamaBackend(host="127.0.0.1:1")
    from launcher.fit import fit

    with_encoder = fit(None, server_policy(Policy(n_ctx=4096), ollama), machine=machine, candidates=[candidate],
                       confirm=False)  # fmt: skip
    without = fit(None, Policy(n_ctx=4096), machine=machine, candidates=[candidate], confirm=False)
    encoder = with_encoder.chosen.facts.inline_vision_bytes  # type: ignore[union-attr]
    assert encoder == 2 * (14 * 14 * 3 * 1024 + 1024 * 1024 + 1024 * n_embd)  # the three F16 tensors
    gained = with_encoder.chosen.needs["GPU0"] - without.chosen.needs["GPU0"]  # type: ignore[union-attr]
    assert gained == encoder + encoder // 2


@pytest.mark.parametrize(("listen", "url"), [
    ("127.0.0.1:8080", "http://127.0.0.1:8080/v1"), ("0.0.0.0:8080", "http://127.0.0.1:8080/v1"),
    ("[::]:9000", "http://[::1]:9000/v1"), ("[::1]:9000", "http://[::1]:9000/v1"),
    ("192.168.1.20:8080", "http://192.168.1.20:8080/v1"), ("localhost:8080", "http://localhost:8080/v1"),
])  # fmt: skip
def test_a_served_model_s_instance_names_serve_s_endpoint_a_client_on_this_machine_reaches(listen: str, url: str):
    from launcher.service.pool import _client_url

    assert _client_url(listen) == url
