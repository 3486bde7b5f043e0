"""The command channel's errors: `SshError` (a `TTError`) and its kinds; then the internal signals
the channel's modules pass each other, which `Connection` turns into those errors (never raised to a
caller)."""

from __future__ import annotations

from typing import Any

from pytest_ttenv.errors import TTError
from pytest_ttenv.ssh.results import RunResult, short


class SshError(TTError):
    """Base of the command channel's errors; `str()` is one line that starts with the VM's name."""

    def __init__(self, message: str, *, vm: str = "") -> None:
        super().__init__(message)
        self.vm = vm


class HostKeyMismatch(SshError):
    """The server presented a host key other than `SshTarget.host_key`."""


class Unreachable(SshError):
    """No working SSH session: refused, no banner, login refused, timed out, or connection lost."""


class CommandTimeout(SshError):
    """The command outlived its timeout; its process group was killed. Partial output attached."""

    def __init__(
        self,
        message: str,
        *,
        vm: str = "",
        command: str = "",
        timeout: float = 0.0,
        stdout_bytes: bytes = b"",
        stderr_bytes: bytes = b"",
    ) -> None:
        super().__init__(message, vm=vm)
        self.command = command
        self.timeout = timeout
        self.stdout_bytes = stdout_bytes
        self.stderr_bytes = stderr_bytes


class LimitExceeded(SshError):
    """The guest sent more than a cap allows (get: bytes or entries; read_text: size)."""


class ProtocolError(SshError):
    """The far side broke the agent protocol (oversized or unknown frame, bad EXIT, stray reply).

    The command's fate is unknown; the agent is not used again on that connection."""


class CommandFailed(SshError):
    """A `check=True` command exited non-zero; `.result` is its RunResult."""

    def __init__(self, result: RunResult) -> None:
        tail = [line.strip() for line in result.stderr.strip().splitlines()[-5:] if line.strip()]
        message = f"{result.vm}: command {short(result.command)!r} failed with exit status {result.exit_status}"
        if tail:
            message += "; stderr: " + short(" | ".join(tail), 500)
        super().__init__(message, vm=result.vm)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return (CommandFailed, (self.result,))


# -- internal signals ------------------------------------------------------------------------


class Lost(Exception):
    """The connection or the agent went away; `sent`: the command may have started."""

    def __init__(self, why: str, *, sent: bool) -> None:
        super().__init__(why)
        self.sent = sent


class TimedOut(Exception):
    """A command outlived its timeout and was killed; the output captured until then."""

    def __init__(self, stdout: bytes, stderr: bytes) -> None:
        super().__init__("timed out")
        self.stdout = stdout
        self.stderr = stderr


class Broken(Exception):
    """The agent broke the protocol; its channel was closed."""


class Refused(Exception):
    """A transfer stopped on purpose (a cap, a conflict); the message is for the user."""

    def __init__(self, message: str, *, limit: bool = False) -> None:
        super().__init__(message)
        self.limit = limit
