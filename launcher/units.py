"""Sizes and context lengths: bytes in code, GiB/MiB for people, tokens for contexts."""

from __future__ import annotations

import re

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kb": 1000, "kib": KiB,
    "m": MiB, "mb": 1000**2, "mib": MiB,
    "g": GiB, "gb": 1000**3, "gib": GiB,
    "t": TiB, "tb": 1000**4, "tib": TiB,
}  # fmt: skip

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_CTX_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmM]?)\s*$")


def parse_bytes(text: str) -> int:
    """Parse '24GiB', '12 GB', '512MiB', '1.5G' (G = GiB) or a plain byte count. Raises ValueError."""
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size; write it like 24GiB, 12GB or 512MiB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_context(text: str | int) -> int:
    """Parse a context length in tokens: '32768', '32k', '128K' (k = 1024), '1M'. Raises ValueError."""
    if isinstance(text, int):
        value = text
    else:
        match = _CTX_RE.match(text)
        if not match:
            raise ValueError(f"{text!r} is not a context length; write it like 32768, 32k or 128K")
        scale = {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]
        value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"context length must be positive, got {text!r}")
    return value


def format_bytes(n_bytes: int | float) -> str:
    """Human size with binary units: '23.6 GiB', '512.0 MiB', '17 B'."""
    n = float(n_bytes)
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
