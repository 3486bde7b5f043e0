"""The host side of the identity agent (``guest/ttenv-identity``), which a warm template's guest
runs: its source, its wire protocol, and the requests that make a restored VM its own machine.

Wire format (``PROTOCOL``), one line each way: ``<op> <nonce> key=<base64>...`` and
``ok <nonce> <seconds>`` or ``error <nonce> <text>``. The guest is not trusted: every reply is
bounded in size (``REPLY_MAX``, ``READ_MAX``) and time, checked, matched to its request by nonce,
and made safe to print.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shlex
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pytest_ttenv.backend.engines.console import clean_text
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.errors import TTError

PROTOCOL = 2  # the agent's wire format (this file and guest/ttenv-identity): in a template's key, so a
# template whose saved agent speaks another protocol is never started by this host side
REPLY_MAX = 4096  # bytes: the longest reply line the host accepts from the agent
READ_MAX = 64 * 1024  # bytes the host reads per request at most, stale replies included
_REPLY = re.compile(rb"(ok|error) ([0-9a-f]{32}) (.*)", re.DOTALL)
AGENT_PATH = "/run/ttenv-identity"  # in the guest: tmpfs, so the template's disk stays the image's
AGENT_TIMEOUT = 60.0


def agent_source() -> str:
    """The guest identity agent (a python3 script)."""
    text: str = resources.files("pytest_ttenv.backend.engines").joinpath("guest").joinpath("ttenv-identity").read_text()
    return text


def agent_start_command(user: str, embedded: bool = False) -> str:
    """The shell command that puts the agent into the guest's /run and starts it as the unit
    ``ttenv-identity`` (through ``sudo -n`` for a ``user`` other than root). It reads the agent's
    source from stdin, or with ``embedded`` carries it (base64) and is a no-op where the unit
    already runs (a warm VM's, or one started before): for a channel that has no stdin."""
    install = (
        "command -v python3 >/dev/null || { echo 'no python3 in the guest' >&2; exit 1; }; "
        f"cat > {AGENT_PATH} && chmod 0755 {AGENT_PATH} && "
        f"systemd-run --quiet --unit=ttenv-identity /usr/bin/python3 {AGENT_PATH}"
    )
    if embedded:
        blob = base64.b64encode(agent_source().encode()).decode()
        install = (
            f"systemctl is-active --quiet ttenv-identity && exit 0; printf %s {blob} | base64 -d | {{ {install}; }}"
        )
    return install if user == "root" else f"sudo -n /bin/sh -c {shlex.quote(install)}"


def agent_request(sock: Path, op: str, timeout: float, what: str, **fields: str | bytes) -> str:
    """Send one request to the identity agent behind ``sock``; its ``ok`` answer (the seconds it
    took). TTError naming ``what`` if it answers ``error``, sends a malformed reply, or gives no
    reply to *this* request within ``timeout`` s or ``READ_MAX`` bytes.

    Wire format (``PROTOCOL``), one line each way: ``<op> <nonce> key=<base64>...`` and
    ``ok <nonce> <seconds>`` or ``error <nonce> <text>``; the nonce (32 hex digits, new per
    request) matches a reply to its request, so a late reply to an earlier request is skipped.
    """
    nonce = secrets.token_hex(16)
    line = f"{op} {nonce}" + "".join(
        f" {k}={base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode()}" for k, v in fields.items()
    )
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            return exchange(s, line.encode() + b"\n", nonce, deadline, what)
    except TimeoutError:
        raise TTError(f"{what}: no answer from the identity agent within {timeout:.0f} s") from None
    except OSError as exc:
        raise TTError(f"{what}: cannot reach the identity agent at {sock}: {exc}") from None


def await_agent(ping: Callable[[], object], alive: Callable[[], bool] = lambda: True) -> None:
    """Return once ``ping()`` (one ``ping`` request to an agent just started) succeeds: the agent
    needs a moment before it serves its port. Asked again every 0.2 s for ``AGENT_TIMEOUT`` s
    while ``alive()``; then its last TTError is raised."""
    deadline = time.monotonic() + AGENT_TIMEOUT
    while True:
        try:
            ping()
            return
        except TTError:
            if time.monotonic() >= deadline or not alive():
                raise
            time.sleep(0.2)


def exchange(s: socket.socket, request: bytes, nonce: str, deadline: float, what: str) -> str:
    """Send ``request`` on the connected socket ``s`` and read the agent's reply to ``nonce``
    (see ``agent_request``), giving up at ``deadline`` (``time.monotonic()``; TimeoutError) or
    after ``READ_MAX`` bytes (TTError): a guest that keeps talking never keeps the host reading,
    nor its memory growing. Every line is checked; a well-formed reply to another nonce is skipped."""
    s.settimeout(max(0.001, deadline - time.monotonic()))
    s.sendall(request)
    buf, total = bytearray(), 0
    while True:
        end = buf.find(b"\n")
        if end < 0 and len(buf) <= REPLY_MAX:
            if total >= READ_MAX:
                raise TTError(f"{what}: the identity agent sent {total} bytes without answering this request")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            s.settimeout(remaining)
            data = s.recv(min(REPLY_MAX + 1, READ_MAX - total))
            if not data:
                raise TTError(f"{what}: the identity agent's channel closed before it answered")
            total += len(data)
            buf += data
            continue
        if end < 0 or end > REPLY_MAX:
            raise TTError(f"{what}: the identity agent sent a line longer than {REPLY_MAX} bytes")
        frame = bytes(buf[:end])
        del buf[: end + 1]
        status, got, rest = _parse_reply(frame, what)
        if got != nonce:
            continue  # a late reply to an earlier request (that one timed out): not ours
        if status == "error":
            raise TTError(f"{what}: the identity agent failed: {rest}")
        return rest


def _parse_reply(frame: bytes, what: str) -> tuple[str, str, str]:
    """(status, nonce, rest) of one reply line; TTError if it is not a well-formed reply."""
    m = _REPLY.fullmatch(frame.rstrip(b"\r"))
    if m is None or (m.group(1) == b"ok" and not re.fullmatch(rb"\d{1,9}(\.\d{1,9})?", m.group(3))):
        shown = clean_text(frame[:80].decode("ascii", errors="replace"))
        raise TTError(f"{what}: the identity agent sent a malformed reply: {shown!r}")
    return m.group(1).decode(), m.group(2).decode(), clean_text(m.group(3).decode(errors="replace"))


@dataclass(frozen=True)
class Identity:
    """What makes a warm VM its own machine (kept 0600 in its run dir until applied)."""

    hostname: str
    machine_id: str
    user: str
    authorized_key: str
    host_key: KeyPair
    instance_id: str = ""  # the instance-id in the VM's seed: a cloud-init guest's instance becomes this one
    user_data: str = ""  # the user-data in the VM's seed: what cloud-init's cached cloud-config becomes

    def to_dict(self) -> dict[str, str]:
        return {
            "hostname": self.hostname,
            "machine_id": self.machine_id,
            "user": self.user,
            "authorized_key": self.authorized_key,
            "host_key": self.host_key.private,
            "host_key_pub": self.host_key.public,
            "instance_id": self.instance_id,
            "user_data": self.user_data,
        }

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> Identity:
        return cls(
            data["hostname"],
            data["machine_id"],
            data["user"],
            data["authorized_key"],
            KeyPair(data["host_key"], data["host_key_pub"]),
            data.get("instance_id", ""),
            data.get("user_data", ""),
        )


def apply_identity(sock: Path, ident: Identity, timeout: float, what: str) -> None:
    """Make the restored VM behind ``sock`` its own machine: entropy and a CRNG reseed, the clock
    set to now, hostname, machine-id, host key, and ``authorized_key`` as the only login; with an
    ``instance_id``, a cloud-init guest's record of its instance moved to that id, its cached
    cloud-config made ``user_data`` (an agent of protocol 2 that predates them ignores both)."""
    extra = {"instance_id": ident.instance_id, "user_data": ident.user_data} if ident.instance_id else {}
    agent_request(
        sock,
        "identity",
        timeout,
        what,
        time=f"{time.time():.6f}",
        entropy=os.urandom(64),
        hostname=ident.hostname,
        machine_id=ident.machine_id,
        host_key=ident.host_key.private,
        host_key_pub=ident.host_key.public + "\n",
        user=ident.user,
        authorized_keys=ident.authorized_key + "\n",
        **extra,
    )


def refresh(sock: Path, timeout: float, what: str) -> None:
    """After a snapshot revert: the clock set to now, fresh entropy and a CRNG reseed."""
    agent_request(sock, "refresh", timeout, what, time=f"{time.time():.6f}", entropy=os.urandom(64))
