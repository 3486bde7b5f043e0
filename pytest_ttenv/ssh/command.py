"""What a `run` call asks for (`RunOptions`, defined once for `Connection.run`/`arun` and `Vm.run`)
and how it becomes a `Request`: the `/bin/sh -c` script both channels run, and the argv that the
agent may spawn directly (no shell) for a simple command.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict


class RunOptions(TypedDict, total=False):
    """The keyword options of a command (all optional; semantics in docs/ssh.md):

    - timeout: seconds before the command's process group is killed (CommandTimeout);
      None or absent: the Connection's `default_timeout`.
    - check: raise CommandFailed on a non-zero exit status (default False).
    - env: variables exported for the command; cwd: directory entered with `cd` first.
    - input: the command's stdin (str: UTF-8), then EOF; default: empty.
    - sudo: run through `sudo -n` unless the user is root (default False).
    - max_output: bytes of each stream kept in memory (head and tail; default DEFAULT_MAX_OUTPUT).
    - stdout_file / stderr_file: a local file that receives that stream whole instead.
    """

    timeout: float | None
    check: bool
    env: Mapping[str, str] | None
    cwd: str | None
    input: str | bytes | None
    sudo: bool
    max_output: int | None
    stdout_file: str | os.PathLike[str] | None
    stderr_file: str | os.PathLike[str] | None


def check_options(options: Mapping[str, object]) -> None:
    """TypeError for a keyword that is not a RunOptions key (as a misspelt keyword argument gets)."""
    for key in options:
        if key not in RunOptions.__optional_keys__:
            raise TypeError(f"run() got an unexpected keyword argument {key!r}")


# Words a shell gives a meaning of its own (keywords and builtins of dash, and of bash for systems
# whose /bin/sh is bash): a command starting with one is never exec'd directly.
SHELL_WORDS = frozenset(
    "! { } [[ ]] case do done elif else esac fi for function if in select then time until while "
    ". : [ alias bg bind break builtin caller cd chdir command compgen complete compopt continue "
    "coproc declare dirs disown echo enable eval exec exit export false fc fg getopts hash help "
    "history jobs kill let local logout mapfile popd printf pushd pwd read readarray readonly "
    "return set shift shopt source suspend test times trap true type typeset ulimit umask unalias "
    "unset wait".split()
)
_SIMPLE = re.compile(r"[ \t]*[A-Za-z0-9_./,:@%+=-]+(?:[ \t]+[A-Za-z0-9_./,:@%+=-]+)*[ \t]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Request:
    display: str  # the command as the user gave it (a sequence shlex-joined)
    script: str  # what /bin/sh -c runs: cd, exports, sudo wrapper, command
    argv: list[str] | None  # run directly (no shell) when it resolves on the VM's PATH
    env: dict[str, str]  # for the direct argv run only (the script exports them itself)
    stdin: bytes
    sudo: bool


def build(
    cmd: str | Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    input: str | bytes | None,
    sudo: bool,
    user: str,
) -> Request:
    """The Request for *cmd* run as *user*; ValueError for an empty argv, NUL bytes or bad env names."""
    if isinstance(cmd, str):
        display = cmd
        words = cmd.split() if _SIMPLE.fullmatch(cmd) else None
    else:
        argv = list(cmd)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"command must be a non-empty sequence of str, not {cmd!r}")
        display = shlex.join(argv)
        words = argv
    envd = dict(env or {})
    for k, v in envd.items():
        if not _ENV_NAME.fullmatch(k) or not isinstance(v, str):
            raise ValueError(f"bad environment variable {k!r}={v!r}")
    for text in (display, cwd or "", *envd.values()):
        if "\0" in text:
            raise ValueError("NUL byte in command, cwd or env")
    parts = []
    if cwd is not None:
        parts.append(f"cd -- {shlex.quote(cwd)} || exit")
    if envd:
        parts.append("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in envd.items()))
    script = "; ".join([*parts, display])
    if cwd is not None or not words or words[0] in SHELL_WORDS or "=" in words[0]:
        words = None
    sudo = sudo and user != "root"
    if sudo:
        words = ["sudo", "-n", "/bin/sh", "-c", script]
        script = "sudo -n /bin/sh -c " + shlex.quote(script)
        envd = {}
    data = input.encode() if isinstance(input, str) else (input or b"")
    return Request(display, script, words, envd, data, sudo)
