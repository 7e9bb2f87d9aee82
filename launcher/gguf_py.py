"""llama.cpp's gguf-py constants (the top-level `gguf` package's `constants.py`), loaded without numpy.

`import gguf` pulls in numpy (~80 ms), so its `constants.py` is loaded on its own as `gguf_constants`: the ggml type
enum and block sizes the header parser checks tensors against (`launcher.gguf.header`), and llama.cpp's file type
names the quant labels come from (`launcher.quants`). Its enums are IntEnums, so they compare equal to the `gguf`
package's. A leaf: it imports nothing from fitquant, so both of those can build on it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

__all__ = ["gguf_constants"]


def _load_constants() -> Any:
    """Return gguf's constants module without executing `gguf/__init__.py` unless it already ran."""
    loaded = sys.modules.get("gguf.constants")
    if loaded is not None:
        return loaded
    try:
        spec = importlib.util.find_spec("gguf")
        origin = spec.origin if spec is not None else None
        if origin is None:
            raise ImportError("gguf package not found")
        path = os.path.join(os.path.dirname(origin), "constants.py")
        cspec = importlib.util.spec_from_file_location("launcher._gguf_constants", path)
        if cspec is None or cspec.loader is None:
            raise ImportError(path)
        module = importlib.util.module_from_spec(cspec)
        cspec.loader.exec_module(module)
        return module
    except (ImportError, OSError, SyntaxError):
        import gguf.constants

        return gguf.constants


gguf_constants = _load_constants()
