"""llama.cpp's graph helpers (src/llama-graph.cpp `llm_graph_context`) over launcher.compute.ggml, for one model
and one reserved batch. Pure."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from launcher.compute.ggml import BYTE, CACHE_ELEMENT, F16, F32, HOST, I32, I64, Graph, Tensor
from launcher.model import ModelFacts

_OP_OFFLOAD_MIN_BATCH = 32  # ggml-cuda's op_offload_min_batch_size default (GGML_OP_OFFLOAD_MIN_BATCH)

# ------------------------------------------------------------------------------------------------------------------
# what the graph is built for


@dataclass(frozen=True)
class GraphShape:
    """The ubatch and memory the reserved graph is built for (llama_context::graph_reserve)."""

    n_tokens: int  # ubatch tokens: min(n_ctx, n_ubatch), rounded up to a multiple of n_seqs
    n_seqs: int  # sequences in the ubatch (n_seq_max)
    n_outputs: int  # rows of logits: min(n_tokens, n_outputs_max)
    n_stream: int  # KV streams the mask is split into: 1 when unified, else n_seqs
    flash_attn: bool
    type_k: str
    type_v: str
    cells: Mapping[str, int]  # KV cells per stream of each cache: "base", "swa"
    layer_cache: Mapping[int, str]  # which cache each KV layer uses
    n_rs: int  # recurrent state rows (llama_memory_recurrent size)
    layer_device: Sequence[str] = ()  # device of layers 0..n_layer (the last is the output layer)
    alignment: Mapping[str, int] = field(default_factory=dict)
    cpu_moe: bool = False  # expert tensors kept in host memory (--cpu-moe, -ot exps=CPU)
    n_copies: int = 1  # GGML_SCHED_MAX_COPIES (4) with pipeline parallelism, else 1


def _quantized(cache_type: str) -> bool:
    return cache_type not in CACHE_ELEMENT


def _k_rotation(head: int) -> int:
    """Side of the Hadamard rotation llama_kv_cache applies to Q and K with a quantized K cache
    (build_input_k_rot): the largest power of two dividing the head size, at least 64. V's is always 64."""
    n = 64
    while head % (n * 2) == 0:
        n *= 2
    return n


# ------------------------------------------------------------------------------------------------------------------
# llama.cpp's graph (src/llama-graph.cpp llm_graph_context), for one model


class Model:
    """Tensor shapes and hyperparameters of one model, read the way the graph functions read them."""

    def __init__(self, facts: ModelFacts) -> None:
        self.facts = facts
        self.shapes: Mapping[str, tuple[int, ...]] = facts.tensor_shapes
        self.hp: Mapping[str, Any] = facts.hparams
        self.arch: str = facts.architecture
        self.n_embd: int = facts.n_embd

    def shape(self, il: int, name: str) -> tuple[int, ...] | None:
        return self.shapes.get(f"blk.{il}.{name}.weight")

    def has(self, il: int, name: str) -> bool:
        return f"blk.{il}.{name}.weight" in self.shapes

    def rows(self, il: int, name: str) -> int:
        """The output width of blk.il.name (ne[1] of its weight), 0 when absent."""
        shape = self.shape(il, name)
        return shape[1] if shape is not None and len(shape) > 1 else 0

    def weight_bytes(self, il: int, name: str) -> int:
        """Bytes of blk.il.name.weight (of output.weight for il = -1)."""
        if il < 0:
            return int(self.facts.output_bytes)
        suffix = name + ".weight"
        return next((n for t, _, n in self.facts.layers[il].tensors if t == suffix), 0)

    def number(self, key: str, default: float = 0.0) -> float:
        value = self.hp.get(key, default)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    @property
    def n_vocab(self) -> int:
        out = self.shapes.get("output.weight") or self.shapes.get("token_embd.weight")
        return out[1] if out is not None and len(out) > 1 else self.facts.n_vocab


@dataclass(frozen=True)
class AttnInputs:
    """The inputs of one KV cache's attention (llm_graph_input_attn_kv and kin)."""

    k_idxs: Tensor
    v_idxs: Tensor | None
    mask: Tensor
    k_rot: Tensor | None
    v_rot: Tensor | None


