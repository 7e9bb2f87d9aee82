import pytest

from launcher.units import GiB, MiB, OutOfRange, format_bytes, parse_bytes, parse_context


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


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1024TiB", 1024**5), ("1125899906842624", 1024**5), ("0.5", 0), ("1.25KiB", 1280), ("3.3333GiB", 3579103621)],
)
def test_units_parse_bytes_is_exact_up_to_1_pib(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "99999999999999999999999GiB",
            "'99999999999999999999999GiB' is more than 1 PiB; no machine has that much memory",
        ),
        ("1025TiB", "'1025TiB' is more than 1 PiB; no machine has that much memory"),
        ("1125899906842625", "'1125899906842625' is more than 1 PiB; no machine has that much memory"),
        ("9" * 400, "'99999999999999999999999999999999999...' is not a size; write it like 24GiB, 12GB or 512MiB"),
    ],
)
def test_units_parse_bytes_refuses_absurd_sizes_in_one_short_line(text, message):
    with pytest.raises(OutOfRange if "PiB" in message else ValueError) as caught:
        parse_bytes(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(("text", "expected"), [("16M", 2**24), (2**24, 2**24), ("16384k", 2**24)])
def test_units_parse_context_takes_up_to_16m_tokens(text, expected):
    assert parse_context(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("99999999999999999999", "context length '99999999999999999999' is too large: at most 16777216 tokens (16M)"),
        (99999999999999999999, "context length 99999999999999999999 is too large: at most 16777216 tokens (16M)"),
        ("16.01M", "context length '16.01M' is too large: at most 16777216 tokens (16M)"),
        (2**24 + 1, "context length 16777217 is too large: at most 16777216 tokens (16M)"),
        ("9" * 5000, "'99999999999999999999999999999999999...' is not a context length; write it like 32768, 32k or 128K"),
    ],
)  # fmt: skip
def test_units_parse_context_refuses_absurd_contexts_in_one_short_line(text, message):
    with pytest.raises(ValueError) as caught:
        parse_context(text)
    assert str(caught.value) == message
