"""Compute buffers: the graph llama.cpp reserves for the worst-case batch, sized the way ggml-alloc sizes it. Pure.

`llama_context::sched_reserve` (src/llama-context.cpp) builds the prompt-processing graph of one ubatch
(`n_tokens = min(n_ctx, n_ubatch)` tokens in `n_seq_max` sequences, `min(n_tokens, n_outputs_max)` outputs) and
hands it to ggml-alloc (`ggml_backend_sched_reserve_size` -> `ggml_gallocr_reserve_n_size`, ggml/src/ggml-alloc.c).
The compute buffer of a backend is the highest address ggml-alloc's allocator reaches while it walks that graph.

This package rebuilds the graph from the model's own tensor shapes and replays the allocator on it:

- the graph: the tensors each architecture's graph function creates (`src/models/<arch>.cpp` over the
  `llm_graph_context` helpers of src/llama-graph.cpp: `build_inp_embd`, `build_norm`, `build_qkv`, `build_attn`,
  `build_attn_mha`, `build_ffn`, `build_moe_ffn`, `build_rs`...), with ggml's shapes, views and in-place rules
  (ggml/src/ggml.c), in the order `ggml_build_forward_expand` visits them (depth first, sources in order);
- the allocator: inputs first, then every node in order; a node whose op may run in place
  (`ggml_op_can_inplace`) takes over a parent that has no other consumer and the same layout; a tensor is freed
  after its last consumer (graph outputs never); free blocks are reused best-fit, else the end grows
  (`ggml_dyn_tallocr_alloc`, `ggml_dyn_tallocr_free_bytes`).

So the attention width comes from `attn_q` (heads x head size, not `n_embd`), the flash-attention mask and the
KQ scores have the padded KV size, the feed-forward and expert widths come from their tensors, and the logits
have `n_vocab x n_outputs`, all where llama.cpp places them. Weights, the KV cache and recurrent states live in
their own buffers and take no room here.

Checked byte for byte against llama.cpp's CPU backend (no_alloc dry runs, scripts/bench_estimate.py). On GPUs the
same graph is split by layer as ggml_backend_sched splits it: each device allocates the nodes of its layers and
copies of what it reads from another (graph inputs live on the host); a weight in host memory is multiplied on
the first GPU after a copy (op offload); with several GPUs and every layer offloaded, each input is kept four
times (pipeline parallelism). That part is an estimate until measured on the GPU.

Modules: `ggml` (tensors, ops, the allocator), `graph` (llm_graph_context's helpers and the layer folding that
keeps long models fast), `models` (the architectures). An architecture not listed in `models.ARCHITECTURES` is
built as the common decoder, from whatever tensors it has.
"""

from __future__ import annotations

from launcher.compute.ggml import BUFFER_ALIGNMENT, allocate
from launcher.compute.graph import Builder, GraphShape, Model
from launcher.compute.models import ARCHITECTURES, decoder
from launcher.model import ModelFacts

__all__ = ["BUFFER_ALIGNMENT", "GraphShape", "compute_buffers"]


def compute_buffers(facts: ModelFacts, shape: GraphShape) -> dict[str, int]:
    """Bytes of the compute buffer llama.cpp reserves on each device for `facts` at `shape`.

    Long runs of identical layers are folded (graph.fold_layers); when the allocator's state at the two
    checkpoints differs, the fold would not be exact and every layer is built instead."""
    build = ARCHITECTURES.get(facts.architecture, decoder)
    net = Builder(Model(facts), shape)
    build(net)
    if net.checkpoints is not None:
        first, second = net.checkpoints
        if first in net.starts and second in net.starts:
            sizes, states = allocate(net.g, shape.alignment, snapshots=(net.starts[first], net.starts[second]))
            if len(states) == 2 and states[0] == states[1]:
                return sizes
        net = Builder(Model(facts), shape, fold=False)
        build(net)
    return allocate(net.g, shape.alignment)[0]
