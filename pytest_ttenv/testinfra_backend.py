"""pytest-testinfra over ttenv's command channel: the ``ttenv://<vm>`` backend behind ``tt_vm.host``.

testinfra finds a backend class by the URL scheme of a host spec in ``testinfra.backend.BACKENDS``
(scheme -> "module.Class"); ``handles.register_testinfra`` adds ``ttenv`` there. This module
imports testinfra, so only import it when pytest-testinfra is installed.

A command goes through the VM's ``Vm`` handle in this process (agent channel, reconnects after a
revert or reboot, ``VmDied`` if the VM is gone, remembered for failure reports), so the VM must be
in use by this process: a test asking for ``tt_vm`` (or ``tt_vm_fresh``, ``tt_env``) has it.
"""

from __future__ import annotations

from typing import Any

from testinfra.backend.base import BaseBackend, CommandResult

from pytest_ttenv.errors import UsageError
from pytest_ttenv.fixtures.handles import SCHEME, active_vm


class TtenvBackend(BaseBackend):
    """testinfra backend for ``ttenv://<vm name>``: runs commands through that VM's ``Vm`` handle."""

    NAME = SCHEME

    def __init__(self, hostname: str, *args: Any, **kwargs: Any) -> None:
        if not hostname or any(c in hostname for c in "@:/"):
            raise UsageError(
                f"bad testinfra host {SCHEME}://{hostname}: give a VM name, e.g. {SCHEME}://debian-12-x86_64"
            )
        super().__init__(hostname, *args, **kwargs)

    def run(self, command: str, *args: str, **kwargs: Any) -> CommandResult:
        """Run ``command % quoted(args)`` (with the sudo wrapping testinfra asks for) on the VM."""
        cmd = self.get_command(command, *args)
        res = active_vm(self.hostname).run(cmd)
        return self.result(res.exit_status, self.encode(cmd), res.stdout_bytes, res.stderr_bytes)

    def get_sudo_command(self, command: str, sudo_user: str | None) -> str:
        """testinfra's ``sudo /bin/sh -c`` with ``-n`` (no terminal here: fail, don't wait for a
        password); as root without a target user there is nothing to wrap."""
        if sudo_user is None:
            if active_vm(self.hostname).info.user == "root":
                return command
            return self.quote("sudo -n /bin/sh -c %s", command)
        return self.quote("sudo -n -u %s /bin/sh -c %s", sudo_user, command)
