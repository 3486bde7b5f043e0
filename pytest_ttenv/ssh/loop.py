"""The process's one SSH event loop, in a daemon thread: every Connection does its I/O there.

`sync()` hands a coroutine to it from any other thread and waits; calling it from the loop
thread itself is a RuntimeError (use the async API there). Connections register themselves so
that `close_all()` (run at exit) closes them. A forked child starts a loop of its own.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import signal
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Closable(Protocol):
    """What `close_all()` closes: a Connection."""

    async def _aclose(self) -> None: ...


_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_thread: threading.Thread | None = None
_loop_pid = 0
_registry: weakref.WeakSet[Closable] = weakref.WeakSet()
_background: set[asyncio.Task[Any]] = set()


def loop() -> asyncio.AbstractEventLoop:
    """The process's one SSH event loop, running in a daemon thread (started on first use)."""
    global _loop, _loop_thread, _loop_pid
    with _loop_lock:
        if _loop is None or _loop_pid != os.getpid() or not _loop_thread or not _loop_thread.is_alive():
            lp = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                # Signals go to the main thread: one taken here would leave the main thread
                # blocked in a lock wait, its Ctrl-C handler not run until the command ends.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
                asyncio.set_event_loop(lp)
                lp.call_soon(ready.set)
                lp.run_forever()

            thread = threading.Thread(target=run, name="ttenv-ssh-loop", daemon=True)
            thread.start()
            ready.wait()
            _loop, _loop_thread, _loop_pid = lp, thread, os.getpid()
        return _loop


def started() -> bool:
    """True if this process started its loop (so there may be connections to close)."""
    return _loop is not None and _loop_pid == os.getpid()


def sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run *coro* on the shared loop and wait for it from this (non-loop) thread."""
    lp = loop()
    if threading.current_thread() is _loop_thread:
        coro.close()
        raise RuntimeError("pytest_ttenv.ssh: sync call from the SSH loop thread; use arun()")
    fut = asyncio.run_coroutine_threadsafe(coro, lp)
    try:
        while True:  # short waits, so a signal taken by any other thread still interrupts us
            try:
                return fut.result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                continue
    except BaseException:
        fut.cancel()
        raise


async def on_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Await *coro* on the shared loop from any event loop (the shared one included)."""
    lp = loop()
    if asyncio.get_running_loop() is lp:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, lp))


def spawn(coro: Coroutine[Any, Any, Any]) -> None:
    """Run *coro* in the background on the current loop (kept referenced until done)."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


def register(conn: Closable) -> None:
    """Let `close_all()` close *conn* (held weakly)."""
    _registry.add(conn)


def close_all() -> None:
    """Close every Connection of this process (registered with atexit)."""
    lp, thread = _loop, _loop_thread
    if lp is None or thread is None or not thread.is_alive() or _loop_pid != os.getpid():
        return
    conns = list(_registry)

    async def close() -> None:
        await asyncio.gather(*(c._aclose() for c in conns), return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(close(), lp).result(timeout=10)
    except Exception as e:  # noqa: BLE001 - best effort at exit
        log.debug("close_all: %s", e)


atexit.register(close_all)
