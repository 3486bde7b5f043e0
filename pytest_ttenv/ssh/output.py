"""Where a command's output goes, bounded whatever the guest sends: memory (head and tail kept up to a
cap, `Capture`) or a local file (`open_output`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO

MiB = 1 << 20
DEFAULT_MAX_OUTPUT = 64 * MiB  # per stream (stdout, stderr) kept in memory by run()


class Capture:
    """One output stream of one command, bounded: written to *file*, or kept in memory whole up
    to *cap* bytes, beyond that only its first cap // 2 and its last cap - cap // 2 bytes."""

    __slots__ = ("error", "file", "head", "head_cap", "tail", "tail_cap", "total")

    def __init__(self, cap: int, file: IO[bytes] | None = None) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.head_cap = cap // 2
        self.tail_cap = cap - cap // 2
        self.total = 0
        self.file = file
        self.error: OSError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.total += len(data)
        if self.file is not None:
            if self.error is None:
                try:
                    self.file.write(data)
                except OSError as e:
                    self.error = e
            return
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            if len(data) <= room:
                return
            data = data[room:]
        self.tail += data
        excess = len(self.tail) - self.tail_cap
        if excess > 0:
            del self.tail[:excess]  # bytearray drops its front in O(1) amortized

    @property
    def truncated(self) -> bool:
        return self.file is None and self.total > self.head_cap + self.tail_cap

    def value(self) -> bytes:
        """What was kept (b"" when written to a file); frees the buffers."""
        head, self.head = self.head, bytearray()
        head += self.tail
        self.tail = bytearray()
        return bytes(head)


@contextlib.contextmanager
def open_output(path: str | os.PathLike[str] | None, what: str) -> Iterator[IO[bytes] | None]:
    """A local file for a command's *what* (stdout/stderr), created or truncated; None: no file."""
    if path is None:
        yield None
        return
    try:
        f = open(path, "wb")
    except OSError as e:
        raise ValueError(f"cannot open {what} file {os.fspath(path)!r}: {e.strerror or e}") from None
    try:
        yield f
    finally:
        f.close()
