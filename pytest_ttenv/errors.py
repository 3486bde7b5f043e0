"""Errors that reach the user as one clear line (what is wrong, what to do).

``TTError`` is the one root: the command channel's ``pytest_ttenv.ssh.SshError`` derives from it too."""

from __future__ import annotations


class TTError(Exception):
    """A failure the user can act on; ``str()`` is the one line to print.

    ``exit_code`` follows the CLI convention: 1 runtime failure, 2 usage error.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class UsageError(TTError):
    """Bad input: a name, prefix, size or option that cannot be used."""

    exit_code = 2


class NotFound(TTError):
    """A named ENV, VM or image does not exist."""

    exit_code = 2


class QuotaError(TTError):
    """A request does not fit the host server's free resources; ``free`` says what is free
    (``cpu``, ``mem_mib``, ``disk_mib``). Nothing was created."""

    def __init__(self, message: str, free: dict[str, int] | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.free = dict(free or {})


class BootError(TTError):
    """A VM did not come up: qemu exited or SSH never answered before the timeout."""

    def __init__(self, message: str, console_tail: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.console_tail = console_tail


class VmDied(BootError):
    """A VM that was up is gone (qemu exited, the guest powered off or panicked)."""


def from_os_error(exc: OSError, doing: str) -> TTError:
    """One line for a failed file operation: what we were doing, why, and what to do."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    hint = {
        errno.ENOSPC: "free disk space, or point TTENV_STATE_DIR / TTENV_IMAGE_DIR elsewhere",
        errno.EDQUOT: "free disk space, or point TTENV_STATE_DIR / TTENV_IMAGE_DIR elsewhere",
        errno.EACCES: "check permissions, or point TTENV_STATE_DIR / TTENV_IMAGE_DIR elsewhere",
        errno.EROFS: "the file system is read-only: point TTENV_STATE_DIR / TTENV_IMAGE_DIR elsewhere",
    }.get(exc.errno or 0)
    return TTError(f"cannot {doing}: {exc.strerror or exc}{where}", hint)
