"""Host ports for forwarded SSH, and the probe that tells an sshd answers on one."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator

from pytest_ttenv.errors import TTError

PORT_RANGE = (10022, 32767)  # below Linux's ephemeral range, so outgoing connections never take them
_TRIES = 200


def free_ports(bind_addr: str = "127.0.0.1") -> Iterator[int]:
    """Random ports in PORT_RANGE that nothing listens on right now (on ``bind_addr``); at most
    ``_TRIES`` candidates are tried."""
    for _ in range(_TRIES):
        port = random.randint(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind((bind_addr, port))
            except OSError:
                continue
        yield port


def any_ports() -> Iterator[int]:
    """Random ports in PORT_RANGE, for a host whose ports cannot be checked from here."""
    for _ in range(_TRIES):
        yield random.randint(*PORT_RANGE)


def free_port(bind_addr: str = "127.0.0.1", what: str = "") -> int:
    """One port nothing listens on right now; TTError (saying it was ``for`` ``what``) if none was found."""
    for port in free_ports(bind_addr):
        return port
    raise TTError(f"no free TCP port on {bind_addr}" + (f" for {what}" if what else ""))


def ssh_banner(host: str, port: int, timeout: float = 2.0) -> bool:
    """True if an SSH server answers with its ``SSH-`` banner on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False
