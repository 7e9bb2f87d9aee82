"""The public namespace is a contract: pin it, and keep `import launcher` free of heavy imports."""

import subprocess
import sys

import launcher


def test_public_api_is_pinned():
    assert launcher.__all__ == sorted([
        "Candidate", "CatalogError", "EngineError", "EngineMeasurement", "EngineSettings", "EstimateError",
        "FitquantError", "GGUFFormatError", "GGUFHeader", "GPU", "HardwareError", "HardwareSnapshot", "MemoryEstimate",
        "ModelError", "ModelFacts", "NoFitError", "Plan", "Policy", "RunFailed", "RunResult", "RunSpec", "Settings",
        "TensorInfo", "choose_backend", "describe_machine", "detect_hardware", "embedded_model_path", "estimate",
        "estimate_memory", "fit", "list_candidates", "make_plan", "measure", "model_facts", "parse_header",
        "read_header", "read_model_facts", "run_machine", "start", "stop",
    ])  # fmt: skip


def test_public_api_every_name_resolves():
    for name in launcher.__all__:
        assert getattr(launcher, name) is not None, name


def test_public_api_import_is_light():
    code = "import sys, launcher, launcher.cli; print(sorted(m for m in ('rich', 'httpx', 'llama_cpp', 'pynvml', 'numpy', 'pydantic') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
