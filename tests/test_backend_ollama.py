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
from processes import gone

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
# the plan's options: per-slot context, every layer, the plan's ubatch (not Ollama's automatic batch), no draft model
OPTIONS = {"num_ctx": CTX, "num_gpu": ALL, "num_batch": 512, "draft_num_predict": 0}


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
    """What Ollama's `size` is for `option` at a full offload with a `kv` cache (the GPU's buffers alone: MemorySize
    leaves the host out then), computed here from the estimate directly."""
    settings = option.estimate.settings
    fa = "on" if kv != "f16" else settings.flash_attn
    e = estimate(option.facts, replace(settings, type_k=kv, type_v=kv, flash_attn=fa), gpus=layer_split(plan.budgets))
    return sum(d.total_bytes - d.overhead_bytes for d in e.devices if d.name != "CPU")


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces


def test_launch_form_is_the_plans_ollama_form(tiny: Candidate) -> None:
    plan = make_test_plan([tiny])
    form = OllamaBackend(host="127.0.0.1:1").launch_form(plan)
    assert form == ollama_form(plan)
    assert form["options"] == OPTIONS
    assert form["env"] == {"OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_FLASH_ATTENTION": "1", "OLLAMA_NUM_PARALLEL": "1",
                           "OLLAMA_CONTEXT_LENGTH": str(CTX)}  # fmt: skip
    assert form["modelfile"].splitlines()[1:] == [f"PARAMETER num_ctx {CTX}", f"PARAMETER num_gpu {ALL}",
                                                  "PARAMETER num_batch 512", "PARAMETER draft_num_predict 0"]  # fmt: skip


@pytest.mark.parametrize("vram", [[8 * GiB], [8 * GiB, 8 * GiB]])
def test_the_service_drop_in_sets_what_the_backend_assumes(tmp_path: Path, vram: list[int]) -> None:
    """The systemd drop-in for Ollama renders the server environment the backend starts its own server with; on
    several GPUs that includes OLLAMA_SCHED_SPREAD (else Ollama puts a model it thinks fits on one GPU)."""
    from launcher.service.units import ollama_dropin_env

    budgets = budgets_for(describe_machine(vram=vram).devices, ram_available_bytes=None, reserve_bytes=0)
    plan = make_plan("tiny", [tiny_candidate(tmp_path)], budgets, Policy(n_ctx=CTX, type_k="q8_0", type_v="q8_0"))
    assert plan.chosen is not None
    env = ollama_form(plan)["env"]
    spread = len([d for d in plan.chosen.estimate.devices if d.name != "CPU" and d.layers]) > 1
    assert ("OLLAMA_SCHED_SPREAD" in env) == spread == (len(vram) > 1)
    dropin = ollama_dropin_env(kv_type=plan.policy.type_k, flash_attn=plan.chosen.estimate.flash_attn,
                               context_length=CTX, num_parallel=plan.policy.n_parallel, sched_spread=spread)  # fmt: skip
    assert dropin == env


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

    # again, from another backend (another run): the model is created once, since Ollama rewrites a whole GGUF on
    # every create from files; nothing is hashed, checked or uploaded
    assert OllamaBackend(host=stub.url).fetch(tiny, progress=False).ollama_model == "fitquant/tiny:q4_k_m"
    os.utime(path)  # touched, not changed: hashed again, still the same model
    assert OllamaBackend(host=stub.url).fetch(tiny, progress=False).ollama_model == "fitquant/tiny:q4_k_m"
    assert [m for m, p, _ in stub.requests if p.startswith("/api/blobs/")] == ["HEAD", "POST"]
    assert stub.creates == ["fitquant/tiny:q4_k_m"]
    # the model removed from the server (ollama rm): created again from the blob it still has
    stub.models.pop("fitquant/tiny:q4_k_m")
    backend.fetch(tiny, progress=False)
    assert [m for m, p, _ in stub.requests if p.startswith("/api/blobs/")] == ["HEAD", "POST", "HEAD"]
    assert stub.creates == ["fitquant/tiny:q4_k_m"] * 2


