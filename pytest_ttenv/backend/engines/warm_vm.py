"""One warm VM's identity between its start and the moment it takes it, the same for every
engine's warm starts (``qemu_warm``, ``libvirt_warm``): they inherit ``PendingIdentity``.

A warm VM's run dir holds ``identity.json`` (0600: its host key) from its start until its identity
is sent, and ``identity.lock``: whichever process gets there first sends it, once. In a cloud-init
guest the identity carries its seed's instance-id and user-data, so the guest takes over the
template's cloud-init instance as its own (``identity.apply_identity``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from pytest_ttenv.backend.engines.base import Start
from pytest_ttenv.backend.engines.identity import AGENT_TIMEOUT, Identity, apply_identity
from pytest_ttenv.backend.engines.seed import read_seed_file, seed_instance_id
from pytest_ttenv.backend.engines.templates import flock

PENDING = "identity.json"
LOCK = "identity.lock"


class PendingIdentity:
    """What both engines' warm starts do with a warm VM's identity (``deferred.WarmSide``'s
    ``keep_identity`` and ``cold_instead``, and ``send_identity`` for their ``ready``)."""

    progress: Callable[[str], None]

    @staticmethod
    def keep_identity(job: Start) -> None:
        """Keep what makes the VM its own machine once it runs (sent by ``send_identity``, then
        deleted): a cloud-init guest's takes over the template's instance as its seed's."""
        ident = Identity(
            job.vm.name,
            job.machine_id,
            job.image.user,
            job.spec.client_pubkey,
            job.host_key,
            seed_instance_id(job.seed),
            read_seed_file(job.seed, "user-data"),
        )
        with open(os.open(job.vmdir / PENDING, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(ident.to_dict(), f)

    def cold_instead(self, job: Start, why: str) -> None:
        """``job``, planned warm, boots cold: said in one line, its kept identity dropped."""
        self.progress(f"{job.vm.name}: cold boot (no warm start: {why})")
        job.info.boot = "cold"
        (job.vmdir / PENDING).unlink(missing_ok=True)

    @staticmethod
    def send_identity(vmdir: Path, vm: str, channel: Callable[[], AbstractContextManager[Path]]) -> None:
        """Send VM ``vm`` its kept identity, if it has not taken it yet, through the unix socket
        ``channel()`` gives (it leads to the VM's agent); once, whichever process asks first.
        TTError if it is not taken."""
        pending = vmdir / PENDING
        if not pending.exists():
            return
        with flock(vmdir / LOCK, AGENT_TIMEOUT + 10, f"the identity lock of VM {vm}"):
            if pending.exists():
                ident = Identity.from_dict(json.loads(pending.read_text()))
                with channel() as sock:
                    apply_identity(sock, ident, AGENT_TIMEOUT, f"VM {vm}")
                pending.unlink()
