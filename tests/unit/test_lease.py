"""LeaseKeeper: renewal cadence, retry after failures, end when the ENV is gone (pure logic;
the real server renewal is covered by the server and plugin tests)."""

from __future__ import annotations

import time
from typing import Any

from pytest_ttenv.errors import NotFound, TTError
from pytest_ttenv.lease import LeaseKeeper


class FakeBackend:
    """Records renewals; fails while ``failures`` > 0; raises NotFound once ``gone``."""

    name = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self.failures = 0
        self.gone = False

    def renew(self, ref: str, ttl: float) -> Any:
        self.calls.append((ref, ttl))
        if self.gone:
            raise NotFound(f"no ENV {ref}")
        if self.failures:
            self.failures -= 1
            raise TTError("server http://x unreachable")
        return None


def _wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached within 5 s"
        time.sleep(0.01)


def test_renews_every_quarter_lease_until_stopped() -> None:
    backend = FakeBackend()
    warnings: list[str] = []
    keeper = LeaseKeeper(backend, "e1", 0.2, warnings.append).start()  # type: ignore[arg-type]
    _wait_for(lambda: keeper.renewals >= 3)
    keeper.stop()
    count = len(backend.calls)
    time.sleep(0.15)
    assert len(backend.calls) == count, "renewals went on after stop()"
    assert set(backend.calls) == {("e1", 0.2)}
    assert warnings == []


def test_failure_streak_warns_once_and_recovers() -> None:
    backend = FakeBackend()
    warnings: list[str] = []
    backend.failures = 3
    keeper = LeaseKeeper(backend, "e1", 0.2, warnings.append).start()  # type: ignore[arg-type]
    _wait_for(lambda: keeper.renewals >= 1)
    keeper.stop()
    assert len(warnings) == 2, warnings
    assert "retrying" in warnings[0] and "unreachable" in warnings[0]
    assert "renewed again" in warnings[1]


def test_ends_when_the_env_is_gone() -> None:
    backend = FakeBackend()
    warnings: list[str] = []
    backend.gone = True
    keeper = LeaseKeeper(backend, "e1", 0.2, warnings.append).start()  # type: ignore[arg-type]
    _wait_for(lambda: bool(warnings))
    time.sleep(0.15)
    assert len(backend.calls) == 1
    assert "gone from the server" in warnings[0]
    keeper.stop()
