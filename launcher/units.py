"""Sizes, context lengths and durations: bytes in code, GiB/MiB for people, tokens for contexts, seconds for time."""

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


# ---------------------------------------------------------------------------------------------- durations

MAX_DURATION_S = 10 * 365 * 24 * 3600.0  # 10 years: a bound on typos, far beyond any timeout or keep-alive

# Go's time.ParseDuration units, which Ollama's keep_alive takes ("5m", "1h30m", "500ms"); µ in both spellings
_DURATION_UNITS = {
    "h": Fraction(3600),
    "m": Fraction(60),
    "s": Fraction(1),
    "ms": Fraction(1, 10**3),
    "us": Fraction(1, 10**6),
    "µs": Fraction(1, 10**6),
    "μs": Fraction(1, 10**6),
    "ns": Fraction(1, 10**9),
}
_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]+|[0-9]+\.)(h|ms|m|s|us|µs|μs|ns)")
_BARE_NUMBER = re.compile(r"^[+-]?(?:[0-9]*\.?[0-9]+|[0-9]+\.)$")


def _duration_seconds(value: str | int | float) -> float:
    """Signed seconds from a number or Go-style duration text. Raises ValueError naming the value."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{shown_value(value)} is not a duration; write it like 30s, 10m or 1h30m")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        if len(text) > _MAX_NUMBER_CHARS or not text:
            raise ValueError(f"{shown_value(value)} is not a duration; write it like 30s, 10m or 1h30m")
        if _BARE_NUMBER.match(text):  # a bare number is seconds (Ollama's keep_alive takes "300" and "-1")
            seconds = float(text)
        else:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-") if text[:1] in "+-" else text
            parts = _DURATION_PART.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"{shown_value(value)} is not a duration; write it like 30s, 10m or 1h30m")
            seconds = sign * float(sum(Fraction(n) * _DURATION_UNITS[u] for n, u in parts))
    if seconds != seconds:  # NaN: no comparison refuses it below
        raise ValueError(f"{shown_value(value)} is not a duration; write it like 30s, 10m or 1h30m")
    if abs(seconds) > MAX_DURATION_S:
        raise OutOfRange(f"duration {shown_value(value)} is more than 10 years")
    return seconds


def parse_duration(value: str | int | float) -> float:
    """Seconds from a number (seconds) or text: '30s', '10m', '1h30m', '500ms', '2h45m30s', '0', '90' (seconds).
    Units as Go's time.ParseDuration: h m s ms us/µs ns. Raises ValueError: not a duration, negative, or
    more than 10 years (OutOfRange)."""
    seconds = _duration_seconds(value)
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {shown_value(value)}")
    return seconds


def parse_keep_alive(value: str | int | float) -> float | None:
    """Ollama's keep_alive: seconds to stay loaded after a request, 0 = unload now, any negative value = forever
    (None). Raises ValueError as parse_duration does."""
    seconds = _duration_seconds(value)
    return None if seconds < 0 else seconds


def format_duration(seconds: float) -> str:
    """A duration as a profile writes it: '30s', '10m', '1h30m', '500ms', '0s'; parse_duration reads it back.
    From a second up it is rounded to the second; below, to the ms, us or ns."""
    if not 0 <= seconds <= MAX_DURATION_S:
        raise ValueError(f"duration must be 0 to 10 years, got {seconds!r}")
    if 0 < seconds < 0.9995:
        for unit, scale in (("ms", 1e3), ("us", 1e6), ("ns", 1e9)):
            if seconds * scale >= 0.9995 or unit == "ns":
                return f"{round(seconds * scale)}{unit}"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return text or "0s"