class Builder:
    """One graph build: llm_graph_context's helpers over a Graph."""

    def __init__(self, model: Model, shape: GraphShape, *, fold: bool = True) -> None:
        self.m = model
        self.s = shape
        self.g = Graph(n_copies=shape.n_copies)
        self.n_tokens = shape.n_tokens
        self.devices = list(shape.layer_device) or [HOST] * (model.facts.n_layer + 1)
        # the GPU ops on host weights are offloaded to (the first backend, ggml_backend_sched): the first GPU
        # holding layers, when any does
        self.offload = next((d for d in self.devices if d != HOST), None)
        self.keys = self._layer_keys()
        self.kept, self.checkpoints = fold_layers(self.keys) if fold else (None, None)
        self.starts: dict[int, int] = {}  # layer -> index of the first graph node added while building it
        self._attn_inputs: dict[str, AttnInputs] = {}
        self.pos: Tensor | None = None
        self.out_ids: Tensor | None = None
        self.rs_copy: Tensor | None = None
        self.attn_scale: Tensor | None = None  # deepseek2's attention temperature input

    # -- inputs

    def inp_embd(self) -> Tensor:
        """build_inp_embd: token rows gathered from token_embd (on the host, where token_embd lives), and the
        unused embeddings input, which is never freed."""
        g, n = self.g, self.n_tokens
        g.device = HOST
        tokens = g.input((n,), I32)
        embd_input = g.input((self.m.n_embd, n), F32)
        cur = g.get_rows(None, tokens, width=self.m.n_embd)
        g.expand(cur)  # ggml_build_forward_select: the token path...
        g.expand(embd_input)  # ...and the embeddings path, as a leaf
        return cur

    def inp_pos(self) -> Tensor:
        if self.pos is None:
            n_pos = 4 if self.m.arch in ("qwen2vl", "qwen3vl", "qwen3vlmoe") else 1  # n_pos_per_embd (M-RoPE)
            self.pos = self.g.input((self.n_tokens * n_pos,), I32)
        return self.pos

    def inp_out_ids(self) -> Tensor:
        if self.out_ids is None:
            self.out_ids = self.g.input((self.s.n_outputs,), I32)
        return self.out_ids

    def attn_inputs(self, kind: str, *, with_v: bool = True, rot: bool = True) -> AttnInputs:
        """build_attn_inp_kv(_iswa) / build_attn_inp_k for one cache: KV row indices (one per element of V
        when V is stored transposed, without flash attention), the KQ mask [n_kv, n_tokens/n_stream, 1,
        n_stream] (F16 with flash attention), and the Hadamard rotations a quantized cache adds
        (llama_kv_cache::build_input_k_rot / build_input_v_rot, when the head size is a multiple of 64)."""
        if kind in self._attn_inputs:
            return self._attn_inputs[kind]
        s, g, n = self.s, self.g, self.n_tokens
        head_k, head_v = self._cache_heads(kind)
        head0 = self.m.facts.layers[0].head_dim_k if self.m.facts.layers else 0
        rotated = rot and head0 % 64 == 0
        k_side = _k_rotation(head_k) if rotated and _quantized(s.type_k) and head_k > 0 else 0
        v_side = 64 if rotated and with_v and _quantized(s.type_v) and head_v > 0 else 0
        inputs = AttnInputs(
            k_idxs=g.input((n,), I64),
            v_idxs=g.input((n if s.flash_attn else n * self._n_embd_v_gqa_max(),), I64) if with_v else None,
            mask=g.input((s.cells.get(kind, 0), n // s.n_stream, 1, s.n_stream), F16 if s.flash_attn else F32),
            k_rot=g.input((k_side, k_side), F32) if k_side else None,
            v_rot=g.input((v_side, v_side), F32) if v_side else None,
        )
        self._attn_inputs[kind] = inputs
        return inputs

    def _cache_heads(self, kind: str) -> tuple[int, int]:
        """n_embd_head_k_all / n_embd_head_v_all of a cache: the layers' head size if they all agree, else 0."""
        ks = {layer.head_dim_k for layer in self.m.facts.layers if self.s.layer_cache.get(layer.index) == kind}
        vs = {layer.head_dim_v for layer in self.m.facts.layers if self.s.layer_cache.get(layer.index) == kind}
        return (ks.pop() if len(ks) == 1 else 0), (vs.pop() if len(vs) == 1 else 0)

    def _n_embd_v_gqa_max(self) -> int:
        return max((layer.n_embd_v_gqa for layer in self.m.facts.layers), default=0)

    def rs_input(self) -> Tensor:
        """build_rs_inp: the state copy indices [n_rs]."""
        if self.rs_copy is None:
            self.rs_copy = self.g.input((self.s.n_rs,), I32)
        return self.rs_copy

    # -- blocks

    def norm(self, x: Tensor, *, weight: bool = True, bias: bool = False) -> Tensor:
        """build_norm: rms_norm/norm, then the weight (mul) and bias (add), each in place when it can."""
        g = self.g
        cur = g.elementwise(x)
        if weight:
            cur = g.elementwise(cur, None)
        if bias:
            cur = g.elementwise(cur, None)
        return cur

    def qkv(
        self,
        il: int,
        cur: Tensor,
        head_q: int,
        n_head: int,
        head_k: int,
        n_head_kv: int,
        head_v: int,
        n_head_v: int,
        *,
        reshape: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """build_qkv: one fused projection and three views, or three projections (each + bias in place)."""
        g, m, n = self.g, self.m, self.n_tokens
        q_w, k_w, v_w = head_q * n_head, head_k * n_head_kv, head_v * n_head_v
        if m.has(il, "attn_qkv"):
            qkv = self.mm(il, "attn_qkv", cur)
            if m.shapes.get(f"blk.{il}.attn_qkv.bias") is not None:
                qkv = g.elementwise(qkv, None)
            if reshape:
                e = qkv.elt[1]
                q = g.view(qkv, (head_q, n_head, n), (e, head_q * e, qkv.nb[1], qkv.nb[1] * n))
                k = g.view(qkv, (head_k, n_head_kv, n), (e, head_k * e, qkv.nb[1], qkv.nb[1] * n))
                v = g.view(qkv, (head_v, n_head_v, n), (e, head_v * e, qkv.nb[1], qkv.nb[1] * n))
                return q, k, v
            q = g.cont(g.view(qkv, (q_w, n), (qkv.elt[1], qkv.nb[1])))
            k = g.cont(g.view(qkv, (k_w, n), (qkv.elt[1], qkv.nb[1])))
            v = g.cont(g.view(qkv, (v_w, n), (qkv.elt[1], qkv.nb[1])))
            return q, k, v
        out = []
        for name, width in (("attn_q", q_w), ("attn_k", k_w), ("attn_v", v_w)):
            t = self.mm(il, name, cur, width)
            if m.shapes.get(f"blk.{il}.{name}.bias") is not None:
                t = g.elementwise(t, None)
            out.append(t)
        q, k, v = out
        if reshape:
            q = g.view(q, (head_q, n_head, n))
            k = g.view(k, (head_k, n_head_kv, n))
            v = g.view(v, (head_v, n_head_v, n))
        return q, k, v

    def mm(self, il: int, name: str, x: Tensor, rows: int = 0) -> Tensor:
        """build_lora_mm: x times the weight blk.il.name (its rows from the tensor, else `rows`)."""
        return self._weight_op(il, name, rows, x, None)

    def mm_id(self, il: int, name: str, x: Tensor, ids: Tensor, rows: int = 0) -> Tensor:
        """build_lora_mm_id: x times the selected experts of blk.il.name."""
        return self._weight_op(il, name, rows, x, ids)

    def _weight_op(self, il: int, name: str, rows: int, x: Tensor, ids: Tensor | None) -> Tensor:
        """A matrix product with a weight, on the backend ggml_backend_sched gives it: the weight's own device,
        except that a weight held in host memory (a layer left on the CPU, experts kept there with --cpu-moe)
        is multiplied on the first GPU when the batch is large enough (ggml_backend_sched_backend_id_from_cur
        with op offload; ggml_backend_cuda_device_offload_op: 32 rows or more), after copying the weight there."""
        g, m = self.g, self.m
        rows = m.rows(il, name) or rows
        on_host = g.device == HOST or (self.s.cpu_moe and "_exps" in name)
        batch = x.ne[2] if ids is not None else x.ne[1]
        if not (on_host and self.offload is not None and batch >= _OP_OFFLOAD_MIN_BATCH):
            if on_host and g.device != HOST:
                here, g.device = g.device, HOST
                out = g.mul_mat_id(rows, x, ids) if ids is not None else g.mul_mat(rows, x)
                g.device = here
                return out
            return g.mul_mat_id(rows, x, ids) if ids is not None else g.mul_mat(rows, x)
        here, g.device = g.device, self.offload
        weight = g.new((m.weight_bytes(il, name),), [], elt=BYTE)
        out = g.new((rows, ids.ne[0], x.ne[2], 1) if ids is not None else (rows, *x.ne[1:]), [weight, x, ids])
        g.device = here
        return out

    def hadamard(self, x: Tensor, rot: Tensor) -> Tensor:
        """llama_mul_mat_hadamard (src/llama-impl.h): x rotated by a rot x rot matrix, in x's shape."""
        g = self.g
        side = rot.ne[0]
        flat = (side, math.prod(x.ne) // side)
        contiguous = x.nb == Tensor(x.ne, x.elt, [], x.device).nb
        res = g.view(x, flat) if contiguous else g.cont(x, flat)
        res = g.mul_mat(side, res, rot)
        return g.view(res, x.ne)

    def attn(
        self,
        il: int,
        q: Tensor,
        k: Tensor | None,
        v: Tensor | None,
        *,
        kind: str,
        wo: bool = True,
        sinks: bool = False,
        iswa: bool = False,
    ) -> Tensor:
        """build_attn over a KV cache (llm_graph_input_attn_kv and _iswa): rotate with a quantized cache,
        store K and V (views of the cache), attend (build_attn_mha), project with wo."""
        g = self.g
        inp = self.attn_inputs(kind)
        if inp.k_rot is not None:
            q = self.hadamard(q, inp.k_rot)
            if k is not None:
                k = self.hadamard(k, inp.k_rot)
        if inp.v_rot is not None and v is not None:
            v = self.hadamard(v, inp.v_rot)
        # build_attn: q, v, k (so that rope fuses into the cache store); the iSWA variant q, k, v
        for t in (q, k, v) if iswa else (q, v, k):
            g.expand(t)
        if k is not None:
            g.expand(g.store(g.view(k, (k.ne[0] * k.ne[1], k.ne[2])), inp.k_idxs))  # llama_kv_cache::cpy_k
        if v is not None:
            if self.s.flash_attn:
                v_rows = g.view(v, (v.ne[0] * v.ne[1], v.ne[2]))
            else:
                v_rows = g.view(v, (v.ne[0] * v.ne[1], v.ne[2]))
                width_max = self._n_embd_v_gqa_max()
                if v.ne[0] * v.ne[1] < width_max:
                    v_rows = g.new((width_max, v.ne[2]), [v_rows])  # ggml_pad to the widest layer
                v_rows = g.view(v_rows, (1, math.prod(v_rows.ne)))
            g.expand(g.store(v_rows, inp.v_idxs))  # llama_kv_cache::cpy_v
        layer = self.m.facts.layers[il]
        cur = self.attn_mha(
            q, inp.mask, head_v=layer.head_dim_v, n_kv=self.s.cells.get(kind, 0), v_trans=not self.s.flash_attn
        )
        if inp.v_rot is not None:
            cur = self.hadamard(cur, inp.v_rot)
        if wo:
            cur = self.mm(il, "attn_output", cur, self.m.n_embd)
            if self.m.shapes.get(f"blk.{il}.attn_output.bias") is not None:
                cur = g.elementwise(cur, None)
        return cur

    def attn_mha(
        self, q: Tensor, mask: Tensor, *, head_v: int, n_kv: int, v_trans: bool, v_mla: int = 0, v_cont_bytes: int = 0
    ) -> Tensor:
        """build_attn_mha: flash attention, or KQ = K·Q [n_kv, n_tokens, n_head] F32, softmax in place with the
        mask, KQV = V·KQ, then the heads put back together (ggml_cont_2d). `v_mla`: MLA's V up-projection
        width; `v_cont_bytes`: bytes of the V copy made contiguous when the cache holds V untransposed."""
        g, s = self.g, self.s
        n_stream = s.n_stream
        n_head = q.ne[1]
        per_stream = q.ne[2] // n_stream
        e = q.elt[1]
        q4 = g.view(q, (q.ne[0], n_head, per_stream, n_stream), (e, q.nb[1], q.nb[2], q.nb[2] * per_stream))
        qp = g.permute(q4, (0, 2, 1, 3))
        if s.flash_attn:
            cur = g.new((head_v, n_head, per_stream, n_stream), [qp, mask])
            if v_mla:
                cur = g.permute(cur, (0, 2, 1, 3))
                cur = g.mul_mat(v_mla, cur)
                cur = g.permute(cur, (0, 2, 1, 3))
                cur = g.cont(cur)
            cur = g.view(cur, (cur.ne[0] * cur.ne[1], cur.ne[2] * cur.ne[3]))
        else:
            kq = g.new((n_kv, per_stream, n_head, n_stream), [qp])
            kq = g.elementwise(kq, mask)  # ggml_soft_max_ext
            if not v_trans and v_cont_bytes:
                v = g.new((v_cont_bytes,), [], elt=("i8", 1))  # ggml_cont(ggml_transpose(v))
                kqv = g.new((head_v, per_stream, n_head, n_stream), [v, kq])
            else:
                kqv = g.new((head_v, per_stream, n_head, n_stream), [kq])
            if v_mla:
                kqv = g.mul_mat(v_mla, kqv)
            cur = g.permute(kqv, (0, 2, 1, 3))
            cur = g.cont(cur, (cur.ne[0] * cur.ne[1], cur.ne[2] * cur.ne[3]))
        g.expand(cur)
        return cur

    def ffn(self, il: int, cur: Tensor, *, prefix: str = "ffn", act_gated: bool = True) -> Tensor:
        """build_ffn: up and gate in parallel then swiglu/geglu_split (LLM_FFN_PAR), one fused gate+up then
        swiglu (phi3), or up then an in-place activation (no gate); then down."""
        g, m = self.g, self.m
        tmp = self.mm(il, f"{prefix}_up", cur)
        if m.shapes.get(f"blk.{il}.{prefix}_up.bias") is not None:
            tmp = g.elementwise(tmp, None)
        if m.has(il, f"{prefix}_gate"):
            gate = self.mm(il, f"{prefix}_gate", cur)
            if m.shapes.get(f"blk.{il}.{prefix}_gate.bias") is not None:
                gate = g.elementwise(gate, None)
            act = g.glu(gate, tmp)
        elif act_gated and self._fused_up(il, prefix):
            act = g.glu(tmp)  # LLM_FFN_SWIGLU on [gate | up]
        else:
            act = g.elementwise(tmp)  # gelu / silu / relu in place
        out = self.mm(il, f"{prefix}_down", act, m.n_embd)
        if m.shapes.get(f"blk.{il}.{prefix}_down.bias") is not None:
            out = g.elementwise(out, None)
        return out

    def _fused_up(self, il: int, prefix: str) -> bool:
        up, down = self.m.shape(il, f"{prefix}_up"), self.m.shape(il, f"{prefix}_down")
        return up is not None and down is not None and len(up) > 1 and up[1] == 2 * down[0]

    def moe_ffn(
        self,
        il: int,
        cur: Tensor,
        *,
        gating: str = "softmax",
        norm_w: bool = True,
        w_scale: float = 0.0,
        biased: bool = False,
    ) -> Tensor:
        """build_moe_ffn: router logits and probabilities, top-k experts, their weights (normalised), then
        per selected expert up/gate/down (ggml_mul_mat_id), weighted, and summed over the experts."""
        g, m, n = self.g, self.m, cur.ne[1]  # the last layer keeps only the output rows
        n_expert = m.rows(il, "ffn_gate_inp") or self.m.facts.expert_count
        n_used = int(self._per_layer("expert_used_count", il) or self.m.facts.expert_used_count or 1)
        logits = self.mm(il, "ffn_gate_inp", cur, n_expert)
        if m.shapes.get(f"blk.{il}.ffn_gate_inp.bias") is not None:
            logits = g.elementwise(logits, None)
        probs = logits if gating == "softmax_weight" else g.elementwise(logits)  # soft_max / sigmoid / ...
        selection = probs
        if m.shapes.get(f"blk.{il}.exp_probs_b.bias") is not None:
            selection = g.elementwise(probs, None)
        n_groups = int(m.number("expert_group_count", 0))
        if n_groups > 1:
            per_group = n_expert // n_groups
            groups = g.view(selection, (per_group, n_groups, n))
            top2 = g.view(g.argsort(groups), (2, n_groups, n))
            scores = g.get_rows(g.view(groups, (1, per_group, n_groups, n)), top2)
            scores = g.sum_rows(g.view(scores, (2, n_groups, n)))
            n_group_used = int(m.number("expert_group_used_count", 1))
            chosen = g.view(g.argsort(g.view(scores, (n_groups, n))), (n_group_used, n))
            kept = g.get_rows(groups, chosen)
            filled = g.elementwise(groups)  # ggml_fill
            g.expand(g.store(kept, chosen, filled))
            selection = g.view(filled, (n_expert, n))
        selected = g.view(g.argsort(selection), (n_used, n))
        probs3 = g.view(probs, (1, n_expert, n))
        weights = g.get_rows(probs3, selected)
        if gating == "softmax_weight":
            weights = g.view(g.elementwise(g.view(weights, (n_used, n))), (1, n_used, n))
        if norm_w:
            flat = g.view(weights, (n_used, n))
            total = g.elementwise(g.sum_rows(flat))  # sum, clamped in place
            weights = g.view(g.elementwise(flat, total), (1, n_used, n))  # ggml_div
        if w_scale not in (0.0, 1.0):
            weights = g.elementwise(weights)
        g.expand(weights)
        x = g.view(cur, (cur.ne[0], 1, n))
        if m.has(il, "ffn_gate_up_exps"):
            gate_up = self.mm_id(il, "ffn_gate_up_exps", x, selected)
            if biased:
                gate_up = g.elementwise(gate_up, selected)
            half = gate_up.ne[0] // 2
            gate = g.view(gate_up, (half, gate_up.ne[1], gate_up.ne[2]), gate_up.nb[:3])
            up = g.view(gate_up, (half, gate_up.ne[1], gate_up.ne[2]), gate_up.nb[:3])
        else:
            up = self.mm_id(il, "ffn_up_exps", x, selected)
            if biased:
                up = g.elementwise(up, selected)  # ggml_add_id
            gate = up
            if m.has(il, "ffn_gate_exps"):
                gate = self.mm_id(il, "ffn_gate_exps", x, selected)
                if biased:
                    gate = g.elementwise(gate, selected)
        act = g.glu(gate, up) if gate is not up else g.elementwise(gate)
        experts = self.mm_id(il, "ffn_down_exps", act, selected, m.n_embd)
        if biased:
            experts = g.elementwise(experts, selected)
        experts = g.elementwise(experts, weights)
        g.expand(experts)
        views = [g.view(experts, (experts.ne[0], n), (4, experts.nb[2])) for _ in range(n_used)]
        for v in views:
            g.expand(v)
        out = views[0]
        for v in views[1:]:
            out = g.elementwise(out, v)
            g.expand(out)
        if n_used == 1:
            out = g.cont(out)
        return out

    def _per_layer(self, key: str, il: int) -> float:
        value = self.m.hp.get(key)
        if isinstance(value, list):
            return float(value[il]) if il < len(value) else 0.0
        return float(value) if isinstance(value, (int, float)) else 0.0

    def set_layer(self, il: int) -> None:
        self.g.device = self.devices[il] if il < len(self.devices) else HOST

    def layers(self, n_layer: int) -> Iterator[int]:
        """The layers to build, in order, each on its device: all of them, or (folded) all but whole periods of
        identical layers from the middle of a long repeating run (see fold)."""
        for il in range(n_layer) if self.kept is None or n_layer != len(self.keys) else self.kept:
            self.set_layer(il)
            self.starts[il] = len(self.g.nodes)
            yield il

    def _layer_keys(self) -> list[Any]:
        """Per main layer, what its part of the graph is built from: its tensors' names and shapes (and their
        bytes, where a weight is copied to the GPU), its cache and its device. The last layer is like no other."""
        facts, s = self.m.facts, self.s
        keys: list[Any] = []
        for layer in facts.layers[: facts.n_layer - facts.n_layer_nextn]:
            device = self.devices[layer.index] if layer.index < len(self.devices) else HOST
            copies = self.offload is not None and (device == HOST or s.cpu_moe)
            tensors = layer.tensors if copies else tuple((name, shape) for name, shape, _ in layer.tensors)
            keys.append((tensors, layer.recurrent, layer.has_kv, layer.swa, s.layer_cache.get(layer.index), device))
        if keys:
            keys[-1] = ("last", keys[-1])
        return keys

    def output(self, cur: Tensor, *, rows: str = "layer", softcap: bool = False, scale: bool = False) -> None:
        """The output layer (on layer n_layer's device): the final norm (t_embd, a graph output), then the logits
        [n_vocab, n_outputs] (t_logits, another). Where the output rows were picked (`rows`): in the last layer
        ("layer", most graphs); here, from the last hidden state, which is a graph output too (t_h_nextn), before
        the norm ("before_norm": openai-moe.cpp) or after it ("after_norm": qwen3next.cpp)."""
        g = self.g
        self.set_layer(self.m.facts.n_layer)
        if rows == "before_norm":
            cur.is_output = True
            cur = g.get_rows(cur, self.inp_out_ids())
        cur = self.norm(cur, bias=self.m.shapes.get("output_norm.bias") is not None)
        cur.is_output = True
        if rows == "after_norm":
            cur = g.get_rows(cur, self.inp_out_ids())
            cur.is_output = True
        logits = self.mm(-1, "output", cur, self.m.n_vocab)
        if softcap:
            logits = g.elementwise(g.elementwise(g.elementwise(logits)))  # scale, tanh, scale
        if scale or self.m.shapes.get("output.bias") is not None:
            logits = g.elementwise(logits)
        logits.is_output = True
        g.expand(logits)


_FOLD_WARMUP_LAYERS = 8  # layers (at least 4 periods) kept before the fold: the allocator settles well within them


def fold_layers(keys: Sequence[Any], *, max_period: int = 12) -> tuple[list[int] | None, tuple[int, int] | None]:
    """Which layers to build so that the allocator sees what it would see over all of them, and the two layers
    whose starts must find the allocator in the same state for that to hold.

    ggml-alloc is deterministic: once two layers of a repeating run (same tensors, same cache, same device; the
    pattern of period P) start from the same allocator state 2P layers apart, every later period repeats what
    it did. So the middle of the run can be left out, an even number of periods, keeping the warm-up periods
    before it and at least one after; the state at the first layer after the fold is then the full graph's.
    Returns (None, None) when no run is long enough; compute_buffers checks the two states and builds every
    layer when they differ.
    """
    n = len(keys)
    best: tuple[int, int, int, int, int] | None = None
    for period in range(1, max_period + 1):
        i = n - 2 - period
        while i >= 0 and keys[i] == keys[i + period]:
            i -= 1
        start = i + 1
        periods = (n - 1 - start) // period
        warmup = max(4, -(-_FOLD_WARMUP_LAYERS // period))
        drop = periods - warmup - 1
        drop -= drop % 2
        if drop >= 2 and (best is None or drop * period > best[0]):
            best = (drop * period, start, period, drop, warmup)
    if best is None:
        return None, None
    _, start, period, drop, warmup = best
    head_end = start + warmup * period
    kept = list(range(head_end)) + list(range(head_end + drop * period, n))
    return kept, (start + (warmup - 2) * period, head_end + drop * period)
