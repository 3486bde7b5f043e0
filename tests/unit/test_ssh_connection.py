"""pytest_ttenv.ssh's connections against a real OpenSSH sshd on 127.0.0.1: host keys, reachability,
reconnects, close() and reboot()."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pytest_ttenv.ssh as ssh
import pytest_ttenv.ssh.connection as connection_module
from pytest_ttenv.ssh import Connection, HostKeyMismatch, SshError, SshTarget, Unreachable

from helpers.sshd import Sshd, free_port, have_sshd, keygen, start_sshd

pytestmark = pytest.mark.skipif(not have_sshd(), reason="needs root, openssh-server and ssh-keygen")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    s = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield s
    s.stop()


@pytest.fixture
def own_sshd(tmp_path: Path) -> Iterator[Sshd]:
    """An sshd this test may restart or stop."""
    s = start_sshd(tmp_path / "own-sshd")
    yield s
    s.stop()


def wait_until(cond: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return True
        time.sleep(0.02)
    return False


def test_wrong_host_key_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host_key")
    t = SshTarget("debian-12-x86_64", "127.0.0.1", sshd.port, "root", sshd.client_key, other)
    c = Connection(t)
    with pytest.raises(HostKeyMismatch) as ei:
        c.run("true")
    msg = str(ei.value)
    assert msg.startswith("debian-12-x86_64: host key mismatch") and "SHA256:" in msg
    with pytest.raises(HostKeyMismatch):
        c.wait_ssh(5)  # not retried: a wrong key is final


def test_known_hosts_files_are_not_touched(sshd: Sshd) -> None:
    home_kh = Path.home() / ".ssh" / "known_hosts"
    before = home_kh.read_bytes() if home_kh.exists() else None
    c = Connection(sshd.target())
    c.run("true")
    c.close()
    assert (home_kh.read_bytes() if home_kh.exists() else None) == before


def test_unreachable_port_fails_fast(sshd: Sshd) -> None:
    t = SshTarget("vm-down", "127.0.0.1", free_port(), "root", sshd.client_key, sshd.host_key)
    started = time.monotonic()
    with pytest.raises(Unreachable) as ei:
        Connection(t).run("true")
    assert time.monotonic() - started < 2
    assert str(ei.value).startswith("vm-down: ") and "refused" in str(ei.value)


def test_wait_ssh_retries_until_sshd_listens(own_sshd: Sshd) -> None:
    own_sshd.stop()
    c = Connection(own_sshd.target())
    with pytest.raises(Unreachable) as ei:
        c.wait_ssh(0.5)
    assert "waited for TCP connect, SSH banner, login and `true`" in str(ei.value)
    timer = threading.Timer(1.0, own_sshd.start)
    timer.start()
    started = time.monotonic()
    c.wait_ssh(15)
    assert 0.9 < time.monotonic() - started < 10
    timer.join()
    assert c.run("echo up").stdout == "up\n"
    c.close()


@pytest.mark.parametrize("mode", ["agent", "exec"])
def test_reconnects_after_sshd_restart(own_sshd: Sshd, mode: str) -> None:
    c = Connection(own_sshd.target(), use_agent=mode == "agent")
    first = c.run("echo $PPID").stdout
    own_sshd.restart()  # kills every session too: the connection drops
    assert c.run("echo again").stdout == "again\n"
    assert c.run("echo $PPID").stdout != first
    c.close()


def test_connection_lost_mid_command_is_unreachable(own_sshd: Sshd) -> None:
    c = Connection(own_sshd.target())
    c.run("true")
    timer = threading.Timer(0.5, own_sshd.restart)
    timer.start()
    with pytest.raises(Unreachable) as ei:
        c.run("sleep 10")
    timer.join()
    assert "connection lost while running 'sleep 10'" in str(ei.value)
    assert c.run("echo back").stdout == "back\n"
    c.close()


def test_agent_restarts_after_it_dies(sshd: Sshd) -> None:
    c = Connection(sshd.target())
    c.run("true")
    pid = c.agent_pid
    assert pid is not None
    os.kill(pid, 9)
    assert wait_until(lambda: c.agent_pid is None)
    assert c.run("echo ok").stdout == "ok\n"
    assert c.agent_pid not in (None, pid)
    c.close()


def test_close_then_reuse(sshd: Sshd) -> None:
    c = Connection(sshd.target())
    c.run("true")
    c.close()
    assert c.agent_pid is None
    assert c.run("echo reopened").stdout == "reopened\n"
    ssh.close_all()
    assert c.agent_pid is None


@pytest.mark.parametrize("mode", ["agent", "exec"])
def test_close_interrupts_running_commands(sshd: Sshd, mode: str) -> None:
    c = Connection(sshd.target(), use_agent=mode == "agent")
    c.run("true")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            c.run("sleep 30")
        except SshError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)
    c.close()
    t.join(5)
    assert [str(e) for e in errors] == ["sshd-test: connection closed by close() while running 'sleep 30'"]
    assert c.run("echo reopened").stdout == "reopened\n"
    c.close()


def test_reboot_waits_for_a_new_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    (fakebin / "reboot").write_text(
        f"#!/bin/sh\nif [ -e {tmp_path}/deny ]; then echo 'reboot: denied' >&2; exit 1; fi\n"
        f"touch {tmp_path}/rebooting\n"
    )
    (fakebin / "reboot").chmod(0o755)
    (tmp_path / "boot_id").write_text("one\n")
    monkeypatch.setattr(connection_module, "BOOT_ID_CMD", f"cat {tmp_path}/boot_id")
    s = start_sshd(tmp_path / "sshd", extra_config=f"PATH={fakebin}:/usr/bin:/bin")
    try:
        c = Connection(s.target())
        (tmp_path / "deny").touch()
        with pytest.raises(SshError, match="'reboot' failed with exit status 1: reboot: denied"):
            c.reboot(30)
        (tmp_path / "deny").unlink()

        def fake_reboot() -> None:
            assert wait_until(lambda: (tmp_path / "rebooting").exists(), 10)
            time.sleep(0.3)
            (tmp_path / "boot_id").write_text("two\n")
            s.restart()

        t = threading.Thread(target=fake_reboot)
        t.start()
        c.reboot(30)
        t.join()
        assert c.run(f"cat {tmp_path}/boot_id").stdout == "two\n"
        c.close()
    finally:
        s.stop()
