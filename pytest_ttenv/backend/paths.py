"""Where ttenv keeps things on this host: the image store, the state dir, the caches.

``TTENV_IMAGE_DIR`` / ``TTENV_STATE_DIR`` override the platformdirs defaults
(``~/.cache/ttenv/images`` and ``~/.local/state/ttenv``).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import platformdirs

from pytest_ttenv.errors import TTError


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


def runtime_dir() -> Path:
    """A short private directory for unix sockets (their paths are limited to 107 bytes).

    ``$TMPDIR/ttenv-<uid>``, created 0700; refuses one that is a symlink or not ours.
    """
    path = Path(tempfile.gettempdir()) / f"ttenv-{os.getuid()}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise TTError(f"{path} is not a private directory of this user", "remove it or set TMPDIR elsewhere")
    return path
