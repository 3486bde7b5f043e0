"""The lease reaper: a daemon thread deleting expired ENVs (VMs, overlays, ports) through gc."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pytest_ttenv.core.model import EnvInfo

log = logging.getLogger("ttenv.server")


class Reaper:
    """Calls ``gc()`` every ``interval`` seconds until ``stop()``; a failing round is logged and
    retried at the next tick. ``gc`` returns the ENVs it deleted."""

    def __init__(self, gc: Callable[[], list[EnvInfo]], interval: float = 1.0) -> None:
        self.gc, self.interval = gc, interval
        self.reaped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ttenv-reaper", daemon=True)

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the round in progress (waits for it)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                for env in self.gc():
                    self.reaped += 1
                    log.info("reaped ENV %s (%s) of %s: lease expired", env.name, env.id, env.owner)
            except Exception:  # one bad round must not end reaping
                log.exception("lease reaper round failed")
