"""fitquant's defaults, in one place for the library, the plan and the command line.

../shared/DESIGN.md "What fits means": a q8_0 KV cache with flash attention, 1 GiB kept free per device.
This module imports nothing, so the command line can show these in --help without loading the library.
"""

from __future__ import annotations

DEFAULT_KV_TYPE = "q8_0"  # K and V cache type
DEFAULT_CONTEXT = 4096  # tokens, when a model does not declare its training context
DEFAULT_PLAN_CONTEXT = 8192  # tokens `fitquant plan` targets when none is given
DEFAULT_RESERVE_BYTES = 1024**3  # kept free on every device (llama.cpp's --fit-target is 1 GiB too)
DEFAULT_MIN_CONTEXT = 4096  # the smallest reduced context worth proposing
DEFAULT_UBATCH = 512  # llama.cpp's n_ubatch
DEFAULT_SERVER_PORT = 8080  # llama-server's port
# the longest DNS name, and an origin around it (scheme, ://, the name, :port): a longer Host or Origin is no
# browser's (launcher.service.browsers refuses it before any pattern reads it; a profile may not list one)
MAX_HOST_NAME_CHARS = 253
MAX_ORIGIN_CHARS = 300
