"""Resource accounting of the host server: totals, used, free; admission under one lock.

Used = the VMs of every live ENV (``live()``: key -> demand, read from the store) plus the
creates in flight (reserved here until their ENV is in the store). ``reserve`` checks and
records a demand atomically, so concurrent creates never exceed a total, nor an owner's caps
(``auth.Limits``: keys are ``<owner>:<name>``); a key that is live or in flight is a Conflict
(ENV names are unique per owner).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pytest_ttenv.errors import QuotaError
from pytest_ttenv.server.auth import Limits
from pytest_ttenv.server.errors import Conflict


@dataclass(frozen=True)
class Amounts:
    """CPUs, memory (MiB) and disk (MiB); ``vms`` counts VMs (for owner caps, not in ``as_dict``)."""

    cpu: int = 0
    mem_mib: int = 0
    disk_mib: int = 0
    vms: int = 0

    def __add__(self, other: Amounts) -> Amounts:
        return Amounts(
            self.cpu + other.cpu, self.mem_mib + other.mem_mib, self.disk_mib + other.disk_mib, self.vms + other.vms
        )

    def __sub__(self, other: Amounts) -> Amounts:
        return Amounts(
            self.cpu - other.cpu, self.mem_mib - other.mem_mib, self.disk_mib - other.disk_mib, self.vms - other.vms
        )

    def fits(self, room: Amounts) -> bool:
        return self.cpu <= room.cpu and self.mem_mib <= room.mem_mib and self.disk_mib <= room.disk_mib

    def as_dict(self) -> dict[str, int]:
        return {"cpu": self.cpu, "mem_mib": self.mem_mib, "disk_mib": self.disk_mib}

    def text(self) -> str:
        return f"{self.cpu} CPU, {self.mem_mib} MiB memory, {self.disk_mib} MiB disk"


class Quota:
    """Admission control over ``totals``; ``live()`` lists what live ENVs hold, keyed like ``reserve``."""

    def __init__(self, totals: Amounts, live: Callable[[], dict[str, Amounts]]) -> None:
        self.totals = totals
        self._live = live
        self._lock = threading.Lock()
        self._pending: dict[str, Amounts] = {}

    def _used(self, live: dict[str, Amounts], owner: str | None = None) -> Amounts:
        mine = (lambda k: k.startswith(f"{owner}:")) if owner is not None else (lambda k: True)
        used = sum((a for k, a in live.items() if k not in self._pending and mine(k)), Amounts())
        return sum((a for k, a in self._pending.items() if mine(k)), used)

    def used(self, live: dict[str, Amounts] | None = None, owner: str | None = None) -> Amounts:
        """What live ENVs (``live``: as ``live()`` gives it, read now if None) and creates in flight
        hold; only ``owner``'s if given."""
        if live is None:
            live = self._live()
        with self._lock:
            return self._used(live, owner)

    @staticmethod
    def room(limits: Limits, used: Amounts) -> Amounts:
        """What an owner with caps ``limits`` holding ``used`` may still take (large where no cap)."""
        big = 2**62
        return Amounts(
            big if limits.cpu is None else limits.cpu - used.cpu,
            big if limits.mem_mib is None else limits.mem_mib - used.mem_mib,
            big,
            big if limits.vms is None else limits.vms - used.vms,
        )

    @contextmanager
    def reserve(self, key: str, demand: Amounts, what: str, limits: Limits | None = None) -> Iterator[None]:
        """Hold ``demand`` for the body of the ``with`` (the create); QuotaError if it does not
        fit the totals or the caps ``limits`` of the key's owner, Conflict if ``key`` is live or
        being created. ``what`` names the ENV in messages."""
        with self._lock:
            live = self._live()
            if key in live or key in self._pending:
                raise Conflict(
                    f"an ENV named {what!r} exists already", f"pick another name or delete it: ttenv env del {what}"
                )
            free = self.totals - self._used(live)
            if limits is not None:
                owner = key.partition(":")[0]
                room = self.room(limits, self._used(live, owner))
                capped = Amounts(min(free.cpu, room.cpu), min(free.mem_mib, room.mem_mib), free.disk_mib)
                over = [
                    f"{getattr(demand, f)} {label} asked, {max(0, getattr(room, f))} left of {getattr(limits, f)}"
                    for label, f in (("CPU", "cpu"), ("MiB memory", "mem_mib"), ("VM(s)", "vms"))
                    if getattr(demand, f) > getattr(room, f)
                ]
                if over:
                    raise QuotaError(
                        f"ENV {what} exceeds the caps of owner {owner}: {'; '.join(over)}",
                        _floor(capped).as_dict(),
                        "delete some of your ENVs, or ask for higher caps "
                        "(ttenv token add --max-cpu/--max-mem/--max-vms)",
                    )
            if not demand.fits(free):
                hint = (
                    "it exceeds the server's totals" if not demand.fits(self.totals) else "retry once ENVs are deleted"
                )
                raise QuotaError(
                    f"ENV {what} needs {demand.text()}; free: {_floor(free).text()}", _floor(free).as_dict(), hint
                )
            self._pending[key] = demand
        try:
            yield
        finally:
            with self._lock:
                del self._pending[key]


def _floor(a: Amounts) -> Amounts:
    return Amounts(max(0, a.cpu), max(0, a.mem_mib), max(0, a.disk_mib))
