"""pytest_ttenv.ssh without any SSH server: command building, the one `run` signature, the one error
root, and the agent program's source (what it imports, the wire format it shares with the host)."""

from __future__ import annotations

import ast
import asyncio
import inspect
import pickle
import re
from pathlib import Path

import pytest

import pytest_ttenv.ssh as ssh
import pytest_ttenv.ssh.ttagent as ttagent
from pytest_ttenv.errors import TTError
from pytest_ttenv.ssh import CommandTimeout, Connection, SshError, SshTarget
from pytest_ttenv.ssh.command import build


def test_sudo_wraps_for_other_users() -> None:
    req = build("id -u", {"A": "1"}, "/tmp", None, True, "debian")
    assert req.script == "sudo -n /bin/sh -c 'cd -- /tmp || exit; export A=1; id -u'"
    assert req.argv == ["sudo", "-n", "/bin/sh", "-c", "cd -- /tmp || exit; export A=1; id -u"]


def test_simple_commands_skip_the_shell() -> None:
    def argv(cmd: str | list[str]) -> list[str] | None:
        return build(cmd, None, None, None, False, "root").argv

    assert argv("uname -a") == ["uname", "-a"]
    assert argv(["ls", "-l", "a b"]) == ["ls", "-l", "a b"]
    for shelly in ("echo hi", "true", "ls *", "A=1 env", "ls; ls", "cat $HOME", "ls ~", "cd /", ["exit", "3"]):
        assert argv(shelly) is None, shelly
    assert build("uname", None, "/tmp", None, False, "root").argv is None


def test_run_options_are_one_signature() -> None:
    """Connection.run, Connection.arun and Vm.run take the same keywords, defined once (RunOptions),
    the ones docs/reference.md lists; a misspelt one is a TypeError before anything connects."""
    from pytest_ttenv.fixtures.handles import Vm

    def keywords(f: object) -> list[str]:
        params = list(inspect.signature(f).parameters.values())[1:]  # type: ignore[arg-type]
        return [f"{p.name}: {p.annotation}" for p in params]

    assert keywords(Connection.run) == keywords(Connection.arun) == keywords(Vm.run)
    assert keywords(Vm.run) == ["cmd: str | Sequence[str]", "options: Unpack[RunOptions]"]
    reference = (Path(__file__).resolve().parents[2] / "docs" / "reference.md").read_text()
    documented = re.search(r"`run\(cmd, \*, ([^)]*)\)`", reference)
    assert documented is not None
    assert [kw.split("=")[0] for kw in documented.group(1).split(", ")] == list(ssh.RunOptions.__annotations__)
    c = Connection(SshTarget("nowhere", "127.0.0.1", 1, "root", Path("/nonexistent/key"), "ssh-ed25519 AAAA"))
    with pytest.raises(TypeError, match="unexpected keyword argument 'tmeout'"):
        c.run("true", tmeout=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'chek'"):
        asyncio.run(c.arun("true", chek=True))  # type: ignore[call-arg]


def test_ssh_errors_are_tt_errors() -> None:
    """One error root: every SshError is a TTError whose message is its one line; kinds pickle whole."""
    assert issubclass(SshError, TTError)
    e = CommandTimeout("vm1: command 'sleep 9' timed out", vm="vm1", command="sleep 9", timeout=1.0, stdout_bytes=b"x")
    assert str(e) == e.message == "vm1: command 'sleep 9' timed out"
    assert (e.hint, e.exit_code, e.vm) == (None, 1, "vm1")
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is CommandTimeout and str(again) == str(e)
    assert (again.vm, again.stdout_bytes, again.timeout) == ("vm1", b"x", 1.0)


def test_agent_wire_format_is_defined_once() -> None:
    """The host side uses ttagent.py's own frame constants, and sends that very file to the guest."""
    from pytest_ttenv.ssh import agent_channel

    for name in ("HDR", "RUN", "KILL", "HELLO", "OUT", "ERR", "EXIT", "pack"):
        assert getattr(agent_channel, name) is getattr(ttagent, name), name
    assert agent_channel.agent_source() == Path(ttagent.__file__).read_bytes()


def test_agent_uses_only_python3_minimal_modules() -> None:
    source = Path(ttagent.__file__).read_text()
    assert source.isascii()
    tree = ast.parse(source, feature_version=(3, 6))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    allowed = {"errno", "os", "selectors", "signal", "struct", "subprocess", "sys", "time", "typing"}
    assert imported <= allowed
    guarded = {id(n) for i in ast.walk(tree) if isinstance(i, ast.If) and ast.unparse(i.test) == "MYPY" for n in i.body}
    assert all(id(n) in guarded for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))  # type checkers only
