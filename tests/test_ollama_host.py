"""launcher.ollama_host: OLLAMA_HOST read as the official ollama-python client reads it (`_parse_host`)."""

from __future__ import annotations

import importlib

import pytest

from launcher.errors import BackendError
from launcher.ollama_host import DEFAULT_URL, ollama_base_url

# The spec: what ollama-python's `_parse_host` gives (checked against it below when `ollama` is importable).
AS_THE_OFFICIAL_CLIENT = [
    (None, "http://127.0.0.1:11434"),
    ("", "http://127.0.0.1:11434"),
    ("0.0.0.0", "http://0.0.0.0:11434"),  # dialled as written, as the official client does
    ("0.0.0.0:11434", "http://0.0.0.0:11434"),
    (":11434", "http://127.0.0.1:11434"),
    (":11435", "http://127.0.0.1:11435"),
    ("host", "http://host:11434"),
    ("example.com:8080", "http://example.com:8080"),
    ("http://h", "http://h:80"),
    ("http://h:8080", "http://h:8080"),
    ("https://h", "https://h:443"),
    ("https://h/path", "https://h:443/path"),
    ("https://h:1/ollama/", "https://h:1/ollama"),
    ("http://example.com/ollama/", "http://example.com:80/ollama"),
    ("example.com/", "http://example.com:11434"),
    ("example.com:56789/path/", "http://example.com:56789/path"),
    ("[::1]:11434", "http://[::1]:11434"),
    ("[::]:11434", "http://[::]:11434"),
    ("[0001:002:003:0004::1]", "http://[0001:002:003:0004::1]:11434"),
    ("https://[::1]:56789/path", "https://[::1]:56789/path"),
    ("1.2.3.4", "http://1.2.3.4:11434"),
]


class TestOllamaHost_Forms:
    @pytest.mark.parametrize(("value", "url"), AS_THE_OFFICIAL_CLIENT)
    def test_reads_each_form_as_the_official_client(self, value: str | None, url: str) -> None:
        assert ollama_base_url(value, env={}) == url

    @pytest.mark.parametrize(("value", "url"), AS_THE_OFFICIAL_CLIENT)
    def test_agrees_with_the_installed_official_client(self, value: str | None, url: str) -> None:
        try:
            client = importlib.import_module("ollama._client")
        except ImportError:
            pytest.skip("the ollama package is not installed: the table above is the spec")
        assert client._parse_host(value) == url == ollama_base_url(value, env={})

    def test_default_is_loopback(self) -> None:
        assert DEFAULT_URL == "http://127.0.0.1:11434"
        assert ollama_base_url(env={}) == DEFAULT_URL
        assert ollama_base_url("   ", env={}) == DEFAULT_URL

    def test_blanks_around_the_value_are_ignored(self) -> None:
        assert ollama_base_url(" host:1 \n", env={}) == "http://host:1"

    def test_scheme_is_case_insensitive(self) -> None:
        assert ollama_base_url("HTTPS://h", env={}) == "https://h:443"


class TestOllamaHost_Environment:
    def test_reads_ollama_host_when_no_value_is_given(self) -> None:
        assert ollama_base_url(env={"OLLAMA_HOST": "0.0.0.0:9999"}) == "http://0.0.0.0:9999"

    def test_a_value_wins_over_ollama_host(self) -> None:
        assert ollama_base_url("h:1", env={"OLLAMA_HOST": "other:2"}) == "http://h:1"

    def test_reads_the_process_environment_by_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("OLLAMA_HOST", ":9999")
        assert ollama_base_url() == "http://127.0.0.1:9999"
        monkeypatch.delenv("OLLAMA_HOST")
        assert ollama_base_url() == DEFAULT_URL


class TestOllamaHost_Errors:
    def test_a_bad_scheme_names_ollama_host_and_the_fix(self) -> None:
        with pytest.raises(BackendError) as info:
            ollama_base_url(env={"OLLAMA_HOST": "ftp://x"})
        assert str(info.value) == (
            "OLLAMA_HOST 'ftp://x' has scheme 'ftp'; use http:// or https:// (e.g. OLLAMA_HOST=http://127.0.0.1:11434)"
        )

    @pytest.mark.parametrize("value", ["host:port", "h:99999", "http://h:x/"])
    def test_a_port_that_is_not_a_number_is_refused(self, value: str) -> None:
        with pytest.raises(BackendError) as info:
            ollama_base_url(value, env={})
        assert str(info.value) == (
            f"OLLAMA_HOST {value!r} is not [scheme://]host[:port][/path] (e.g. OLLAMA_HOST=http://127.0.0.1:11434)"
        )
