"""What a GGUF file name says: its quant label, whether it is a shard, a vision projector or another sidecar.

Pure functions over names (and, for the fallbacks, a parsed header). The quant label follows huggingface.js
`parseGGUFQuantLabel` (packages/tasks/src/gguf.ts): known quant names matched in the upper-cased name, the
last match wins, an Unsloth `UD-` prefix and a size suffix (`_XL`, `_L`, ...) are kept, and a
percentage-mixed name (`Model-55IQ2_XXS-34Q2_K-07Q8_0.gguf`) gives its dominant component. Unlike the
JavaScript regex, alternatives are tried longest first and a match must not run on into letters or digits,
so `Q4_0_4_4` is one label and `Q4_K_MX` none.

Quant-type knowledge (the one normaliser `normalize_label`, the llama.cpp file-type table `file_type_label`) lives
in `launcher.quants`; this module only reads names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from launcher.quants import file_type_labels, normalize_label

if TYPE_CHECKING:
    from launcher.gguf import GGUFHeader

__all__ = [
    "ShardName",
    "is_projector_header",
    "is_projector_name",
    "is_sidecar_name",
    "parse_shard",
    "quant_label",
]

# Unsloth's "dynamic" names: not llama.cpp file types, only names (huggingface.js gives them ids 1000-1005).
_UNSLOTH_XL = ("Q2_K_XL", "Q3_K_XL", "Q4_K_XL", "Q5_K_XL", "Q6_K_XL", "Q8_K_XL")
# Names seen in files that this gguf package may not list: retired ARM repacks, newer types, tensor types
# used as whole-file labels (gpt-oss ships "MXFP4"), and FP16/FP32 spellings.
_EXTRA_NAMES = ("Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "Q2_0", "Q1_0", "MXFP4", "NVFP4", "FP16", "FP32")
# A name's label is kept as spelt (gpt-oss files say MXFP4, not MXFP4_MOE), except these float spellings, which
# take launcher.quants' one spelling (F16, F32).
_FLOAT_SPELLINGS = ("FP16", "FP32")
# Tensor types that are storage, not quantization (huggingface.js `_GGUF_QUANT_MIX_NON_QUANT_NAMES`).
_NON_QUANT_TENSOR_TYPES = {"I8", "I16", "I32", "I64", "F64"}
_SIZE_SUFFIXES = ("XXS", "XS", "XL", "S", "M", "L")

_SHARD_RE = re.compile(r"^(.*?)-(\d{5})-of-(\d{5})\.gguf$")
_PROJECTOR_RE = re.compile(r"(?:^|[-_.])mmproj(?:[-_.]|$)", re.IGNORECASE)
_SIDECAR_RE = re.compile(r"(?:^mtp[-_.])|(?:(?:^|[-_.])imatrix(?:[-_.]|$))", re.IGNORECASE)


@cache
def _label_re() -> re.Pattern[str]:
    names = {*file_type_labels().values(), *_UNSLOTH_XL, *_EXTRA_NAMES}
    alternation = "|".join(sorted(names, key=lambda n: (-len(n), n)))
    sizes = "|".join(_SIZE_SUFFIXES)
    return re.compile(rf"(?P<prefix>UD-)?(?P<quant>{alternation})(?P<size>_(?:{sizes}))?(?![A-Z0-9])")


@cache
def _mix_re() -> re.Pattern[str]:
    from launcher.gguf import GGML_TYPE_NAMES

    names = set(GGML_TYPE_NAMES.values()) - _NON_QUANT_TENSOR_TYPES
    alternation = "|".join(sorted(names, key=lambda n: (-len(n), n)))
    return re.compile(rf"(?:^|(?<=-))(?P<pct>\d{{1,3}})(?P<quant>{alternation})(?=$|[-.])")


def _basename(path: str) -> str:
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _label_of(part: str) -> str | None:
    upper = part.upper()
    stem = upper[: -len(".GGUF")] if upper.endswith(".GGUF") else upper
    mix = [(int(m["pct"]), i, m["quant"]) for i, m in enumerate(_mix_re().finditer(stem))]
    if len(mix) >= 2:
        # the largest share wins; on a tie, the first in the name (as huggingface.js `reduce` does)
        return max(mix, key=lambda c: (c[0], -c[1]))[2]
    matches = list(_label_re().finditer(upper))
    if not matches:
        return None
    m = matches[-1]
    quant = normalize_label(m["quant"]) if m["quant"] in _FLOAT_SPELLINGS else m["quant"]
    return f"{m['prefix'] or ''}{quant}{m['size'] or ''}"


def quant_label(path: str) -> str | None:
    """The quant label a file's name gives ("UD-Q4_K_XL", "Q8_0", "IQ2_XXS"), or None.

    The file name is tried first, then each folder above it, nearest first (per-quant folders:
    `Q8_0/x-00001-of-00002.gguf`).
    """
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    for part in reversed(parts):
        label = _label_of(part)
        if label is not None:
            return label
    return None


@dataclass(frozen=True)
class ShardName:
    """A split-set file name `{prefix}-{index:05d}-of-{total:05d}.gguf` (index is 1-based)."""

    prefix: str
    index: int
    total: int

    def name(self, index: int) -> str:
        """The name of shard `index` of the same set."""
        return f"{self.prefix}-{index:05d}-of-{self.total:05d}.gguf"


def parse_shard(path: str) -> ShardName | None:
    """The split-set parts of a file name (folders ignored), or None when it is not a shard name.

    Uses huggingface.js's shard regex `^(.*?)-(\\d{5})-of-(\\d{5})\\.gguf$`; index 0, total 0 or
    index > total is no shard.
    """
    m = _SHARD_RE.match(_basename(path))
    if m is None:
        return None
    index, total = int(m[2]), int(m[3])
    if index < 1 or total < 1 or index > total:
        return None
    return ShardName(m[1], index, total)


def raw_split_lacks(joined: str, missing: list[int], total: int) -> str:
    """What a raw byte split without all its parts lacks: "raw split of 3 parts lacks x.gguf.part2of3 and 1 more"."""
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    return f"raw split of {total} parts lacks {joined}.part{missing[0]}of{total}{more}"


def is_projector_name(path: str) -> bool:
    """True for a vision projector's file name: `mmproj-F16.gguf`, `mmproj-model-f16.gguf`, `model-mmproj-f16.gguf`."""
    return _PROJECTOR_RE.search(_basename(path)) is not None


def is_sidecar_name(path: str) -> bool:
    """True for GGUF files that are neither a model nor a projector: `mtp-*` draft heads, imatrix files."""
    return _SIDECAR_RE.search(_basename(path)) is not None


def is_projector_header(header: GGUFHeader) -> bool:
    """True for a vision projector's header: `general.type` "mmproj", architecture "clip", or `clip.*` keys."""
    if header.get("general.type") == "mmproj" or header.architecture == "clip":
        return True
    return any(key.startswith("clip.") for key in header.metadata)
