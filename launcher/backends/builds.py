"""Where scripts/build-llama-cpp caches llama-server and ggml-rpc-server, and how the backend finds them.

    builds_root()/                         $FITQUANT_LLAMA_CPP_BUILDS, else <user cache>/fitquant/llama.cpp
        0.3.36-cpu/                        <llama-cpp-python version>-<variant>
            bin/llama-server               RPATH $ORIGIN: the lib*.so beside them
            bin/ggml-rpc-server
            bin/llama-bench                 (builds since it was added; not required: scripts/bench_speed.py)
            bin/lib*.so
            build.json                     version, variant, llama.cpp commit, date
        .partial-0.3.36-cpu-<pid>/         a build in progress (never looked at)

The root is deliberately not under FITQUANT_HOME (the tests point that at a temporary directory): one
build, made once per machine, serves the test setup and the backend alike. A build folder appears only by
rename once complete, so a folder with a valid build.json and both binaries is a complete build.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from launcher.version import llama_cpp_python_version as installed_version

ENV_ROOT = "FITQUANT_LLAMA_CPP_BUILDS"
VARIANTS = ("cpu", "cuda", "metal", "rocm", "vulkan")
BINARIES = ("llama-server", "ggml-rpc-server")  # a complete build has both
TOOLS = ("llama-bench",)  # built beside them; an older cached build may lack it
MANIFEST = "build.json"


@dataclass(frozen=True)
class Build:
    """One complete cached build: `path` is its folder, the binaries are in `path / "bin"`."""

    path: Path
    version: str  # llama-cpp-python's version, whose vendored llama.cpp was built
    variant: str  # cpu, cuda, metal, rocm or vulkan
    commit: str | None  # llama.cpp commit, from `llama-server --version`
    date: str  # ISO 8601, UTC
    cmake_args: tuple[str, ...] = ()  # how it was configured (build.json)

    @property
    def fa_quants(self) -> str | None:
        """A CUDA build's FlashAttention K-V pairs (GGML_CUDA_FA_QUANTS, as its system info prints them); None for
        other variants, whose flash attention is not limited to compiled pairs this way."""
        if self.variant != "cuda":
            return None
        from launcher.speed import DEFAULT_CUDA_FA_QUANTS

        for arg in self.cmake_args:
            if arg.startswith("-DGGML_CUDA_FA_QUANTS="):
                return arg.split("=", 1)[1].replace(";", ",")
            if arg.upper() in ("-DGGML_CUDA_FA_ALL_QUANTS=ON", "-DGGML_CUDA_FA_ALL_QUANTS=1"):
                return "all"
        return DEFAULT_CUDA_FA_QUANTS

    def binary(self, name: str = "llama-server") -> Path:
        return self.path / "bin" / (name + (".exe" if os.name == "nt" else ""))


def builds_root() -> Path:
    """$FITQUANT_LLAMA_CPP_BUILDS when set, else `llama.cpp` in fitquant's user cache dir (not FITQUANT_HOME)."""
    value = os.environ.get(ENV_ROOT)
    if value:
        return Path(value).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("fitquant")) / "llama.cpp"


def build_name(version: str, variant: str) -> str:
    """The folder name of a build: `<llama-cpp-python version>-<variant>`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    return f"{version}-{variant}"


def read_build(path: Path) -> Build | None:
    """The build in `path` when it is complete (a valid build.json and both binaries runnable), else None."""
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    version, variant, commit, date = (data.get(k) for k in ("version", "variant", "commit", "date"))
    if not isinstance(version, str) or variant not in VARIANTS or not isinstance(date, str):
        return None
    args = data.get("cmake_args")
    cmake_args = tuple(a for a in args if isinstance(a, str)) if isinstance(args, list) else ()
    build = Build(path, version, str(variant), commit if isinstance(commit, str) else None, date, cmake_args)
    for name in BINARIES:
        exe = build.binary(name)
        if not exe.is_file() or not os.access(exe, os.X_OK):
            return None
    return build


def list_builds(root: Path | None = None) -> list[Build]:
    """Every complete build under `root` (default builds_root()), in no particular order."""
    root = builds_root() if root is None else root
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    builds = (read_build(p) for p in entries if p.is_dir() and not p.name.startswith("."))
    return [b for b in builds if b is not None]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version))


def find_built(binary: str = "llama-server", *, variant: str | None = None) -> Path | None:
    """`binary` (llama-server, ggml-rpc-server or llama-bench) from the best complete cached build, or None (also
    when that build lacks a tool: it was cached before the tool was added; `scripts/build-llama-cpp --force`).

    Best: built from the installed llama-cpp-python version, then (without `variant`) a GPU variant over
    cpu, then the newest version, then the latest build date."""
    if binary not in BINARIES + TOOLS:
        raise ValueError(f"unknown binary {binary!r}; one of {', '.join(BINARIES + TOOLS)}")
    installed = installed_version()
    builds = [b for b in list_builds() if variant is None or b.variant == variant]
    if not builds:
        return None
    best = max(builds, key=lambda b: (b.version == installed, b.variant != "cpu", _version_key(b.version), b.date))
    found = best.binary(binary)
    return found if binary in BINARIES or found.is_file() else None
