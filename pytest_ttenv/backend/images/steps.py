"""What every stage of an image build does: run a tool with its output streamed as progress
lines (``run_step``), and read a file the builder puts into the guest (``guest_file``, package
data under ``guest/``).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from pytest_ttenv.errors import TTError

Progress = Callable[[str], None]


def guest_file(name: str) -> str:
    """The text of ``guest/<name>`` (units, sshd config, the initramfs ``/init``)."""
    text: str = resources.files("pytest_ttenv.backend.images").joinpath("guest").joinpath(name).read_text()
    return text


def run_step(argv: list[str], progress: Progress, what: str, cwd: Path | None = None) -> None:
    """Run a build step, streaming its output lines to ``progress``; TTError with the last 15
    lines if it fails."""
    tail: list[str] = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", cwd=cwd
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail = ([*tail, line])[-15:]
                progress("  " + line)
    if proc.returncode != 0:
        detail = "\n".join(tail)
        raise TTError(f"{what} failed (exit {proc.returncode}):\n{detail}")
