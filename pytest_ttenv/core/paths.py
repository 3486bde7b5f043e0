"""Where ttenv keeps things on this host: the image store, the state dir, the caches.

``TTENV_IMAGE_DIR`` / ``TTENV_STATE_DIR`` override the platformdirs defaults
(``~/.cache/ttenv/images`` and ``~/.local/state/ttenv``).
"""

from __future__ import annotations

import json
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


def is_private_dir(path: Path) -> bool:
    """True if ``path`` is a real directory (not a symlink) of this user that no one else may enter."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not stat.S_IMODE(st.st_mode) & 0o077


def runtime_candidates() -> list[Path]:
    """Where this user's runtime dir may be, preferred first: ``$XDG_RUNTIME_DIR/ttenv`` when
    ``$XDG_RUNTIME_DIR`` is a private directory of this user (after ``su`` it may be another
    user's: then it is not used), and ``$TMPDIR/ttenv-<uid>``."""
    found = []
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and is_private_dir(Path(xdg)):
        found.append(Path(xdg) / "ttenv")
    found.append(Path(tempfile.gettempdir()) / f"ttenv-{os.getuid()}")
    return found


def runtime_dir() -> Path:
    """A short private directory for unix sockets (their paths are limited to 107 bytes).

    ``$XDG_RUNTIME_DIR/ttenv`` (see ``runtime_candidates``), else ``$TMPDIR/ttenv-<uid>``; created
    0700. One that exists but is a symlink, not ours or open to others (another local user may
    create ``/tmp/ttenv-<uid>`` first) is refused with one line - never used, never chmod-ed.
    """
    path = runtime_candidates()[0]
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    if not is_private_dir(path):
        raise TTError(
            f"{path} is not a private directory of this user (mode 0700, owned by uid {os.getuid()})",
            "remove it, or set TMPDIR (or XDG_RUNTIME_DIR) to a directory only you can write",
        )
    return path


def socket_dir(env_id: str) -> Path:
    """ENV ``env_id``'s socket dir: in whichever runtime dir candidate holds it (processes of one
    user may differ in ``$XDG_RUNTIME_DIR``: a cron job, ``su``), else in ``runtime_dir()``."""
    for candidate in runtime_candidates():
        if is_private_dir(candidate) and (candidate / env_id).is_dir():
            return candidate / env_id
    return runtime_dir() / env_id


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) mode 0700; an existing one of ours that others may
    read is tightened to 0700 (state dirs made by older versions were 0755)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        path.chmod(0o700)
    return path


def write_private(path: Path, text: str | bytes) -> None:
    """Write ``path`` created mode 0600 (never briefly readable by others, whatever the umask);
    an existing file is replaced."""
    data = text.encode() if isinstance(text, str) else text
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as f:
        f.write(data)


def write_json_atomic(path: Path, data: object) -> None:
    """Write ``data`` as JSON to ``path`` so readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