def test_a_file_that_does_not_match_its_published_hash_is_refused(
    stub: OllamaApiServer, backend: OllamaBackend, tiny: Candidate
) -> None:
    wrong = replace(tiny, files=(replace(tiny.files[0], sha256="0" * 64),))
    with pytest.raises(BackendError, match=r"does not match its published sha256"):
        backend.fetch(wrong, progress=False)
    assert stub.bodies("/api/create") == []


def test_a_split_gguf_is_created_from_its_shards_and_ollama_local_models_are_there(
    stub: OllamaApiServer, backend: OllamaBackend, tiny: Candidate, tmp_path: Path
) -> None:
    """Ollama merges `-NNNNN-of-MMMMM.gguf` files given to /api/create (create.go mergeSplitGGUFLayers)."""
    whole = Path(str(tiny.files[0].local_path))
    first, second = tmp_path / "tiny-Q4_K_M-00001-of-00002.gguf", tmp_path / "tiny-Q4_K_M-00002-of-00002.gguf"
    first.write_bytes(whole.read_bytes())
    second.write_bytes(b"the second shard's tensors")
    shards = tuple(CandidateFile(f.name, f.stat().st_size, local_path=str(f)) for f in (first, second))
    fetched = backend.fetch(replace(tiny, files=shards), progress=False)
    assert fetched.ollama_model == "fitquant/tiny:q4_k_m"
    [create] = stub.bodies("/api/create")
    assert sorted(create["files"]) == [first.name, second.name]
    model = stub.models["fitquant/tiny:q4_k_m"]
    assert model["details"]["family"] == "llama" and model["size"] == first.stat().st_size + second.stat().st_size
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
    stub.env = {"OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_FLASH_ATTENTION": "1"}  # a server set up as the plan says
    instance = backend.start(plan, option, LaunchRequest(), log_dir=tmp_path / "logs")
    served = f"fitquant/tiny:q4_k_m-c{CTX}-g{ALL}-b512"
    assert loads(stub) == [{"model": served, "stream": False,
                            "options": OPTIONS, "keep_alive": -1.0}]  # fmt: skip
    assert "prompt" not in loads(stub)[0]
    # the model served is derived from the created one (no blob copied) and carries the plan's parameters, for a
    # request without options and a later `ollama run`
    assert stub.bodies("/api/create")[-1] == {"model": served, "from": "fitquant/tiny:q4_k_m", "stream": True,
                                              "parameters": OPTIONS}  # fmt: skip
    assert (instance.backend, instance.server, instance.version) == ("ollama", "ollama", "0.33.0")
    assert instance.endpoint == f"{stub.url}/v1" and instance.model_name == served
    assert instance.pid is None and instance.process is None and instance.port == stub.port
    backend.wait_ready(instance, 5)

    placement = backend.placement(instance, option)
    entry = stub.loaded[served]
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

    before = len(stub.loads)
    assert "".join(complete(instance, [{"role": "user", "content": "hi"}], max_tokens=8)) == "Hello from the stub."
    chat = stub.bodies("/api/chat")[-1]
    assert chat["options"] == {**OPTIONS, "num_predict": 8}
    assert chat["keep_alive"] == -1.0
    assert len(stub.loads) == before
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


