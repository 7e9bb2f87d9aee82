import pytest

from launcher.units import GiB, MiB, format_bytes, parse_bytes, parse_context


@pytest.mark.parametrize(
    ("text", "expected"),
    [("32768", 32768), ("32k", 32768), ("128K", 131072), ("1M", 1048576), ("4096", 4096), (8192, 8192)],
)
def test_units_parse_context_accepts_plain_and_k_suffixes(text, expected):
    assert parse_context(text) == expected


@pytest.mark.parametrize("text", ["", "32kb", "-5", "0", "abc", "1.5.2k"])
def test_units_parse_context_rejects_nonsense_with_a_hint(text):
    with pytest.raises(ValueError, match="context"):
        parse_context(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24GiB", 24 * GiB), ("12GB", 12 * 10**9), ("512MiB", 512 * MiB), ("1.5G", int(1.5 * GiB)), ("100", 100)],
)
def test_units_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["12XB", "", "GiB", "-1GiB"])
def test_units_parse_bytes_rejects_bad_sizes(text):
    with pytest.raises(ValueError, match="like 24GiB"):
        parse_bytes(text)


def test_units_format_bytes_uses_binary_units():
    assert format_bytes(int(23.6 * GiB)) == "23.6 GiB"
    assert format_bytes(512 * MiB) == "512.0 MiB"
    assert format_bytes(17) == "17 B"
