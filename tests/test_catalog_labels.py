"""launcher.catalog.labels: quant labels, shards, projectors and sidecars from file names (pure)."""

from __future__ import annotations

import pytest
from gguf_factory import write_gguf

from launcher.catalog import labels
from launcher.gguf import read_header
from launcher.quants import file_type_label, normalize_label


@pytest.mark.parametrize(
    ("name", "label"),
    [
        # plain llama.cpp file types, any case
        ("Qwen3-14B-Q4_K_M.gguf", "Q4_K_M"),
        ("qwen3-14b-q4_k_m.gguf", "Q4_K_M"),
        ("Meta-Llama-3.1-8B-Instruct-Q8_0.gguf", "Q8_0"),
        ("gemma-3-4b-it-qat-q4_0.gguf", "Q4_0"),
        ("model.Q5_K_S.gguf", "Q5_K_S"),
        ("Llama-3.2-1B-Instruct-f16.gguf", "F16"),
        ("Llama-3.2-1B-Instruct-f32.gguf", "F32"),
        ("Qwen3-0.6B-BF16.gguf", "BF16"),
        ("Mistral-7B-Q3_K_L.gguf", "Q3_K_L"),
        ("Mistral-7B-Q2_K_S.gguf", "Q2_K_S"),
        ("Mistral-7B-Q6_K.gguf", "Q6_K"),
        ("Mistral-7B-Q5_1.gguf", "Q5_1"),
        ("Mistral-7B-Q4_1.gguf", "Q4_1"),
        ("Mistral-7B-TQ1_0.gguf", "TQ1_0"),
        # I-quants: the longest name wins (IQ2_XXS is not IQ2_XS, IQ3_XXS not IQ3_XS)
        ("Qwen2.5-7B-Instruct-IQ2_XXS.gguf", "IQ2_XXS"),
        ("Qwen2.5-7B-Instruct-IQ2_XS.gguf", "IQ2_XS"),
        ("Qwen2.5-7B-Instruct-IQ3_XXS.gguf", "IQ3_XXS"),
        ("Qwen2.5-7B-Instruct-IQ3_XS.gguf", "IQ3_XS"),
        ("Qwen2.5-7B-Instruct-IQ3_M.gguf", "IQ3_M"),
        ("Qwen2.5-7B-Instruct-IQ4_NL.gguf", "IQ4_NL"),
        ("Qwen2.5-7B-Instruct-IQ4_XS.gguf", "IQ4_XS"),
        ("Qwen2.5-7B-Instruct-IQ1_S.gguf", "IQ1_S"),
        ("Qwen2.5-7B-Instruct-IQ1_M.gguf", "IQ1_M"),
        # Unsloth dynamic: UD- prefix and _XL kept
        ("Qwen3-14B-UD-Q4_K_XL.gguf", "UD-Q4_K_XL"),
        ("Qwen3-14B-UD-IQ1_S.gguf", "UD-IQ1_S"),
        ("Qwen3-14B-ud-q2_k_xl.gguf", "UD-Q2_K_XL"),
        ("Qwen3-14B-Q8_K_XL.gguf", "Q8_K_XL"),
        # bartowski's _L variants (Q8_0 embed/output) keep their suffix
        ("Meta-Llama-3-8B-Instruct-Q6_K_L.gguf", "Q6_K_L"),
        ("Meta-Llama-3-8B-Instruct-Q3_K_XL.gguf", "Q3_K_XL"),
        # MXFP4 (gpt-oss) and MXFP4_MOE
        ("gpt-oss-20b-MXFP4.gguf", "MXFP4"),
        ("gpt-oss-20b-MXFP4_MOE.gguf", "MXFP4_MOE"),
        # retired ARM repacks are whole labels, not Q4_0 plus leftovers
        ("model-Q4_0_4_4.gguf", "Q4_0_4_4"),
        ("model-Q4_0_8_8.gguf", "Q4_0_8_8"),
        # FP16 / FP32 spellings
        ("model-fp16.gguf", "F16"),
        ("model-FP32.gguf", "F32"),
        # the last match wins
        ("Q4_K_M-Q8_0.gguf", "Q8_0"),
        ("Q8_0-distill-Q4_K_M.gguf", "Q4_K_M"),
        # percentage mixes: the dominant component
        ("Model-55IQ2_XXS-34Q2_K-07Q8_0-03F16.gguf", "IQ2_XXS"),
        ("Model-20Q4_K-70Q6_K-10F32.gguf", "Q6_K"),
        ("Model-50Q4_K-50Q6_K.gguf", "Q4_K"),
        # trailing words that are not size suffixes do not spoil a label
        ("model-Q4_K_M-imat.gguf", "Q4_K_M"),
        ("q4_k_m_imatrix.gguf", "Q4_K_M"),
        # no label
        ("README.gguf", None),
        ("model.gguf", None),
        ("a-Q4_K_MX.gguf", None),
        ("Q4.gguf", None),
    ],
)
def test_labels_from_names(name, label):
    assert labels.quant_label(name) == label


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("UD-Q2_K_XL/Kimi-K2-Instruct-UD-Q2_K_XL-00001-of-00008.gguf", "UD-Q2_K_XL"),
        ("Q8_0/model-00001-of-00002.gguf", "Q8_0"),  # the folder names it
        ("Q8_0/model-Q4_K_M.gguf", "Q4_K_M"),  # the file name comes first
        ("deep/Q6_K/sub/model.gguf", "Q6_K"),
        ("a\\b\\model-Q5_K_M.gguf", "Q5_K_M"),
        ("weights/model.gguf", None),
    ],
)
def test_labels_from_paths(path, label):
    assert labels.quant_label(path) == label


