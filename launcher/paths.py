"""Where fitquant keeps its files: FITQUANT_HOME when set, else the platform's cache/config dirs."""

from __future__ import annotations

import os
from pathlib import Path


def fitquant_home() -> Path | None:
    """FITQUANT_HOME, when set (tests and portable installs put everything under it)."""
    value = os.environ.get("FITQUANT_HOME")
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """Cache for assembled models, parsed headers and listings."""
    home = fitquant_home()
    if home is not None:
        return home / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir("fitquant"))


def config_dir() -> Path:
    """Machine profiles and settings."""
    home = fitquant_home()
    if home is not None:
        return home / "config"
    import platformdirs

    return Path(platformdirs.user_config_dir("fitquant"))


def state_dir() -> Path:
    """What fitquant started and what it measured: instance records, server logs, per-machine records."""
    home = fitquant_home()
    if home is not None:
        return home / "state"
    import platformdirs

    return Path(platformdirs.user_state_dir("fitquant"))
