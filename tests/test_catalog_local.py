"""launcher.catalog.local (and the local references of launcher.catalog): files, split sets, folders of quants."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from gguf_factory import QT, write_gguf

from launcher import catalog
from launcher.catalog import local
from launcher.errors import CatalogError
from launcher.gguf import read_header

FAMILY = "tiny-llama"


@pytest.fixture
def ladder(corpus, tmp_path) -> Path:
    """A folder holding one corpus family's quant ladder under its corpus names."""
    folder = tmp_path / "models"
    folder.mkdir()
    for m in corpus:
        if m.family_name == FAMILY:
            shutil.copy(m.path, folder / m.path.name)
    return folder


def _split(folder: Path, name: str = "split-Q8_0.gguf", file_type: int = 7) -> list[Path]:
    return write_gguf(
        folder / name,
        values=[("general.file_type", file_type, None)],
        tensors=[("token_embd.weight", (4, 256), QT.Q8_0), ("blk.0.attn_q.weight", (4, 256), QT.Q8_0),
                 ("output_norm.weight", (256,), QT.F32)],
        split_max_tensors=1,
    )  # fmt: skip


def _projector(path: Path) -> Path:
    (p,) = write_gguf(
        path, arch="clip", values=[("general.type", "mmproj", None), ("clip.has_vision_encoder", True, None)]
    )
    return p


def test_local_folder_gives_one_candidate_per_quant(corpus, ladder):
    found = local.list_candidates(ladder)
    expected = {m.quant: m.path for m in corpus if m.family_name == FAMILY}
    assert sorted(c.quant for c in found) == sorted(expected)
    assert [c.size_bytes for c in found] == sorted((c.size_bytes for c in found), reverse=True)
    for c in found:
        assert c.source == "local" and c.model == str(ladder) and c.projector is None and c.notes == ()
        (f,) = c.files
        assert f.local_path == str(ladder / f.name) and f.url is None and f.sha256 is None
        assert f.size_bytes == expected[c.quant].stat().st_size
        ref = read_header(expected[c.quant])
        assert c.header is not None
        assert (c.header.metadata, c.header.tensors) == (ref.metadata, ref.tensors)
        assert c.bits_per_weight == pytest.approx(ref.tensor_bytes_total * 8 / ref.n_params)


def test_local_single_file(corpus):
    m = next(m for m in corpus if m.family_name == FAMILY and m.quant == "Q4_K_M")
    (c,) = local.list_candidates(m.path)
    assert (c.quant, c.size_bytes, c.files[0].local_path) == ("Q4_K_M", m.path.stat().st_size, str(m.path))
    assert c.header is not None and c.header.get("general.file_type") == 15


def test_local_unnamed_file_is_labelled_by_its_header(corpus, tmp_path):
    m = next(m for m in corpus if m.family_name == FAMILY and m.quant == "Q6_K")
    path = tmp_path / "weights.gguf"
    shutil.copy(m.path, path)
    (c,) = local.list_candidates(path)
    assert c.quant == "Q6_K"


def test_local_split_set_from_any_shard(tmp_path):
    paths = _split(tmp_path)
    for given in paths:
        (c,) = local.list_candidates(given)
        assert [f.name for f in c.files] == [p.name for p in paths]
        assert c.size_bytes == sum(p.stat().st_size for p in paths)
        assert c.quant == "Q8_0"
        assert c.header is not None and len(c.header.tensors) == 3


def test_local_split_set_with_a_missing_shard_is_refused(tmp_path):
    paths = _split(tmp_path)
    paths[1].unlink()
    with pytest.raises(CatalogError) as err:
        local.list_candidates(paths[0], model="m")
    assert str(err.value) == "m: split set of 3 files is missing 1 of them (split-Q8_0-00002-of-00003.gguf first)"


def test_local_folder_groups_shards_reads_per_quant_folders_and_attaches_the_projector(ladder):
    (ladder / "Q8_0").mkdir()
    _split(ladder / "Q8_0", name="big.gguf")  # a per-quant folder names the split set
    _projector(ladder / "mmproj-F16.gguf")
    _projector(ladder / "mmproj-F32.gguf")
    (ladder / "imatrix.gguf").write_bytes(b"not even a GGUF")
    deep = ladder / "a" / "b"
    deep.mkdir(parents=True)
    _split(deep, name="too-deep-Q2_K.gguf")
    found = local.list_candidates(ladder)
    split = [c for c in found if len(c.files) > 1]
    assert [(c.quant, len(c.files)) for c in split] == [("Q8_0", 3)]
    assert all(c.projector is not None and c.projector.name == "mmproj-F16.gguf" for c in found)
    assert not any("mmproj" in f.name or "imatrix" in f.name or "too-deep" in f.name for c in found for f in c.files)
    assert len(found) == 10  # the 9 corpus quants and the split set


