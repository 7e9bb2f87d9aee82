"""launcher.quants: labels, quality order, bits per weight, published figures and the planner's floors."""

from __future__ import annotations

import re

import pytest

from launcher import quants
from launcher.gguf import gguf_constants, read_header
from launcher.quants import (
    QUALITY_FLOORS,
    SOURCES,
    at_least,
    file_type_label,
    file_type_name,
    known_labels,
    normalize_label,
    quality_floor,
    quant_info,
    same_label,
)

BRIEF_LABELS = [
    "F32",
    "BF16",
    "F16",
    "Q8_0",
    "Q6_K",
    "Q5_K_M",
    "Q5_K_S",
    "Q5_1",
    "Q5_0",
    "Q4_K_M",
    "Q4_K_S",
    "Q4_1",
    "Q4_0",
    "IQ4_NL",
    "IQ4_XS",
    "MXFP4_MOE",
    "NVFP4",
    "Q3_K_L",
    "Q3_K_M",
    "Q3_K_S",
    "IQ3_M",
    "IQ3_S",
    "IQ3_XS",
    "IQ3_XXS",
    "Q2_K",
    "Q2_K_S",
    "IQ2_M",
    "IQ2_S",
    "IQ2_XS",
    "IQ2_XXS",
    "IQ1_M",
    "IQ1_S",
    "TQ1_0",
    "TQ2_0",
    "UD-Q2_K_XL",
    "UD-Q3_K_XL",
    "UD-Q4_K_XL",
    "UD-Q5_K_XL",
    "UD-Q6_K_XL",
    "UD-Q8_K_XL",
    "UD-IQ1_S",
    "UD-IQ1_M",
    "UD-IQ2_XXS",
    "UD-IQ2_M",
    "UD-IQ3_XXS",
    "UD-IQ4_XS",
    "MXFP4",
]

# Mean KLD vs FP16 on LLaMA-3-8B wikitext, llama.cpp tools/perplexity/README.md scoreboard: with a wikitext imatrix
# where the scoreboard has that figure, else without. Quality order must follow it.
SCOREBOARD_KLD = {
    "Q8_0": 0.001355,
    "Q6_K": 0.005452,
    "Q5_K_M": 0.010762,
    "Q5_K_S": 0.016595,
    "Q5_1": 0.018045,
    "Q5_0": 0.022239,
    "Q4_K_M": 0.028152,
    "Q4_K_S": 0.031951,
    "IQ4_NL": 0.035742,
    "IQ4_XS": 0.036334,
    "Q4_1": 0.071683,
    "Q4_0": 0.071940,
    "Q3_K_L": 0.073077,
    "Q3_K_M": 0.084358,
    "IQ3_M": 0.102534,
    "IQ3_S": 0.111278,
    "IQ3_XS": 0.138693,
    "IQ3_XXS": 0.183625,
    "Q3_K_S": 0.199821,
    "IQ2_M": 0.325989,
    "Q2_K": 0.332223,
    "Q2_K_S": 0.403360,
    "IQ2_S": 0.439197,
    "IQ2_XS": 0.546290,
    "IQ2_XXS": 0.812022,
    "IQ1_M": 1.393084,
    "IQ1_S": 2.211278,
}


def rank(label: str) -> float:
    return quant_info(label).rank