@pytest.mark.parametrize(
    ("given", "normal"), [("q4_k_m", "Q4_K_M"), (" ud-q4_k_xl ", "UD-Q4_K_XL"), ("fp16", "F16"), ("bf16", "BF16")]
)
def test_labels_normalize_user_input(given, normal):
    assert normalize_label(given) == normal


def test_labels_from_file_type_use_llama_cpp_names():
    assert file_type_label(15) == "Q4_K_M"
    assert file_type_label(7) == "Q8_0"
    assert file_type_label(0) == "F32"
    assert file_type_label(1) == "F16"
    assert file_type_label(32) == "BF16"
    assert file_type_label(38) == "MXFP4_MOE"
    assert file_type_label(30) == "IQ4_XS"
    for unknown in (None, 4, 999, 1024, -1, True, "15", 15.0):
        assert file_type_label(unknown) is None


def test_labels_every_file_type_name_parses_back():
    from launcher.gguf import gguf_constants

    for member in gguf_constants.LlamaFileType:
        name = file_type_label(int(member))
        if name is None:
            continue
        assert labels.quant_label(f"Model-7B-{name}.gguf") == name
        assert labels.quant_label(f"model-7b-{name.lower()}.gguf") == name


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("model-00001-of-00003.gguf", ("model", 1, 3)),
        ("Q8_0/Kimi-K2-Q8_0-00003-of-00003.gguf", ("Kimi-K2-Q8_0", 3, 3)),
        ("a-b-c-00002-of-00010.gguf", ("a-b-c", 2, 10)),
        ("model-00000-of-00003.gguf", None),  # 1-based
        ("model-00004-of-00003.gguf", None),
        ("model-00001-of-00000.gguf", None),
        ("model-0001-of-0003.gguf", None),  # five digits
        ("model-00001-of-00003.gguf.part1of2", None),  # mradermacher's byte splits are no GGUF split
        ("model-00001-of-00003.bin", None),
        ("model.gguf", None),
    ],
)
def test_shards_parse_like_huggingface_js(name, parts):
    shard = labels.parse_shard(name)
    assert (None if shard is None else (shard.prefix, shard.index, shard.total)) == parts


def test_shards_name_their_siblings():
    shard = labels.parse_shard("x/m-Q4_K_M-00002-of-00004.gguf")
    assert shard is not None
    assert [shard.name(i) for i in (1, 4)] == ["m-Q4_K_M-00001-of-00004.gguf", "m-Q4_K_M-00004-of-00004.gguf"]


@pytest.mark.parametrize(
    ("name", "projector"),
    [
        ("mmproj-F16.gguf", True),
        ("mmproj-BF16.gguf", True),
        ("vision/mmproj-google_gemma-3-4b-it-f32.gguf", True),
        ("MMPROJ-model-f16.gguf", True),
        ("llava-v1.6-mistral-7b-mmproj-f16.gguf", True),
        ("model.mmproj.gguf", True),
        ("mmprojector.gguf", False),
        ("gemma-3-4b-it-Q4_K_M.gguf", False),
    ],
)
def test_projectors_by_name(name, projector):
    assert labels.is_projector_name(name) is projector


@pytest.mark.parametrize(
    ("name", "sidecar"),
    [
        ("mtp-Q8_0.gguf", True),
        ("imatrix.gguf", True),
        ("Qwen3-14B.imatrix.gguf", True),
        ("imatrix_unsloth.gguf", True),
        ("Qwen3-14B-Q4_K_M.gguf", False),
        ("mtproj-Q8_0.gguf", False),
    ],
)
def test_sidecars_by_name(name, sidecar):
    assert labels.is_sidecar_name(name) is sidecar


def test_projectors_by_header(tmp_path):
    (by_type,) = write_gguf(tmp_path / "a.gguf", arch="clip", values=[("general.type", "mmproj", None)])
    (by_key,) = write_gguf(tmp_path / "b.gguf", arch="llama", values=[("clip.has_vision_encoder", True, None)])
    (model,) = write_gguf(tmp_path / "c.gguf", arch="llama", values=[("general.type", "model", None)])
    assert labels.is_projector_header(read_header(by_type))
    assert labels.is_projector_header(read_header(by_key))
    assert not labels.is_projector_header(read_header(model))
