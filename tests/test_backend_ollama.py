"""The Ollama backend against a real HTTP server shaped like Ollama's API (tests/ollama_api_server.py), through the
real `ollama` client: pull, blob upload and create, load with the plan's options, /api/ps placement, failures
classified for the run loop, the KV cache type inferred from the measured size, unload, our own `ollama serve`
(a fake `ollama` executable running the stub), and a real Ollama when FITQUANT_TEST_OLLAMA_HOST or OLLAMA_HOST
(read at import, before conftest clears it) names one that answers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from gguf import GGMLQuantizationType as QT

from launcher.backends import launch_forms
from launcher.backends.base import AttemptFailed, LaunchRequest
from launcher.backends.llamacpp import server_argv
from launcher.backends.ollama import OllamaBackend
from launcher.backends.ollama_form import (
    infer_kv_type,
    keep_alive_value,
    kv_type_sizes,
    local_model_name,
    ollama_form,
    same_model,
)
from launcher.catalog.types import Candidate, CandidateFile
from launcher.errors import BackendError
from launcher.estimate import estimate
from launcher.gguf import read_header
from launcher.hardware import describe_machine
from launcher.plan import Option, Plan, Policy, budgets_for, layer_split, make_plan
from tests.gguf_factory import llama_gguf, write_header_only
from tests.ollama_api_server import OllamaApiServer

# captured before conftest's autouse fixture clears OLLAMA_HOST for each test
REAL_OLLAMA = os.environ.get("FITQUANT_TEST_OLLAMA_HOST") or os.environ.get("OLLAMA_HOST")
ROOT = Path(__file__).resolve().parents[1]
MiB = 1024**2
GiB = 1024**3
N_LAYER = 4
ALL = N_LAYER + 1
CTX = 16384


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a small header-only GGUF, a plan for it, the stub server


def tiny_candidate(folder: Path, quant: str = "Q4_K_M", ggml_type: int = QT.Q4_K) -> Candidate:
    head, size = llama_gguf(ggml_type, n_layer=N_LAYER, n_embd=256, n_ff=512, n_vocab=2048, n_head=4, n_head_kv=2)
    path = write_header_only(folder / f"tiny-{quant}.gguf", head, size)
    header = read_header(path)
    return Candidate("tiny", "local", quant, (CandidateFile(path.name, size, local_path=str(path)),), header=header)


def make_test_plan(candidates: list[Candidate], *, vram: int = 8 * GiB, kv: str = "q8_0") -> Plan:
    budgets = budgets_for(describe_machine(vram=[vram]).devices, ram_available_bytes=None, reserve_bytes=GiB)
    return make_plan("tiny", candidates, budgets, Policy(n_ctx=CTX, type_k=kv, type_v=kv))


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[OllamaApiServer]:
    server = OllamaApiServer(models_dir=tmp_path / "ollama-models").start()
    yield server
    server.close()


@pytest.fixture
def backend(stub: OllamaApiServer) -> OllamaBackend:
    return OllamaBackend(host=stub.url)


@pytest.fixture
def tiny(tmp_path: Path) -> Candidate:
    folder = tmp_path / "models"
    folder.mkdir()
    return tiny_candidate(folder)


def loads(stub: OllamaApiServer) -> list[dict]:
    return [b for b in stub.bodies("/api/generate") if not b.get("prompt") and b.get("keep_alive") != 0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetched_option(backend: OllamaBackend, plan: Plan) -> Option:
    assert plan.chosen is not None
    return replace(plan.chosen, candidate=backend.fetch(plan.chosen.candidate, progress=False))


def buffers_size(option: Option, plan: Plan, kv: str) -> int:
    """What Ollama's `size` is for `option` with a `kv` cache, computed here from the estimate directly."""
    settings = option.estimate.settings
    fa = "on" if kv != "f16" else settings.flash_attn
    e = estimate(option.facts, replace(settings, type_k=kv, type_v=kv, flash_attn=fa), gpus=layer_split(plan.budgets))
    return e.total_bytes - e.overhead_bytes


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces


def test_launch_form_is_the_plans_ollama_form(tiny: Candidate) -> None:
    plan = make_test_plan([tiny])
    form = OllamaBackend(host="127.0.0.1:1").launch_form(plan)
    assert form == ollama_form(plan)
    assert form["options"] == {"num_ctx": CTX, "num_gpu": ALL}
    assert form["env"] == {"OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_FLASH_ATTENTION": "1", "OLLAMA_NUM_PARALLEL": "1"}


