"""`fan_out`: one command on many Connections at once, on the shared loop; one VM's failure is its
result, never an exception for the others."""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Sequence

from pytest_ttenv.ssh.connection import Connection
from pytest_ttenv.ssh.errors import SshError
from pytest_ttenv.ssh.loop import sync
from pytest_ttenv.ssh.results import RunResult

log = logging.getLogger(__name__)


def _raise_nofile(need: int) -> None:
    """Raise RLIMIT_NOFILE's soft limit to the hard one if *need* more descriptors may not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need + 256:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warning("cannot raise the open-file limit from %d: %s", soft, e)


def fan_out(
    conns: Sequence[Connection],
    cmd: str,
    *,
    timeout: float | None = None,
    max_concurrent_connects: int = 50,
) -> dict[str, RunResult | SshError]:
    """Run *cmd* on every connection at once; {VM name: RunResult, or the SshError it raised}.

    At most *max_concurrent_connects* connections (and agent starts) are set up at a time; once
    connected, commands run concurrently without a bound. Names must be unique.
    """
    names = [c.target.name for c in conns]
    if len(set(names)) != len(names):
        raise ValueError("fan_out: VM names must be unique")
    _raise_nofile(2 * len(conns))

    async def run_all() -> list[RunResult | SshError]:
        slots = asyncio.Semaphore(max_concurrent_connects)

        async def one(c: Connection) -> RunResult | SshError:
            try:
                return await c._arun(cmd, {"timeout": timeout}, slots=slots)
            except SshError as e:
                return e

        return await asyncio.gather(*(one(c) for c in conns))

    return dict(zip(names, sync(run_all()), strict=True))
