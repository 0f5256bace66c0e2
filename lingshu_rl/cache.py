"""Where the package keeps what it builds (the tiny models, generated images): ``$LINGSHU_CACHE`` or
``~/.cache/lingshu_rl``."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    env = os.environ.get("LINGSHU_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lingshu_rl"
