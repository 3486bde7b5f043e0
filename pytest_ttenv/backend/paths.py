"""Where ttenv keeps things on this host: the image store, the state dir, the caches.

``TTENV_IMAGE_DIR`` / ``TTENV_STATE_DIR`` override the platformdirs defaults
(``~/.cache/ttenv/images`` and ``~/.local/state/ttenv``).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def image_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The image store: ``override``, else ``$TTENV_IMAGE_DIR``, else the user cache."""
    chosen = override or os.environ.get("TTENV_IMAGE_DIR")
    return Path(chosen) if chosen else Path(platformdirs.user_cache_dir("ttenv")) / "images"


def state_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The local backend's state (sqlite store, ENV run dirs, keys)."""
    chosen = override or os.environ.get("TTENV_STATE_DIR")
    return Path(chosen) if chosen else Path(platformdirs.user_state_dir("ttenv"))


def cache_dir() -> Path:
    """Small caches that may be dropped at any time (accelerator verdicts)."""
    return Path(platformdirs.user_cache_dir("ttenv"))
