"""The dashboard's Server-Sent Event streams: ENVs, a VM's console, events.

Each stream is an async generator behind a StreamingResponse (``text/event-stream``,
``Cache-Control: no-store``) that ends when the client goes, its session ends (logout, expiry,
its token removed) or the server stops; a comment line every HEARTBEAT seconds keeps proxies
from closing it. Memory per stream is bounded: the ENV list it last sent, or the console
follower's buffer (at most READ_MAX bytes read per tick, lines cut at LINE_MAX characters).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from pytest_ttenv.backend.engines.console import cap_log, clean_text, tail_file

HEARTBEAT = 15.0
ENV_POLL = 0.5
CONSOLE_POLL = 0.25
READ_MAX = 64 * 1024  # console bytes read per tick
BEHIND_MAX = 4 * READ_MAX  # further behind than this: skip to the last READ_MAX
LINE_MAX = 4096  # characters of one console line sent
FIRST_LINES = 200
PARTIAL_AFTER = 1.0  # an unterminated console line (a prompt) is sent once it sat this long
FIRST_EVENTS = 100


def sse(event: str, data: Any) -> bytes:
    """One SSE message: ``event: <event>`` and its JSON ``data`` (JSON never holds a newline)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


HEARTBEAT_LINE = b": keep-alive\n\n"


def line_of(raw: bytes) -> str:
    """A console line as sent: decoded, ``clean_text``-ed, at most LINE_MAX characters."""
    return clean_text(raw.decode(errors="replace").rstrip("\r"))[:LINE_MAX]


class LogFollower:
    """Follows a console log file that grows, is capped (truncated in place by ``cap_log``) or
    replaced. ``start`` gives its last lines; each ``poll`` the complete lines written since
    (reading at most READ_MAX bytes; further behind than BEHIND_MAX, it skips ahead and says so).
    Blocking file I/O: call it in a worker thread."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.clock = path, clock
        self.pos = 0
        self.ino: int | None = None
        self.partial = b""
        self.partial_since = 0.0

    def start(self, lines: int = FIRST_LINES) -> list[str]:
        try:
            st = os.stat(self.path)
            self.pos, self.ino = st.st_size, st.st_ino
        except OSError:
            return []
        text = tail_file(self.path, lines)  # cleaned already; a line written meanwhile may show twice
        return [t[:LINE_MAX] for t in text.splitlines()]

    def poll(self) -> list[str]:
        cap_log(self.path)  # the engine's rotation, so a followed log stays bounded on disk too
        try:
            st = os.stat(self.path)
        except OSError:
            return []
        out: list[str] = []
        if st.st_ino != self.ino or st.st_size < self.pos:  # replaced or capped: from its start
            self.ino, self.pos = st.st_ino, 0
        if st.st_size - self.pos > BEHIND_MAX:
            skipped = st.st_size - READ_MAX - self.pos
            out.append(f"[ttenv: {skipped} bytes of console output skipped]")
            self.pos, self.partial = st.st_size - READ_MAX, b""
        data = b""
        if st.st_size > self.pos:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self.pos)
                    data = f.read(min(READ_MAX, st.st_size - self.pos))
            except OSError:
                return out
            self.pos += len(data)
        if data:
            if not self.partial:
                self.partial_since = self.clock()
            *complete, self.partial = (self.partial + data).split(b"\n")
            out += [line_of(raw) for raw in complete]
            if len(self.partial) > LINE_MAX * 4:  # a line without end: sent in pieces
                out.append(line_of(self.partial))
                self.partial = b""
            if complete and self.partial:
                self.partial_since = self.clock()
        elif self.partial and self.clock() - self.partial_since >= PARTIAL_AFTER:  # a prompt: sent as a line
            out.append(line_of(self.partial))
            self.partial = b""
        return out


class TailDiff:
    """New console lines of an engine whose log is not a local file (libvirt): each ``poll``
    reads its tail and sends the lines after the longest overlap with the tail before."""

    def __init__(self, tail: Callable[[int], str]) -> None:
        self.tail = tail
        self.prev: list[str] = []

    def start(self, lines: int = FIRST_LINES) -> list[str]:
        self.prev = self.tail(lines).splitlines()
        return [t[:LINE_MAX] for t in self.prev]

    def poll(self) -> list[str]:
        cur = self.tail(FIRST_LINES).splitlines()
        prev, new = self.prev, cur
        for k in range(min(len(prev), len(cur)), 0, -1):
            if prev[-k:] == cur[:k]:
                new = cur[k:]
                break
        self.prev = cur
        return [t[:LINE_MAX] for t in new]


Alive = Callable[[], Awaitable[bool]]  # whether the stream goes on: client there, session live, server up


async def env_stream(alive: Alive, snapshot: Callable[[], list[dict[str, Any]]]) -> AsyncIterator[bytes]:
    """``event: envs`` with the list at once, then whenever it changes (read every ENV_POLL s
    in a worker thread)."""
    last: list[dict[str, Any]] | None = None
    beat = time.monotonic()
    while await alive():
        envs = await anyio.to_thread.run_sync(snapshot)
        if envs != last:
            last, beat = envs, time.monotonic()
            yield sse("envs", envs)
        elif time.monotonic() - beat >= HEARTBEAT:
            beat = time.monotonic()
            yield HEARTBEAT_LINE
        await anyio.sleep(ENV_POLL)


async def console_stream(alive: Alive, follower: LogFollower | TailDiff, every: float) -> AsyncIterator[bytes]:
    """``event: line`` with ``{"text": line}``: the last FIRST_LINES, then new ones (every ``every`` s)."""
    lines = await anyio.to_thread.run_sync(follower.start)
    for text in lines:
        yield sse("line", {"text": text})
    beat = time.monotonic()
    while await alive():
        await anyio.sleep(every)
        lines = await anyio.to_thread.run_sync(follower.poll)
        if lines:
            beat = time.monotonic()
            yield b"".join(sse("line", {"text": text}) for text in lines)
        elif time.monotonic() - beat >= HEARTBEAT:
            beat = time.monotonic()
            yield HEARTBEAT_LINE


async def event_stream(
    alive: Alive,
    visible: Callable[[int, int | None], list[dict[str, Any]]],
    latest: Callable[[], int],
    wait: Callable[[int], Awaitable[bool]],
) -> AsyncIterator[bytes]:
    """``event: event``: the last FIRST_EVENTS visible, then new ones as they are recorded.
    ``visible(after, last)`` lists the session's events as dicts, oldest first; ``latest()`` is the
    newest id of all; ``wait(after)`` waits up to a second for an id over ``after``."""
    cursor = latest()  # newest id covered; events over it come in the next round
    batch, done = visible(0, FIRST_EVENTS), 0
    beat = time.monotonic()
    while True:
        news = [event for event in batch if done < event["id"] <= cursor]
        done = cursor
        if news:
            beat = time.monotonic()
            yield b"".join(sse("event", event) for event in news)
        elif time.monotonic() - beat >= HEARTBEAT:
            beat = time.monotonic()
            yield HEARTBEAT_LINE
        if not await alive():
            return
        if await wait(cursor):
            cursor = latest()
        batch = visible(done, None) if cursor > done else []
