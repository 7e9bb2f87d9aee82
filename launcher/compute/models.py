"""The architectures' graph functions (src/models/<arch>.cpp) over launcher.compute.graph's Builder. Pure.

`decoder` is the common decoder most architectures are; the others mirror their llama.cpp graph function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from launcher.compute.ggml import CACHE_ELEMENT, F16, F32, Tensor
from launcher.compute.graph import Builder

# ------------------------------------------------------------------------------------------------------------------
# architectures (src/models/<arch>.cpp)


def decoder(net: Builder) -> None:
    """The common decoder: src/models/llama.cpp and its kin (qwen2, qwen3, qwen3moe, qwen2moe, mistral3, granite,
    olmo2, gemma2/gemma3, phi3, seed_oss, ...): norm -> attention -> residual -> norm -> FFN or MoE -> residual.
    Differences read from the tensors: fused QKV (phi3), Q/K norms (qwen3, gemma3, olmo2), post-attention and
    post-FFN norms (gemma2/3), a fused gate+up (phi3), experts and shared experts (qwen2moe). Architectures
    without a graph function here are built this way too, from the tensors they have (an approximation)."""
    m, g, facts = net.m, net.g, net.m.facts
    arch = m.arch
    gemma = arch in ("gemma2", "gemma3", "gemma-embedding")
    phi3 = arch == "phi3"
    iswa = facts.swa_type != "none"
    cur = net.inp_embd()
    if gemma or m.number("embedding_scale"):
        cur = g.elementwise(cur)  # ggml_scale by sqrt(n_embd) / f_embedding_scale
    inp_l = cur
    net.inp_pos()
    n_layer = facts.n_layer - facts.n_layer_nextn
    for il in net.layers(n_layer):
        layer = facts.layers[il]
        inp_sa = inp_l
        cur = net.norm(inp_l, bias=m.shapes.get(f"blk.{il}.attn_norm.bias") is not None)
        if layer.recurrent:
            # a recurrent layer of an architecture not modelled below: its Mamba-2 block when it has one
            cur = _mamba2_layer(net, il, cur) if m.has(il, "ssm_in") else cur
        elif m.has(il, "attn_q") or m.has(il, "attn_qkv"):
            n_head, n_head_kv = layer.n_head, layer.n_head_kv
            hk, hv = layer.head_dim_k, layer.head_dim_v
            q, k, v = net.qkv(il, cur, hk, n_head, hk, n_head_kv, hv, n_head_kv)
            if m.has(il, "attn_q_norm"):
                q = net.norm(q)
            pos = net.inp_pos()
            q = g.elementwise(q, pos)  # rope
            if m.has(il, "attn_k_norm"):
                k = net.norm(k)
            k = g.elementwise(k, pos)
            if gemma or phi3:
                q = g.elementwise(q)  # ggml_scale by the attention scale
            kind = net.s.layer_cache.get(il, "base")
            cur = net.attn(il, q, k, v, kind=kind, iswa=iswa)
        last = il == n_layer - 1
        if last:
            out_ids = net.inp_out_ids()
            cur = g.get_rows(cur, out_ids)
            inp_sa = g.get_rows(inp_sa, out_ids)
        if m.has(il, "post_attention_norm") and gemma:
            cur = net.norm(cur)
        if phi3:
            cur = g.elementwise(cur, inp_sa)
            ffn_inp = cur
        elif m.number("residual_scale"):
            ffn_inp = g.elementwise(g.elementwise(cur), inp_sa)
        else:
            ffn_inp = g.elementwise(cur, inp_sa)
        if not (m.has(il, "ffn_up") or m.has(il, "ffn_gate_inp")):
            inp_l = ffn_inp  # no feed-forward in this layer (nemotron_h's attention and Mamba layers)
            continue
        cur = net.norm(ffn_inp, bias=m.shapes.get(f"blk.{il}.ffn_norm.bias") is not None)
        cur = _feed_forward(net, il, cur)
        if m.has(il, "post_ffw_norm") and gemma:
            cur = net.norm(cur)
        if m.number("residual_scale"):
            cur = g.elementwise(cur)
        cur = g.elementwise(ffn_inp, cur) if phi3 else g.elementwise(cur, ffn_inp)
        inp_l = cur
    net.output(inp_l, softcap=gemma and bool(m.number("final_logit_softcapping")), scale=bool(m.number("logit_scale")))


def _feed_forward(net: Builder, il: int, cur: Tensor) -> Tensor:
    """The FFN of a layer: dense (build_ffn) or MoE (build_moe_ffn) plus shared experts, as the tensors say."""
    m, g = net.m, net.g
    if not m.has(il, "ffn_gate_inp"):
        return net.ffn(il, cur)
    gating = {1: "softmax", 2: "sigmoid", 3: "softmax_weight"}.get(int(m.number("expert_gating_func", 1)), "softmax")
    moe = net.moe_ffn(il, cur, gating=gating, norm_w=_norm_w(net), w_scale=m.number("expert_weights_scale"))
    if not m.has(il, "ffn_up_shexp"):
        return moe
    return g.elementwise(moe, _shared_expert(net, il, cur))


# build_moe_ffn's norm_w (normalise the selected experts' weights) as each graph function passes it: always, never,
# or hparams.expert_weights_norm (the GGUF key, false when absent) for the others (src/models/<arch>.cpp)
_MOE_NORM_W_ALWAYS = frozenset(
    ["arctic", "dbrx", "ernie4_5-moe", "gemma4", "granite", "granitemoe", "granite_swa", "granitehybrid", "grok",
     "grovemoe", "kimi-linear", "lfm2", "lfm2moe", "llama", "mellum", "mimo2", "minimax", "minimax-m2", "mistral3",
     "phi3", "phimoe", "qwen35moe", "qwen3moe", "qwen3next", "qwen3vlmoe", "rnd1", "smallthinker"]
)  # fmt: skip
_MOE_NORM_W_NEVER = frozenset(["bert", "deepseek", "jamba", "llada-moe", "llama4", "olmoe", "gpt-oss", "qwen2moe"])


def _norm_w(net: Builder) -> bool:
    arch = net.m.arch
    if arch in _MOE_NORM_W_ALWAYS:
        return True
    return arch not in _MOE_NORM_W_NEVER and bool(net.m.hp.get("expert_weights_norm", False))


def _shared_expert(net: Builder, il: int, cur: Tensor) -> Tensor:
    """Shared experts (build_ffn on the *_shexp tensors), gated by a sigmoid where ffn_gate_inp_shexp exists
    (qwen2moe, qwen3next)."""
    g, m = net.g, net.m
    up = net.mm(il, "ffn_up_shexp", cur)
    gate = net.mm(il, "ffn_gate_shexp", cur)
    out = net.mm(il, "ffn_down_shexp", g.glu(gate, up), m.n_embd)
    if m.has(il, "ffn_gate_inp_shexp"):
        shared_gate = g.elementwise(net.mm(il, "ffn_gate_inp_shexp", cur, 1))
        out = g.elementwise(out, shared_gate)
    return out


def _gpt_oss(net: Builder) -> None:
    """src/models/openai-moe.cpp: sinks, biases, iSWA attention, then MoE with biased experts and
    SOFTMAX_WEIGHT gating; the last hidden state is a graph output and the output rows are picked after the
    layers."""
    g, facts = net.g, net.m.facts
    inp_l = net.inp_embd()
    net.inp_pos()
    for il in net.layers(facts.n_layer):
        layer = facts.layers[il]
        inp_sa = inp_l
        cur = net.norm(inp_l)
        q, k, v = net.qkv(
            il,
            cur,
            layer.head_dim_k,
            layer.n_head,
            layer.head_dim_k,
            layer.n_head_kv,
            layer.head_dim_v,
            layer.n_head_kv,
        )
        pos = net.inp_pos()
        q = g.elementwise(q, pos)
        k = g.elementwise(k, pos)
        cur = net.attn(il, q, k, v, kind=net.s.layer_cache.get(il, "base"), iswa=True)
        ffn_inp = g.elementwise(cur, inp_sa)
        cur = net.norm(ffn_inp)
        cur = net.moe_ffn(il, cur, gating="softmax_weight", norm_w=False, biased=True)
        inp_l = g.elementwise(cur, ffn_inp)
    net.output(inp_l, rows="before_norm")


def _deepseek2(net: Builder) -> None:
    """src/models/deepseek2.cpp with MLA: Q (through q_a/q_b or one wq), the compressed KV [kv_lora + rope],
    Q's nope part absorbed by wk_b, K = [kv_cmpr | k_pe] stored as the only cache, attention over the K view
    (build_attn with llm_graph_input_attn_k) and V decompressed by wv_b; then a dense lead layer or MoE with
    shared experts."""
    m, g, facts, s = net.m, net.g, net.m.facts, net.s
    n = net.n_tokens
    kv_lora = facts.kv_lora_rank
    n_rot = int(m.number("rope.dimension_count", 64))
    head_k = int(m.number("attention.key_length_mla", 192))
    head_v = int(m.number("attention.value_length_mla", 128))
    nope = head_k - n_rot
    inp_l = net.inp_embd()
    if m.number("attention.temperature_scale"):
        net.attn_scale = g.input((1, 1, n), F32)
    pos = net.inp_pos()
    inp = net.attn_inputs("base", with_v=False, rot=False)
    for il in net.layers(facts.n_layer - facts.n_layer_nextn):
        layer = facts.layers[il]
        n_head = layer.n_head
        inp_sa = inp_l
        cur = net.norm(inp_l)
        if m.has(il, "attn_q_a"):
            q = net.mm(il, "attn_q_a", cur)
            q = net.norm(q)
            q = net.mm(il, "attn_q_b", q)
        else:
            q = net.mm(il, "attn_q", cur, n_head * head_k)
        q = g.view(q, (head_k, n_head, n))
        kv_pe = net.mm(il, "attn_kv_a_mqa", cur, kv_lora + n_rot)
        e = kv_pe.elt[1]
        kv_cmpr = g.view(kv_pe, (kv_lora, n), (e, kv_pe.nb[1]))
        k_pe = g.view(kv_pe, (n_rot, 1, n), (e, kv_pe.nb[1], kv_pe.nb[1]))
        k_pe = g.new(k_pe.ne, [k_pe, pos])  # rope of a strided view: a new tensor
        kv_cmpr = net.norm(kv_cmpr)
        q_nope = g.view(q, (nope, n_head, n), q.nb[:3])
        q_pe = g.view(q, (n_rot, n_head, n), q.nb[:3])
        q_pe = g.new(q_pe.ne, [q_pe, pos])
        q_nope = g.permute(q_nope, (0, 2, 1, 3))
        absorbed = g.mul_mat(kv_lora, q_nope)  # wk_b: [kv_lora, n_tokens, n_head]
        absorbed = g.permute(absorbed, (0, 2, 1, 3))
        qcur = g.concat(absorbed, q_pe, 0)
        kv_cmpr = g.view(kv_cmpr, (kv_lora, 1, n))
        kcur = g.concat(kv_cmpr, k_pe, 0)
        if net.attn_scale is not None:
            qcur = g.elementwise(qcur, net.attn_scale)
        for t in (qcur, kv_cmpr, kcur):  # build_attn (k-only cache): q, v, k
            g.expand(t)
        g.expand(g.store(g.view(kcur, (kcur.ne[0], n)), inp.k_idxs))
        v_cont = 0
        if not s.flash_attn:
            v_cont = s.cells.get("base", 0) * kv_lora * s.n_stream * CACHE_ELEMENT.get(s.type_k, F16)[1]
        cur = net.attn_mha(
            qcur,
            inp.mask,
            head_v=kv_lora,
            n_kv=s.cells.get("base", 0),
            v_trans=False,
            v_mla=head_v,
            v_cont_bytes=v_cont,
        )
        cur = net.mm(il, "attn_output", cur, m.n_embd)
        if il == facts.n_layer - facts.n_layer_nextn - 1:
            out_ids = net.inp_out_ids()
            cur = g.get_rows(cur, out_ids)
            inp_sa = g.get_rows(inp_sa, out_ids)
        ffn_inp = g.elementwise(cur, inp_sa)
        cur = net.norm(ffn_inp)
        if m.has(il, "ffn_gate_inp"):
            gating = {1: "softmax", 2: "sigmoid"}.get(int(m.number("expert_gating_func", 1)), "softmax")
            moe = net.moe_ffn(
                il,
                cur,
                gating=gating,
                norm_w=_norm_w(net),
                w_scale=m.number("expert_weights_scale"),
            )
            cur = g.elementwise(moe, _shared_expert(net, il, cur))
        else:
            cur = net.ffn(il, cur)
        inp_l = g.elementwise(cur, ffn_inp)
    net.output(inp_l)


def _mamba2_layer(net: Builder, il: int, cur: Tensor) -> Tensor:
    """llm_build_mamba_base::build_mamba2_layer (src/models/mamba-base.cpp): in-projection, the conv window
    (concat with the stored state, ssm_conv, silu), the selective scan (y and the new states in one tensor),
    y * D + gate (swiglu), grouped RMS norm, out-projection."""
    g, m, facts = net.g, net.m, net.m.facts
    hp = m.hp
    d_conv = int(hp.get("ssm.conv_kernel", 4))
    d_inner = int(hp.get("ssm.inner_size", 0)) or facts.ssm_d_inner
    d_state = int(hp.get("ssm.state_size", 0))
    n_head = int(hp.get("ssm.time_step_rank", 1)) or 1
    n_group = int(hp.get("ssm.group_count", 1)) or 1
    n_seqs = net.s.n_seqs
    n_seq_tokens = net.n_tokens // n_seqs
    head_dim = d_inner // n_head
    channels = d_inner + 2 * n_group * d_state
    rs = net.rs_input()
    copy_main = g.view(rs, (n_seqs,))
    copy_extra = g.view(rs, (max(rs.ne[0] - n_seqs, 0),))
    conv = _build_rs(net, facts.n_embd_r, copy_main, copy_extra)
    conv = g.view(conv, (d_conv - 1, channels, n_seqs))
    zxbcdt = net.mm(il, "ssm_in", cur)
    zxbcdt = g.view(zxbcdt, (zxbcdt.ne[0], n_seq_tokens, n_seqs))
    e = zxbcdt.elt[1]
    z = g.view(zxbcdt, (head_dim, n_head, n_seq_tokens, n_seqs), (e, head_dim * e, zxbcdt.nb[1], zxbcdt.nb[2]))
    xbc = g.view(zxbcdt, (channels, n_seq_tokens, n_seqs), (e, zxbcdt.nb[1], zxbcdt.nb[2]))
    dt = g.view(zxbcdt, (n_head, n_seq_tokens, n_seqs), (e, zxbcdt.nb[1], zxbcdt.nb[2]))
    conv_x = g.concat(conv, g.transpose(xbc), 0)
    last = g.view(conv_x, (d_conv - 1, channels, n_seqs), conv_x.nb[:3])
    g.expand(g.store(last))
    xbc = g.new((channels, n_seq_tokens, n_seqs), [conv_x])  # ggml_ssm_conv
    xbc = g.elementwise(xbc, None)
    xbc = g.elementwise(xbc)  # silu
    x = g.view(xbc, (head_dim, n_head, n_seq_tokens, n_seqs), (e, head_dim * e, xbc.nb[1], xbc.nb[2]))
    b = g.view(xbc, (d_state, n_group, n_seq_tokens, n_seqs), (e, d_state * e, xbc.nb[1], xbc.nb[2]))
    c = g.view(xbc, (d_state, n_group, n_seq_tokens, n_seqs), (e, d_state * e, xbc.nb[1], xbc.nb[2]))
    dt = g.elementwise(g.cont(dt), None)
    state_size = facts.n_embd_s
    y_ssm = _build_rs(
        net,
        state_size,
        copy_main,
        copy_extra,
        scan=lambda ids: g.new((math.prod(x.ne) + state_size * n_seqs,), [x, dt, b, c, ids]),
    )
    g.expand(g.store(g.view(y_ssm, (state_size, n_seqs), (4, state_size * 4))))
    y = g.view(y_ssm, (head_dim, n_head, n_seq_tokens, n_seqs))
    y = g.elementwise(y, g.elementwise(x, None))  # y + x * D
    y = g.glu(g.cont(z), y)
    if m.has(il, "ssm_norm"):
        y = g.view(y, (d_inner // n_group, n_group, n_seq_tokens, n_seqs))
        y = net.norm(y)
    y = g.view(y, (d_inner, n_seq_tokens * n_seqs))
    return net.mm(il, "ssm_out", y, m.n_embd)


def _build_rs(
    net: Builder, state_size: int, copy_main: Tensor, copy_extra: Tensor, scan: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """llm_graph_context::build_rs: the states of this ubatch's sequences gathered (or scanned) from the
    recurrent cache, and the other states copied in place."""
    g = net.g
    g.expand(g.store())  # ggml_scale_inplace of the zeroed state: a view of the cache
    states = scan(copy_main) if scan is not None else g.get_rows(None, copy_main, width=state_size)
    g.expand(states)
    extra = g.get_rows(None, copy_extra, width=state_size)
    g.expand(g.store(extra))
    return states


def _granite_hybrid(net: Builder) -> None:
    """src/models/granite-hybrid.cpp (and mamba2.cpp, nemotron_h's Mamba-2 layers): Mamba-2 or attention
    layers, each followed by the (MoE + shared expert) feed-forward with Granite's scales."""
    m, g, facts = net.m, net.g, net.m.facts
    cur = net.inp_embd()
    if m.number("embedding_scale"):
        cur = g.elementwise(cur)
    inp_l = cur
    net.rs_input()
    if any(layer.has_kv for layer in facts.layers):
        net.attn_inputs("base")
    rope = not (m.arch == "granitehybrid" and m.hp.get("rope.scaling.finetuned") is False) and m.arch != "mamba2"
    if rope and any(layer.has_kv for layer in facts.layers):
        net.inp_pos()
    n_layer = facts.n_layer
    for il in net.layers(n_layer):
        layer = facts.layers[il]
        inp_sa = inp_l
        cur = net.norm(inp_l)
        if layer.recurrent:
            cur = _mamba2_layer(net, il, cur)
        else:
            hk, hv = layer.head_dim_k, layer.head_dim_v
            q, k, v = net.qkv(il, cur, hk, layer.n_head, hk, layer.n_head_kv, hv, layer.n_head_kv)
            if rope:
                pos = net.inp_pos()
                q = g.elementwise(q, pos)
                k = g.elementwise(k, pos)
            cur = net.attn(il, q, k, v, kind="base")
        if il == n_layer - 1:
            out_ids = net.inp_out_ids()
            cur = g.get_rows(cur, out_ids)
            inp_sa = g.get_rows(inp_sa, out_ids)
        if m.arch == "mamba2":
            inp_l = g.elementwise(cur, inp_sa)
            continue
        if m.number("residual_scale"):
            cur = g.elementwise(cur)
        ffn_inp = g.elementwise(cur, inp_sa)
        cur = net.norm(ffn_inp)
        cur = _feed_forward(net, il, cur)
        if m.number("residual_scale"):
            cur = g.elementwise(cur)
        inp_l = g.elementwise(cur, ffn_inp)
    net.output(inp_l, scale=bool(m.number("logit_scale")))


def _lfm2(net: Builder) -> None:
    """src/models/lfm2.cpp: short-convolution or attention blocks, then a dense or MoE feed-forward."""
    m, g, facts = net.m, net.g, net.m.facts
    cur = net.inp_embd()
    net.rs_input()
    net.attn_inputs("base")
    pos = net.inp_pos()
    n_layer = facts.n_layer
    n_seqs = net.s.n_seqs
    n_seq_tokens = net.n_tokens // n_seqs
    l_cache = int(m.number("shortconv.l_cache", 3))
    d_conv = l_cache - 1
    for il in net.layers(n_layer):
        layer = facts.layers[il]
        prev = cur
        cur = net.norm(cur)
        if layer.recurrent:
            x3 = g.view(cur, (cur.ne[0], n_seq_tokens, n_seqs))
            bcx = net.mm(il, "shortconv.in_proj", x3)
            chunk = bcx.ne[0] // 3
            e = bcx.elt[1]
            b = g.view(bcx, (chunk, bcx.ne[1], bcx.ne[2]), (e, bcx.nb[1], bcx.nb[2]))
            c = g.view(bcx, (chunk, bcx.ne[1], bcx.ne[2]), (e, bcx.nb[1], bcx.nb[2]))
            x = g.view(bcx, (chunk, bcx.ne[1], bcx.ne[2]), (e, bcx.nb[1], bcx.nb[2]))
            bx = g.transpose(g.new(b.ne, [b, x]))  # ggml_mul of two strided views
            rs = net.rs_input()
            conv = _build_rs(net, facts.n_embd_r, g.view(rs, (n_seqs,)), g.view(rs, (max(rs.ne[0] - n_seqs, 0),)))
            conv = g.view(conv, (d_conv, m.n_embd, n_seqs))
            bx = g.concat(conv, bx, 0)
            g.expand(g.store(g.view(bx, (d_conv, bx.ne[1], bx.ne[2]), bx.nb[:3])))
            conv_out = g.new((bx.ne[1], n_seq_tokens, n_seqs), [bx])  # ggml_ssm_conv
            y = g.new(c.ne, [c, conv_out])  # ggml_mul(c, conv_out): c is a strided view
            y = net.mm(il, "shortconv.out_proj", y, m.n_embd)
            cur = g.view(y, (y.ne[0], n_seq_tokens * n_seqs))
        else:
            hk, hv = layer.head_dim_k, layer.head_dim_v
            q, k, v = net.qkv(il, cur, hk, layer.n_head, hk, layer.n_head_kv, hv, layer.n_head_kv)
            q = net.norm(q)
            k = net.norm(k)
            q = g.elementwise(q, pos)
            k = g.elementwise(k, pos)
            cur = net.attn(il, q, k, v, kind="base")
        if il == n_layer - 1:
            out_ids = net.inp_out_ids()
            cur = g.get_rows(cur, out_ids)
            prev = g.get_rows(prev, out_ids)
        cur = g.elementwise(prev, cur)
        ffn_norm = net.norm(cur)
        ffn_out = _feed_forward(net, il, ffn_norm)
        cur = g.elementwise(cur, ffn_out)
    net.output(cur)


def _gated_delta_net(net: Builder, il: int, cur: Tensor) -> Tensor:
    """llama_model_qwen3next::graph::build_layer_attn_linear over llm_build_delta_net_base
    (src/models/delta-net-base.cpp), with the fused gated-delta-net op the CPU and CUDA backends run
    (build_delta_net_fused: the output and the new state in one tensor): Q/K/V (and the gate z) projected,
    beta and the decay from ssm_ba, the conv window (build_conv_state), the state (build_rs), the short
    convolution, L2-normed Q and K repeated to the value heads, the delta rule, a gated RMS norm, ssm_out."""
    g, m, facts, hp = net.g, net.m, net.m.facts, net.m.hp
    n_seqs = net.s.n_seqs
    n_seq_tokens = net.n_tokens // n_seqs
    d_inner = int(hp.get("ssm.inner_size", 0)) or facts.ssm_d_inner
    head_k = int(hp.get("ssm.state_size", 128))
    n_k = int(hp.get("ssm.group_count", 1)) or 1
    n_v = int(hp.get("ssm.time_step_rank", 1)) or 1
    head_v = d_inner // n_v
    d_conv = int(hp.get("ssm.conv_kernel", 4))
    channels = d_inner + 2 * n_k * head_k
    rs = net.rs_input()
    copy_main, copy_extra = g.view(rs, (n_seqs,)), g.view(rs, (max(rs.ne[0] - n_seqs, 0),))
    if m.has(il, "attn_qkv"):  # build_qkvz
        qkv = net.mm(il, "attn_qkv", cur)
        qkv = g.view(qkv, (qkv.ne[0], n_seq_tokens, n_seqs))
        z = net.mm(il, "attn_gate", cur)
    else:
        mixed = net.mm(il, "ssm_in", cur)
        per_group = 2 * head_k + 2 * head_v * (n_v // n_k)
        r = g.view(mixed, (per_group, n_k, n_seq_tokens, n_seqs))
        query = g.view(r, (head_k, n_k, n_seq_tokens, n_seqs), r.nb)
        key = g.view(r, (head_k, n_k, n_seq_tokens, n_seqs), r.nb)
        value = g.view(r, (head_v * n_v // n_k, n_k, n_seq_tokens, n_seqs), r.nb)
        z = g.cont(g.view(r, (head_v * n_v // n_k, n_k, n_seq_tokens, n_seqs), r.nb))
        qkv = g.concat(
            g.cont(query, (head_k * n_k, n_seq_tokens, n_seqs)), g.cont(key, (head_k * n_k, n_seq_tokens, n_seqs)), 0
        )
        qkv = g.concat(qkv, g.cont(value, (head_v * n_v, n_seq_tokens, n_seqs)), 0)
    ba = net.mm(il, "ssm_ba", cur, 2 * n_v)
    ba = g.view(ba, (2 * n_v // n_k, n_k, n_seq_tokens, n_seqs))
    beta = g.elementwise(g.cont(g.view(ba, (n_v // n_k, n_k, n_seq_tokens, n_seqs), ba.nb)))  # sigmoid
    alpha = g.cont(g.view(ba, (n_v // n_k, n_k, n_seq_tokens, n_seqs), ba.nb), (n_v, n_seq_tokens, n_seqs))
    gate = g.elementwise(g.elementwise(g.elementwise(alpha, None)), None)  # + dt bias, softplus, * A
    beta = g.view(beta, (1, n_v, n_seq_tokens, n_seqs))
    gate = g.view(gate, (1, n_v, n_seq_tokens, n_seqs))
    conv = g.view(_build_rs(net, facts.n_embd_r, copy_main, copy_extra), (d_conv - 1, channels, n_seqs))
    conv_input = g.concat(conv, g.transpose(qkv), 0)
    g.expand(g.store(g.view(conv_input, (d_conv - 1, channels, n_seqs), conv_input.nb)))
    state = g.view(_build_rs(net, facts.n_embd_s, copy_main, copy_extra), (head_v, head_v, n_v, n_seqs))
    conv_out = g.elementwise(g.new((channels, n_seq_tokens, n_seqs), [conv_input]))  # ssm_conv, silu
    row = channels * conv_out.elt[1]
    strides = (conv_out.elt[1], head_k * conv_out.elt[1], row, row * n_seq_tokens)
    # build_gdn_l2_norm: rms_norm (a new tensor: its source is a view) then a scale in place
    q = g.elementwise(g.elementwise(g.view(conv_out, (head_k, n_k, n_seq_tokens, n_seqs), strides)))
    k = g.elementwise(g.elementwise(g.view(conv_out, (head_k, n_k, n_seq_tokens, n_seqs), strides)))
    v = g.view(conv_out, (head_v, n_v, n_seq_tokens, n_seqs), (strides[0], head_v * strides[0], *strides[2:]))
    if n_k != n_v:
        repeat = (head_k, n_v // n_k, n_k, n_seq_tokens * n_seqs)
        q = g.view(
            g.repeat(g.view(q, (head_k, 1, n_k, n_seq_tokens * n_seqs)), repeat), (head_k, n_v, n_seq_tokens, n_seqs)
        )
        k = g.view(
            g.repeat(g.view(k, (head_k, 1, n_k, n_seq_tokens * n_seqs)), repeat), (head_k, n_v, n_seq_tokens, n_seqs)
        )
    result = g.new((head_v * n_v, n_seq_tokens * n_seqs + head_v * n_seqs), [q, k, v, gate, beta, state])
    output = g.view(result, (head_v, n_v, n_seq_tokens, n_seqs))
    g.expand(g.store(g.view(result, (head_v, head_v, n_v, n_seqs))))  # the new state into the cache
    normed = net.norm(output)
    gated = g.elementwise(normed, g.elementwise(g.view(z, (head_v, n_v, n_seq_tokens, n_seqs))))  # build_norm_gated
    out = net.mm(il, "ssm_out", g.view(gated, (head_v * n_v, n_seq_tokens, n_seqs)), m.n_embd)
    return g.view(out, (m.n_embd, n_seq_tokens * n_seqs))


def _qwen3next(net: Builder) -> None:
    """src/models/qwen3next.cpp: gated delta-net layers (_gated_delta_net) with gated full attention every few
    layers (Q and its gate from one projection, Q/K norms), each followed by MoE with a sigmoid-gated shared
    expert; the final norm is a graph output and the output rows are picked after it."""
    m, g, facts = net.m, net.g, net.m.facts
    inp_l = net.inp_embd()
    net.rs_input()
    net.attn_inputs("base")
    pos = net.inp_pos()
    n = net.n_tokens
    n_layer = facts.n_layer - facts.n_layer_nextn
    for il in net.layers(n_layer):
        layer = facts.layers[il]
        inp_sa = inp_l
        cur = net.norm(inp_l)
        g.expand(cur)
        if layer.recurrent:
            cur = _gated_delta_net(net, il, cur)
        else:
            hk = layer.head_dim_k
            q_full, k, v = net.qkv(
                il, cur, 2 * hk, layer.n_head, hk, layer.n_head_kv, layer.head_dim_v, layer.n_head_kv, reshape=False
            )
            q_full = g.view(q_full, (2 * hk, layer.n_head, n))
            q = g.view(q_full, (hk, layer.n_head, n), q_full.nb)
            gate = g.view(q_full, (hk, layer.n_head, n), q_full.nb)
            k = g.view(k, (hk, layer.n_head_kv, n))
            v = g.view(v, (layer.head_dim_v, layer.n_head_kv, n))
            q = g.elementwise(net.norm(q), pos)
            k = g.elementwise(net.norm(k), pos)
            cur = net.attn(il, q, k, v, kind="base", wo=False)
            cur = g.elementwise(cur, g.elementwise(g.cont(gate, (hk * layer.n_head, n))))  # * sigmoid(gate)
            cur = net.mm(il, "attn_output", cur, m.n_embd)
        cur = g.elementwise(cur, inp_sa)
        residual = cur
        cur = _feed_forward(net, il, net.norm(cur))
        inp_l = g.elementwise(cur, residual)
    net.output(inp_l, rows="after_norm")


ARCHITECTURES: dict[str, Callable[[Builder], None]] = {
    "gpt-oss": _gpt_oss,
    "deepseek2": _deepseek2,
    "granitehybrid": _granite_hybrid,
    "mamba2": _granite_hybrid,
    "lfm2": _lfm2,
    "lfm2moe": _lfm2,
    "qwen3next": _qwen3next,
    # qwen35.cpp projects beta and alpha separately (ssm_beta, ssm_alpha) and is otherwise qwen3next's graph:
    # approximated by it
    "qwen35": _qwen3next,
    "qwen35moe": _qwen3next,
}