def test_plan_json_launch_forms_come_from_each_backend_and_touch_no_server(
    tiny: Candidate, stub: OllamaApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an Ollama server that answers at OLLAMA_HOST, and no binary to find: rendering must ask neither
    monkeypatch.setenv("OLLAMA_HOST", stub.url)
    monkeypatch.setenv("PATH", str(tmp_path))
    plan = make_test_plan([tiny])
    forms = launch_forms(plan, host="0.0.0.0", port=9000)
    assert forms == {"llama_server_argv": server_argv(plan, host="0.0.0.0", port=9000), "ollama": ollama_form(plan)}
    data = plan.to_json(launch_forms=forms)
    assert (data["llama_server_argv"], data["ollama"]) == (forms["llama_server_argv"], forms["ollama"])
    assert stub.requests == []


def test_names_and_keep_alive() -> None:
    c = Candidate("m", "local", "Q4_K_M", (CandidateFile("x", 1, local_path="/d/Gemma 3 (270M)-it-Q4_K_M.gguf"),))
    assert local_model_name(c) == "fitquant/gemma-3-270m-it:q4_k_m"
    c = Candidate("m", "local", "UD-Q4_K_XL", (CandidateFile("x", 1, local_path="/d/.Model.UD-Q4_K_XL.GGUF"),))
    assert local_model_name(c) == "fitquant/model:ud-q4_k_xl"
    assert same_model("llama3.2", "llama3.2:latest") and same_model("library/Llama3.2:latest", "llama3.2")
    assert not same_model("llama3.2:1b", "llama3.2")
    # "-1" as a string is refused by Ollama's api.Duration (Go's ParseDuration wants a unit): sent as a number
    assert keep_alive_value("-1") == -1.0 and keep_alive_value("30m") == "30m" and keep_alive_value(0) == 0


def test_infer_kv_type_needs_distinguishable_predictions() -> None:
    sizes = {"f16": 6000, "q8_0": 5200, "q4_0": 4800}
    assert infer_kv_type(6100, sizes) == "f16"
    assert infer_kv_type(5150, sizes) == "q8_0"
    assert infer_kv_type(20000, sizes) is None  # far from every prediction: the estimate is off, not the type
    assert infer_kv_type(5000, {"f16": 5001, "q8_0": 5000}) is None  # no KV cache to speak of


# ---------------------------------------------------------------------------------------------------------------
# Fetching: pull (NDJSON progress) and create (blob + create)


def test_pull_consumes_the_ndjson_progress_to_success(stub: OllamaApiServer, backend: OllamaBackend) -> None:
    digests = stub.add_registry_model("tiny:1b-q4_K_M", (3 * MiB, 4096))
    parts = []
    assert backend.pull("tiny:1b-q4_K_M", progress=False, on_progress=parts.append) == "success"
    statuses = [p.status for p in parts]
    assert statuses[0] == "pulling manifest"
    assert statuses[-4:] == ["pulling " + digests[1][7:19], "verifying sha256 digest", "writing manifest", "success"]
    first = [p for p in parts if p.digest == digests[0]]
    assert first[0].status == f"pulling {digests[0][7:19]}" and first[0].total == 3 * MiB
    assert first[0].completed is None  # absent on a layer's first line
    done = [p.completed for p in first[1:]]
    assert len(done) == stub.pull_chunks and done == sorted(done) and done[-1] == 3 * MiB
    assert stub.bodies("/api/pull") == [{"model": "tiny:1b-q4_K_M", "insecure": False, "stream": True}]

    # fetch pulls a registry candidate and leaves it as it is; the model is now on the server
    c = Candidate("tiny", "ollama", "Q4_K_M", (CandidateFile(digests[0], 3 * MiB),), ollama_model="tiny:1b-q4_K_M")
    assert backend.fetch(c, progress=True) == c  # stderr is not a terminal here: no bar
    assert "tiny:1b-q4_K_M" in stub.models


def test_pull_progress_bar_renders_per_layer(stub: OllamaApiServer, backend: OllamaBackend) -> None:
    from rich.console import Console

    digests = stub.add_registry_model("hf.co/someone/tiny-GGUF:Q4_K_M", (2 * MiB,))
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    assert backend.pull("hf.co/someone/tiny-GGUF:Q4_K_M", console=console) == "success"
    text = out.getvalue()
    assert f"hf.co/someone/tiny-GGUF:Q4_K_M {digests[0][7:19]}" in text
    assert "2.0/2.0 MiB" in text
    assert "verifying sha256 digest" in text and "success" in text


def test_pull_failures_are_one_line(stub: OllamaApiServer, backend: OllamaBackend) -> None:
    with pytest.raises(BackendError) as unknown:
        backend.pull("nosuch:7b", progress=False)
    assert str(unknown.value).startswith("unknown model nosuch:7b")
    assert "pull model manifest: file does not exist" in str(unknown.value) and "\n" not in str(unknown.value)

    stub.add_registry_model("flaky:1b")
    stub.pull_error = "max retries exceeded: read tcp 10.0.0.2:443: connection reset by peer"
    with pytest.raises(BackendError) as midstream:
        backend.pull("flaky:1b", progress=False)
    assert str(midstream.value) == f"ollama pull flaky:1b: {stub.pull_error}"


def test_local_gguf_is_uploaded_as_a_blob_and_created(
    stub: OllamaApiServer, backend: OllamaBackend, tiny: Candidate
) -> None:
    path = Path(str(tiny.files[0].local_path))
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    fetched = backend.fetch(tiny, progress=False)
    assert fetched.ollama_model == "fitquant/tiny:q4_k_m"
    assert fetched.files == tiny.files and fetched.header is tiny.header
    assert stub.blobs == {digest: path.stat().st_size}
    blob_requests = [(m, p) for m, p, _ in stub.requests if p.startswith("/api/blobs/")]
    assert blob_requests == [("HEAD", f"/api/blobs/{digest}"), ("POST", f"/api/blobs/{digest}")]
    assert stub.bodies("/api/create") == [
        {"model": "fitquant/tiny:q4_k_m", "stream": True, "files": {path.name: digest}}
    ]
    assert stub.models["fitquant/tiny:q4_k_m"]["details"]["family"] == "llama"  # the stub read the uploaded GGUF

    # again: the server has the blob (HEAD 200), so nothing is uploaded twice
    backend.fetch(tiny, progress=False)
    assert [m for m, p, _ in stub.requests if p.startswith("/api/blobs/")] == ["HEAD", "POST", "HEAD"]


def test_a_file_that_does_not_match_its_published_hash_is_refused(
    stub: OllamaApiServer, backend: OllamaBackend, tiny: Candidate
) -> None:
    wrong = replace(tiny, files=(replace(tiny.files[0], sha256="0" * 64),))
    with pytest.raises(BackendError, match=r"does not match its published sha256"):
        backend.fetch(wrong, progress=False)
    assert stub.bodies("/api/create") == []


def test_split_ggufs_are_refused_and_ollama_local_models_are_there(backend: OllamaBackend, tiny: Candidate) -> None:
    shards = tuple(CandidateFile(f"x-0000{i}-of-00002.gguf", 1, url=f"https://example.invalid/{i}") for i in (1, 2))
    with pytest.raises(BackendError, match=r"2 split GGUF files .* use --backend llamacpp"):
        backend.fetch(replace(tiny, source="huggingface", files=shards), progress=False)
    present = replace(tiny, source="ollama-local", ollama_model="tiny:latest")
    assert backend.fetch(present) is present


def test_a_gguf_by_url_is_downloaded_then_created(
    stub: OllamaApiServer, backend: OllamaBackend, tiny: Candidate
) -> None:
    from http_range import begin_range_reply
    from local_server import start_server, stop_server

    data = Path(str(tiny.files[0].local_path)).read_bytes()
    sha = hashlib.sha256(data).hexdigest()

    def on_get(h: Any) -> None:
        span = begin_range_reply(h, len(data))
        if span is not None:
            h.wfile.write(data[span[0] : span[1] + 1])

    files = start_server(on_get)
    try:
        url = f"http://127.0.0.1:{files.server_address[1]}/models/tiny-Q4_K_M.gguf"
        remote = replace(tiny, source="url", files=(CandidateFile("tiny-Q4_K_M.gguf", len(data), url=url, sha256=sha),))
        fetched = backend.fetch(remote, progress=False)
    finally:
        stop_server(files)
    assert fetched.ollama_model == "fitquant/tiny:q4_k_m"  # named after the file, not the cache's blob name
    assert fetched.files[0].local_path and Path(fetched.files[0].local_path).read_bytes() == data
    assert stub.bodies("/api/create") == [
        {"model": "fitquant/tiny:q4_k_m", "stream": True, "files": {"tiny-Q4_K_M.gguf": f"sha256:{sha}"}}
    ]
    assert stub.blobs == {f"sha256:{sha}": len(data)}


# ---------------------------------------------------------------------------------------------------------------
# Loading, readiness and placement


def test_start_loads_with_the_plans_options_and_verifies_on_the_gpu(
    stub: OllamaApiServer, backend: OllamaBackend, tiny: Candidate, tmp_path: Path
) -> None:
    plan = make_test_plan([tiny])
    option = fetched_option(backend, plan)
    instance = backend.start(plan, option, LaunchRequest(), log_dir=tmp_path / "logs")
    assert loads(stub) == [{"model": "fitquant/tiny:q4_k_m", "stream": False,
                            "options": {"num_ctx": CTX, "num_gpu": ALL}, "keep_alive": -1.0}]  # fmt: skip
    assert "prompt" not in loads(stub)[0]
    # the created model carries the plan's parameters, for a later `ollama run`
    assert stub.bodies("/api/create")[-1]["parameters"] == {"num_ctx": CTX, "num_gpu": ALL}
    assert (instance.backend, instance.server, instance.version) == ("ollama", "ollama", "0.33.0")
    assert instance.endpoint == f"{stub.url}/v1" and instance.model_name == "fitquant/tiny:q4_k_m"
    assert instance.pid is None and instance.process is None and instance.port == stub.port
    backend.wait_ready(instance, 5)

    placement = backend.placement(instance, option)
    entry = stub.loaded["fitquant/tiny:q4_k_m"]
    assert entry["size_vram"] == entry["size"]
    assert placement.verdict == "gpu", placement.reason
    assert placement.source == "ollama"
    gpu = placement.gpu_devices
    assert len(gpu) == 1 and gpu[0].measured_bytes == entry["size"]
    planned = [d for d in option.estimate.devices if d.name != "CPU"]
    assert gpu[0].predicted_bytes == sum(d.total_bytes - d.overhead_bytes for d in planned)
    assert placement.errors == []

    # the model answers through Ollama's own chat API with the options it was loaded with (no reload)
    from launcher.chat import complete

    before = len(loads(stub))
    assert "".join(complete(instance, [{"role": "user", "content": "hi"}], max_tokens=8)) == "Hello from the stub."
    chat = stub.bodies("/api/chat")[-1]
    assert chat["options"] == {"num_ctx": CTX, "num_gpu": ALL, "num_predict": 8} and chat["keep_alive"] == -1.0
    assert len(loads(stub)) == before
    backend.stop(instance)


def test_openai_compatible_endpoint_of_the_stub(stub: OllamaApiServer) -> None:
    stub.add_model("tiny:latest")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{stub.url}/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello from the stub."
    with httpx.stream("POST", f"{stub.url}/v1/chat/completions", json={**body, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"] == "text/event-stream" and lines[-1] == "data: [DONE]"
    pieces = [json.loads(line[5:])["choices"][0]["delta"]["content"] for line in lines[:-1]]
    assert "".join(pieces) == "Hello from the stub."


def test_partial_offload_is_reported_as_a_spill(
    stub: OllamaApiServer, backend: OllamaBackend, tiny: Candidate, tmp_path: Path
) -> None:
    plan = make_test_plan([tiny])
    option = fetched_option(backend, plan)
    stub.load_size = 1000 * MiB
    stub.vram_fraction = 0.74
    instance = backend.start(plan, option, LaunchRequest(), log_dir=tmp_path)
    backend.wait_ready(instance, 5)
    placement = backend.placement(instance, option)
    assert placement.verdict == "spill", placement.reason
    assert placement.reason.startswith("74% on the GPU")
    by_kind = {d.is_gpu: d.measured_bytes for d in placement.devices}
    assert by_kind == {True: round(1000 * MiB * 0.74), False: 1000 * MiB - round(1000 * MiB * 0.74)}
    backend.stop(instance)


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        ("model requires more system memory (12.3 GiB) than is available (8.0 GiB)", "oom"),
        ("llama runner process has terminated: cudaMalloc failed: out of memory", "oom"),
        ("unable to load full model on GPU", "oom"),
        ("llama runner process has terminated: exit status 2", "crash"),
    ],
)
def test_load_errors_are_classified(
    stub: OllamaApiServer, backend: OllamaBackend, tiny: Candidate, tmp_path: Path, error: str, outcome: str
) -> None:
    plan = make_test_plan([tiny])
    option = fetched_option(backend, plan)
    stub.load_error = error
    with pytest.raises(AttemptFailed) as failed:
        backend.start(plan, option, LaunchRequest(), log_dir=tmp_path)
    assert failed.value.outcome == outcome
    assert error in failed.value.detail and "\n" not in failed.value.detail
    assert stub.loaded == {}


def test_a_load_past_the_ready_timeout_and_a_server_that_dies_mid_load(
    stub: OllamaApiServer, backend: OllamaBackend, tiny: Candidate, tmp_path: Path
) -> None:
    plan = make_test_plan([tiny])
    option = fetched_option(backend, plan)
    stub.load_delay_s = 1.5
    started = time.monotonic()
    with pytest.raises(AttemptFailed) as slow:
        backend.start(plan, option, LaunchRequest(ready_timeout_s=0.3), log_dir=tmp_path)
    assert slow.value.outcome == "timeout" and time.monotonic() - started < 1.4
    stub.load_delay_s = 0.0
    stub.load_hangup = True
    with pytest.raises(AttemptFailed) as died:
        backend.start(plan, option, LaunchRequest(), log_dir=tmp_path)
    assert died.value.outcome == "crash" and "stopped answering while loading" in died.value.detail


def test_a_model_missing_from_the_server_is_a_backend_error(
    backend: OllamaBackend, tiny: Candidate, tmp_path: Path
) -> None:
    plan = make_test_plan([tiny])
    assert plan.chosen is not None
    option = replace(plan.chosen, candidate=replace(tiny, ollama_model="fitquant/never-created:q4_k_m"))
    with pytest.raises(BackendError, match=r"model fitquant/never-created:q4_k_m is not on the Ollama server") as e:
        backend.start(plan, option, LaunchRequest(), log_dir=tmp_path)
    assert not isinstance(e.value, AttemptFailed)


def test_an_f16_server_is_diagnosed_when_q8_0_was_planned(
    stub: OllamaApiServer, backend: OllamaBackend, tiny: Candidate, tmp_path: Path
) -> None:
    plan = make_test_plan([tiny], kv="q8_0")
    option = fetched_option(backend, plan)
    f16, q8 = buffers_size(option, plan, "f16"), buffers_size(option, plan, "q8_0")
    assert f16 - q8 > 0.1 * f16  # the tiny model's KV cache is a good part of it at this context
    assert kv_type_sizes(option, layer_split(plan.budgets))["f16"] == f16

    stub.load_size = f16  # the server's global OLLAMA_KV_CACHE_TYPE is unset: f16
    instance = backend.start(plan, option, LaunchRequest(), log_dir=tmp_path)
    placement = backend.placement(instance, option)
    assert instance.extra["kv_type_inferred"] == "f16"
    note = instance.extra["kv_type_note"]
    assert note.startswith("this Ollama server runs an f16 KV cache (measured ")
    assert "set OLLAMA_KV_CACHE_TYPE=q8_0 and OLLAMA_FLASH_ATTENTION=1 in the server's environment" in note
    assert "ollama.service.d/fitquant.conf" in note and note.endswith("then restart it")
    assert note in placement.errors
    backend.stop(instance)

    stub.load_size = q8 + 3 * MiB  # a q8_0 server, a little above the estimate: no note
    instance = backend.start(plan, option, LaunchRequest(), log_dir=tmp_path)
    placement = backend.placement(instance, option)
    assert instance.extra["kv_type_inferred"] == "q8_0" and instance.extra["kv_type_note"] is None
    assert placement.errors == []
    backend.stop(instance)


# ---------------------------------------------------------------------------------------------------------------
# Stopping, unreachable servers


def test_stop_unloads_waits_for_the_expiry_and_is_idempotent(
    stub: OllamaApiServer, backend: OllamaBackend, tiny: Candidate, tmp_path: Path
) -> None:
    plan = make_test_plan([tiny])
    option = fetched_option(backend, plan)
    instance = backend.start(plan, option, LaunchRequest(), log_dir=tmp_path)
    stub.unload_delay_s = 0.3  # an unload is an expiry: /api/ps still lists the model for a while
    backend.stop(instance)
    unloads = [b for b in stub.bodies("/api/generate") if b.get("keep_alive") == 0]
    assert unloads == [{"model": "fitquant/tiny:q4_k_m", "stream": False, "keep_alive": 0.0}]
    assert stub.loaded == {}  # stop() returned only once the model was gone
    count = len(stub.requests)
    backend.stop(instance)
    assert len(stub.requests) == count


def test_stop_never_raises_for_a_server_already_gone(tiny: Candidate, tmp_path: Path) -> None:
    server = OllamaApiServer(models_dir=tmp_path / "m").start()
    backend = OllamaBackend(host=server.url)
    plan = make_test_plan([tiny])
    option = fetched_option(backend, plan)
    instance = backend.start(plan, option, LaunchRequest(), log_dir=tmp_path)
    server.close()
    backend.stop(instance)
    backend.stop(instance)


def test_unreachable_ollama_without_a_binary_is_one_line(
    tiny: Candidate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    port = closed_port()
    backend = OllamaBackend(host=f"127.0.0.1:{port}")
    expected = (
        f"no Ollama server answers at http://127.0.0.1:{port} and no `ollama` binary is on PATH; "
        "install Ollama or set OLLAMA_HOST"
    )
    assert backend.unavailable() == expected
    with pytest.raises(BackendError) as fetching:
        backend.fetch(tiny, progress=False)
    assert str(fetching.value) == expected
    plan = make_test_plan([tiny])
    assert plan.chosen is not None
    option = replace(plan.chosen, candidate=replace(tiny, ollama_model="fitquant/tiny:q4_k_m"))
    with pytest.raises(BackendError) as starting:
        backend.start(plan, option, LaunchRequest(), log_dir=tmp_path)
    assert str(starting.value) == expected

    monkeypatch.setenv("OLLAMA_HOST", "ftp://127.0.0.1:1")
    line = OllamaBackend().unavailable()
    assert line is not None and "OLLAMA_HOST" in line and "http://" in line and "\n" not in line


def test_an_api_key_is_refused(backend: OllamaBackend, tiny: Candidate, tmp_path: Path) -> None:
    plan = make_test_plan([tiny])
    option = fetched_option(backend, plan)
    with pytest.raises(BackendError, match="Ollama serves without an API key"):
        backend.start(plan, option, LaunchRequest(api_key="sekrit"), log_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# The closed loop on Ollama: an OOM on the best quant, verified on the next


def test_run_loop_steps_down_after_an_ollama_oom(stub: OllamaApiServer, backend: OllamaBackend, tmp_path: Path) -> None:
    from launcher.run import launch

    folder = tmp_path / "models"
    folder.mkdir()
    ladder = [tiny_candidate(folder, "Q8_0", QT.Q8_0), tiny_candidate(folder, "Q4_K_M", QT.Q4_K)]
    plan = make_test_plan(ladder)
    assert plan.chosen is not None and plan.chosen.quant == "Q8_0"
    stub.load_errors["fitquant/tiny:q8_0"] = "llama runner process has terminated: cudaMalloc failed: out of memory"
    result = launch(plan, backend, LaunchRequest(), log_dir=tmp_path / "logs", progress=False)
    try:
        assert [a.outcome for a in result.attempts] == ["oom", "verified"]
        assert result.option.quant == "Q4_K_M" and result.placement.verdict == "gpu"
        assert result.warmup["short_reply"] == "Hello from the stub."
        assert list(stub.loaded) == ["fitquant/tiny:q4_k_m"]
    finally:
        backend.stop(result.instance)
    assert stub.loaded == {}


# ---------------------------------------------------------------------------------------------------------------
# Our own `ollama serve`: a fake `ollama` on PATH that records its environment and runs the stub


def fake_ollama(bindir: Path, records: Path) -> Path:
    bindir.mkdir()
    records.mkdir()
    script = bindir / "ollama"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = serve ] || {{ echo "unexpected arguments: $*" >&2; exit 2; }}\n'
        f'"{sys.executable}" -c "import json, os; json.dump(dict(os.environ), open(\'{records}/\' + str(os.getppid()) '
        "+ '.json', 'w'))\"\n"
        f'exec "{sys.executable}" "{ROOT / "tests" / "ollama_api_server.py"}" --port "${{OLLAMA_HOST##*:}}"\n'
    )
    script.chmod(0o755)
    return script


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def test_starts_its_own_ollama_serve_with_the_plans_environment_and_stops_it(
    tiny: Candidate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = tmp_path / "records"
    fake_ollama(tmp_path / "bin", records)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama-models"))  # kept across restarts, as Ollama's are
    nobody = closed_port()
    backend = OllamaBackend(host=f"127.0.0.1:{nobody}")
    assert backend.unavailable() is None  # nothing answers, but `ollama` is on PATH

    plan = make_test_plan([tiny])
    option = fetched_option(backend, plan)  # starts a server to create the model in
    instance = backend.start(plan, option, LaunchRequest(), log_dir=tmp_path / "logs")
    try:
        assert instance.pid is not None and instance.process is not None and instance.extra["own_server"]
        assert instance.port not in (None, nobody, 11434)
        assert instance.endpoint == f"http://127.0.0.1:{instance.port}/v1"
        assert instance.log_path is not None and instance.log_path.parent == tmp_path / "logs"
        assert psutil.Process(instance.pid).cmdline()[-1] == str(instance.port)
        envs = {int(p.stem): json.loads(p.read_text()) for p in records.glob("*.json")}
        # the fetch's server (any environment) was replaced by one with the plan's environment
        assert len(envs) == 2 and instance.pid in envs
        env = envs[instance.pid]
        assert env["OLLAMA_HOST"] == f"127.0.0.1:{instance.port}"
        assert (env["OLLAMA_KV_CACHE_TYPE"], env["OLLAMA_FLASH_ATTENTION"], env["OLLAMA_NUM_PARALLEL"]) == (
            "q8_0",
            "1",
            "1",
        )
        assert all(_gone(pid, 0.1) for pid in envs if pid != instance.pid)
        assert os.getpgid(instance.pid) == instance.pid  # its own process group
        backend.wait_ready(instance, 10)
        placement = backend.placement(instance, option)
        assert placement.verdict == "gpu", placement.reason
        assert instance.extra["kv_type_note"] is None
    finally:
        backend.stop(instance)
    assert _gone(instance.pid), "ollama serve outlived stop()"
    assert all(_gone(pid) for pid in envs)
    backend.stop(instance)  # idempotent


def test_a_server_that_exits_at_once_is_one_line(
    tiny: Candidate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ollama").write_text("#!/bin/sh\necho 'Error: listen tcp: address already in use' >&2\nexit 1\n")
    (bindir / "ollama").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    backend = OllamaBackend(host=f"127.0.0.1:{closed_port()}")
    with pytest.raises(BackendError) as exited:
        backend.fetch(tiny, progress=False)
    assert "serve exited (status 1) before answering: Error: listen tcp: address already in use" in str(exited.value)


# ---------------------------------------------------------------------------------------------------------------
# A real Ollama, when one is named and answers


def _real_ollama_url() -> str | None:
    if not REAL_OLLAMA:
        return None
    from launcher.ollama_host import ollama_base_url

    try:
        url = ollama_base_url(REAL_OLLAMA)
        r = httpx.get(f"{url}/api/version", timeout=3, trust_env=False)
    except (BackendError, httpx.HTTPError):
        return None
    return url if r.status_code == 200 else None


def test_real_ollama(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = _real_ollama_url()
    if url is None:
        pytest.skip("no real Ollama answers (set FITQUANT_TEST_OLLAMA_HOST or OLLAMA_HOST to run this)")
    gemma3_270m_path: Path = request.getfixturevalue("gemma3_270m_path")  # only when there is a server to use
    header = read_header(gemma3_270m_path)
    size = gemma3_270m_path.stat().st_size
    candidate = Candidate("gemma3-270m", "local", "Q4_K_M",
                          (CandidateFile(gemma3_270m_path.name, size, local_path=str(gemma3_270m_path)),),
                          header=header)  # fmt: skip
    budgets = budgets_for(describe_machine(vram=[8 * GiB]).devices, ram_available_bytes=None, reserve_bytes=GiB)
    plan = make_plan("gemma3-270m", [candidate], budgets, Policy(n_ctx=2048))
    backend = OllamaBackend(host=url)
    assert backend.unavailable() is None
    option = fetched_option(backend, plan)
    instance = backend.start(plan, option, LaunchRequest(ready_timeout_s=300), log_dir=tmp_path)
    try:
        backend.wait_ready(instance, 60)
        placement = backend.placement(instance, option)
        assert placement.verdict in ("gpu", "spill", "cpu-only"), placement.reason
        assert placement.source == "ollama"
        assert instance.version
    finally:
        backend.stop(instance)
    assert backend._ps_entry(url, instance.model_name) is None
