"""The data of the command channel: where a VM is (`SshTarget`) and what a command did (`RunResult`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SshTarget:
    """Everything needed to reach one VM; `host_key` is its public host key as one OpenSSH line."""

    name: str
    host: str
    port: int
    user: str
    client_key: Path
    host_key: str


@dataclass(frozen=True, repr=False)
class RunResult:
    """What a command did; bytes are exact, `stdout`/`stderr` decode UTF-8 with replacement."""

    command: str
    exit_status: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration: float
    vm: str
    truncated: bool = False  # stdout or stderr went over max_output: its middle was dropped

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def __repr__(self) -> str:
        return (
            f"RunResult(vm={self.vm!r}, command={short(self.command)!r}, "
            f"exit_status={self.exit_status}, stdout={short(self.stdout)!r}, "
            f"stderr={short(self.stderr)!r}, duration={self.duration:.3f}"
            + (", truncated=True)" if self.truncated else ")")
        )


def short(text: str, limit: int = 200) -> str:
    """*text*, cut to *limit* characters (ending in "...") for one-line messages."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
