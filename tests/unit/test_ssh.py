"""pytest_ttenv.ssh against a real OpenSSH sshd on 127.0.0.1 (and asyncssh servers for fan-out): what
commands do on both paths, timeouts, big output, the agent over pipes, files, fan-out. Connections
(host keys, reconnects, reboot) are in test_ssh_connection.py; what needs no server in test_ssh_static.py."""

from __future__ import annotations

import asyncio
import logging
import pickle
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pytest_ttenv.ssh as ssh
import pytest_ttenv.ssh.ttagent as ttagent
from pytest_ttenv.ssh import (
    CommandFailed,
    CommandTimeout,
    Connection,
    RunResult,
    SshError,
    SshTarget,
    Unreachable,
    fan_out,
)
from pytest_ttenv.ssh.command import build

from helpers.sshd import Farm, Sshd, free_port, have_sshd, path_without_python, start_farm, start_sshd

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


@pytest.fixture(params=["agent", "exec"])
def conn(request: pytest.FixtureRequest, sshd: Sshd) -> Iterator[Connection]:
    c = Connection(sshd.target(), use_agent=request.param == "agent", default_timeout=30)
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
    if build(cmd, None, None, None, False, "root").argv is None:
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


class LocalAgent:
    """ttagent.py run directly on this machine over pipes, for protocol-level tests."""

    def __init__(self, *, popen: bool) -> None:
        src = Path(ttagent.__file__).read_bytes()
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
        assert (typ, rid) == (ttagent.HELLO, 0) and hello.startswith(b"ttagent 1 pid=")

    def send(self, typ: int, rid: int, payload: bytes = b"") -> None:
        self.stdin.write(ttagent.HDR.pack(typ, rid, len(payload)) + payload)
        self.stdin.flush()

    def run(self, rid: int, script: str, argv: tuple[str, ...] = (), stdin: bytes = b"", timeout: str = "") -> None:
        fields = [timeout.encode(), script.encode(), ttagent.pack([a.encode() for a in argv]), ttagent.pack([])]
        self.send(ttagent.RUN, rid, ttagent.pack([*fields, stdin, b""]))

    def frame(self) -> tuple[int, int, bytes]:
        typ, rid, n = ttagent.HDR.unpack(self.stdout.read(ttagent.HDR.size))
        return typ, rid, self.stdout.read(n)

    def results(self, count: int) -> dict[int, tuple[bytes, bytes, list[bytes]]]:
        out: dict[int, tuple[bytes, bytes, list[bytes]]] = {}
        acc: dict[int, tuple[bytearray, bytearray]] = {}
        while len(out) < count:
            typ, rid, data = self.frame()
            o, e = acc.setdefault(rid, (bytearray(), bytearray()))
            if typ == ttagent.OUT:
                o += data
            elif typ == ttagent.ERR:
                e += data
            else:
                assert typ == ttagent.EXIT
                out[rid] = (bytes(o), bytes(e), ttagent.unpack(data))
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
    agent.send(ttagent.KILL, 4)
    agent.send(ttagent.KILL, 99)  # unknown ids are ignored
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
