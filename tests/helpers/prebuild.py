"""Images that selected VM tests declare with ``@pytest.mark.needs_images(...)``, built in the
background from the end of collection.

A foreign arch's image bootstraps its second stage under qemu-user: minutes of one busy core per
image. Built when their tests ask, they run one after another and each delays its test; built here
two at a time while the unit tests run, they overlap each other and the unit tests. The ``images``
fixture waits for all of them before the first VM test gets its images: no VM test boots while a
bootstrap takes the cores (timing checks, like the dashboard's, stay as on a quiet host), and no
image is built twice.
Progress goes to a log file (a background thread's output would land in whichever test's capture
is open); a failed prebuild fails the tests that need the image with its error, not the session.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from pytest_ttenv.backend.images.build import ensure_images
from pytest_ttenv.backend.images.store import ImageStore

MARKER = "needs_images"
WORKERS = 2  # a qemu-user bootstrap keeps about one core busy: two at once on a 2-core host


def declared(items: Iterable[pytest.Item]) -> list[str]:
    """The image names the ``needs_images`` markers of ``items`` declare, in first-seen order."""
    names: dict[str, None] = {}
    for item in items:
        for mark in item.iter_markers(MARKER):
            names.update(dict.fromkeys(mark.args))
    return list(names)


class Prebuilds:
    """Background builds of ``names`` missing from ``store``, ``WORKERS`` at a time, logged to ``log``."""

    def __init__(self, store: ImageStore, names: Iterable[str], log: Path) -> None:
        self.store, self.log = store, log
        self._lock = threading.Lock()
        have = set(store.names())
        missing = [n for n in names if n not in have]
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="prebuild")
        self._futures: dict[str, Future[None]] = {n: self._pool.submit(self._build, n) for n in missing}

    @property
    def names(self) -> list[str]:
        return list(self._futures)

    def _line(self, name: str, text: str) -> None:
        with self._lock, self.log.open("a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {name}: {text}\n")

    def _build(self, name: str) -> None:
        started = time.monotonic()
        self._line(name, "building")
        try:
            ensure_images(self.store, [name], progress=lambda line: self._line(name, line))
        except BaseException as exc:
            self._line(name, f"FAILED: {exc}")
            raise
        self._line(name, f"built in {time.monotonic() - started:.0f} s")

    def wait_all(self, needed: Iterable[str]) -> None:
        """Block until every prebuild has ended, then raise the error of a failed prebuild among
        ``needed`` (a test that needs no failed image runs)."""
        pending = [n for n, f in self._futures.items() if not f.done()]
        if pending:
            print(f"waiting for the background builds of {', '.join(pending)} (log: {self.log})", flush=True)
        for name, future in self._futures.items():
            error = future.exception()
            if error is not None and name in needed:
                raise error

    def close(self) -> None:
        """Drop the builds not started; wait for the running ones (a half-built image is never
        installed, but its mmdebstrap must not outlive the session)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
