"""Model facts from headers: each architecture rule as llama.cpp applies it (src/models/<arch>.cpp)."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from launcher.errors import EstimateError, ModelError
from launcher.estimate import Settings, estimate
from launcher.gguf import parse_header
from launcher.model import model_facts
from tests.gguf_factory import gguf_bytes, kv, tensor_info


def header(arch: str, values: dict, tensors: list[tuple[str, tuple[int, ...], int]] = ()):
    kvs = [kv("general.architecture", VT.STRING, arch)]
    for key, value in values.items():
        if isinstance(value, bool):
            kvs.append(kv(key, VT.BOOL, value))
        elif isinstance(value, int):
            kvs.append(kv(key, VT.UINT32, value))
        elif isinstance(value, str):
            kvs.append(kv(key, VT.STRING, value))
        elif isinstance(value, list) and value and isinstance(value[0], bool):
            kvs.append(kv(key, VT.ARRAY, (VT.BOOL, value)))
        elif isinstance(value, list):
            kvs.append(kv(key, VT.ARRAY, (VT.UINT32, value)))
    infos, offset = [], 0
    for name, dims, qtype in tensors:
        infos.append(tensor_info(name, dims, qtype, offset))
        block, size = {QT.F32: (1, 4), QT.F16: (1, 2), QT.Q8_0: (32, 34)}[qtype]
        n = 1
        for d in dims:
            n *= d
        offset += -(-(n // block * size) // 32) * 32
    return parse_header(gguf_bytes(kvs, infos), source="test.gguf")


def base(arch: str, n_layer: int = 6, **extra) -> dict:
    values = {
        f"{arch}.block_count": n_layer,
        f"{arch}.embedding_length": 256,
        f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2,
        f"{arch}.context_length": 131072,
        f"{arch}.feed_forward_length": 512,
    }
    values.update({f"{arch}.{k}" if not k.startswith(arch) else k: v for k, v in extra.items()})
    return values


def test_model_gemma3_uses_sliding_window_on_five_of_six_layers():
    facts = model_facts(header("gemma3", base("gemma3", 12, **{"attention.sliding_window": 512})))
    assert facts.swa_layers == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert facts.sliding_window == 512
    assert facts.head_dim_k == 64


def test_model_gemma3_without_window_key_is_dense():
    facts = model_facts(header("gemma3", base("gemma3", 12)))
    assert facts.swa_layers == []
    assert facts.swa_type == "none"


def test_model_gpt_oss_alternates_sliding_window():
    facts = model_facts(header("gpt-oss", base("gpt-oss", 4, **{"attention.sliding_window": 128})))
    assert facts.swa_layers == [0, 2]


def test_model_explicit_pattern_array_wins():
    values = base("gemma3", 4, **{"attention.sliding_window": 512})
    values["gemma3.attention.sliding_window_pattern"] = [False, True, True, False]
    facts = model_facts(header("gemma3", values))
    assert facts.swa_layers == [1, 2]


def test_model_llama4_chunked_attention_unless_window_is_zero():
    facts = model_facts(header("llama4", base("llama4", 8)))
    assert facts.swa_type == "chunked" and facts.sliding_window == 8192
    assert facts.swa_layers == [0, 1, 2, 4, 5, 6]
    dense = model_facts(header("llama4", base("llama4", 8, **{"attention.sliding_window": 0})))
    assert dense.swa_type == "none"


def test_model_phi3_ignores_its_sliding_window():
    facts = model_facts(header("phi3", base("phi3", 4, **{"attention.sliding_window": 2048})))
    assert facts.swa_type == "none"


def test_model_per_layer_kv_heads_and_recurrent_layers_of_granitehybrid():
    values = base("granitehybrid", 4, **{"ssm.conv_kernel": 4, "ssm.inner_size": 512, "ssm.state_size": 16,
                                          "ssm.group_count": 1, "ssm.time_step_rank": 8})  # fmt: skip
    values["granitehybrid.attention.head_count_kv"] = [0, 0, 2, 0]
    facts = model_facts(header("granitehybrid", values))
    assert facts.n_head_kv == [0, 0, 2, 0]
    assert facts.recurrent_layers == [0, 1, 3]
    assert [layer.index for layer in facts.layers if layer.has_kv] == [2]
    # src/llama-hparams.cpp n_embd_r = (d_conv - 1) * (d_inner + 2 * n_group * d_state), n_embd_s = d_state * d_inner
    assert facts.n_embd_r == 3 * (512 + 2 * 16)
    assert facts.n_embd_s == 16 * 512
    est = estimate(facts, Settings(n_ctx=4096, n_parallel=2, kv_unified=True))
    assert est.recurrent_bytes == 3 * (facts.n_embd_r + facts.n_embd_s) * 4 * 2


def test_model_qwen3next_full_attention_every_fourth_layer():
    values = base("qwen3next", 8, **{"ssm.conv_kernel": 4, "ssm.inner_size": 512, "ssm.state_size": 128,
                                     "ssm.group_count": 16, "ssm.time_step_rank": 32})  # fmt: skip
    facts = model_facts(header("qwen3next", values))
    assert [layer.index for layer in facts.layers if layer.has_kv] == [3, 7]
    assert facts.recurrent_layers == [0, 1, 2, 4, 5, 6]


def test_model_mla_keeps_a_k_only_cache():
    values = base("deepseek2", 2, **{"attention.key_length": 576, "attention.value_length": 512,
                                     "attention.key_length_mla": 192, "attention.value_length_mla": 128,
                                     "attention.kv_lora_rank": 512, "attention.head_count_kv": 1})  # fmt: skip
    facts = model_facts(header("deepseek2", values))
    assert facts.is_mla
    est = estimate(facts, Settings(n_ctx=4096, type_k="f16", type_v="f16"))
    # K only: 576 elements x 2 bytes per cell per layer
    assert est.kv_bytes == 2 * 4096 * 576 * 2
    with pytest.raises(EstimateError, match="same K and V cache type"):
        estimate(facts, Settings(n_ctx=4096, type_k="q8_0", type_v="f16"))


def test_model_gemma4_shared_kv_layers_own_no_cache():
    values = base("gemma4", 6, **{"attention.sliding_window": 512, "attention.shared_kv_layers": 2})
    values["gemma4.attention.sliding_window_pattern"] = [True, True, False, True, True, False]
    facts = model_facts(header("gemma4", values))
    assert [layer.index for layer in facts.layers if layer.has_kv] == [0, 1, 2, 3]


def test_model_mtp_layers_hold_weights_but_no_cache():
    values = base("glm4moe", 3, **{"nextn_predict_layers": 1})
    facts = model_facts(header("glm4moe", values))
    assert facts.n_layer == 3 and facts.n_layer_nextn == 1
    assert [layer.index for layer in facts.layers if layer.has_kv] == [0, 1]


def test_model_unknown_architecture_is_labelled_approximate():
    facts = model_facts(header("brandnew", base("brandnew", 2)))
    assert not facts.known
    assert "approximate" in facts.notes[0]
    assert estimate(facts, Settings(n_ctx=4096)).approximate


def test_model_tied_output_duplicates_token_embd_on_the_output_device():
    tensors = [("token_embd.weight", (256, 1024), QT.Q8_0), ("blk.0.attn_q.weight", (256, 256), QT.F16),
               ("output_norm.weight", (256,), QT.F32)]  # fmt: skip
    facts = model_facts(header("llama", base("llama", 1), tensors))
    assert facts.output_tied
    from launcher.estimate import GPU

    cpu_only = estimate(facts, Settings(n_ctx=4096))
    assert cpu_only.weights_bytes == facts.tensor_bytes_total  # one copy on the host
    gpu = estimate(facts, Settings(n_ctx=4096, n_gpu_layers=-1), gpus=[GPU("GPU0")])
    # blocks, output_norm and the tied copy of token_embd: as many bytes as the whole file
    assert gpu.device("GPU0").weights_bytes == facts.tensor_bytes_total
    assert gpu.device("CPU").weights_bytes == 1024 * 256 // 32 * 34  # token_embd stays on the CPU


def test_model_offload_places_output_layer_first():
    tensors = [(f"blk.{i}.attn_q.weight", (256, 256), QT.F16) for i in range(4)]
    tensors += [("token_embd.weight", (256, 512), QT.F16), ("output.weight", (256, 512), QT.F16)]
    facts = model_facts(header("llama", base("llama", 4), tensors))
    from launcher.estimate import GPU

    est = estimate(facts, Settings(n_ctx=4096, n_gpu_layers=2), gpus=[GPU("GPU0")])
    gpu = est.device("GPU0")
    assert gpu.layers == [3]  # ngl 2 = the output layer and the last block
    assert gpu.weights_bytes == 256 * 256 * 2 + 256 * 512 * 2


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "missing 'llama.block_count'"),
        ({"llama.block_count": 0, "llama.embedding_length": 256}, "outside 1..512"),
        ({"llama.block_count": 2, "llama.embedding_length": 256, "llama.attention.head_count_kv": [1, 2, 3]},
         "expected one per layer"),
    ],
)  # fmt: skip
def test_model_bad_hyperparameters_are_one_clear_error(values, message):
    with pytest.raises(ModelError, match=message):
        model_facts(header("llama", values))


def test_model_quantized_v_cache_needs_flash_attention():
    facts = model_facts(header("llama", base("llama", 2)))
    with pytest.raises(EstimateError, match="requires flash attention"):
        estimate(facts, Settings(n_ctx=4096, type_k="q8_0", type_v="q8_0", flash_attn="off"))


def test_model_context_padding_and_streams_follow_llama_context():
    facts = model_facts(header("llama", base("llama", 2)))
    est = estimate(facts, Settings(n_ctx=5000, n_parallel=3))
    # pad(5000, 256) = 5120; per-sequence: pad(5120 / 3, 256) = 1792 cells x 3 streams
    assert (est.n_ctx, est.n_ctx_seq) == (5376, 1792)
    assert est.kv_caches[0].cells == 1792 and est.kv_caches[0].n_stream == 3
