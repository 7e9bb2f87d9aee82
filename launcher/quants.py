"""Quantization types: names, quality order, bits per weight and published quality figures.

The table lives in `launcher/data/quants.json`: the labels best first, and per label the typical whole-file bits per
weight and the published mean KL divergence / perplexity figures, each with its source (model, data set, imatrix or
not, and where it was published). `SOURCES` maps the short source ids used in the notes to full citations.

- `normalize_label("q4_k_m") == "Q4_K_M"`: one spelling per label (Ollama tags, file names, config `file_type`,
  a user's `:QUANT`); `same_label(a, b)` compares two spellings. This is the only normaliser: the catalog's
  sources (Hugging Face, local, Ollama) all use it.
- `quant_info(label, bits_per_weight)`: rank (higher = better quality), bits per weight, KLD and notes. Unsloth's
  `*_K_XL` sit just above their K-quant as in huggingface.js GGUF_QUANT_ORDER; `UD-<quant>` and bartowski's
  `<quant>_L` rank half a step above `<quant>`. A label nobody knows is ranked by the bits per weight measured from
  its header, interpolated between the known labels' typical bits per weight (`known=False`).
- `quality_floor(n_params)`, `at_least(label, floor)`: the planner's lower bound on quality by model size.

llama.cpp file type names (`file_type_name`) and their labels (`file_type_label`, `file_type_labels`) come from the
`gguf` package; this is the only file-type table. Only the newest tensor types and their file types, which an
installed `gguf` may not know yet, are carried in the table (`newer_ggml_types`: id, block size and bytes per
block from llama.cpp's ggml.c type traits), and used only where `gguf` lacks them.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

__all__ = [
    "QUALITY_FLOORS",
    "SOURCES",
    "QuantInfo",
    "at_least",
    "file_type_label",
    "file_type_labels",
    "file_type_name",
    "known_labels",
    "newer_ggml_types",
    "normalize_label",
    "quality_floor",
    "quant_info",
    "same_label",
]

# Planner floors by parameter count: (upper bound, exclusive; None = no bound) -> the lowest acceptable label.
# Small models degrade first (DESIGN.md "What fits means"): keep Q4_K_M below 10B, 1-bit only for the largest.
QUALITY_FLOORS: tuple[tuple[int | None, str], ...] = (
    (10_000_000_000, "Q4_K_M"),
    (35_000_000_000, "Q3_K_M"),
    (150_000_000_000, "Q2_K"),
    (None, "IQ1_M"),
)

_VARIANT_BUMP = 0.5  # UD-<quant> and <quant>_L: above <quant>, below the next better label
_ALIASES = {
    "FP16": "F16",
    "FP32": "F32",
    "BFLOAT16": "BF16",
    "Q4_K": "Q4_K_M",  # llama-quantize and Ollama accept the bare K names for the _M mixes
    "Q5_K": "Q5_K_M",
    "Q3_K": "Q3_K_M",
    "MXFP4": "MXFP4_MOE",  # the only llama.cpp file type built on MXFP4 tensors
}
# Where typical whole-file bits per weight were measured: these anchor the ranking of unknown labels.
_ANCHOR_BPW_SOURCES = ("quantize_readme", "derived")


@dataclass(frozen=True)
class QuantInfo:
    """What is known about a quant label: its quality rank (higher = better) and published figures."""

    label: str  # normalised
    known: bool  # False: ranked only by its measured bits per weight
    rank: float
    nominal_bpw: float | None  # typical whole-file bits per weight (llama.cpp, Llama-3.1-8B) or the tensor type's
    kld: float | None  # published mean KL divergence vs FP16
    kld_source: str | None  # model, data set, setting and citation of `kld`
    ppl_note: str | None  # perplexity and other published figures; source ids as in SOURCES


@cache
def _table() -> dict[str, Any]:
    text = resources.files("launcher").joinpath("data/quants.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


@cache
def _infos() -> dict[str, QuantInfo]:
    data = _table()
    order: list[str] = data["order"]
    sources: dict[str, str] = data["sources"]
    infos = {}
    for i, label in enumerate(order):
        entry = data["quants"][label]
        kld_source = None
        if entry.get("kld") is not None:
            kld_source = f"{entry['kld_setting']}; {sources[entry['kld_source']]}"
        infos[label] = QuantInfo(
            label=label,
            known=True,
            rank=float(len(order) - i),
            nominal_bpw=entry.get("bpw"),
            kld=entry.get("kld"),
            kld_source=kld_source,
            ppl_note=entry.get("ppl_note"),
        )
    return infos


@cache
def _anchors() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(bpw, rank) of the labels with a measured typical bpw, by bpw, ranks made non-decreasing."""
    quants = _table()["quants"]
    infos = _infos()
    points = sorted(
        (quants[label]["bpw"], info.rank)
        for label, info in infos.items()
        if quants[label].get("bpw_source") in _ANCHOR_BPW_SOURCES
    )
    xs, ys, best = [], [], 0.0
    for bpw, rank in points:
        best = max(best, rank)
        xs.append(float(bpw))
        ys.append(best)
    return tuple(xs), tuple(ys)


def _rank_from_bpw(bpw: float) -> float:
    xs, ys = _anchors()
    if bpw <= xs[0]:
        return ys[0] * max(bpw, 0.0) / xs[0]
    if bpw >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, bpw)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 if x1 == x0 else y0 + (y1 - y0) * (bpw - x0) / (x1 - x0)


SOURCES: dict[str, str] = dict(_table()["sources"])


def known_labels() -> tuple[str, ...]:
    """Every label of the table, best first."""
    return tuple(_infos())