def test_the_stubs_errors_are_ollamas(stub: OllamaApiServer) -> None:
    """A bad request is a 400, an unknown model a 404, and an error once a stream has started an `{"error"}` line
    after a 200 (NDJSON) or an error event (SSE)."""
    stub.add_model("m:1b")
    chat = {"model": "m:1b", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{stub.url}/api/chat", json={**chat, "model": ""})
    assert (r.status_code, r.json()) == (400, {"error": "model is required"})
    assert httpx.post(f"{stub.url}/api/chat", json={**chat, "options": [1]}).status_code == 400
    assert httpx.post(f"{stub.url}/api/generate", json={"model": "nosuch"}).status_code == 404
    stub.stream_error = "llama-server process has terminated: exit status 2"
    with httpx.stream("POST", f"{stub.url}/api/chat", json=chat) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[0]["message"]["content"] == "Hello"
    assert lines[1:] == [{"error": stub.stream_error}]
    with httpx.stream("POST", f"{stub.url}/v1/chat/completions", json={**chat, "stream": True}) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert r.status_code == 200 and events[-1]["error"]["message"] == stub.stream_error


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
        # Ollama v0.33's texts (llm/llama_server.go WaitUntilRunning), llama-server's captured lines after them
        ("llama-server reported out-of-memory during startup: CUDA0 compute buffer: see the log", "oom"),
        (
            "llama-server process has terminated: exit status 1: cudaMalloc failed: out of memory\n"
            "error loading model: unable to allocate CUDA0 buffer",
            "oom",
        ),
        ("llama-server process has terminated: exit status 1: error loading model: invalid magic", "crash"),
        (
            "llama-server process has terminated: exit status 1: llama_init_from_model: V cache quantization "
            "requires flash_attn",
            "crash",
        ),
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
    assert " ".join(error.split()) in failed.value.detail and "\n" not in failed.value.detail
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
    assert kv_type_sizes(option, layer_split(plan.budgets), gpu_only=True)["f16"] == f16

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


def test_a_system_ollama_at_full_offload_is_compared_on_the_gpu_side(
    stub: OllamaApiServer, backend: OllamaBackend, tiny: Candidate, tmp_path: Path
) -> None:
    """/api/ps `size` at a full offload is the GPU's buffers alone (MemorySize): the plan's GPU side is compared,
    and the server's KV cache type is inferred from it (the stub's sizes are its own llama-server's buffers)."""
    plan = make_test_plan([tiny], kv="q8_0")
    option = fetched_option(backend, plan)
    for env, inferred in (({}, "f16"), ({"OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_FLASH_ATTENTION": "1"}, "q8_0")):
        stub.env = env
        instance = backend.start(plan, option, LaunchRequest(), log_dir=tmp_path)
        placement = backend.placement(instance, option)
        entry = stub.loaded[instance.model_name]
        assert entry["size"] == entry["size_vram"] and placement.verdict == "gpu"
        assert [d.name for d in placement.devices if d.predicted_bytes is not None] == ["GPU"]  # no host side
        assert instance.extra["kv_type_inferred"] == inferred
        assert (instance.extra["kv_type_note"] is None) == (inferred == "q8_0")
        backend.stop(instance)


def test_infer_kv_type_says_it_cannot_tell_beyond_the_predictions() -> None:
    sizes = {"q8_0": 39_600, "f16": 57_200, "q4_0": 31_600}
    assert infer_kv_type(26_600, sizes) is None  # below every prediction: compute may be off as much as the cache
    assert infer_kv_type(30_000, sizes) == "q4_0" and infer_kv_type(41_000, sizes) == "q8_0"


def test_an_explicit_num_gpu_that_does_not_fit_fails_with_llama_servers_oom(
    stub: OllamaApiServer, backend: OllamaBackend, tiny: Candidate, tmp_path: Path
) -> None:
    """num_gpu set: Ollama passes -ngl and llama-server fails the load; there is no partial fallback."""
    plan = make_test_plan([tiny])
    option = fetched_option(backend, plan)
    stub.gpu_free_bytes = 16 * MiB  # the plan needs about 40 MiB of it
    with pytest.raises(AttemptFailed) as failed:
        backend.start(plan, option, LaunchRequest(), log_dir=tmp_path)
    assert failed.value.outcome == "oom"
    assert "llama-server process has terminated: exit status 1: cudaMalloc failed: out of memory" in failed.value.detail
    assert stub.loaded == {}
    r = httpx.post(f"{stub.url}/api/generate", json={"model": "fitquant/tiny:q4_k_m", "options": {"num_gpu": -1}})
    assert r.status_code == 200  # automatic: llama.cpp's fit puts fewer layers on the GPU instead
    entry = stub.loaded["fitquant/tiny:q4_k_m"]
    assert 0 < entry["size_vram"] < entry["size"]
    r = httpx.post(f"{stub.url}/api/generate", json={"model": "fitquant/tiny:q4_k_m", "options": {"num_gpu": 0}})
    entry = stub.loaded["fitquant/tiny:q4_k_m"]
    assert r.status_code == 200 and entry["size_vram"] == 0 < entry["size"]  # CPU only


def test_a_quantized_cache_without_flash_attention_fails_the_load(
    stub: OllamaApiServer, backend: OllamaBackend, tiny: Candidate, tmp_path: Path
) -> None:
    """Ollama v0.33 passes OLLAMA_KV_CACHE_TYPE as it is: no fallback to f16, llama.cpp refuses the context."""
    plan = make_test_plan([tiny])
    option = fetched_option(backend, plan)
    stub.env = {"OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_FLASH_ATTENTION": "0"}
    with pytest.raises(AttemptFailed) as failed:
        backend.start(plan, option, LaunchRequest(), log_dir=tmp_path)
    assert failed.value.outcome == "crash"
    assert "V cache quantization requires flash_attn" in failed.value.detail


def test_oom_line_classifies_ollama_v033_load_errors() -> None:
    from launcher.verify import oom_line

    assert oom_line(["llama-server reported out-of-memory during startup: compute buffer"]) is not None
    assert oom_line(["llama-server process has terminated: exit status 1: cudaMalloc failed: out of memory"])
    assert oom_line(["llama-server process has terminated: exit status 1: error loading model: bad magic"]) is None


def test_the_llama_server_launch_is_read_from_ollamas_log() -> None:
    from launcher.llamalog import ollama_launch
    from launcher.verify import placement_from_ollama_log

    line = ('time=2026-08-21T10:00:00.000Z level=INFO source=llama_server.go:433 msg="starting llama-server" '
            'cmd="/usr/lib/ollama/llama-server --model /m/blobs/sha256-ab --port 4 -c 16384 -np 2 --flash-attn auto '
            '-b 1024 -ub 1024"')  # fmt: skip
    launch = ollama_launch(line)
    assert launch is not None and launch.model_path == "/m/blobs/sha256-ab"
    assert (launch.n_ctx, launch.n_parallel, launch.n_ubatch, launch.flash_attn) == (16384, 2, 1024, "auto")
    assert (launch.type_k, launch.n_gpu_layers) == (None, None)  # not passed: llama-server's defaults
    earlier = line.replace("-ub 1024", "-ub 512") + "\nload_tensors: offloaded 3/5 layers to GPU\n"
    body = ("load_tensors: offloaded 5/5 layers to GPU\n"
            "load_tensors:        CUDA0 model buffer size =   100.00 MiB\n")  # fmt: skip
    placement = placement_from_ollama_log(earlier + line + "\n" + body, expected_ctx=4096)
    assert placement is not None and placement.verdict == "gpu", placement.reason
    assert (placement.type_k, placement.n_ubatch, placement.n_slots) == ("f16", 1024, 2)  # the last launch's
    assert placement.n_ctx_per_slot == 8192 and placement.context_mismatch
    assert placement_from_ollama_log(body) is None  # no launch line: not Ollama's log (or before v0.30)
    mtp = ollama_launch(line.replace(" -b 1024", " --spec-type mtp --spec-draft-n-max 4 -b 1024"))
    assert mtp is not None and mtp.draft and not launch.draft


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
    assert unloads == [{"model": instance.model_name, "stream": False, "keep_alive": 0.0}]
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
        assert list(stub.loaded) == [result.instance.model_name]
        assert stub.models[result.instance.model_name]["from"] == "fitquant/tiny:q4_k_m"
    finally:
        backend.stop(result.instance)
    assert stub.loaded == {}


@pytest.mark.parametrize("source", ["local", "registry"])
def test_requests_without_options_keep_the_verified_model(
    stub: OllamaApiServer, tiny: Candidate, tmp_path: Path, source: str
) -> None:
    """What `run` advertises (endpoint, model name) carries the plan: an OpenAI-style request and an /api/chat
    without options neither reload the model (Ollama's needsReload) nor change its context; for a pulled registry
    model (no num_ctx of its own) as for a created local one."""
    from launcher.run import launch

    if source == "registry":
        stub.add_registry_model("tiny:1b")
        tiny = replace(tiny, source="ollama", ollama_model="tiny:1b")
    backend = OllamaBackend(host=stub.url)
    plan = make_test_plan([tiny])
    assert stub.server_default_context() != CTX  # a reload with the server's default would show
    result = launch(plan, backend, LaunchRequest(), log_dir=tmp_path / "logs", progress=False)
    try:
        inst = result.instance
        assert result.placement.verdict == "gpu", result.placement.reason
        loads = [opts for name, opts in stub.loads if same_model(name, inst.model_name)]
        assert len(loads) == 1, loads  # the warm-up (through /v1) did not reload it either
        assert loads[0]["num_ctx"] == CTX and loads[0]["num_gpu"] == ALL
        assert loads[0]["num_batch"] == plan.policy.n_ubatch  # not Ollama's automatic 1024 for a 16k context
        body = {"model": inst.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(f"{inst.endpoint}/chat/completions", json=body, timeout=10)
        assert r.status_code == 200, r.text
        base = inst.endpoint.removesuffix("/v1")
        body = {"model": inst.model_name, "messages": [{"role": "user", "content": "hi"}], "stream": False}
        r = httpx.post(f"{base}/api/chat", json=body, timeout=10)
        assert r.status_code == 200, r.text
        assert len([n for n, _ in stub.loads if same_model(n, inst.model_name)]) == 1
        [entry] = httpx.get(f"{base}/api/ps", timeout=10).json()["models"]
        assert entry["context_length"] == CTX
    finally:
        backend.stop(result.instance)


def test_the_faithful_stub_reloads_on_other_options(stub: OllamaApiServer) -> None:
    """The stub's scheduler, as Ollama's: no num_ctx means the server's default (a reload of a model loaded with
    another), a derived model's parameters are its defaults, keep_alive resets to the default on every request."""
    stub.add_model("m:1b")
    chat = {"model": "m:1b", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    assert httpx.post(f"{stub.url}/api/chat", json={**chat, "options": {"num_ctx": 8192},
                                                      "keep_alive": -1}).status_code == 200  # fmt: skip
    assert stub.loaded["m:1b"]["keep_alive_s"] == float("inf")
    assert httpx.post(f"{stub.url}/v1/chat/completions", json=chat).status_code == 200
    assert [o["num_ctx"] for _, o in stub.loads] == [8192, 4096]  # reloaded with the default context
    assert stub.loaded["m:1b"]["keep_alive_s"] == 300.0 and stub.loaded["m:1b"]["options"]["num_batch"] == 512
    r = httpx.post(f"{stub.url}/api/create", json={"model": "m:derived", "from": "m:1b", "stream": False,
                                                    "parameters": {"num_ctx": 8192, "num_batch": 256}})  # fmt: skip
    assert r.json() == {"status": "success"} and stub.models["m:derived"]["files"] == stub.models["m:1b"]["files"]
    for _ in range(2):
        assert httpx.post(f"{stub.url}/v1/chat/completions", json={**chat, "model": "m:derived"}).status_code == 200
    assert [(n, o["num_ctx"], o["num_batch"]) for n, o in stub.loads[2:]] == [("m:derived", 8192, 256)]
    assert httpx.post(f"{stub.url}/api/create", json={"model": "x", "from": "nosuch"}).status_code == 404


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
        assert all(gone(pid, 0.1) for pid in envs if pid != instance.pid)
        assert os.getpgid(instance.pid) == instance.pid  # its own process group
        assert (env["OLLAMA_CONTEXT_LENGTH"], env["OLLAMA_KEEP_ALIVE"]) == (str(CTX), "-1")
        backend.wait_ready(instance, 10)
        placement = backend.placement(instance, option)
        # verified from `ollama serve`'s own log: the llama-server command line it ran, then llama.cpp's lines
        assert placement.source == "log" and placement.verdict == "gpu", placement.reason
        assert (placement.layers_on_gpu, placement.layers_total) == (ALL, ALL)
        assert (placement.type_k, placement.type_v, placement.flash_attn) == ("q8_0", "q8_0", True)
        assert (placement.n_ubatch, placement.n_ctx_per_slot, placement.context_mismatch) == (512, CTX, False)
        [gpu] = placement.gpu_devices
        assert gpu.name == "CUDA0" and gpu.model_bytes > 0 and gpu.kv_bytes > 0 and gpu.compute_bytes > 0
        assert gpu.predicted is not None and gpu.predicted["model"] > 0
        assert instance.extra["kv_type_note"] is None
    finally:
        backend.stop(instance)
    assert gone(instance.pid), "ollama serve outlived stop()"
    assert all(gone(pid) for pid in envs)
    backend.stop(instance)  # idempotent


def test_fitquant_run_on_its_own_ollama_serve_verifies_from_the_log(
    tiny: Candidate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fitquant run MODEL --backend ollama` end to end on a fake `ollama` (the stub): plan, create, the derived
    model loaded with the plan's options, verified from `ollama serve`'s log, a piped prompt answered."""
    import subprocess

    records = tmp_path / "records"
    fake_ollama(tmp_path / "bin", records)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "OLLAMA_HOST": f"127.0.0.1:{closed_port()}",
           "OLLAMA_MODELS": str(tmp_path / "ollama-models"), "FITQUANT_HOME": str(tmp_path / "home")}  # fmt: skip
    model = str(tiny.files[0].local_path)
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "run", model, "--backend", "ollama", "--vram", "8GiB", "--ram", "16GiB",
         "--no-engine", "--ctx", str(CTX), "--json", "--max-tokens", "4"],
        input="hi", capture_output=True, text=True, env=env, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout.strip().splitlines()[0])
    served = f"fitquant/tiny:q4_k_m-c{CTX}-g{ALL}-b512"
    assert data["model_name"] == served and data["backend"]["server"] == "ollama", data
    placement = data["placement"]
    assert (placement["source"], placement["verdict"], placement["type_k"]) == ("log", "gpu", "q8_0"), placement
    [server_env] = [json.loads(p.read_text()) for p in records.glob("*.json")
                    if json.loads(p.read_text()).get("OLLAMA_CONTEXT_LENGTH")]  # fmt: skip
    assert server_env["OLLAMA_CONTEXT_LENGTH"] == str(CTX) and server_env["OLLAMA_KV_CACHE_TYPE"] == "q8_0"


def test_fitquant_run_serve_on_ollama_is_listed_and_a_v1_request_changes_nothing(
    tiny: Candidate, tmp_path: Path
) -> None:
    """The issue's whole loop: `fitquant run MODEL --backend ollama --serve` creates the derived model, loads it,
    verifies from the log; `fitquant ps` lists it; a plain /v1/chat/completions (no options) sent to what `run`
    advertises is answered by the same loaded model, at the verified context, and nothing else gets loaded."""
    import subprocess

    fake_ollama(tmp_path / "bin", tmp_path / "records")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "OLLAMA_HOST": f"127.0.0.1:{closed_port()}",
           "OLLAMA_MODELS": str(tmp_path / "ollama-models"), "FITQUANT_HOME": str(tmp_path / "home")}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", str(tiny.files[0].local_path), "--backend", "ollama", "--vram",
         "8GiB", "--ram", "16GiB", "--no-engine", "--ctx", str(CTX), "--json", "--serve"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        data = json.loads(line)
        assert data["placement"]["source"] == "log" and data["placement"]["verdict"] == "gpu"
        base = data["endpoint"].removesuffix("/v1")
        before = httpx.get(f"{base}/api/ps", timeout=10).json()["models"]
        assert [(m["name"], m["context_length"]) for m in before] == [(data["model_name"], CTX)]
        listed = subprocess.run([sys.executable, "-m", "launcher", "ps", "--json"], capture_output=True, text=True,
                                env=env, timeout=60, cwd=ROOT)  # fmt: skip
        [instance] = json.loads(listed.stdout)["instances"]
        assert instance["endpoint"] == data["endpoint"] and instance["backend"] == "ollama"
        reply = httpx.post(f"{data['endpoint']}/chat/completions", timeout=30,
                           json={"model": data["model_name"], "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert reply.status_code == 200, reply.text
        after = httpx.get(f"{base}/api/ps", timeout=10).json()["models"]
        assert [(m["name"], m["context_length"], m["size"]) for m in after] == [
            (m["name"], m["context_length"], m["size"]) for m in before
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_projector_ollama_loads_on_its_own_is_reported(
    tiny: Candidate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose manifest has a projector: Ollama passes --mmproj whatever the plan said; the plan (without
    --vision) did not count it, and the form and the verdict say so."""
    models = tmp_path / "ollama-models"
    earlier = OllamaApiServer(models_dir=models).start()  # the model pulled earlier, with a projector layer
    try:
        gguf_path = Path(str(tiny.files[0].local_path))
        projector = tmp_path / "mmproj-tiny-F16.gguf"
        projector.write_bytes(b"a projector's weights" * 1000)
        files = {}
        for name, path in (("tiny.gguf", gguf_path), ("mmproj-tiny-F16.gguf", projector)):
            digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
            httpx.post(f"{earlier.url}/api/blobs/{digest}", content=path.read_bytes()).raise_for_status()
            files[name] = digest
        r = httpx.post(f"{earlier.url}/api/create", json={"model": "tiny:vision", "files": files, "stream": False})
        assert r.json() == {"status": "success"}
    finally:
        earlier.close()
    fake_ollama(tmp_path / "bin", tmp_path / "records")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.setenv("OLLAMA_MODELS", str(models))
    backend = OllamaBackend(host=f"127.0.0.1:{closed_port()}")
    pulled = replace(tiny, source="ollama-local", ollama_model="tiny:vision",
                     projector=CandidateFile("mmproj-tiny-F16.gguf", projector.stat().st_size))  # fmt: skip
    plan = make_test_plan([pulled])
    assert any("projector on its own" in note for note in ollama_form(plan)["notes"])
    option = fetched_option(backend, plan)
    instance = backend.start(plan, option, LaunchRequest(), log_dir=tmp_path / "logs")
    try:
        placement = backend.placement(instance, option)
        assert placement.source == "log"
        assert any("vision projector on its own (--mmproj)" in e for e in placement.errors), placement.errors
    finally:
        backend.stop(instance)


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
        # a request without options (OpenAI-style) keeps the model as verified: the derived model carries num_ctx
        body = {"model": instance.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(f"{instance.endpoint}/chat/completions", json=body, timeout=120, trust_env=False)
        assert r.status_code == 200, r.text
        entry = backend._ps_entry(url, instance.model_name)
        assert entry is not None and entry.get("context_length") == instance.extra["options"]["num_ctx"]
    finally:
        backend.stop(instance)
    assert backend._ps_entry(url, instance.model_name) is None
