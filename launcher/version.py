"""fitquant's version, in a leaf module: `launcher.__version__` and launcher.http's user agent both read it, and
launcher.http must not import the package namespace (whose helpers import launcher.http)."""

from __future__ import annotations

__version__ = "0.1.0"
