"""Where umm keeps its data: one directory per user (``UMM_HOME`` overrides it)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def home() -> Path:
    """The umm data directory: ``$UMM_HOME`` or the user's cache dir (``~/.cache/umm`` on Linux)."""
    env = os.environ.get("UMM_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("umm"))


def experts_dir() -> Path:
    """Cache of the tiny expert suite built by ``umm experts prepare``."""
    return home() / "experts"
