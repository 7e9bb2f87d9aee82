"""Machine profiles: a small YAML file per machine, what it is and what it runs.

    machine: home-server               # the machine's name
    devices:                           # optional: describe the machine instead of probing it
      - {name: RTX 3090, kind: cuda, memory: 24GiB}
    ram: 64GiB                         # optional: the host's RAM (with devices)
    unified: 32GiB                     # optional, alone: an Apple Silicon Mac's unified memory
    chip: M2 Pro (19-core GPU)         # optional, with unified: the Mac's chip and GPU bin (its speed figures)
    reserve: 1GiB                      # kept free on every device, or {default: 1GiB, GPU0: 2GiB}
    backend: auto                      # auto | llamacpp | ollama
    llama_server: /opt/llama.cpp/bin/llama-server   # or ollama_host: 127.0.0.1:11434
    rpc: [192.168.1.20:50052]          # llama.cpp RPC servers whose devices join this machine
    defaults: {kv: q8_0, flash_attn: on, parallel: 1, min_quant: Q4_K_M, warmup: short}
    models:
      - {model: qwen3:14b, context: 32k, min_quant: Q4_K_M, alias: qwen3, pin: true}   # also ttl: 10m, preload,
                                       # embeddings, port (its server's private 127.0.0.1 port)
    router: {min_residency: 30s, max_queue: 64, max_wait: 600s, swap_after: 10s, drain: 30s, max_body: 8MiB,
             body_timeout: 30s}
    peers: [http://192.168.1.21:8080]  # other fitquant endpoints: their models are answered here too
    listen: 127.0.0.1:8080             # fitquant serve's one endpoint (model servers bind 127.0.0.1)
    api_key_env: FITQUANT_API_KEY      # or api_key_file: a file holding the key; never the key itself

`parse_profile(text)` checks text against the schema; `load_profile(path)` reads a file; `find_profile(ref)`
follows the search path (a path, then ./profiles/NAME.yaml, then the user config directory). Every error is
one `ProfileError` line naming the file, the line and the field. YAML is read with pyyaml's safe loader,
whose composition is bounded (aliases, expanded size) before anything is constructed.

`profile_plan(profile, model)` turns a profile into what the planner takes: the machine (the profile's
devices, or the probe), the Policy (the profile's defaults and model entry) and the port. fitquant never
writes into a profile a person wrote: verified results live in the machine's record (launcher.record).

The modules, by job: `schema` (the pydantic models and value parsers), `loader` (the bounded YAML loader,
errors, search path, API key, writing), `machine` (resolution into the planner's machine and Policy).
"""

from __future__ import annotations

from launcher.profiles.loader import (
    default_profile_name,
    find_profile,
    load_profile,
    parse_profile,
    profile_api_key,
    profile_text,
    user_profile_path,
    write_profile,
)
from launcher.profiles.machine import (
    ProfilePlan,
    profile_hardware,
    profile_machine,
    profile_plan,
    profile_policy,
    profile_records,
)
from launcher.profiles.schema import Defaults, DeviceSpec, ModelEntry, Profile

__all__ = [
    "Defaults",
    "DeviceSpec",
    "ModelEntry",
    "Profile",
    "ProfilePlan",
    "default_profile_name",
    "find_profile",
    "load_profile",
    "parse_profile",
    "profile_api_key",
    "profile_hardware",
    "profile_machine",
    "profile_plan",
    "profile_policy",
    "profile_records",
    "profile_text",
    "user_profile_path",
    "write_profile",
]
