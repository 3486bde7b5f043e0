"""The host against a hostile guest and other local users, without VMs (issue 16): the identity
agent's replies bounded in size and time and matched by nonce, console tails safe to print and
bounded in what they read, console logs capped, gc confined to this user's processes of its own
state dir, private files and directories, pids recorded before any wait, abandoned VMs failed."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pycdlib
import pytest

from pytest_ttenv.backend import owner, sweep
from pytest_ttenv.backend.engines import console, identity, qemu, seed, warm
from pytest_ttenv.backend.engines.base import Boot, Start
from pytest_ttenv.backend.engines.qemu_engine import QemuEngine
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.backend.store import Store
from pytest_ttenv.core import paths
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, Resources, VmInfo, VmSpec
from pytest_ttenv.errors import TTError

from helpers.guest import identity_agent
from helpers.qemu_configs import warm_config

NONCE = "ab" * 16


# -- the identity agent's channel -----------------------------------------------------------------
def _peer(talk: Callable[[socket.socket, bytes], None]) -> tuple[socket.socket, threading.Thread]:
    """One end of a socketpair for the host; on the other a fake agent that reads the request
    and then ``talk``s (until the host hangs up)."""
    host, guest = socket.socketpair()

    def run() -> None:
        with guest:
            request = guest.recv(65536)
            try:
                talk(guest, request)
            except OSError:  # the host gave up and closed its end
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return host, thread


def _exchange(talk: Callable[[socket.socket, bytes], None], timeout: float = 2.0) -> str:
    host, thread = _peer(talk)
    with host:
        try:
            return identity.exchange(host, f"ping {NONCE}\n".encode(), NONCE, time.monotonic() + timeout, "VM v")
        finally:
            host.shutdown(socket.SHUT_RDWR)
            thread.join(5)


def test_a_guest_that_never_stops_talking_is_cut_off_with_bounded_memory() -> None:
    def flood(s: socket.socket, _: bytes) -> None:  # one endless line
        chunk = b"x" * 65536
        while True:
            s.sendall(chunk)

    tracemalloc.start()
    started = time.monotonic()
    try:
        longer = f"VM v: the identity agent sent a line longer than {identity.REPLY_MAX} bytes"
        with pytest.raises(TTError, match=longer):
            _exchange(flood)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 2.0
    assert peak < 256 * 1024, peak


def test_endless_stale_replies_end_after_read_max_bytes() -> None:
    def stale(s: socket.socket, _: bytes) -> None:
        while True:
            s.sendall(f"ok {'cd' * 16} 0.001\n".encode() * 100)

    tracemalloc.start()
    try:
        with pytest.raises(TTError, match=r"VM v: the identity agent sent 6\d{4} bytes without answering this"):
            _exchange(stale)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak


def test_a_trickling_guest_is_given_up_on_at_the_deadline() -> None:
    def trickle(s: socket.socket, _: bytes) -> None:
        while True:
            s.sendall(b"o")
            time.sleep(0.05)

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        _exchange(trickle, timeout=0.5)
    assert time.monotonic() - started < 1.5


def test_a_stale_ok_is_not_accepted() -> None:
    def stale_then_silent(s: socket.socket, _: bytes) -> None:
        s.sendall(f"ok {'cd' * 16} 0.001\n".encode())
        time.sleep(3)

    with pytest.raises(TimeoutError):
        _exchange(stale_then_silent, timeout=0.5)

    def stale_then_ours(s: socket.socket, request: bytes) -> None:
        nonce = request.split()[1].decode()
        s.sendall(f"error {'cd' * 16} stale failure\nok {nonce} 0.250\n".encode())

    assert _exchange(stale_then_ours) == "0.250"


@pytest.mark.parametrize(
    "reply",
    [b"ok 0.001\n", b"ok " + NONCE.encode() + b" soon\n", b"hello\n", b"ok " + NONCE.encode().upper() + b" 1\n"],
)
def test_malformed_replies_are_refused(reply: bytes) -> None:
    with pytest.raises(TTError, match="VM v: the identity agent sent a malformed reply"):
        _exchange(lambda s, _: s.sendall(reply))


def test_error_text_is_made_safe_to_print() -> None:
    reply = f"error {NONCE} RuntimeError: bad \x1b]52;c;cm0gLXJmIH4K\x07thing\x1b[2J\r\n".encode()
    with pytest.raises(TTError) as info:
        _exchange(lambda s, _: s.sendall(reply))
    assert info.value.message == "VM v: the identity agent failed: RuntimeError: bad thing"


def test_agent_request_over_a_unix_socket_flooded(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                try:
                    while True:
                        conn.sendall(b"\x1b]52;c;" + b"A" * 8192)
                except OSError:
                    pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with pytest.raises(TTError, match="VM z: the identity agent sent a line longer than"):
            identity.agent_request(path, "ping", 5, "VM z")
        thread.join(5)


def test_the_agent_answers_with_the_requests_nonce() -> None:
    agent = identity_agent()
    assert agent.handle(f"ping {NONCE}".encode()).startswith(f"ok {NONCE} ".encode())
    assert agent.handle(b"ping") == b""  # no nonce: nothing the host would take
    assert agent.handle(b"ping not-hex") == b""
    bad = agent.handle(f"refresh {NONCE} time=***".encode())
    assert bad.startswith(f"error {NONCE} ".encode()) and bad.endswith(b"\n") and bad.count(b"\n") == 1
    status, nonce, _ = identity._parse_reply(agent.handle(f"bogus {NONCE}".encode()).rstrip(b"\n"), "VM a")
    assert (status, nonce) == ("error", NONCE)


def test_template_key_changes_with_the_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = _image(tmp_path)
    inputs = warm.template_inputs(image, "tcg", Resources(), "alice")
    assert inputs["protocol"] == identity.PROTOCOL
    monkeypatch.setattr(identity, "PROTOCOL", identity.PROTOCOL + 1)
    assert warm.template_key(warm.template_inputs(image, "tcg", Resources(), "alice")) != warm.template_key(inputs)


# -- console tails --------------------------------------------------------------------------------
HOSTILE = (
    b"boot ok\r\n"
    b"\x1b]52;c;Y3VybCBldmlsIHwgc2gK\x07clip\n"  # OSC 52: write the user's clipboard
    b"\x1b]8;;http://evil.example/\x1b\\link\x1b]8;;\x1b\\ text\n"  # OSC 8 hyperlink
    b"\x1bP+q544e\x1b\\dcs\n"  # DCS (XTGETTCAP)
    b"\x1b[31mred\x1b[0m \x1b[?1049h alt\n"  # CSI
    b"\xc2\x9b6n c1-csi \xc2\x9d0;title\xc2\x9c c1-osc\n"  # 8-bit C1 CSI and OSC
    b"bell\x07 back\x08space del\x7f tab\there\n"
    b"\x1b]0;unterminated title\n"
    b"\x1b(B\x1bc\x1b7end\n"
)


def test_console_tails_strip_every_control_but_newline_and_tab(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(HOSTILE)
    expected = [
        "boot ok",
        "clip",
        "link text",
        "dcs",
        "red  alt",
        " c1-csi  c1-osc",
        "bell backspace del tab\there",
        "",
        "end",
    ]
    for text in (console.tail_file(log, 50), console.tail_text(HOSTILE, 50)):
        assert text.splitlines() == expected
        assert not any((c < " " and c not in "\t\n") or "\x7f" <= c <= "\x9f" for c in text)
    assert console.tail_file(log, 2).splitlines() == ["", "end"]
    assert console.clean_text("a\x1b]52;c;x\x1b\\b\x1b") == "ab"


def test_tails_read_only_the_end_of_a_huge_log(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    with open(log, "wb") as f:
        f.truncate(8 * 2**30)  # 8 GiB, sparse: reading it all would take long and need that memory
        f.seek(0, os.SEEK_END)
        f.write(b"last line\n")
    tracemalloc.start()
    started = time.monotonic()
    try:
        assert console.tail_file(log, 1) == "last line"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 2.0
    assert peak < 2 * console.TAIL_BYTES + 2**20, peak


def test_console_logs_are_capped_and_the_writer_goes_on(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # as qemu's chardev (append=on)
    with open(fd, "wb", buffering=0) as writer:
        writer.write(b"".join(b"line %06d\n" % i for i in range(2000)))  # 24000 bytes
        assert not console.cap_log(log, limit=30000, keep=1100)
        writer.write(b"".join(b"line %06d\n" % i for i in range(2000, 4000)))
        assert console.cap_log(log, limit=30000, keep=1100)
        assert log.stat().st_size == 0
        kept = console.rotated(log)
        assert kept.read_bytes().endswith(b"line 003999\n") and kept.stat().st_size == 1100
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        writer.write(b"after\n")
    assert log.read_bytes() == b"after\n"  # at the new end: no hole, no zeros
    assert console.tail_file(log, 3).splitlines() == ["line 003998", "line 003999", "after"]


def test_qemu_console_chardev_appends(tmp_path: Path) -> None:
    cfg = warm_config(_image(tmp_path), tmp_path, Resources())
    assert f"file,id=console,path={tmp_path / 'console.log'},append=on" in qemu.build_argv(cfg)


# -- gc: only this user's processes of this state dir -----------------------------------------------
FAKE = """
import os, sys, time
want = sys.argv[1].encode().replace(b"|", b"\\0") + b"\\0"
f = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
start, end = int(f[45]), int(f[46])  # arg_start, arg_end: fields 48 and 49 of proc(5)'s stat
fd = os.open("/proc/self/mem", os.O_RDWR)
os.pwrite(fd, want.ljust(end - start, b"\\0"), start)
os.close(fd)
print("ready", flush=True)
time.sleep(120)
"""


@pytest.fixture
def fake_qemu() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start processes whose /proc/PID/cmdline looks like a ttenv qemu of a given VM dir (a python
    that rewrites its own argv area); all killed afterwards."""
    procs: list[subprocess.Popen[str]] = []

    def start(vmdir: Path, user: int | None = None) -> subprocess.Popen[str]:
        console = f"file,id=console,path={vmdir}/console.log,append=on"
        argv = f"qemu-system-x86_64|-name|ttenv:E/{vmdir.name}|-chardev|{console}"
        python = sys.executable if user is None else "/usr/bin/python3"  # one another user may run
        proc = subprocess.Popen(
            [python, "-c", FAKE, argv, "x" * (len(argv) + 64)],
            stdout=subprocess.PIPE,
            text=True,
            user=user,
            start_new_session=True,
            cwd="/",
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


Fake = Callable[..., "subprocess.Popen[str]"]


def test_gc_reaps_only_its_own_state_dirs_strays(tmp_path: Path, fake_qemu: Fake) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    mine = fake_qemu(ours / "envs" / "e1" / "vm1")  # its run dir was deleted: a stray of ours
    alive_dir = ours / "envs" / "e2" / "vm1"
    alive_dir.mkdir(parents=True)
    alive = fake_qemu(alive_dir)  # its run dir exists: not a stray
    other = fake_qemu(theirs / "envs" / "e3" / "vm1")  # another state dir's (another server, session)
    found = dict(qemu.ttenv_processes())
    assert found[mine.pid] == ours / "envs" / "e1" / "vm1" and other.pid in found
    lines: list[str] = []
    QemuEngine(progress=lines.append).reap_strays(ours, lambda env_id: False)
    assert mine.wait(10) is not None
    assert alive.poll() is None and other.poll() is None
    assert lines == []


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK),
    reason="starting another user's process needs root (and /usr/bin/python3)",
)
def test_gc_never_touches_another_users_processes(tmp_path: Path, fake_qemu: Fake) -> None:
    tmp_path.chmod(0o755)
    state = tmp_path / "state"
    foreign = fake_qemu(state / "envs" / "e1" / "vm1", user=65534)  # nobody, naming our state dir
    assert foreign.pid not in dict(qemu.ttenv_processes())
    assert foreign.pid in dict(qemu.ttenv_processes(uid=65534))
    QemuEngine().reap_strays(state, lambda env_id: False)
    assert foreign.poll() is None


