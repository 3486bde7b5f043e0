"""Connections of the host server: descriptor limit, connection cap, header timeout, quiet logs.

A client that opens connections and never finishes a request head (idle, or a slowloris that
trickles header bytes) must not take the server's descriptors: uvicorn's own keep-alive timer
only runs after a response, and its ``limit_concurrency`` answers requests, not connections. So:

- ``raise_nofile`` lifts RLIMIT_NOFILE's soft limit to the hard one at start;
- ``guarded_protocol`` is uvicorn's h11 protocol with a deadline for every request head
  (``header_timeout`` s from the connection, or from the end of the previous answer) and a cap on
  open connections (``max_connections``, below the descriptor limit): at the cap a new connection
  closes the one that has waited longest for a request head, or is refused itself when every
  connection is busy with a request;
- ``RateLimit`` is a logging filter: per logger and message, at most ``burst`` records per
  ``window`` s, tracebacks only for the first few, then one line saying how many were dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import threading
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

RESERVED_FDS = 128  # descriptors kept for sqlite, qemu's pipes and QMP sockets, logs
BACKLOG = 128  # the listen queue, and how many connections asyncio accepts at once before any is closed


def raise_nofile() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) as they are then."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def default_max_connections(nofile: int) -> int:
    """Half of what the descriptor limit leaves after the reserve and one accept burst, between 32
    and 4096."""
    if nofile == resource.RLIM_INFINITY or nofile < 0:
        return 4096
    return max(32, min(4096, (nofile - RESERVED_FDS - BACKLOG) // 2))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a connection cap (class attributes,
    set by ``guarded_protocol``)."""

    max_connections = 1024
    header_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._waiting_since: float | None = None  # waiting for a request head since (monotonic)
        self._seen_cycle: object = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()
        if len(self.connections) > self.max_connections and not self._evict():
            self._close()  # every other connection is busy with a request: this one waits outside

    def _evict(self) -> bool:
        """Close the connection that has waited longest for a request head (not this one)."""
        oldest: GuardedH11Protocol | None = None
        for conn in self.connections:
            if (
                isinstance(conn, GuardedH11Protocol)
                and conn is not self
                and conn._waiting_since is not None
                and not conn.transport.is_closing()
                and (oldest is None or conn._waiting_since < (oldest._waiting_since or 0.0))
            ):
                oldest = conn
        if oldest is None:
            return False
        oldest._close()
        return True

    def _await_head(self) -> None:
        self._cancel_head_timer()
        self._waiting_since = time.monotonic()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._waiting_since is not None:
            self._close()

    def _close(self) -> None:
        self._cancel_head_timer()
        self._waiting_since = None
        self.connections.discard(self)  # counts as gone at once (connection_lost comes a loop turn later)
        if not self.transport.is_closing():
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._seen_cycle:  # a request head is in
            self._seen_cycle = self.cycle
            if not self.cycle.response_complete:
                self._cancel_head_timer()
                self._waiting_since = None

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._await_head()  # keep-alive: the next head is due within header_timeout too
        super().on_response_complete()  # may start a pipelined request: handle_events stops the timer

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._waiting_since = None
        super().connection_lost(exc)


def guarded_protocol(max_connections: int, header_timeout: float) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol class with these limits (uvicorn.Config's ``http``)."""
    return type(
        "ServerH11Protocol",
        (GuardedH11Protocol,),
        {"max_connections": max_connections, "header_timeout": header_timeout},
    )


class RateLimit(logging.Filter):
    """At most ``burst`` records per logger and message template per ``window`` seconds; the
    first ``tracebacks`` of each window keep their traceback, later ones are one line. What is
    dropped is counted and said once the window ends (with the next record of that message)."""

    def __init__(self, burst: int = 20, window: float = 10.0, tracebacks: int = 3) -> None:
        super().__init__()
        self.burst, self.window, self.tracebacks = burst, window, tracebacks
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], tuple[float, int, int]] = {}  # -> (window start, count, dropped)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            start, count, dropped = self._seen.get(key, (now, 0, 0))
            if now - start >= self.window:
                if dropped:
                    record.msg = f"{record.msg} [{dropped} similar message(s) dropped in {self.window:.0f} s]"
                start, count, dropped = now, 0, 0
            count += 1
            keep = count <= self.burst
            self._seen[key] = (start, count, dropped + (not keep))
            if len(self._seen) > 10000:  # many distinct messages: forget the old windows
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window}
        if keep and count > self.tracebacks and record.exc_info:
            record.exc_info, record.exc_text = None, None
        return keep


def quiet_logs(*names: str, burst: int = 20, window: float = 10.0) -> RateLimit:
    """Put one RateLimit on the loggers ``names`` (their own records; children propagate past it)."""
    limit = RateLimit(burst, window)
    for name in names:
        logging.getLogger(name).addFilter(limit)
    return limit
