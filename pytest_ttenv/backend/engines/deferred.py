"""Starting VMs later: those that wait (``base.waiting``) for something slow their engine makes
first (a warm template) are started once it is made, or without it if making it failed.

One thread per thing being made (the VMs that need it wait for it together); the VMs are then
started from one long-lived thread per ``StartLater``: VMs started to die with their owner get
PDEATHSIG, which follows the thread that forked them, so they are never started from the
short-lived thread that made what they waited for. Each start is made under the job's
``resume()`` (the backend's guard: its ENV is not deleted meanwhile) and a failure fails the VM.
``start_all`` is an engine's ``start`` on top of that: warm VMs whose template exists start now,
the others wait for it.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from pytest_ttenv.backend.engines.base import Start
from pytest_ttenv.core.model import ImageInfo

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


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


class WarmSide(Protocol[T_co]):
    """An engine's warm starts, as ``start_all`` uses them (``T_co``: its templates)."""

    @property
    def later(self) -> StartLater: ...

    def keep_identity(self, job: Start) -> None:
        """Keep what the warm VM of ``job`` is sent once it runs."""

    def find(self, image: ImageInfo, key: str) -> T_co | None:
        """The usable template ``key`` of ``image``, or None (none yet)."""

    def make(self, job: Start) -> T_co:
        """The template ``job`` waits for, made now (or by another process meanwhile)."""

    def cold_instead(self, job: Start, why: str) -> None:
        """``job``, planned warm, boots cold, saying why."""


def start_all(
    jobs: Sequence[Start],
    warm: WarmSide[T],
    launch: Callable[[Start, T | None], None],
    progress: Callable[[str], None],
    cold_why: Callable[[Start], str] = lambda job: "",
) -> None:
    """Start ``jobs`` in order with ``launch(job, template)`` (None: cold). A warm job boots cold
    instead if ``cold_why(job)`` says why; else its identity is kept and, if its template does not
    exist yet, it is recorded (as waiting) and waits: one ``warm.make`` per key, in the background,
    then each job that waited for it is launched on the starter thread (``StartLater``), from the
    template or, if it could not be made, cold (``warm.cold_instead``); its boot is timed from
    that start, not from its ENV's creation."""

    def resume(job: Start, template: T | None, why: str) -> None:
        if template is None:
            warm.cold_instead(job, why)
        launch(job, template)

    waiting: dict[str, list[Start]] = {}
    for job in jobs:
        template = None
        if job.boot.how == "warm":
            why = cold_why(job)
            if why:
                warm.cold_instead(job, why)
            else:
                warm.keep_identity(job)
                template = warm.find(job.image, job.boot.key)
                if template is None:
                    job.record()
                    progress(f"{job.vm.name}: waiting for the warm template of {job.image.name}")
                    waiting.setdefault(job.boot.key, []).append(job)
                    continue
        launch(job, template)
    for key, group in waiting.items():
        warm.later.after(f"template-{key}", group, functools.partial(warm.make, group[0]), resume)


def _serve(jobs: queue.Queue[Callable[[], None]]) -> None:
    while True:
        jobs.get()()  # each reports its own failure (its VM's state)


def _start(job: Start, made: T | None, why: str, start: Callable[[Start, T | None, str], None]) -> None:
    try:
        with job.resume() as wanted:
            if not wanted:
                return  # its ENV was deleted, or it failed, meanwhile
            try:
                start(job, made, why)
            except Exception as exc:  # noqa: BLE001 - reported through the VM's state and wait_vm
                job.fail(f"VM {job.vm.name} could not be started: {exc}")
    except Exception:  # noqa: BLE001 - its state is gone (the state dir deleted): nobody to start it for
        return