def test_gc_skips_a_process_it_cannot_handle_with_a_line(
    tmp_path: Path, fake_qemu: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    first, second = fake_qemu(state / "envs" / "e1" / "vm1"), fake_qemu(state / "envs" / "e2" / "vm1")
    real_stop, stopped = qemu.stop, []

    def stop(pid: int, marker: str, qmp: Path, grace: float = 2.0) -> None:
        if pid == first.pid:
            raise PermissionError(13, "Permission denied", marker)
        stopped.append(pid)
        real_stop(pid, marker, qmp, grace)

    monkeypatch.setattr(qemu, "stop", stop)
    lines: list[str] = []
    QemuEngine(progress=lines.append).reap_strays(state, lambda env_id: False)
    assert stopped == [second.pid] and first.poll() is None
    assert len(lines) == 1 and lines[0].startswith(f"gc: skipped qemu process {first.pid} (")
    assert "Permission denied" in lines[0]


# -- private files ---------------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_state_dir_and_store_are_private(tmp_path: Path, loose_umask: None) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)  # as older versions left it
    (state / "state.sqlite").touch(0o644)
    LocalBackend(tmp_path / "images", state)
    assert _mode(state) == 0o700 and _mode(state / "state.sqlite") == 0o600
    fresh = tmp_path / "fresh"
    LocalBackend(tmp_path / "images", fresh)
    assert _mode(fresh) == 0o700
    db = sqlite3.connect(fresh / "state.sqlite", isolation_level=None)
    try:  # while a connection is open after a write in WAL mode, its WAL and shared memory exist
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("UPDATE envs SET state='x' WHERE id='nothing'")
        for name in ("state.sqlite", "state.sqlite-wal", "state.sqlite-shm"):
            assert _mode(fresh / name) == 0o600, name
    finally:
        db.close()


def test_seed_iso_is_private_while_it_is_written(
    tmp_path: Path, loose_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = pycdlib.PyCdlib.write_fp

    def write_fp(self: pycdlib.PyCdlib, fp: BinaryIO, *args: Any, **kwargs: Any) -> None:
        seen.append(_mode(tmp_path / "seed.iso.tmp"))
        real(self, fp, *args, **kwargs)

    monkeypatch.setattr(pycdlib.PyCdlib, "write_fp", write_fp)
    key = KeyPair.generate("t")
    seed.write_seed_iso(seed.SeedData("vm", "i", "root", key.public, key), tmp_path / "seed.iso")
    assert seen == [0o600] and _mode(tmp_path / "seed.iso") == 0o600
    assert not (tmp_path / "seed.iso.tmp").exists()


def test_qemu_and_qemu_img_create_private_files(
    tmp_path: Path, loose_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    qemu.create_overlay(base, tmp_path / "overlay.qcow2")
    assert _mode(tmp_path / "overlay.qcow2") == 0o600
    made = tmp_path / "made-by-qemu"
    monkeypatch.setattr(qemu, "build_argv", lambda cfg: ["sh", "-c", f"echo hi > {made}"])
    cfg = warm.qemu_config(
        _image(tmp_path),
        "tcg",
        Resources(),
        name="n",
        disk=base,
        seed=base,
        port=1,
        rundir=tmp_path,
        qmp=base,
        identity=base,
        cmdline="",
        vmgenid="0",
    )
    proc = qemu.start(cfg, tmp_path / "qemu.log", die_with_parent=False)
    assert proc.wait(10) == 0
    assert _mode(made) == 0o600 and _mode(tmp_path / "qemu.log") == 0o600


def test_write_private_replaces_with_mode_0600(tmp_path: Path, loose_umask: None) -> None:
    f = tmp_path / "f"
    f.write_text("old")
    f.chmod(0o644)
    paths.write_private(f, "new")
    assert f.read_text() == "new" and _mode(f) == 0o600


def test_runtime_dir_is_private_or_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made = paths.runtime_dir()
    assert made == tmp_path / f"ttenv-{os.getuid()}" and _mode(made) == 0o700
    made.chmod(0o755)  # as if another user (or a careless umask) made it: it is not used
    with pytest.raises(TTError, match="is not a private directory of this user"):
        paths.runtime_dir()
    assert _mode(made) == 0o755  # refused, not "fixed"
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert paths.runtime_dir() == xdg / "ttenv" and _mode(xdg / "ttenv") == 0o700
    (xdg / "ttenv" / "env1").mkdir()
    assert paths.socket_dir("env1") == xdg / "ttenv" / "env1"
    monkeypatch.delenv("XDG_RUNTIME_DIR")  # another process of the same user (cron, su) finds it not
    made.chmod(0o700)
    assert paths.socket_dir("env1") == made / "env1"
    xdg.chmod(0o755)  # an XDG_RUNTIME_DIR that is not private (another user's, after su): not used
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert paths.runtime_dir() == made


# -- pids recorded before any wait; VMs nobody will start ---------------------------------------------
def _image(root: Path) -> ImageInfo:
    d = root / "img"
    d.mkdir(exist_ok=True)
    for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (d / name).write_bytes(b"x")
    info = ImageInfo("debian-12-x86_64", "debian", "12", "x86_64", cmdline="root=/dev/vda")
    (d / "image.json").write_text(json.dumps(info.to_dict()))
    return ImageInfo.from_dict(info.to_dict(), path=d)


def test_the_pid_is_recorded_before_qemu_is_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = _image(tmp_path)
    vmdir = tmp_path / "run" / "vm1"
    vmdir.mkdir(parents=True)
    recorded: list[int] = []
    info = VmInfo("vm1", image.name, "debian", "12", "x86_64", port=2222)
    proc = subprocess.Popen(["sleep", "30"])
    monkeypatch.setattr(qemu, "create_overlay", lambda *a, **k: None)
    monkeypatch.setattr(qemu, "start", lambda *a, **k: proc)

    def wait_monitor(p: subprocess.Popen[bytes], qmp: Path, timeout: float = 10.0) -> bool:
        assert recorded == [proc.pid]  # stored before this wait began
        return True

    monkeypatch.setattr(QemuEngine, "_wait_monitor", staticmethod(wait_monitor))
    env = EnvInfo("e1", "E", "me", 0.0, None, "booting", rundir=str(vmdir.parent))
    spec = EnvSpec("E", (VmSpec("vm1", image.name),), "k")
    job = Start(
        env,
        spec,
        spec.vms[0],
        image,
        "tcg",
        info,
        vmdir,
        vmdir / "seed.iso",
        KeyPair.generate("t"),
        "0" * 32,
        Boot("cold", "cold requested"),
        move_port=lambda: 1,
        record=lambda: recorded.append(info.pid),
    )
    try:
        QemuEngine().start([job])
    finally:
        proc.kill()
        proc.wait()
    assert info.pid == proc.pid and recorded == [proc.pid]


def _pending_env(backend: LocalBackend, env_id: str, creator: dict[str, object] | None) -> None:
    rundir = backend.state / "envs" / env_id
    rundir.mkdir(parents=True)
    if creator is not None:
        (rundir / sweep.CREATOR).write_text(json.dumps(creator))
    env = EnvInfo(env_id, env_id, "me", time.time(), None, "booting", rundir=str(rundir))
    backend.store.add_env(env, None, None)
    vm = VmInfo("vm1", "debian-12-x86_64", "debian", "12", "x86_64", state="booting", boot="warm", pid=0)
    backend.store.reserve_port(env_id, vm, iter([20000 + len(backend.store.list_envs())]))


def test_vms_whose_creator_is_gone_fail_when_the_backend_opens(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "images", tmp_path / "state")
    dead = subprocess.Popen(["true"])
    dead.wait()
    _pending_env(backend, "gone", {"pid": dead.pid, "start": 1})
    _pending_env(backend, "alive", {"pid": os.getpid(), "start": owner.start_time(os.getpid())})
    _pending_env(backend, "unknown", None)
    reopened = LocalBackend(tmp_path / "images", tmp_path / "state")
    states = {e.id: (e.state, e.vms[0].state, e.vms[0].error) for e in reopened.store.list_envs()}
    assert states["alive"] == ("booting", "booting", "")
    for env_id in ("gone", "unknown"):
        assert states[env_id][:2] == ("failed", "failed")
        assert states[env_id][2] == f"VM vm1 was never started: the process that created ENV {env_id} is gone"
    reopened.delete_env("gone")  # failed VMs are deleted like any other
    assert not (tmp_path / "state" / "envs" / "gone").exists()


def test_a_store_written_by_others_is_still_opened(tmp_path: Path) -> None:
    Store(tmp_path / "s" / "state.sqlite")  # an existing store: its mode is tightened, not replaced
    LocalBackend(tmp_path / "images", tmp_path / "s")
    assert _mode(tmp_path / "s" / "state.sqlite") == 0o600
