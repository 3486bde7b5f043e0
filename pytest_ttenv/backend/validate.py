"""What a request to the local backend must satisfy, and small lookups its methods share."""

from __future__ import annotations

import os

from pytest_ttenv.core.model import EnvInfo, ImageInfo, Resources, VmInfo
from pytest_ttenv.errors import NotFound, UsageError

MAX_CPU = 64
MIN_MEM_MIB = 128


def vm_of(env: EnvInfo, name: str) -> VmInfo:
    """The ENV's VM called ``name``, or NotFound listing its VMs."""
    try:
        return env.vm(name)
    except KeyError:
        raise NotFound(
            f"no VM named {name!r} in ENV {env.id}", f"VMs: {', '.join(v.name for v in env.vms) or 'none'}"
        ) from None


def check_resources(res: Resources, image: ImageInfo) -> None:
    """UsageError (one line) if ``res`` cannot be given to a VM of ``image``."""
    if not 1 <= res.cpu <= MAX_CPU:
        raise UsageError(f"--cpu must be between 1 and {MAX_CPU}, got {res.cpu}")
    if res.mem_mib < MIN_MEM_MIB:
        raise UsageError(f"--mem must be at least {MIN_MEM_MIB} MiB, got {res.mem_mib}")
    if res.disk_mib and res.disk_mib < image.disk_mib:
        raise UsageError(
            f"--disk {res.disk_mib} MiB is smaller than image {image.name} ({image.disk_mib} MiB)",
            "omit --disk or give a larger size",
        )


def current_user() -> str:
    """This process's user name (its uid if it has none)."""
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):
        return str(os.getuid())
