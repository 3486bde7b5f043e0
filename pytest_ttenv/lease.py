"""Keeping a remote ENV's lease alive while the pytest session that owns it runs.

A local ENV dies with its owner process; a server cannot see the client's process, so the
controller renews the lease every ``ttl / 4`` seconds instead. When pytest is killed the
renewals stop and the server reaps the ENV within ``ttl`` seconds: nothing is left behind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pytest_ttenv.backend import Backend
from pytest_ttenv.errors import NotFound, TTError


class LeaseKeeper:
    """A daemon thread renewing ENV ``env_id``'s lease of ``ttl`` seconds until ``stop()``.

    A failed renewal is retried at the next tick (a server restart or a network blip shorter
    than the lease costs nothing); ``warn`` gets one line per failure streak, and one when
    the ENV is gone (then the thread ends).
    """

    def __init__(self, backend: Backend, env_id: str, ttl: float, warn: Callable[[str], None]) -> None:
        self.backend, self.env_id, self.ttl, self.warn = backend, env_id, ttl, warn
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ttenv-lease-{env_id}", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing (returns within one renewal call's timeout)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        failing_since: float | None = None
        while not self._stop.wait(self.ttl / 4):
            try:
                self.backend.renew(self.env_id, self.ttl)
            except NotFound:
                self.warn(f"ENV {self.env_id} is gone from the server (lease expired or deleted)")
                return
            except TTError as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    self.warn(f"renewing the lease of ENV {self.env_id} failed, retrying: {exc}")
                continue
            if failing_since is not None:
                self.warn(f"lease of ENV {self.env_id} renewed again after {time.monotonic() - failing_since:.0f} s")
                failing_since = None
            self.renewals += 1