def test_local_folder_leaves_out_incomplete_split_sets_with_a_note(ladder):
    paths = _split(ladder, name="broken-Q8_0.gguf")
    paths[2].unlink()
    found = local.list_candidates(ladder)
    assert len(found) == 9
    note = (
        f"{ladder}/broken-Q8_0-00001-of-00003.gguf: split set of 3 files is missing 1 of them (shard 3 first); left out"
    )
    assert all(c.notes == (note,) for c in found)


def test_local_folder_keeps_the_rest_when_one_file_is_corrupt(ladder):
    (ladder / "junk-Q2_K_S.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    found = local.list_candidates(ladder)
    junk = next(c for c in found if c.quant == "Q2_K_S")
    assert junk.header is None
    assert junk.notes[0].startswith(f"header unreadable: {ladder}/junk-Q2_K_S.gguf at byte 8: read tensor count:")
    assert sum(c.header is not None for c in found) == 9


def test_local_quant_filter(ladder):
    (c,) = local.list_candidates(ladder, quant="q4_k_m")
    assert c.quant == "Q4_K_M"
    (c,) = local.list_candidates(ladder, quant="q4_k")  # one normaliser (launcher.quants): Q4_K is Q4_K_M
    assert c.quant == "Q4_K_M"
    with pytest.raises(CatalogError) as err:
        local.list_candidates(ladder, quant="Q9_K", model="models")
    assert (
        str(err.value)
        == "models: no quant Q9_K here; available: F16, IQ4_XS, Q2_K, Q3_K_M, Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0"
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, "{d}: the folder holds no GGUF files"),
        (lambda d: _projector(d / "mmproj-F16.gguf"), "{d}: the folder holds only vision projectors (mmproj)"),
        (
            lambda d: (d / "x.gguf").write_bytes(b"nope"),
            "{d}: {d}/x.gguf at byte 0: read magic: not a GGUF file: magic is b'nope', expected b'GGUF'",
        ),
    ],
)
def test_local_folder_errors(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(CatalogError) as err:
        local.list_candidates(tmp_path)
    assert str(err.value) == message.format(d=tmp_path)


def test_local_projector_given_as_the_model_is_refused(tmp_path):
    for path in (_projector(tmp_path / "mmproj-F16.gguf"), _projector(tmp_path / "vision.gguf")):
        with pytest.raises(CatalogError) as err:
            local.list_candidates(path, model="p")
        assert str(err.value) == f"p: {path.name} is a vision projector (mmproj), not a model"


# ---------------------------------------------------------------------------------------------------------------
# Through the catalog entry point


def test_local_references_through_list_candidates(ladder, monkeypatch):
    assert len(catalog.list_candidates(str(ladder))) == 9
    (c,) = catalog.list_candidates(f"{ladder}:Q4_K_M")
    assert (c.quant, c.model) == ("Q4_K_M", f"{ladder}:Q4_K_M")
    monkeypatch.chdir(ladder.parent)
    (c,) = catalog.list_candidates("./models/tiny-llama-Q8_0.gguf")
    assert (c.quant, c.model) == ("Q8_0", "./models/tiny-llama-Q8_0.gguf")
    assert len(catalog.list_candidates("models")) == 9  # an existing folder wins over an Ollama name


def test_local_missing_path_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for ref in ("./nope.gguf", "nope.gguf", "/no/such/dir/", "~/no-such-model.gguf"):
        with pytest.raises(CatalogError) as err:
            catalog.list_candidates(ref)
        assert str(err.value) == f"{ref}: no such file or folder"


def test_local_corrupt_file_through_list_candidates(tmp_path):
    path = tmp_path / "bad-Q4_K_M.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(CatalogError) as err:
        catalog.list_candidates(str(path))
    assert str(err.value) == (
        f"{path}: {path} at byte 8: read tensor count: truncated: need 8 bytes, only 0 remain before the end of the file (8 bytes)"
    )


def test_local_embedded_default_when_no_model_is_given(corpus, monkeypatch):
    import launcher.embedded

    m = next(m for m in corpus if m.family_name == FAMILY and m.quant == "Q4_K_M")
    monkeypatch.setattr(launcher.embedded, "embedded_model_path", lambda: m.path)
    (c,) = catalog.list_candidates(None)
    assert (c.quant, c.source, c.model) == ("Q4_K_M", "local", str(m.path))
