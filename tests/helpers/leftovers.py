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


def leftovers(state: Path) -> list[str]:
    """Everything a ttenv state dir still holds or runs: qemu processes, run dirs, session dirs,
    sqlite rows, QMP socket dirs. Empty when nothing is left behind."""
    import sqlite3

    from pytest_ttenv.core.paths import runtime_dir

    found = [f"qemu pid {pid}" for pid in qemu_pids_under(state)]
    for sub in ("envs", "sessions"):
        if (state / sub).is_dir():
            found += [f"{sub}/{d.name}" for d in (state / sub).iterdir()]
    if (state / "state.sqlite").exists():
        with sqlite3.connect(state / "state.sqlite") as db:
            ids = [row[0] for row in db.execute("SELECT id FROM envs")]
            found += [f"row env {i}" for i in ids]
            found += [f"row vm {n}" for (n,) in db.execute("SELECT name FROM vms")]
    for sockets in runtime_dir().iterdir():
        try:
            if str(state) in (sockets / "rundir").read_text():
                found.append(f"socket dir {sockets}")
        except OSError:
            continue
    return found


def interactive_signals() -> None:
    """In a child before exec: SIGINT/SIGTERM as in an interactive terminal. A shell's background
    job (CI runners, ``cmd &``) starts with SIGINT ignored, and a child would inherit that."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
