"""The server's ENV events for the dashboard: a ring buffer in memory (the last ``size``).

An event is ``{id, time, kind, env, owner, detail}`` (``id`` counts up from 1, ``time`` unix
seconds, ``env`` the ENV's name); kinds are KINDS. The Service records them (create, a VM's
first answer ``running`` or failure, renew, keep, delete, the reaper's reaps) from any thread;
an owner sees their own, an admin all. SSE streams ``wait`` for the next one on their event
loop: each waiter is an asyncio.Event set by ``record`` through its loop (no polling), removed
when it returns, so memory is the buffer plus one entry per waiting stream.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("created", "ready", "renewed", "kept", "reaped", "deleted", "failed")
SIZE = 2000


@dataclass(frozen=True)
class Event:
    id: int
    time: float
    kind: str
    env: str
    owner: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class EventLog:
    """The last ``size`` events (thread-safe)."""

    def __init__(self, size: int = SIZE) -> None:
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=size)
        self._ids = itertools.count(1)
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def record(self, kind: str, env: str, owner: str, detail: str = "") -> Event:
        """Append an event (ValueError for a kind not in KINDS) and wake every waiting stream."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        with self._lock:
            event = Event(next(self._ids), time.time(), kind, env, owner, detail)
            self._events.append(event)
            waiters = list(self._waiters)
        for loop, flag in waiters:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # its loop is closed: that stream is gone
                pass
        return event

    def visible(self, owner: str, admin: bool, after: int = 0, last: int | None = None) -> list[Event]:
        """Events ``owner`` may see (all for an admin) with an id over ``after``, oldest first;
        only the ``last`` of them when given."""
        with self._lock:
            events = [e for e in self._events if e.id > after and (admin or e.owner == owner)]
        return events[-last:] if last is not None else events

    def latest(self) -> int:
        """The id of the newest event (0 if none)."""
        with self._lock:
            return self._events[-1].id if self._events else 0

    async def wait(self, after: int, timeout: float) -> bool:
        """Wait (on the running event loop) until an event newer than id ``after`` exists, at most
        ``timeout`` seconds; whether one does."""
        flag = asyncio.Event()
        entry = (asyncio.get_running_loop(), flag)
        with self._lock:
            if self._events and self._events[-1].id > after:
                return True
            self._waiters.add(entry)
        try:
            await asyncio.wait_for(flag.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return self.latest() > after
        finally:
            with self._lock:
                self._waiters.discard(entry)
