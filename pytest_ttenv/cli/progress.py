"""A download's progress bar: tqdm's, when tqdm is installed and stdout is a sized terminal;
otherwise none (the command's progress lines say enough)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def sized_terminal() -> bool:
    """stdout is a terminal with a size (a bar on a 0x0 pseudo-terminal shows nothing)."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return sys.stdout.isatty() and size.columns > 0 and size.lines > 0


class ByteBar:
    """A tqdm progress bar for the download of ``name``, shown from the first ``update``.
    ``usable`` is False without tqdm; ``close`` may be called any number of times."""

    def __init__(self, name: str) -> None:
        try:
            self._tqdm: Any = importlib.import_module("tqdm").tqdm
        except ImportError:
            self._tqdm = None
        self.name = name
        self.bar: Any = None

    @property
    def usable(self) -> bool:
        return self._tqdm is not None

    def update(self, done: int, total: int | None) -> None:
        """``done`` of ``total`` bytes (None: unknown) are in; the bar closes at the total."""
        if self.bar is None:
            self.bar = self._tqdm(
                total=total,
                initial=done,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=self.name,
                leave=True,
                file=sys.stdout,
            )
        self.bar.update(done - self.bar.n)
        if total is not None and done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