class TestQuants_Labels:
    @pytest.mark.parametrize("label", BRIEF_LABELS)
    def test_every_label_of_the_brief_is_known(self, label: str) -> None:
        info = quant_info(label)
        assert info.known
        assert info.rank > 0
        assert info.label == normalize_label(label)

    @pytest.mark.parametrize(
        ("text", "label"),
        [
            ("q4_k_m", "Q4_K_M"),
            (" Q8_0 ", "Q8_0"),
            ("fp16", "F16"),
            ("FP32", "F32"),
            ("bf16", "BF16"),
            ("q4_K", "Q4_K_M"),
            ("Q5_K", "Q5_K_M"),
            ("q3_k", "Q3_K_M"),
            ("mxfp4", "MXFP4_MOE"),
            ("MOSTLY_Q4_0", "Q4_0"),
            ("ALL_F32", "F32"),
            ("ud-q4_k_xl", "UD-Q4_K_XL"),
            ("UD_Q4_K_XL", "UD-Q4_K_XL"),
            ("iq2_xxs", "IQ2_XXS"),
            ("Q4-K-M", "Q4_K_M"),
        ],
    )
    def test_normalize_label(self, text: str, label: str) -> None:
        assert normalize_label(text) == label

    def test_normalize_label_refuses_an_empty_label(self) -> None:
        with pytest.raises(ValueError, match="empty quant label"):
            normalize_label("  ")

    def test_every_llama_file_type_has_a_known_label(self) -> None:
        for member in gguf_constants.LlamaFileType:
            if member.name == "GUESSED":
                assert file_type_label(int(member.value)) is None
                continue
            label = file_type_label(int(member.value))
            assert label is not None and quant_info(label).known, member.name

    def test_file_type_name_is_kept(self) -> None:
        assert file_type_name(15) == "Q4_K_M"
        assert file_type_name(0) == "ALL_F32"
        assert file_type_name(None) is None
        assert file_type_name(999) == "type 999"
        assert file_type_label(999) is None
        assert file_type_label(None) is None
        assert file_type_label(0) == "F32"

    @pytest.mark.parametrize(
        ("a", "b", "same"),
        [
            ("Q4_K_M", "q4_k_m", True),
            ("Q4_K_M", "q4_k", True),
            ("MXFP4", "mxfp4_moe", True),
            ("F16", "fp16", True),
            ("UD-Q4_K_XL", "ud_q4_k_xl", True),
            ("Q4_K_M", "Q4_K_S", False),
            ("UD-Q4_K_XL", "Q4_K_XL", False),
            ("", "Q4_K_M", False),
            ("", " ", True),
        ],
    )
    def test_same_label_compares_normalised_spellings(self, a: str, b: str, same: bool) -> None:
        assert same_label(a, b) is same
        assert same_label(b, a) is same

    def test_file_type_label_wants_an_integer(self) -> None:
        for not_an_int in (True, "15", 15.0):
            assert file_type_label(not_an_int) is None

    def test_known_labels_are_best_first_with_distinct_ranks(self) -> None:
        labels = known_labels()
        ranks = [rank(x) for x in labels]
        assert ranks == sorted(ranks, reverse=True)
        assert len(set(ranks)) == len(ranks)
        assert labels[0] == "F32"


