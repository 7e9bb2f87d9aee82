import pytest

from launcher.units import (
    GiB,
    MiB,
    OutOfRange,
    format_bytes,
    format_duration,
    parse_bytes,
    parse_context,
    parse_duration,
    parse_keep_alive,
)


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


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0), ("10m", 600.0), ("1h", 3600.0), ("1h30m", 5400.0), ("500ms", 0.5), ("2h45m30s", 9930.0),
        ("0", 0.0), ("0s", 0.0), ("90", 90.0), ("1.5h", 5400.0), (".5s", 0.5), ("1µs", 1e-6), ("1us", 1e-6),
        ("250ns", 2.5e-7), (" 5m ", 300.0), ("+5m", 300.0), (45, 45.0), (2.5, 2.5), (0, 0.0),
        ("87600h", 10 * 365 * 24 * 3600.0),
    ],
)  # fmt: skip
def test_units_parse_duration_takes_go_durations_and_seconds(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", "'soon' is not a duration; write it like 30s, 10m or 1h30m"),
        ("", "'' is not a duration; write it like 30s, 10m or 1h30m"),
        ("5m3", "'5m3' is not a duration; write it like 30s, 10m or 1h30m"),
        ("1 h", "'1 h' is not a duration; write it like 30s, 10m or 1h30m"),
        ("1h-5m", "'1h-5m' is not a duration; write it like 30s, 10m or 1h30m"),
        ("nan", "'nan' is not a duration; write it like 30s, 10m or 1h30m"),
        (float("nan"), "nan is not a duration; write it like 30s, 10m or 1h30m"),
        (True, "True is not a duration; write it like 30s, 10m or 1h30m"),
        ("-1", "duration must not be negative, got '-1'"),
        ("-5m", "duration must not be negative, got '-5m'"),
        (-3, "duration must not be negative, got -3"),
        ("87601h", "duration '87601h' is more than 10 years"),
        (float("inf"), "duration inf is more than 10 years"),
        ("9" * 400, "'99999999999999999999999999999999999...' is not a duration; write it like 30s, 10m or 1h30m"),
    ],
)
def test_units_parse_duration_refuses_in_one_line(value, message):
    with pytest.raises(ValueError) as caught:
        parse_duration(value)
    assert str(caught.value) == message
    assert isinstance(caught.value, OutOfRange) == ("10 years" in message)


@pytest.mark.parametrize(
    ("value", "seconds"), [("-1", None), (-1, None), ("-5m", None), ("0", 0.0), (0, 0.0), ("5m", 300.0), (300, 300.0)]
)
def test_units_parse_keep_alive_reads_negative_as_forever(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["forever", "-87601h", ""])
def test_units_parse_keep_alive_refuses_what_is_no_duration(value):
    with pytest.raises(ValueError, match="duration"):
        parse_keep_alive(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(30, "30s"), (600, "10m"), (5400, "1h30m"), (0, "0s"), (0.5, "500ms"), (3601, "1h1s"), (86400, "24h"),
     (9930, "2h45m30s"), (2.5e-7, "250ns"), (0.9996, "1s"), (1e-6, "1us")],
)  # fmt: skip
def test_units_format_duration_reads_back(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-3, abs=0.5 if seconds >= 1 else 0)


@pytest.mark.parametrize("seconds", [-1, float("nan"), 10 * 365 * 24 * 3600.0 + 1])
def test_units_format_duration_refuses_what_parse_duration_would(seconds):
    with pytest.raises(ValueError, match="0 to 10 years"):
        format_duration(seconds)
