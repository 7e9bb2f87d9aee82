"""The planner against llama.cpp: every choice equals the best quant llama.cpp's own figures fit.

The oracle measures each quant of a ladder at each context with a llama.cpp dry run (launcher.measure.dryrun) on
this machine's CPU backend; the plan is made for a machine described with that much RAM (no GPU, no
reserve), the way a user would ask "what is the best quant of this model that fits in X?".
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from launcher.backends import launch_forms
from launcher.backends.llamacpp import server_argv
from launcher.backends.ollama_form import ollama_form
from launcher.catalog import list_candidates
from launcher.catalog.types import Candidate, CandidateFile
from launcher.errors import NoFitError
from launcher.estimate import Settings
from launcher.fit import fit
from launcher.gguf import read_header
from launcher.hardware import describe_machine
from launcher.measure.dryrun import EngineSettings, measure_many
from launcher.plan import Budget, Policy, make_plan
from launcher.quants import quant_info

MiB = 1024**2
SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "plan.schema.json").read_text())
FAMILIES = ("tiny-llama", "tiny-gemma3", "tiny-qwen3moe")  # dense, sliding window, MoE
CONTEXTS = (4096, 16384, 65536)


def footprint(measurement) -> int:
    """Everything llama.cpp reserves on the CPU backend: weights, KV, recurrent state, compute, output."""
    total = measurement.model_size_bytes
    for kind in ("KV", "RS", "compute", "output"):
        total += round(measurement.total_mib(kind) * MiB)
    # KV from the per-cache lines when the breakdown has no KV buffers (no_alloc prints 0.00 for them)
    if not any(b.kind == "KV" and b.mib for b in measurement.buffers):
        total += round(measurement.kv_mib * MiB)
    return total


@pytest.fixture(scope="module")
def ladders(corpus, tmp_path_factory):
    """One folder of quants per family, and llama.cpp's footprint of every quant at every context."""
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        models = [m for m in corpus if m.family_name == family]
        for m in models:
            (folder / m.path.name).symlink_to(m.path)
        jobs = [(m.path, EngineSettings.from_settings(Settings(n_ctx=c, type_k="q8_0", type_v="q8_0", flash_attn="on")))
                for m in models for c in CONTEXTS]  # fmt: skip
        results = measure_many(jobs)
        prints = {}
        for (path, settings), result in zip(jobs, results, strict=True):
            assert not isinstance(result, Exception), result
            quant = next(m.quant for m in models if m.path == path)
            prints[(quant, settings.n_ctx)] = footprint(result)
        out[family] = (folder, prints)
    return out


