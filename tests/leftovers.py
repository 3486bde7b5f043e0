"""What a test asserts is gone after a run: qemu processes under a directory, listening ports."""

from __future__ import annotations

import socket
from pathlib import Path


def qemu_pids_under(path: Path) -> list[int]:
    """Live (non-zombie) processes whose command line mentions ``path``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path).encode() in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def port_free(port: int) -> bool:
    """Nothing listens on the port: a new listener can take it (as qemu's hostfwd would)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return True
        except OSError:
            return False
