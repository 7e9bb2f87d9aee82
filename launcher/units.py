"""Sizes and context lengths: bytes in code, GiB/MiB for people, tokens for contexts."""

from __future__ import annotations

import re
from fractions import Fraction

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4
PiB = 1024**5

# Bounds on what a person may write: far above any machine or model, far below what breaks the arithmetic
# (a 30-digit size used to plan terabytes; a 400-digit one overflowed float() into a traceback).
MAX_BYTES = PiB
MAX_CONTEXT = 2**24  # tokens: 16M, beyond every model's trained context
_MAX_NUMBER_CHARS = 40  # longer text is no size or context a person means


class OutOfRange(ValueError):
    """A size or context that parses but is beyond MAX_BYTES or MAX_CONTEXT."""


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
    text = str(text)
    match = _SIZE_RE.match(text) if len(text) <= _MAX_NUMBER_CHARS else None
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"{shown_value(text)} is not a size; write it like 24GiB, 12GB or 512MiB")
    return check_bytes(int(Fraction(match.group(1)) * _SIZE_UNITS[unit]), text)


def check_bytes(n_bytes: int, shown: object = None) -> int:
    """`n_bytes`, if at most MAX_BYTES (1 PiB). Raises ValueError naming `shown` (default: the number)."""
    if n_bytes > MAX_BYTES:
        what = shown_value(n_bytes if shown is None else shown)
        raise OutOfRange(f"{what} is more than 1 PiB; no machine has that much memory")
    return n_bytes


def parse_context(text: str | int) -> int:
    """Parse a context length in tokens: '32768', '32k', '128K' (k = 1024), '1M'. Raises ValueError."""
    if isinstance(text, int):
        value = text
    else:
        match = _CTX_RE.match(text) if len(text) <= _MAX_NUMBER_CHARS else None
        if not match:
            raise ValueError(f"{shown_value(text)} is not a context length; write it like 32768, 32k or 128K")
        scale = {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]
        value = int(Fraction(match.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"context length must be positive, got {shown_value(text)}")
    if value > MAX_CONTEXT:
        raise OutOfRange(f"context length {shown_value(text)} is too large: at most {MAX_CONTEXT} tokens (16M)")
    return value


def shown_value(value: object, limit: int = 40) -> str:
    """A value as an error shows it: repr, cut short (an error is one line, whatever was typed)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 4]}...{text[-1]}"


def format_bytes(n_bytes: int | float) -> str:
    """Human size with binary units: '23.6 GiB', '512.0 MiB', '17 B'."""
    n = float(n_bytes)
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
