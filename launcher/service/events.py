"""The service's log: one event per line on stderr (`fitquant: event key=value ...`), which journald keeps as is."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any


def log_event(event: str, **fields: Any) -> None:
    """One line per event: `fitquant: event key=value ...`, values quoted only when they need it."""
    parts = [event]
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if not text or any(c.isspace() or c in '"=' for c in text):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    # the log's reader may be gone (a closed pipe): serving goes on without the line
    with contextlib.suppress(OSError, ValueError):
        print("fitquant: " + " ".join(parts), file=sys.stderr, flush=True)