class TestQuants_Order:
    def test_k_quant_ladder(self) -> None:
        ladder = ["F32", "BF16", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M"]
        ladder += ["Q2_K", "IQ1_M", "IQ1_S"]
        assert [rank(x) for x in ladder] == sorted((rank(x) for x in ladder), reverse=True)

    def test_order_follows_the_scoreboard_kld(self) -> None:
        by_rank = sorted(SCOREBOARD_KLD, key=rank, reverse=True)
        klds = [SCOREBOARD_KLD[x] for x in by_rank]
        assert klds == sorted(klds), by_rank

    def test_unsloth_xl_sits_above_its_k_quant_as_huggingface_js_does(self) -> None:
        assert rank("Q4_K_M") < rank("UD-Q4_K_XL") < rank("Q5_K_S")
        assert rank("UD-Q4_K_XL") == rank("Q4_K_XL")
        assert rank("Q8_0") < rank("UD-Q8_K_XL") < rank("F16")
        assert rank("Q6_K") < rank("UD-Q6_K_XL") < rank("Q8_0")
        assert rank("Q5_K_M") < rank("UD-Q5_K_XL") < rank("Q6_K")
        assert rank("Q3_K_L") < rank("UD-Q3_K_XL") < rank("NVFP4")
        assert rank("IQ2_M") < rank("UD-Q2_K_XL") < rank("Q3_K_S")

    def test_ud_and_l_variants_sit_half_a_step_above_their_base(self) -> None:
        assert rank("IQ2_M") < rank("UD-IQ2_M") < rank("UD-Q2_K_XL")
        assert rank("IQ1_S") < rank("UD-IQ1_S") < rank("IQ1_M")
        assert rank("Q6_K") < rank("Q6_K_L") < rank("Q6_K_XL")
        assert rank("Q5_K_M") < rank("Q5_K_L") < rank("Q5_K_XL")
        ud = quant_info("UD-IQ2_M")
        assert ud.kld is None and ud.nominal_bpw == quant_info("IQ2_M").nominal_bpw
        assert ud.ppl_note is not None and "Unsloth Dynamic" in ud.ppl_note

    def test_mxfp4_sits_after_the_legacy_4_bit_types(self) -> None:
        assert rank("Q3_K_XL") < rank("NVFP4") < rank("MXFP4_MOE") < rank("Q4_0")
        assert quant_info("MXFP4") == quant_info("MXFP4_MOE")


class TestQuants_Figures:
    def test_every_kld_names_its_model_data_and_source(self) -> None:
        with_kld = [x for x in known_labels() if quant_info(x).kld is not None]
        assert len(with_kld) >= 27
        for label in with_kld:
            source = quant_info(label).kld_source
            assert source is not None
            assert "LLaMA-3-8B" in source and "wikitext" in source and "https://" in source, label

    def test_published_figures(self) -> None:
        q4 = quant_info("Q4_K_M")
        assert (q4.kld, q4.nominal_bpw) == (0.031273, 4.8944)
        assert q4.kld_source is not None and "no imatrix" in q4.kld_source and "PR #6936" in q4.kld_source
        assert q4.ppl_note is not None and "+0.1755" in q4.ppl_note and "4.58G" in q4.ppl_note
        iq2 = quant_info("IQ2_XXS")
        assert iq2.kld == 0.812022 and iq2.kld_source is not None and "wikitext imatrix" in iq2.kld_source
        assert quant_info("BF16").kld == 0.000025
        assert quant_info("F16").kld is None

    def test_every_note_cites_a_known_source(self) -> None:
        ids = set(SOURCES)
        for label in known_labels():
            note = quant_info(label).ppl_note
            assert note, label
            cited = set(re.findall(r"[a-z][a-z0-9_]+", note)) & ids
            assert cited or "Artefact2" in note, label
        for text in SOURCES.values():
            assert text.strip()

    def test_nominal_bpw_falls_with_rank_along_the_k_ladder(self) -> None:
        ladder = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
        bpw = [quant_info(x).nominal_bpw for x in ladder]
        assert all(b is not None for b in bpw)
        assert bpw == sorted(bpw, reverse=True)  # type: ignore[type-var]


class TestQuants_Unknown:
    def test_unknown_label_without_bpw_ranks_below_everything(self) -> None:
        info = quant_info("Q7_FANCY")
        assert (info.label, info.known, info.rank, info.nominal_bpw, info.kld) == ("Q7_FANCY", False, 0.0, None, None)
        assert info.rank < min(rank(x) for x in known_labels())

    def test_unknown_label_is_ranked_by_measured_bpw(self) -> None:
        at_q4 = quant_info("Q7_FANCY", bits_per_weight=4.8944)
        assert not at_q4.known
        assert at_q4.rank == pytest.approx(rank("Q4_K_M"))
        between = quant_info("Q7_FANCY", bits_per_weight=5.3).rank
        assert rank("Q4_K_M") < between < rank("Q5_0")
        assert quant_info("X", bits_per_weight=64).rank == rank("F32")
        tiny = quant_info("X", bits_per_weight=1.0).rank
        assert 0 < tiny < rank("IQ1_S")

    def test_rank_by_bpw_never_falls_as_bpw_grows(self) -> None:
        grid = [0.5 + 0.05 * i for i in range(700)]
        ranks = [quant_info("X", bits_per_weight=b).rank for b in grid]
        assert ranks == sorted(ranks)

    def test_known_label_ignores_bits_per_weight(self) -> None:
        assert quant_info("Q4_K_M", bits_per_weight=2.0) == quant_info("Q4_K_M")


class TestQuants_Floors:
    @pytest.mark.parametrize(
        ("n_params", "floor"),
        [
            (270_000_000, "Q4_K_M"),
            (8_030_000_000, "Q4_K_M"),
            (9_999_999_999, "Q4_K_M"),
            (10_000_000_000, "Q3_K_M"),
            (32_800_000_000, "Q3_K_M"),
            (35_000_000_000, "Q2_K"),
            (120_000_000_000, "Q2_K"),
            (150_000_000_000, "IQ1_M"),
            (671_000_000_000, "IQ1_M"),
        ],
    )
    def test_quality_floor(self, n_params: int, floor: str) -> None:
        assert quality_floor(n_params) == floor

    def test_floors_are_known_and_fall_with_size(self) -> None:
        labels = [label for _, label in QUALITY_FLOORS]
        assert all(quant_info(x).known for x in labels)
        assert [rank(x) for x in labels] == sorted((rank(x) for x in labels), reverse=True)

    def test_at_least(self) -> None:
        small = quality_floor(8_000_000_000)
        assert at_least("Q4_K_M", small)
        assert at_least("UD-Q4_K_XL", small)
        assert at_least("q8_0", small)
        assert not at_least("Q4_K_S", small)
        assert not at_least("IQ4_XS", small)
        huge = quality_floor(671_000_000_000)
        assert at_least("IQ1_M", huge) and not at_least("IQ1_S", huge)
        assert not at_least("Q7_FANCY", small)
        assert at_least("Q7_FANCY", small, bits_per_weight=6.0)


def test_quants_labels_of_the_corpus_files_are_known(corpus) -> None:
    for m in corpus:
        header = read_header(m.path)
        label = file_type_label(header.get("general.file_type"))
        assert label == normalize_label(m.quant), m.path
        info = quant_info(label)
        assert info.known
        bpw = header.tensor_bytes_total * 8 / header.n_params
        assert quant_info("NOT_A_QUANT", bpw).rank > 0


def test_quants_data_file_is_consistent() -> None:
    table = quants._table()
    assert set(table["order"]) == set(table["quants"])
    assert len(table["order"]) == len(set(table["order"]))
    for label, entry in table["quants"].items():
        assert entry.get("bpw_source", "ggml_type") in SOURCES, label
        if entry.get("kld") is not None:
            assert entry["kld_source"] in SOURCES and entry["kld_setting"], label
