"""Starting VMs later: those that wait (``base.waiting``) for something slow their engine makes
first (a warm template) are started once it is made, or without it if making it failed.

One thread per thing being made (the VMs that need it wait for it together); the VMs are then
started from one long-lived thread per ``StartLater``: VMs started to die with their owner get
PDEATHSIG, which follows the thread that forked them, so they are never started from the
short-lived thread that made what they waited for. Each start is made under the job's
``resume()`` (the backend's guard: its ENV is not deleted meanwhile) and a failure fails the VM.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from pytest_ttenv.backend.engines.base import Start

T = TypeVar("T")


class StartLater:
    """Starts waiting VMs once what they wait for is made (see the module doc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.Queue[Callable[[], None]] | None = None

    def after(
        self, what: str, jobs: Sequence[Start], make: Callable[[], T], start: Callable[[Start, T | None, str], None]
    ) -> None:
        """Returns at once. In a thread named ``ttenv-<what>``: ``make()``; then for each job, on the
        starter thread and under ``job.resume()``: ``start(job, made, '')``, or ``start(job, None,
        why)`` with the first line of why ``make`` failed. A ``start`` that raises fails its VM."""
        args = (list(jobs), make, start)
        threading.Thread(target=self._make, args=args, name=f"ttenv-{what}", daemon=True).start()

    def _make(self, jobs: list[Start], make: Callable[[], T], start: Callable[[Start, T | None, str], None]) -> None:
        made, why = None, ""
        try:
            made = make()
        except Exception as exc:  # noqa: BLE001 - any failure: the VMs start without it, saying why
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        for job in jobs:
            self._submit(functools.partial(_start, job, made, why, start))

    def _submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._queue is None:
                self._queue = queue.Queue()
                threading.Thread(target=_serve, args=(self._queue,), name="ttenv-starter", daemon=True).start()
            self._queue.put(job)


def _serve(jobs: queue.Queue[Callable[[], None]]) -> None:
    while True:
        jobs.get()()  # each reports its own failure (its VM's state)


def _start(job: Start, made: T | None, why: str, start: Callable[[Start, T | None, str], None]) -> None:
    with job.resume() as wanted:
        if not wanted:
            return  # its ENV was deleted, or it failed, meanwhile
        try:
            start(job, made, why)
        except Exception as exc:  # noqa: BLE001 - reported through the VM's state and wait_vm
            job.fail(f"VM {job.vm.name} could not be started: {exc}")
