"""Confirm a plan with the engine: llama.cpp sizes the configuration itself, before anything is downloaded.

A dry run (launcher.measure.dryrun: `no_alloc`, `load_mode = 0`) makes llama.cpp size weights, KV cache and
compute buffers for its real backend without allocating or reading tensor data. A candidate that is
not on disk yet is measured through a sparse copy: its real header bytes (a Range read of the first
`data_offset` bytes of each shard) followed by an empty data region of the real size.

Figures are used for the fit decision only when the engine runs the plan's backend (a CPU plan, or a
GPU plan on a llama.cpp build with GPU offload); otherwise they are reported as a cross-check.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.catalog.types import Candidate
from launcher.errors import EngineError, FitquantError
from launcher.paths import cache_dir

if TYPE_CHECKING:
    import httpx

    from launcher.measure.dryrun import EngineMeasurement
    from launcher.plan import Measurements, Option

MiB = 1024**2


def engine_offloads() -> bool:
    """Whether the installed llama.cpp can place layers on a GPU (a CPU-only build cannot)."""
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


def model_file(candidate: Candidate, *, client: httpx.Client | None = None) -> Path:
    """A file llama.cpp can load for `candidate`: the real one when local, else a sparse header-only copy."""
    first = candidate.files[0] if candidate.files else None
    if first is not None and first.local_path and os.path.exists(first.local_path):
        return Path(first.local_path)
    return sparse_copy(candidate, client=client)


def sparse_copy(candidate: Candidate, *, client: httpx.Client | None = None) -> Path:
    """Write the candidate's header bytes into sparse files of the real sizes; return the first shard."""
    from launcher.gguf import read_prefix
    from launcher.http import hf_auth

    header = candidate.header
    if header is None:
        raise EngineError(f"{candidate.model} {candidate.quant}: no header to measure")
    sources = list(header.shards)
    offsets = list(header.shard_data_offsets) or [header.data_offset]
    sizes = [f.size_bytes for f in candidate.files] if len(candidate.files) == len(sources) else []
    if not sizes or any(s <= 0 for s in sizes):
        sizes = [s or 0 for s in header.shard_sizes] if header.shard_sizes else [header.file_size or 0]
    urls = [f.url or f.local_path or src for f, src in zip(candidate.files, sources, strict=False)] or sources
    key = hashlib.sha256("|".join([candidate.content_hash or "", *sources, *map(str, sizes)]).encode()).hexdigest()[:24]
    folder = cache_dir() / "sparse" / key
    n = len(sources)
    names = [f"model-{i + 1:05d}-of-{n:05d}.gguf" if n > 1 else "model.gguf" for i in range(n)]
    paths = [folder / name for name in names]
    if all(p.exists() and p.stat().st_size == size for p, size in zip(paths, sizes, strict=True)):
        return paths[0]
    folder.mkdir(parents=True, exist_ok=True)
    for path, url, offset, size in zip(paths, urls, offsets, sizes, strict=True):
        if size < offset:
            raise EngineError(f"{candidate.model} {candidate.quant}: file size {size} is smaller than its header")
        data = read_prefix(url, offset, client=client, auth=hf_auth())  # HF_TOKEN: the Hub's host only
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        with open(tmp, "wb") as out:
            out.write(data)
            out.truncate(size)  # the data region stays a hole: no disk used, nothing downloaded
        os.replace(tmp, path)
    return paths[0]


def _device_name(buffer_name: str) -> str:
    """CUDA0 -> GPU0, ROCm1 -> GPU1, Metal -> GPU0; host buffers -> CPU."""
    from launcher.llamalog import gpu_device

    device = gpu_device(buffer_name)
    if device is None:
        return "CPU"
    digits = "".join(ch for ch in device if ch.isdigit())
    return f"GPU{digits or 0}"


def needs_by_device(measurement: EngineMeasurement) -> dict[str, int]:
    """Engine-measured bytes per device: weights, KV, recurrent state, compute and output buffers."""
    needs: dict[str, int] = {}
    kinds = {b.kind for b in measurement.buffers}
    for buffer in measurement.buffers:
        nbytes = buffer.nbytes if buffer.nbytes is not None else round(buffer.mib * MiB)
        device = _device_name(buffer.name)
        needs[device] = needs.get(device, 0) + nbytes
    if "model" not in kinds:  # fallback: llama_model_size, all on the host
        needs["CPU"] = needs.get("CPU", 0) + measurement.model_size_bytes
    return needs


def measure_options(options: list[Option], *, client: httpx.Client | None = None) -> Measurements:
    """Dry-run each option in llama.cpp; map each option's MeasureKey to bytes per device.

    Options llama.cpp cannot measure are left out (the plan keeps their estimates).
    """
    from launcher.measure.dryrun import EngineSettings, measure_many
    from launcher.plan import MeasureKey

    jobs, keys = [], []
    for option in options:
        try:
            path = model_file(option.candidate, client=client)
        except (FitquantError, OSError):  # a candidate we cannot copy keeps its estimate
            continue
        settings = option.estimate.settings
        jobs.append((path, EngineSettings.from_settings(settings)))
        keys.append((MeasureKey.of(option), option))
    results = measure_many(jobs) if jobs else []
    measured: Measurements = {}
    for (key, option), result in zip(keys, results, strict=True):
        if not isinstance(result, Exception):
            needs = needs_by_device(result)
            # the dry run keeps llama.cpp's extra buffer types off (its figures stay host-independent): the
            # server's CPU_REPACK copy of host weights is this host's, from the estimate
            cpu = option.estimate.device("CPU")
            if cpu is not None and cpu.repack_bytes:
                needs["CPU"] = needs.get("CPU", 0) + cpu.repack_bytes
            measured[key] = needs
    return measured
