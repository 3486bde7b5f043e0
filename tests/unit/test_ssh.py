"""pytest_ttenv.ssh against a real OpenSSH sshd on 127.0.0.1 (and asyncssh servers for fan-out)."""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import pickle
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pytest_ttenv.ssh as ssh
import pytest_ttenv.ssh_agent as ssh_agent
from pytest_ttenv.ssh import (
    CommandFailed,
    CommandTimeout,
    Connection,
    HostKeyMismatch,
    RunResult,
    SshError,
    SshTarget,
    Unreachable,
    fan_out,
)

from helpers.sshd import Farm, Sshd, free_port, have_sshd, keygen, path_without_python, start_farm, start_sshd

pytestmark = pytest.mark.skipif(not have_sshd(), reason="needs root, openssh-server and ssh-keygen")

MiB = 1 << 20


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    s = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sshd_nopython(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    d = tmp_path_factory.mktemp("sshd-nopython")
    s = start_sshd(d, extra_config="PATH=" + path_without_python(d / "bin"))
    yield s
    s.stop()


@pytest.fixture
def own_sshd(tmp_path: Path) -> Iterator[Sshd]:
    """An sshd this test may restart or stop."""
    s = start_sshd(tmp_path / "own-sshd")
    yield s
    s.stop()


def connect(target: SshTarget, mode: str, **kw: float) -> Connection:
    return Connection(target, use_agent=mode == "agent", **kw)


@pytest.fixture(params=["agent", "exec"])
def conn(request: pytest.FixtureRequest, sshd: Sshd) -> Iterator[Connection]:
    c = connect(sshd.target(), request.param, default_timeout=30)
    c.run("true")
    assert (c.agent_pid is not None) == (request.param == "agent")
    yield c
    c.close()


@pytest.fixture(scope="module")
def pair(sshd: Sshd) -> Iterator[tuple[Connection, Connection]]:
    a, e = Connection(sshd.target(), default_timeout=30), Connection(sshd.target(), use_agent=False)
    yield a, e
    a.close()
    e.close()


def gone(pid: int) -> bool:
    """True if *pid* no longer runs (absent or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until(cond: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return True
        time.sleep(0.02)
    return False


# ---------------------------------------------------------------------------------------------
# run: results


def test_run_stdout_stderr_status(conn: Connection) -> None:
    r = conn.run("echo out; echo err >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_status, r.ok) == ("out\n", "err\n", 3, False)
    assert r.vm == "sshd-test" and r.command == "echo out; echo err >&2; exit 3"
    assert 0 < r.duration < 5
    assert conn.run("true").ok
    assert "exit_status=3" in repr(r)


def test_sequence_is_quoted_not_interpreted(conn: Connection) -> None:
    r = conn.run(["printf", "%s|", "a b", "$HOME", "*", "it's"])
    assert r.stdout == "a b|$HOME|*|it's|"
    assert r.command == "printf '%s|' 'a b' '$HOME' '*' 'it'\"'\"'s'"


def test_env_cwd_input(conn: Connection, tmp_path: Path) -> None:
    r = conn.run('pwd; echo "$A|$B"; cat', cwd=str(tmp_path), env={"A": "x y", "B": "$not'expanded"}, input="in\n")
    assert r.stdout == f"{tmp_path}\nx y|$not'expanded\nin\n"
    assert conn.run(["wc", "-c"], input=b"\0" * (3 * MiB)).stdout.strip() == str(3 * MiB)
    assert conn.run(["env"], env={"ONLY": "1"}).stdout.count("ONLY=1\n") == 1
    bad = conn.run("true", cwd="/nonexistent/dir")
    assert bad.exit_status == 2 and "can't cd to /nonexistent/dir" in bad.stderr


def test_bad_arguments_raise_value_error(conn: Connection) -> None:
    with pytest.raises(ValueError):
        conn.run([])
    with pytest.raises(ValueError):
        conn.run("true", env={"NOT-A-NAME": "x"})
    with pytest.raises(ValueError):
        conn.run("echo \0")


def test_command_not_found_is_127(conn: Connection) -> None:
    for cmd in ("no-such-command-xyz", ["no-such-command-xyz", "arg"]):
        r = conn.run(cmd)
        assert r.exit_status == 127
        assert "no-such-command-xyz: not found" in r.stderr


def test_signal_death_is_128_plus_n(conn: Connection) -> None:
    assert conn.run("kill -9 $$").exit_status == 137
    assert conn.run("kill -TERM $$").exit_status == 143
    assert conn.run(["sh", "-c", "kill -9 $$"]).exit_status == 137


def test_binary_and_non_utf8_output(conn: Connection) -> None:
    r = conn.run("printf 'a\\000b\\377\\376c'; printf '\\351' >&2")
    assert r.stdout_bytes == b"a\0b\xff\xfec"
    assert r.stderr_bytes == b"\xe9"
    assert r.stdout == "a\0b\ufffd\ufffdc" and r.stderr == "\ufffd"


def test_check_raises_command_failed(conn: Connection) -> None:
    with pytest.raises(CommandFailed) as ei:
        conn.run("echo first >&2; echo 'the reason' >&2; exit 4", check=True)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("sshd-test: command ")
    assert "exit status 4" in msg and "the reason" in msg and "echo first" in msg
    assert ei.value.result.exit_status == 4 and ei.value.vm == "sshd-test"
    again = pickle.loads(pickle.dumps(ei.value))
    assert str(again) == msg and again.result == ei.value.result
    assert conn.run("true", check=True).ok


def test_sudo_as_root_runs_without_sudo(conn: Connection) -> None:
    assert conn.run("id -u", sudo=True).stdout == "0\n"  # sudo is not even installed here


def test_sudo_wraps_for_other_users() -> None:
    req = ssh._build("id -u", {"A": "1"}, "/tmp", None, True, "debian")
    assert req.script == "sudo -n /bin/sh -c 'cd -- /tmp || exit; export A=1; id -u'"
    assert req.argv == ["sudo", "-n", "/bin/sh", "-c", "cd -- /tmp || exit; export A=1; id -u"]


def test_simple_commands_skip_the_shell() -> None:
    def argv(cmd: str | list[str]) -> list[str] | None:
        return ssh._build(cmd, None, None, None, False, "root").argv

    assert argv("uname -a") == ["uname", "-a"]
    assert argv(["ls", "-l", "a b"]) == ["ls", "-l", "a b"]
    for shelly in ("echo hi", "true", "ls *", "A=1 env", "ls; ls", "cat $HOME", "ls ~", "cd /", ["exit", "3"]):
        assert argv(shelly) is None, shelly
    assert ssh._build("uname", None, "/tmp", None, False, "root").argv is None


# ---------------------------------------------------------------------------------------------
# agent and exec channels agree byte for byte

EQUAL_CASES: list[tuple[str | list[str], dict[str, object]]] = [
    ("echo hello; echo err >&2", {}),
    ("printf 'a\\000\\377\\376'; printf '\\001' >&2", {}),
    ("exit 7", {}),
    ("kill -9 $$", {}),
    ("kill -TERM $$", {}),
    ("sh -c 'kill -9 $$'; echo after $?", {}),
    ("no-such-command-xyz", {}),
    (["no-such-command-xyz", "arg"], {}),
    (["/etc/passwd"], {}),
    ("uname -a", {}),
    (["printf", "%s|", "a b", "$HOME", "*"], {}),
    ("cat; echo", {"input": b"\0binary\xff input"}),
    ("pwd; echo $OLDPWD", {"cwd": "/tmp"}),
    ("true", {"cwd": "/nonexistent"}),
    ('echo "$A"', {"env": {"A": "1 2 'three'"}}),
    ("echo $0 $# $$ | wc -w; umask; ulimit -n; id; tty; echo $SHLVL", {}),
    ("sleep 0.05 & echo bg", {}),
    ("exec 1>&-; echo to-stderr >&2", {}),
    ("read x; echo got $x; read y || echo eof", {"input": "one\n"}),
]


def _strip_ssh_vars(data: bytes) -> bytes:
    # SSH_CLIENT / SSH_CONNECTION name each connection's own client port
    return b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(b"SSH_"))


@pytest.mark.parametrize("case", range(len(EQUAL_CASES)))
def test_agent_and_exec_channels_are_byte_identical(pair: tuple[Connection, Connection], case: int) -> None:
    cmd, kw = EQUAL_CASES[case]
    agent, exec_ = pair
    a = agent.run(cmd, **kw)  # type: ignore[arg-type]
    e = exec_.run(cmd, **kw)  # type: ignore[arg-type]
    assert agent.agent_pid is not None and exec_.agent_pid is None
    assert (a.exit_status, a.stdout_bytes, a.stderr_bytes) == (e.exit_status, e.stdout_bytes, e.stderr_bytes)


@pytest.mark.parametrize("cmd", [["env"], "env", "env | cat", "exec env"])
def test_environment_is_identical(pair: tuple[Connection, Connection], cmd: str | list[str]) -> None:
    agent, exec_ = pair
    a, e = _strip_ssh_vars(agent.run(cmd).stdout_bytes), _strip_ssh_vars(exec_.run(cmd).stdout_bytes)
    assert b"PWD=" in a and b"LC_CTYPE" not in a  # no trace of Python's C-locale coercion
    if ssh._build(cmd, None, None, None, False, "root").argv is None:
        assert a == e
    else:  # executed without /bin/sh: same variables, but not in the order sh would pass them
        assert sorted(a.splitlines()) == sorted(e.splitlines())


# ---------------------------------------------------------------------------------------------
# timeouts, big output, concurrency


def test_timeout_kills_the_remote_process_group(conn: Connection, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as ei:
        conn.run(f"echo partial; sh -c 'echo $$ > {pidfile}; exec sleep 60' & sleep 61", timeout=1.0)
    assert time.monotonic() - started < 4
    msg = str(ei.value)
    assert msg.startswith("sshd-test: ") and "sleep 61" in msg and "1 s" in msg
    assert ei.value.stdout_bytes == b"partial\n" and ei.value.timeout == 1.0
    pid = int(pidfile.read_text())
    assert wait_until(lambda: gone(pid)), f"remote process {pid} survived the timeout"
    assert conn.run("echo alive").stdout == "alive\n"


def test_default_timeout_applies(sshd: Sshd) -> None:
    c = Connection(sshd.target(), default_timeout=0.5)
    with pytest.raises(CommandTimeout):
        c.run("sleep 5")
    c.close()


def test_100_mib_stdout(conn: Connection) -> None:
    size = 100 * MiB
    r = conn.run(f"yes 0123456789abcdef | head -c {size}", timeout=60, max_output=size)
    line = b"0123456789abcdef\n"
    assert len(r.stdout_bytes) == size
    assert r.stdout_bytes == (line * (size // len(line) + 1))[:size]
    if conn.agent_pid is not None:
        status = Path(f"/proc/{conn.agent_pid}/status").read_text()
        peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
        assert peak_kib < 40 * 1024, f"agent peak RSS {peak_kib} KiB"


def test_concurrent_calls_from_threads(conn: Connection) -> None:
    results: dict[int, RunResult] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(3):
                results[i * 10 + j] = conn.run(f"sleep 0.1; echo {i}-{j}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(24)]  # > MaxSessions (10)
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert {k: r.stdout for k, r in results.items()} == {i * 10 + j: f"{i}-{j}\n" for i in range(24) for j in range(3)}
    assert time.monotonic() - started < 5  # concurrent, not 72 x 0.1 s


def test_arun_from_any_event_loop(conn: Connection) -> None:
    async def main() -> list[RunResult]:
        return await asyncio.gather(*(conn.arun(f"echo {i}") for i in range(20)))

    assert [r.stdout for r in asyncio.run(main())] == [f"{i}\n" for i in range(20)]


# ---------------------------------------------------------------------------------------------
# host keys, reachability, reconnects


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
    c = connect(own_sshd.target(), mode)
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
    c = connect(sshd.target(), mode)
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
    monkeypatch.setattr(ssh, "_BOOT_ID_CMD", f"cat {tmp_path}/boot_id")
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


# ---------------------------------------------------------------------------------------------
# fallback without python3


def test_falls_back_to_exec_channels_without_python3(sshd_nopython: Sshd, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pytest_ttenv.ssh")
    c = Connection(sshd_nopython.target())
    assert c.run("command -v python3 || echo none").stdout == "none\n"
    for _ in range(3):
        assert c.run(["printf", "%s", "x y"]).stdout == "x y"
    assert c.agent_pid is None
    notes = [r for r in caplog.records if "agent unavailable" in r.getMessage()]
    assert len(notes) == 1 and "127" in notes[0].getMessage()
    with pytest.raises(CommandTimeout):
        c.run("sleep 5", timeout=0.5)
    c.close()


def test_agent_uses_only_python3_minimal_modules() -> None:
    source = (Path(ssh.__file__).parent / "ssh_agent.py").read_text()
    assert source.isascii()
    tree = ast.parse(source, feature_version=(3, 6))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    allowed = {"errno", "os", "selectors", "signal", "struct", "subprocess", "sys", "time", "typing"}
    assert imported <= allowed
    guarded = {id(n) for i in ast.walk(tree) if isinstance(i, ast.If) and ast.unparse(i.test) == "MYPY" for n in i.body}
    assert all(id(n) in guarded for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))  # type checkers only


class LocalAgent:
    """ssh_agent.py run directly on this machine over pipes, for protocol-level tests."""

    def __init__(self, *, popen: bool) -> None:
        src = Path(ssh_agent.__file__).read_bytes()
        boot = (
            "import os\n"
            + ("del os.posix_spawn\n" if popen else "")
            + f"n={len(src)}\nb=b''\nwhile len(b)<n:\n b+=os.read(0,n-len(b))\nexec(compile(b,'ttagent','exec'))"
        )
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", "-I", "-S", "-c", boot, "", ""], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.stdin.write(src)
        self.stdin.flush()
        typ, rid, hello = self.frame()
        assert (typ, rid) == (ssh_agent.HELLO, 0) and hello.startswith(b"ttagent 1 pid=")

    def send(self, typ: int, rid: int, payload: bytes = b"") -> None:
        self.stdin.write(ssh_agent.HDR.pack(typ, rid, len(payload)) + payload)
        self.stdin.flush()

    def run(self, rid: int, script: str, argv: tuple[str, ...] = (), stdin: bytes = b"", timeout: str = "") -> None:
        fields = [timeout.encode(), script.encode(), ssh_agent.pack([a.encode() for a in argv]), ssh_agent.pack([])]
        self.send(ssh_agent.RUN, rid, ssh_agent.pack([*fields, stdin, b""]))

    def frame(self) -> tuple[int, int, bytes]:
        typ, rid, n = ssh_agent.HDR.unpack(self.stdout.read(ssh_agent.HDR.size))
        return typ, rid, self.stdout.read(n)

    def results(self, count: int) -> dict[int, tuple[bytes, bytes, list[bytes]]]:
        out: dict[int, tuple[bytes, bytes, list[bytes]]] = {}
        acc: dict[int, tuple[bytearray, bytearray]] = {}
        while len(out) < count:
            typ, rid, data = self.frame()
            o, e = acc.setdefault(rid, (bytearray(), bytearray()))
            if typ == ssh_agent.OUT:
                o += data
            elif typ == ssh_agent.ERR:
                e += data
            else:
                assert typ == ssh_agent.EXIT
                out[rid] = (bytes(o), bytes(e), ssh_agent.unpack(data))
        return out


@pytest.mark.parametrize("popen", [False, True], ids=["posix_spawn", "popen"])
def test_agent_protocol_directly(popen: bool, tmp_path: Path) -> None:
    agent = LocalAgent(popen=popen)
    agent.run(1, "echo out; echo err >&2; exit 3")
    agent.run(2, "", argv=("wc", "-c"), stdin=b"x" * (2 * MiB))
    agent.run(3, "sleep 30", timeout="0.3")
    agent.run(4, "sleep 30")
    agent.run(5, "no-such-command-xyz", argv=("no-such-command-xyz",))
    agent.run(6, "kill -TERM $$")
    agent.send(ssh_agent.KILL, 4)
    agent.send(ssh_agent.KILL, 99)  # unknown ids are ignored
    res = agent.results(6)
    assert res[1] == (b"out\n", b"err\n", [b"3", b""])
    assert res[2] == (f"{2 * MiB}\n".encode(), b"", [b"0", b""])
    assert res[3][2] == [b"137", b"t"] and res[4][2] == [b"137", b"t"]
    assert res[5] == (b"", b"/bin/sh: 1: no-such-command-xyz: not found\n", [b"127", b""])
    assert res[6][2] == [b"143", b""]
    pidfile = tmp_path / "pid"
    agent.run(7, f"echo $$ > {pidfile}; exec sleep 30")
    assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    agent.stdin.close()  # EOF: the agent kills what runs and exits
    assert agent.proc.wait(5) == 0
    agent.stdout.close()
    pid = int(pidfile.read_text())
    assert wait_until(lambda: gone(pid))


# ---------------------------------------------------------------------------------------------
# files


def test_put_get_files_and_directories(conn: Connection, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "tool.sh").write_bytes(b"#!/bin/sh\necho \xff\n")
    (src / "sub" / "tool.sh").chmod(0o755)
    remote = tmp_path / "remote"
    conn.put(src / "a.txt", f"{remote}/deep/er/a.txt")  # parents are created
    assert (remote / "deep/er/a.txt").read_text() == "alpha\n"
    conn.put(src / "a.txt", f"{remote}/deep")  # an existing directory: the copy goes inside
    assert (remote / "deep/a.txt").read_text() == "alpha\n"
    conn.put(src, f"{remote}/tree")
    assert conn.run(f"{remote}/tree/sub/tool.sh").stdout_bytes == b"\xff\n"  # mode kept
    back = tmp_path / "back"
    conn.get(f"{remote}/tree", back)
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*")) == ["a.txt", "sub", "sub/tool.sh"]
    assert (back / "sub/tool.sh").read_bytes() == b"#!/bin/sh\necho \xff\n"
    conn.get(f"{remote}/deep/er/a.txt", tmp_path / "one.txt")
    assert (tmp_path / "one.txt").read_text() == "alpha\n"
    with pytest.raises(SshError) as ei:
        conn.get(f"{remote}/missing", tmp_path / "x")
    assert str(ei.value).startswith("sshd-test: get ")
    with pytest.raises(FileNotFoundError):
        conn.put(tmp_path / "missing", "/tmp/x")


def test_write_text_read_text(conn: Connection, tmp_path: Path) -> None:
    path = f"{tmp_path}/new/dir/file.txt"
    conn.write_text(path, "héllo\nwörld\n")
    assert Path(path).read_text() == "héllo\nwörld\n"
    assert conn.read_text(path) == "héllo\nwörld\n"
    conn.write_text(path, "short")
    assert conn.read_text(path) == "short"
    with pytest.raises(SshError, match=r"^sshd-test: read "):
        conn.read_text(f"{tmp_path}/nope")


def test_sftp_survives_a_reconnect(own_sshd: Sshd, tmp_path: Path) -> None:
    c = Connection(own_sshd.target())
    c.write_text(f"{tmp_path}/f", "1")
    own_sshd.restart()
    c.write_text(f"{tmp_path}/f", "2")
    assert c.read_text(f"{tmp_path}/f") == "2"
    c.close()


# ---------------------------------------------------------------------------------------------
# fan-out


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    f = start_farm(tmp_path_factory.mktemp("farm"), 200)
    yield f
    f.stop()


def test_fan_out_to_200_endpoints(farm: Farm, sshd: Sshd) -> None:
    conns = [Connection(farm.target(i), use_agent=i % 2 == 0) for i in range(200)]
    down = Connection(SshTarget("down", "127.0.0.1", free_port(), "root", farm.client_key, farm.host_key))
    started = time.monotonic()
    results = fan_out([*conns, down], "true", timeout=30, max_concurrent_connects=50)
    elapsed = time.monotonic() - started
    assert isinstance(results["down"], Unreachable)
    ok = {name: r for name, r in results.items() if isinstance(r, RunResult)}
    assert len(ok) == 200
    assert all(r.ok and r.stdout == f"{farm.ports[int(name[2:])]}\n" for name, r in ok.items())
    assert elapsed < 15
    again = fan_out(conns, "true")  # connections are reused
    assert all(isinstance(r, RunResult) and r.ok for r in again.values())
    for c in conns:
        c.close()


def test_fan_out_real_sshd_and_unique_names(sshd: Sshd) -> None:
    conns = [Connection(sshd.target(f"vm{i}")) for i in range(4)]
    results = fan_out(conns, "echo $((6 * 7))")
    assert {k: r.stdout for k, r in results.items() if isinstance(r, RunResult)} == {f"vm{i}": "42\n" for i in range(4)}
    with pytest.raises(ValueError):
        fan_out([conns[0], conns[0]], "true")
    for c in conns:
        c.close()


def test_sync_api_refuses_the_loop_thread(conn: Connection) -> None:
    async def inside() -> None:
        with pytest.raises(RuntimeError):
            conn.run("true")

    asyncio.run_coroutine_threadsafe(inside(), ssh.loop()).result(10)
