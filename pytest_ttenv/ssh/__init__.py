"""The command channel to a VM: run / put / get / fan-out over one asyncssh connection per VM.

The package's rule: it is the layer that talks SSH to VMs and imports nothing of pytest_ttenv above
L0 (only `pytest_ttenv.errors` and `pytest_ttenv.quiet`, through which asyncssh is imported);
what it offers is exported here. One module per concern: `results` (SshTarget, RunResult) and
`errors` (SshError, a TTError, and its kinds); `loop` (the event-loop thread); `command` (the run
options and the script both channels run); `output` (bounded capture); `connect` (opening one
SSH connection); `exec_channel` and `agent_channel` (the two ways a command runs); `ttagent` (the
far-side agent program, sent to the guest and run there with only the stdlib); `transfer` (get /
put tree walks and their caps); `connection` (Connection); `fanout` (fan_out).

Contracts (details in docs/ssh.md):
- One asyncio loop runs in a daemon thread per process (`loop()`); every `Connection` does its I/O
  there, so the sync API is safe from any number of threads, and `arun` is its async twin.
- Host keys are checked strictly against `SshTarget.host_key` only; no file under ~/.ssh is read or
  written, no ssh-agent is used, no agent forwarding, no TOFU.
- A string command runs as `/bin/sh -c CMD`; a sequence is `shlex.join`ed first. `env` adds
  exported variables, `cwd` is entered with `cd` (failing like `cd` does), `sudo` prefixes
  `sudo -n` unless the user is root. Exit status: the command's, or 128+N if it died of signal N.
- Every call has a timeout (`default_timeout` when None); on expiry the remote process group is
  killed and `CommandTimeout` is raised.
- Fast path: a python3 agent (`ttagent.py`) started over one exec channel per connection
  multiplexes commands; without python3 on the VM, plain exec channels are used (at most
  `EXEC_CHANNELS` at once per connection). Both give byte-identical results.
- A connection found dropped (sshd restarted, VM rebooted) is reopened once, transparently, for
  the next call; a connection that drops while a command runs raises `Unreachable`.
- The guest is untrusted (code under test runs there as root): what it sends is bounded and
  checked. Output kept in memory is capped per stream (`max_output`, head and tail kept,
  `RunResult.truncated`) or streamed to a local file; agent frames are validated (size, type,
  request id, EXIT payload) and a violation fails the command at once (`ProtocolError`);
  `get` walks the remote tree itself and never creates, follows or writes through a link that
  leaves the destination, drops set-id bits, skips special files and caps bytes and entries
  (`LimitExceeded`); `read_text` is capped too.
"""

from __future__ import annotations

from pytest_ttenv.ssh.agent_channel import MAX_FRAME
from pytest_ttenv.ssh.command import RunOptions
from pytest_ttenv.ssh.connection import Connection
from pytest_ttenv.ssh.errors import (
    CommandFailed,
    CommandTimeout,
    HostKeyMismatch,
    LimitExceeded,
    ProtocolError,
    SshError,
    Unreachable,
)
from pytest_ttenv.ssh.exec_channel import EXEC_CHANNELS
from pytest_ttenv.ssh.fanout import fan_out
from pytest_ttenv.ssh.loop import close_all, loop
from pytest_ttenv.ssh.output import DEFAULT_MAX_OUTPUT
from pytest_ttenv.ssh.results import RunResult, SshTarget
from pytest_ttenv.ssh.transfer import GET_MAX_BYTES, GET_MAX_ENTRIES, READ_TEXT_MAX

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "EXEC_CHANNELS",
    "GET_MAX_BYTES",
    "GET_MAX_ENTRIES",
    "MAX_FRAME",
    "READ_TEXT_MAX",
    "CommandFailed",
    "CommandTimeout",
    "Connection",
    "HostKeyMismatch",
    "LimitExceeded",
    "ProtocolError",
    "RunOptions",
    "RunResult",
    "SshError",
    "SshTarget",
    "Unreachable",
    "close_all",
    "fan_out",
    "loop",
]