def normalize_label(text: str) -> str:
    """One spelling per quant label: "q4_k_m" -> "Q4_K_M", "fp16" -> "F16", "ud-q4_k_xl" -> "UD-Q4_K_XL"."""
    label = text.strip().upper().replace("-", "_").replace(" ", "_")
    if not label:
        raise ValueError("empty quant label")
    prefix = ""
    if label.startswith("UD_"):
        prefix, label = "UD-", label[3:]
    for lead in ("MOSTLY_", "ALL_"):  # LlamaFileType member names
        if label.startswith(lead):
            label = label[len(lead) :]
    return prefix + _ALIASES.get(label, label)


def quant_info(label: str, bits_per_weight: float | None = None) -> QuantInfo:
    """Rank, bits per weight and published figures of `label`.

    A label outside the table is ranked by `bits_per_weight` (measured from its header), interpolated between the
    known labels' typical bits per weight; without it, it ranks below every known label (rank 0).
    """
    norm = normalize_label(label)
    infos = _infos()
    info = infos.get(norm)
    if info is not None:
        return info
    base, note = _variant_base(norm)
    if base is not None:
        b = infos[base]
        same = base.endswith("_XL")  # UD-Q4_K_XL is Q4_K_XL: the XLs are Unsloth's already
        return QuantInfo(
            label=norm,
            known=True,
            rank=b.rank if same else b.rank + _VARIANT_BUMP,
            nominal_bpw=b.nominal_bpw,
            kld=b.kld if same else None,
            kld_source=b.kld_source if same else None,
            ppl_note=b.ppl_note if same else f"{note}; published figures of plain {base}: {b.ppl_note}",
        )
    rank = 0.0 if bits_per_weight is None else _rank_from_bpw(float(bits_per_weight))
    return QuantInfo(label=norm, known=False, rank=rank, nominal_bpw=None, kld=None, kld_source=None, ppl_note=None)


def _variant_base(norm: str) -> tuple[str | None, str]:
    infos = _infos()
    if norm.startswith("UD-"):
        base = norm[3:]
        if base in infos:
            return base, f"Unsloth Dynamic {base}: per-tensor types chosen per model (unsloth_ud), ranked above {base}"
        return None, ""
    for suffix in ("_XL", "_L"):
        if norm.endswith(suffix):
            base = normalize_label(norm[: -len(suffix)])
            if base in infos:
                return base, f"{base} with Q8_0 embed and output weights (bartowski), ranked above {base}"
    return None, ""


def quality_floor(n_params: int) -> str:
    """The lowest quant label the planner accepts for a model of `n_params` parameters (QUALITY_FLOORS)."""
    for bound, label in QUALITY_FLOORS:
        if bound is None or n_params < bound:
            return label
    raise AssertionError("QUALITY_FLOORS ends without a bound")  # pragma: no cover


def at_least(label: str, floor: str, *, bits_per_weight: float | None = None) -> bool:
    """True when `label` ranks at or above `floor` (`bits_per_weight` ranks a label the table lacks)."""
    return quant_info(label, bits_per_weight).rank >= quant_info(floor).rank


@dataclass(frozen=True)
class GGMLType:
    """A ggml tensor type of the table: its enum ggml_type id, block size and bytes per block (ggml.c type_traits)."""

    name: str
    id: int
    block_size: int
    type_size: int
    file_type: tuple[str, int] | None  # the llama.cpp file type named after it (name, enum llama_ftype value)


@cache
def newer_ggml_types() -> dict[int, GGMLType]:
    """The newest ggml tensor types by id, from llama.cpp's sources (see `ggml_types` in the data): for files whose
    types the installed `gguf` package does not know yet. `gguf`'s own GGML_QUANT_SIZES come first where it knows."""
    out = {}
    for name, entry in _table()["ggml_types"].items():
        file_type = entry.get("file_type")
        out[int(entry["id"])] = GGMLType(
            name=name,
            id=int(entry["id"]),
            block_size=int(entry["block_size"]),
            type_size=int(entry["type_size"]),
            file_type=(str(file_type[0]), int(file_type[1])) if file_type else None,
        )
    return out


@cache
def _file_type_names() -> dict[int, str]:
    """llama.cpp's `LlamaFileType` names by value, `MOSTLY_` dropped ("ALL_F32", "Q4_K_M", "GUESSED"), and the file
    types of `newer_ggml_types` the installed gguf lacks."""
    from launcher.gguf_py import gguf_constants

    names = {int(m.value): m.name.removeprefix("MOSTLY_") for m in gguf_constants.LlamaFileType}
    for t in newer_ggml_types().values():
        if t.file_type is not None:
            names.setdefault(t.file_type[1], t.file_type[0])
    return names


@cache
def file_type_labels() -> dict[int, str]:
    """The normalised quant label of every llama.cpp file type by value (0 -> "F32", 15 -> "Q4_K_M"); no GUESSED."""
    return {value: normalize_label(name) for value, name in _file_type_names().items() if name != "GUESSED"}


def file_type_name(file_type: int | None) -> str | None:
    """'Q4_K_M' for general.file_type 15; None when unknown."""
    if file_type is None:
        return None
    return _file_type_names().get(file_type, f"type {file_type}")


def file_type_label(file_type: object) -> str | None:
    """The normalised quant label of general.file_type ("F32" for 0, "Q4_K_M" for 15).

    None when absent, not an integer (a bool, "15", 15.0) or not a known llama.cpp file type.
    """
    if not isinstance(file_type, int) or isinstance(file_type, bool):
        return None
    return file_type_labels().get(file_type)


def same_label(label: str, wanted: str) -> bool:
    """True when two spellings name one quant: "Q4_K_M" and "q4_k", "MXFP4" and "mxfp4_moe", "F16" and "fp16"."""
    if not label.strip() or not wanted.strip():
        return label.strip().upper() == wanted.strip().upper()
    return normalize_label(label) == normalize_label(wanted)
