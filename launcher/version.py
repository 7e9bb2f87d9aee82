"""fitquant's version, in a leaf module: `launcher.__version__` and launcher.http's user agent both read it, and
launcher.http must not import the package namespace (whose helpers import launcher.http). llama-cpp-python's
version too: the llama.cpp builds and the host's cached speed figures are both keyed by it."""

from __future__ import annotations

__version__ = "0.1.0"


def llama_cpp_python_version() -> str | None:
    """The version of llama-cpp-python installed beside fitquant, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None
