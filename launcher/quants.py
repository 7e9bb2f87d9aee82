"""Quantization types: names for llama.cpp file types and ggml tensor types.

Names come from the `gguf` package (llama.cpp's own constants), never from a hand-written table.
"""

from __future__ import annotations

from functools import cache


@cache
def _file_type_names() -> dict[int, str]:
    from gguf.constants import LlamaFileType

    names = {}
    for member in LlamaFileType:
        name = member.name
        if name.startswith("MOSTLY_"):
            name = name[len("MOSTLY_") :]
        names[int(member.value)] = name
    return names


def file_type_name(file_type: int | None) -> str | None:
    """'Q4_K_M' for general.file_type 15; None when unknown."""
    if file_type is None:
        return None
    return _file_type_names().get(file_type, f"type {file_type}")