def budgets_between(values: list[int]) -> list[int]:
    """Six budgets: below the smallest footprint, between neighbours, and above the largest."""
    distinct = sorted(set(values))
    cuts = [distinct[0] - MiB // 4] + [(a + b) // 2 for a, b in itertools.pairwise(distinct)]
    cuts.append(distinct[-1] + MiB)
    step = max(1, len(cuts) // 6)
    picked = [*cuts[::step][:5], cuts[-1]]
    assert len(set(picked)) >= 6 or len(cuts) < 6
    return sorted(set(picked))


def test_plan_matches_the_llama_cpp_oracle(ladders):
    cases = mismatches = 0
    for family, (folder, prints) in ladders.items():
        candidates = list_candidates(str(folder))
        assert len(candidates) >= 9
        for n_ctx in CONTEXTS:
            at_ctx = {q: b for (q, c), b in prints.items() if c == n_ctx}
            for budget in budgets_between(list(at_ctx.values())):
                cases += 1
                policy = Policy(n_ctx=n_ctx, reserve_bytes=0, min_quant="Q2_K")
                try:
                    plan = fit(str(folder), policy, machine=describe_machine(ram=budget), candidates=candidates)
                except NoFitError as refused:
                    plan = refused.plan
                fitting = [q for q, b in at_ctx.items() if b <= budget]
                if fitting:
                    best = max(fitting, key=lambda q: quant_info(q).rank)
                    assert plan.mode == "cpu", (family, n_ctx, budget, plan.reason)
                    if plan.chosen.quant != best:
                        mismatches += 1
                    assert plan.chosen.quant == best, (family, n_ctx, budget, plan.reason)
                    assert plan.chosen.figures == "engine"
                else:
                    assert plan.mode in ("reduced-context", "none"), (family, n_ctx, budget, plan.reason)
                # never "fits" where llama.cpp's figures say it does not
                if plan.chosen is not None and plan.chosen.n_ctx == n_ctx:
                    assert prints[(plan.chosen.quant, n_ctx)] <= budget
    assert cases >= 3 * 3 * 6
    assert mismatches == 0


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("short_by_mib", [1, 6])
def test_plan_largest_context_is_within_one_step_of_the_oracle(ladders, family_name, short_by_mib):
    folder, prints = ladders[family_name]
    candidates = list_candidates(str(folder))
    smallest = min(b for (q, c), b in prints.items() if c == 65536)
    budget = smallest - short_by_mib * MiB  # nothing fits at 64k: the plan must find the largest context that does
    policy = Policy(n_ctx=65536, reserve_bytes=0, min_quant="Q2_K", min_context=256)
    plan = fit(str(folder), policy, machine=describe_machine(ram=budget), candidates=candidates)
    assert plan.mode == "reduced-context", plan.reason
    chosen = plan.chosen
    path = next(c.files[0].local_path for c in candidates if c.quant == chosen.quant)

    def oracle_fits(n_ctx: int) -> bool:
        settings = EngineSettings.from_settings(Settings(n_ctx=n_ctx, type_k="q8_0", type_v="q8_0", flash_attn="on"))
        return footprint(measure_many([(path, settings)])[0]) <= budget

    assert chosen.figures == "engine"
    assert oracle_fits(chosen.n_ctx)
    # the oracle's largest context is at most one 256-token step further
    assert not oracle_fits(chosen.n_ctx + 2 * 256)


@pytest.mark.slow
def test_plan_engine_confirmation_on_real_file_and_sparse_copy_agree(gemma3_270m_path, tmp_path):
    header = read_header(gemma3_270m_path)
    size = gemma3_270m_path.stat().st_size
    real = Candidate("gemma", "local", "Q4_K_M",
                     (CandidateFile(gemma3_270m_path.name, size, local_path=str(gemma3_270m_path)),), header)  # fmt: skip
    # Not on disk: the engine measures a sparse copy (real header, empty data region of the real size).
    remote = Candidate("gemma", "huggingface", "Q4_K_M", (CandidateFile(gemma3_270m_path.name, size),), header)
    machine = describe_machine(ram=8 * 1024**3)
    policy = Policy(n_ctx=8192, reserve_bytes=0)
    real_plan = fit("gemma", policy, machine=machine, candidates=[real])
    sparse_plan = fit("gemma", policy, machine=machine, candidates=[remote])
    assert real_plan.chosen.figures == sparse_plan.chosen.figures == "engine"
    assert real_plan.chosen.needs == sparse_plan.chosen.needs
    # llama.cpp's own figures for this configuration, measured directly
    from launcher.measure.confirm import needs_by_device

    direct = measure_many([(gemma3_270m_path, EngineSettings.from_settings(real_plan.chosen.estimate.settings))])[0]
    assert real_plan.chosen.needs == needs_by_device(direct)
    assert direct.model_size_bytes == 246587904
    sparse = list((tmp_path / "fitquant-home" / "cache" / "sparse").rglob("*.gguf"))
    assert len(sparse) == 1 and sparse[0].stat().st_size == size
    assert sparse[0].stat().st_blocks * 512 < 16 * MiB  # a hole, not a download
    assert "measured by llama.cpp" in " ".join(real_plan.notes)


@pytest.fixture(scope="module")
def family(corpus, tmp_path_factory):
    """Candidates of one corpus family, listed from a folder holding only its quants."""
    cache = {}

    def get(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name + "-quants")
            for m in corpus:
                if m.family_name == name:
                    (folder / m.path.name).symlink_to(m.path)
            cache[name] = list_candidates(str(folder))
        return cache[name]

    return get


def _gpu_plan(candidates, vram_mib: list[int], **policy):
    budgets = [Budget(f"GPU{i}", "cuda", v * MiB, 0) for i, v in enumerate(vram_mib)]
    return make_plan("test", candidates, budgets, Policy(reserve_bytes=0, **policy))


def test_plan_gpu_choice_and_launch_configurations(family):
    candidates = family("tiny-llama")
    plan = _gpu_plan(candidates, [1024], n_ctx=4096, min_quant="Q2_K")
    assert plan.mode == "gpu" and plan.fits_on_gpu
    assert plan.chosen.quant == "F16"  # everything fits: the highest quality wins
    argv = server_argv(plan, port=9000)
    assert argv[:3] == ["llama-server", "-m", plan.chosen.candidate.files[0].local_path]
    for flag, value in (("-c", "4096"), ("-ngl", "5"), ("-ctk", "q8_0"), ("-ctv", "q8_0"), ("-fa", "on"),
                        ("--fit", "off"), ("-np", "1"), ("--host", "127.0.0.1"), ("--port", "9000")):  # fmt: skip
        assert argv[argv.index(flag) + 1] == value
    ollama = ollama_form(plan)
    assert ollama["options"] == {"num_ctx": 4096, "num_gpu": 5, "num_batch": 512, "draft_num_predict": 0}
    assert ollama["env"] == {"OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_FLASH_ATTENTION": "1", "OLLAMA_NUM_PARALLEL": "1",
                             "OLLAMA_CONTEXT_LENGTH": "4096"}  # fmt: skip
    assert "PARAMETER num_ctx 4096" in ollama["modelfile"]
    # the plan JSON carries each backend's launch_form, rendered by the caller (the plan imports no backend)
    data = plan.to_json(launch_forms=launch_forms(plan, port=9000))
    jsonschema.validate(data, SCHEMA)
    assert (data["llama_server_argv"], data["ollama"]) == (argv, ollama)
    assert list(data)[-2:] == ["llama_server_argv", "ollama"]  # the contract's key order
    bare = plan.to_json()  # no forms rendered: the keys stay, null
    jsonschema.validate(bare, SCHEMA)
    assert (bare["llama_server_argv"], bare["ollama"]) == (None, None)
    assert {k: v for k, v in bare.items() if k not in ("llama_server_argv", "ollama")} == {
        k: v for k, v in data.items() if k not in ("llama_server_argv", "ollama")
    }


def test_plan_two_gpus_split_by_free_memory(family):
    candidates = family("tiny-llama")
    plan = _gpu_plan(candidates, [600, 300], n_ctx=4096, min_quant="Q2_K")
    argv = server_argv(plan)
    assert argv[argv.index("-ts") + 1] == "600,300"
    names = [d.name for d in plan.chosen.estimate.devices]
    assert names == ["CPU", "GPU0", "GPU1"]


def test_plan_moe_keeps_experts_on_cpu_when_that_fits(family):
    f16 = next(c for c in family("tiny-qwen3moe") if c.quant == "F16")
    roomy = _gpu_plan([f16], [10_000], n_ctx=4096, min_quant="Q2_K").chosen
    full = roomy.needs["GPU0"]
    experts = sum(layer.expert_bytes for layer in roomy.facts.layers)
    # a GPU too small for the whole model but big enough without the experts
    plan = _gpu_plan([f16], [(full - experts // 2) // MiB], n_ctx=4096, min_quant="Q2_K")
    assert plan.mode == "moe-cpu-experts"
    assert plan.chosen.cpu_moe
    argv = server_argv(plan)
    assert argv[argv.index("-ot") + 1] == r"blk\.\d+\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU"
    assert "cannot pin MoE experts" in ollama_form(plan)["notes"][0]
    data = plan.to_json(launch_forms=launch_forms(plan))
    jsonschema.validate(data, SCHEMA)
    assert data["llama_server_argv"] == argv and data["ollama"] == ollama_form(plan)


def test_plan_strict_refuses_anything_but_a_full_fit(family):
    candidates = family("tiny-llama")
    plan = _gpu_plan(candidates, [260], n_ctx=65536, strict=True, min_quant="Q2_K")
    assert plan.chosen is None and plan.mode == "none"
    assert "(--strict)" in plan.reason
    assert plan.alternatives  # still says what would work
    assert launch_forms(plan) == {}
    data = plan.to_json(launch_forms={"llama_server_argv": ["ignored"], "ollama": {}})  # nothing chosen: null
    jsonschema.validate(data, SCHEMA)
    assert data["llama_server_argv"] is None and data["ollama"] is None


def test_plan_quality_floor_by_model_size(family):
    candidates = family("tiny-llama")
    plan = _gpu_plan(candidates, [1024], n_ctx=4096)
    assert plan.floor == "Q4_K_M"  # a model under 10B parameters keeps Q4_K_M or better
    below = {o.quant for o in plan.candidates if not o.above_floor}
    assert {"Q3_K_M", "Q2_K"} <= below and "Q4_K_M" not in below


def test_plan_cli_json_and_no_gpu_note(corpus, tmp_path):
    folder = tmp_path / "quants"
    folder.mkdir()
    for m in corpus:
        if m.family_name == "tiny-llama":
            shutil.copy(m.path, folder / m.path.name)
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "plan", str(folder), "--ctx", "4k", "--ram", "64GiB", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    jsonschema.validate(data, SCHEMA)
    assert data["mode"] == "cpu" and data["chosen"]["quant"] == "F16"
    assert any("no GPU found" in note for note in data["notes"])
    assert data["chosen"]["figures"] == "engine"


def test_plan_cli_strict_no_fit_is_one_line_and_exit_1(corpus, tmp_path):
    folder = tmp_path / "quants"
    folder.mkdir()
    for m in corpus:
        if m.family_name == "tiny-llama":
            (folder / m.path.name).symlink_to(m.path)
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "plan", str(folder), "--ctx", "64k", "--vram", "300MiB", "--reserve", "0",
         "--strict", "--no-engine"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("NoFitError: nothing above the quality floor Q4_K_M fits")


def test_plan_launch_names_remote_models_the_way_each_runtime_does(family):
    local = next(c for c in family("tiny-llama") if c.quant == "Q4_K_M")
    hf = Candidate("unsloth/Tiny-GGUF", "huggingface", "Q4_K_M",
                   (CandidateFile("Tiny-Q4_K_M.gguf", local.size_bytes, url="https://hf.example/resolve/main/Tiny-Q4_K_M.gguf"),),
                   local.header, ollama_model="hf.co/unsloth/Tiny-GGUF:Q4_K_M")  # fmt: skip
    plan = _gpu_plan([hf], [1024], n_ctx=4096)
    argv = server_argv(plan)
    assert argv[1:3] == ["-hf", "unsloth/Tiny-GGUF:Q4_K_M"]
    assert ollama_form(plan)["model"] == "hf.co/unsloth/Tiny-GGUF:Q4_K_M"
    registry = Candidate("tiny:1b", "ollama", "Q4_K_M", (CandidateFile("sha256:abc", local.size_bytes),), local.header,
                         ollama_model="tiny:1b-q4_K_M")  # fmt: skip
    plan = _gpu_plan([registry], [1024], n_ctx=8192, n_parallel=2)
    config = ollama_form(plan)
    assert config["model"] == "tiny:1b-q4_K_M"
    assert config["options"]["num_ctx"] == 4096  # per slot: Ollama multiplies by OLLAMA_NUM_PARALLEL
    assert config["env"]["OLLAMA_NUM_PARALLEL"] == "2"
    assert "--kv-unified" in server_argv(plan)


def test_plan_a_hugging_face_repository_measured_by_llama_cpp_before_any_download(corpus, monkeypatch, tmp_path):
    """The whole decision for a remote repository: list it, choose, and confirm with llama.cpp on sparse
    copies of the real headers, while the server sends no more than headers."""
    from hf_server import LADDER_12, HFServer, isolate_hub, ladder_files

    isolate_hub(monkeypatch, tmp_path)
    with HFServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        files = ladder_files(corpus, LADDER_12)
        server.add_repo("org/Tiny-Llama-GGUF", files)
        headers = sum(read_header(f.source).data_offset for f in files.values())
        plan = fit("org/Tiny-Llama-GGUF", Policy(n_ctx=4096, reserve_bytes=0, min_quant="Q2_K"),
                   machine=describe_machine(ram=14 * MiB))  # fmt: skip
        assert plan.chosen is not None and plan.chosen.figures == "engine"
        assert plan.chosen.candidate.source == "huggingface"
        # listing plus the sparse copies: header bytes (+ at most 1 MiB of read-ahead per file), never weights
        assert server.blob_bytes <= headers + len(files) * MiB
        assert server.blob_bytes < sum(f.size for f in files.values())
        argv = server_argv(plan)
        assert argv[1:3] == ["-hf", f"org/Tiny-Llama-GGUF:{plan.chosen.quant}"]


def test_plan_offers_the_most_context_when_no_quant_reaches_the_minimum(family):
    candidates = family("tiny-llama")
    policy = Policy(n_ctx=32768, reserve_bytes=0)
    roomy = make_plan("tiny", candidates, [Budget("CPU", "cpu", 10**9, 0)], policy)
    q4 = next(o for o in roomy.candidates if o.quant == "Q4_K_M")
    # a budget between what Q4_K_M needs at 1024 and at 4096 tokens: no quant reaches the 4096 minimum
    need_1k = make_plan("tiny", [q4.candidate], [Budget("CPU", "cpu", 10**9, 0)], Policy(n_ctx=1024, reserve_bytes=0))
    need_4k = make_plan("tiny", [q4.candidate], [Budget("CPU", "cpu", 10**9, 0)], Policy(n_ctx=4096, reserve_bytes=0))
    budget = (need_1k.chosen.needs["CPU"] + need_4k.chosen.needs["CPU"]) // 2
    plan = make_plan("tiny", candidates, [Budget("CPU", "cpu", budget, 0)], policy)
    assert plan.mode == "reduced-context"
    assert 1024 <= plan.chosen.n_ctx < 4096
    assert "only" in plan.reason and f"{plan.chosen.n_ctx} tokens fit" in plan.reason
    assert any("reaches 4096 tokens" in note for note in plan.notes)
    jsonschema.validate(plan.to_json(), SCHEMA)


def test_plan_json_gives_each_quants_published_quality_loss_with_its_source():
    """Quality beside speed: each option carries the quant's published mean KLD vs FP16 and where it comes from;
    the table shows it in a KLD column."""
    from click.testing import CliRunner

    from launcher.cli import main
    from launcher.quants import quant_info

    result = CliRunner().invoke(main, ["plan", "--vram", "2GiB", "--reserve", "0", "--no-engine", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    jsonschema.validate(plan, SCHEMA)
    quality = plan["chosen"]["quality"]
    info = quant_info("Q4_1")
    assert quality["kld"] == info.kld and info.kld is not None
    assert quality["measure"] == "mean KL divergence vs FP16"
    assert "LLaMA-3-8B" in quality["source"] and "perplexity" in quality["source"]
    table = CliRunner().invoke(
        main, ["plan", "--vram", "2GiB", "--reserve", "0", "--no-engine"], env={"COLUMNS": "120"}
    )
    assert "KLD" in table.output and f"{info.kld:.4f}" in table.output
    assert "not accuracy" in table.output


def test_plan_moe_shows_a_better_quant_with_experts_on_the_cpu_beside_the_full_fit(family):
    """An MoE whose better quant fits only with its experts on the CPU: the plan still chooses the quant that fits
    entirely, and shows the other beside it (as an alternative with its own predicted speed) with a note."""
    quants = {c.quant: c for c in family("tiny-qwen3moe")}
    low, high = quants["Q4_K_M"], quants["F16"]
    roomy = _gpu_plan([high], [10_000], n_ctx=4096, min_quant="Q2_K").chosen
    experts = sum(layer.expert_bytes for layer in roomy.facts.layers)
    small = _gpu_plan([low], [10_000], n_ctx=4096, min_quant="Q2_K").chosen
    gpu_mib = (roomy.needs["GPU0"] - experts // 2) // MiB  # F16 fits only without its experts; Q4_K_M fits whole
    assert small.needs["GPU0"] < gpu_mib * MiB
    plan = _gpu_plan([high, low], [gpu_mib], n_ctx=4096, min_quant="Q2_K")
    assert plan.mode == "gpu" and plan.chosen.quant == "Q4_K_M" and not plan.chosen.cpu_moe
    [beside] = plan.alternatives
    assert beside.quant == "F16" and beside.cpu_moe and beside.fits
    assert any(n.startswith("F16 fits with its MoE experts on the CPU") for n in plan.notes)
    data = plan.to_json()
    jsonschema.validate(data, SCHEMA)
    assert data["alternatives"][0]["mode"] == "moe-cpu-experts"
    dense = _gpu_plan(family("tiny-llama"), [10_000], n_ctx=4096, min_quant="Q2_K")
    assert dense.alternatives == []
