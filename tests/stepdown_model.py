"""A llama-architecture model made for the step-down test on the RPC stand-in device: many small tensors
(16 layers, n_ff 4096, n_embd 256, a small vocabulary), so that its quants differ by tens of MiB while the
largest single tensor (what the RPC server must hold once more while receiving it) stays near 1 MiB.
Random weights from a fixed seed; built once and cached beside the test corpus."""

from __future__ import annotations

import os
from pathlib import Path

import corpus as corpus_mod

N_LAYER = 16
N_FF = 4096
QUANTS = ("Q8_0", "Q4_K_M")


def family() -> corpus_mod.Family:
    arch, H, HKV, D = "llama", 4, 2, 64
    kv = corpus_mod._base_kv(arch, n_layer=N_LAYER, n_head=H, n_head_kv=HKV, n_ff=N_FF, name="stepdown llama")
    kv[f"{arch}.rope.dimension_count"] = D
    kv[f"{arch}.vocab_size"] = corpus_mod.N_VOCAB
    t = corpus_mod._T()
    corpus_mod._embed(t, tied=False)
    for i in range(N_LAYER):
        t(f"blk.{i}.attn_norm.weight", corpus_mod.N_EMBD)
        corpus_mod._attn(t, i, n_head=H, n_head_kv=HKV, head=D)
        t(f"blk.{i}.ffn_norm.weight", corpus_mod.N_EMBD)
        corpus_mod._dense_ffn(t, i, n_ff=N_FF)
    return corpus_mod.Family("stepdown-llama", arch, kv, t.done(), quants=QUANTS)


def build(root: Path) -> Path:
    """The folder holding stepdown-llama-Q8_0.gguf and stepdown-llama-Q4_K_M.gguf."""
    folder = root / "stepdown-llama"
    wanted = {q: folder / f"stepdown-llama-{q}.gguf" for q in QUANTS}
    if all(p.exists() for p in wanted.values()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    fam = family()
    f16 = root / "stepdown-llama-F16.gguf.tmp"
    corpus_mod.write_f16(fam, f16)
    jobs = [(q, corpus_mod.QUANT_FTYPES[q], str(p) + ".tmp") for q, p in wanted.items()]
    results = corpus_mod._quantize_family(f16, jobs, timeout_s=600)
    f16.unlink(missing_ok=True)
    for q, p in wanted.items():
        if not results[q]["ok"]:
            raise RuntimeError(f"quantizing stepdown-llama to {q} failed: {results[q]['why'][-500:]}")
        os.replace(str(p) + ".tmp", p)
    return folder
