"""Warm boot: VMs started from a saved post-boot state of their image instead of booting it.

A *template* is made once per image identity, arch, accelerator, vCPUs, memory, qemu version,
qemu device set, identity agent and owner (the inputs of its key): a VM of the image is booted
cold (through its firmware and boot loader if it has no kernel of ours; a UEFI one with a qcow2
variable store that the template keeps), cloud-init, if the image has it, waited for until its
first boot is done, the identity agent (``guest/ttenv-identity``, ``identity``) started in it
over SSH (as root, or through sudo) with a provisioning key used only then, SSH access sealed (no
authorized key, no session left), its state migrated into a file, and qemu quits. It lives next
to the image and goes with it (``ttenv image rm``, a rebuild): ``templates`` holds the store
(layout, lock, atomic install, checks, reaping).

Each warm VM gets a linked clone of the frozen disk (image <- template disk <- VM overlay) and a
qemu started with ``-incoming`` from the state, then, before anyone uses it, its own identity sent
over the virtio-serial port the agent serves: hostname, machine-id, SSH host key, the client's
authorized key, the wall clock, and fresh entropy with a CRNG reseed (plus a new VM generation ID,
which kernels with the vmgenid driver reseed on); in a cloud-init guest, cloud-init's record of
the template's instance becomes the VM's (its instance-id is the one in the VM's seed), so a
reboot is the same instance and no per-instance module runs again. A UEFI VM starts from a copy of
the template's variable store. ``qemu_warm`` does that for the qemu engine.

The state holds nothing of any client: the provisioning key's private half never leaves the
process that makes the template, and its public half is removed before the state is saved. The
owner is part of the key all the same, so a server never shares a template between owners.

This module: which VMs can start warm, a template's key and qemu configuration, and making one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_ttenv.backend.engines import identity as agent
from pytest_ttenv.backend.engines import qemu
from pytest_ttenv.backend.engines.base import machine_cmdline
from pytest_ttenv.backend.engines.console import clean_text, tail_file
from pytest_ttenv.backend.engines.identity import (
    AGENT_TIMEOUT,
    agent_request,
    agent_source,
    agent_start_command,
    await_agent,
)
from pytest_ttenv.backend.engines.net import free_port, ssh_banner
from pytest_ttenv.backend.engines.seed import SeedData, write_seed_iso
from pytest_ttenv.backend.engines.templates import RAM, UEFI_VARS, Template, TemplateStore, image_identity
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import ImageInfo, Resources
from pytest_ttenv.core.paths import runtime_dir
from pytest_ttenv.errors import BootError, TTError
from pytest_ttenv.quiet import asyncssh

FORMAT = 2  # bump when the layout or the way a template is made changes
SAVE_TIMEOUT = 300.0


def template_budget(boot_limit: float) -> float:
    """Seconds allowed for making a template whose VM would have ``boot_limit`` s to boot: twice
    that for its cold boot (a busy host; a failure costs a cold boot of every waiting VM anyway),
    plus saving its state."""
    return 2 * boot_limit + 60


def ineligible(image: ImageInfo, res: Resources, *, firmware: bool = False, cloud_init: bool = False) -> str:
    """Why VMs of ``image`` with ``res`` cannot start warm, or '' if they can. The caller says what
    its warm starts can do beyond direct-kernel images ttenv built: ``firmware`` (an image's own
    boot loader under SeaBIOS or UEFI, with a per-VM copy of the template's variable store) and
    ``cloud_init`` (images set up by cloud-init, ours or a vendor's, pulled or imported: the
    template waits for cloud-init's first boot, each VM takes over its instance, and logs in
    through sudo). The qemu engine can do both."""
    if image.access != "ttenv" and not cloud_init:
        return f"{image.name} is set up by {image.access}; warm starts need an image ttenv built"
    if (image.kernel is None or image.initrd is None) and not firmware:
        return f"{image.name} boots through firmware; warm starts need direct kernel boot"
    if image.user != "root" and not (cloud_init and image.access == "cloud-init"):
        if cloud_init:
            return f"{image.name} logs in as {image.user} without cloud-init's sudo; warm starts need root or sudo"
        return f"{image.name} logs in as {image.user}; warm starts need root"
    if res.disk_mib > image.disk_mib:
        return f"a disk larger than the image's ({res.disk_mib} > {image.disk_mib} MiB) needs a cold boot"
    return ""


def qemu_config(
    image: ImageInfo,
    accel: str,
    res: Resources,
    *,
    name: str,
    disk: Path,
    seed: Path,
    port: int,
    rundir: Path,
    qmp: Path,
    identity: Path,
    cmdline: str,
    vmgenid: str,
    bind_addr: str = "127.0.0.1",
    incoming: str | None = None,
    uefi_vars: Path | None = None,
    ram: Path | None = None,
) -> qemu.QemuConfig:
    """The qemu config of a template or of a warm VM: one function, so both have one device set.
    ``cmdline``: the kernel's for direct boot (a VM's own machine-id on it, so a reboot keeps it);
    without a kernel the image's boot loader runs under its firmware (``uefi_vars``: the variable
    store, for an image that boots through UEFI). ``ram``: the template's RAM file, written
    through by the template (no ``incoming``) and mapped copy-on-write by its VMs."""
    return qemu.QemuConfig(
        name=name,
        arch=image.arch,
        accel=accel,
        resources=res,
        disk=disk,
        seed=seed,
        kernel=image.file(image.kernel) if image.kernel else None,
        initrd=image.file(image.initrd) if image.initrd else None,
        cmdline=cmdline,
        port=port,
        console=rundir / "console.log",
        qmp=qmp,
        pidfile=rundir / "qemu.pid",
        tcg_cx16=qemu.tcg_cx16_safe(image.arch),
        uefi_vars=uefi_vars,
        bind_addr=bind_addr,
        identity=identity,
        vmgenid=vmgenid,
        incoming=incoming,
        ram_file=ram,
        ram_share=ram is not None and incoming is None,
    )


def ram_sharing(arch: str) -> str:
    """'' if warm VMs of ``arch`` map their template's RAM (VM templating), else why they each
    restore their own copy: qemu cannot, or ``TTENV_SHARED_RAM=0`` turned it off."""
    if os.environ.get("TTENV_SHARED_RAM", "1") == "0":
        return "TTENV_SHARED_RAM=0 turned it off"
    return qemu.shares_ram(arch)


def template_inputs(image: ImageInfo, accel: str, res: Resources, owner: str) -> dict[str, Any]:
    """Everything a template depends on; any change gives another key (so does sharing RAM)."""
    x = Path("/x")
    shared_ram = not ram_sharing(image.arch)
    argv = qemu.build_argv(
        qemu_config(
            image,
            accel,
            Resources(res.cpu, res.mem_mib),
            name="x",
            disk=x,
            seed=x,
            port=1,
            rundir=x,
            qmp=x,
            identity=x,
            cmdline=machine_cmdline(image, "0"),
            vmgenid="0",
            uefi_vars=x.with_suffix(".qcow2") if qemu.uses_uefi(image) else None,
            ram=x if shared_ram else None,
        )
    )
    return {
        "format": FORMAT,
        "image": image.name,
        "image_id": image_identity(image),
        "arch": image.arch,
        "accel": accel,
        "cpu": res.cpu,
        "mem_mib": res.mem_mib,
        "qemu": qemu.version(image.arch),
        "argv": argv,
        "agent": hashlib.sha256(agent_source().encode()).hexdigest(),
        "protocol": agent.PROTOCOL,
        "owner": owner,
        "shared_ram": shared_ram,
    }


def template_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def make_template(
    store: TemplateStore,
    key: str,
    inputs: dict[str, Any],
    res: Resources,
    boot_timeout: float,
    progress: Callable[[str], None],
    login: KeyPair | None = None,
) -> Template:
    """Boot a template VM cold, start the identity agent in it, seal it, save its state; call it
    with the template's lock held. A failure or a kill at any point leaves only a work dir that
    ``reap`` removes (the template appears by one rename, when complete). TTError on failure.
    ``login``: the provisioning key (default: a new one, forgotten afterwards; tests pass theirs
    to prove it no longer logs in).
    """
    image, accel = store.image, str(inputs["accel"])
    started = time.time()
    work = store.workdir(key)
    sockets = runtime_dir() / f"warm-{os.getpid()}-{secrets.token_hex(3)}"
    sockets.mkdir(mode=0o700)
    proc = None
    progress(f"{image.name}: making a warm template (one cold boot; {res.cpu} vCPU, {res.mem_mib} MiB, {accel})")
    try:
        qemu.create_overlay(image.file(image.disk), work / "disk.qcow2")
        host_key = KeyPair.generate("ttenv-template")
        login = login or KeyPair.generate("ttenv-template-provisioning")
        write_seed_iso(
            SeedData("ttenv-template", f"template-{key}", image.user, login.public, host_key), work / "seed.iso"
        )
        qmp, ident = sockets / "qmp", sockets / "identity"
        uefi_vars = qemu.uefi_vars_copy(image.arch, work / UEFI_VARS) if qemu.uses_uefi(image) else None
        for _attempt in range(5):
            port = free_port(what="a template VM")
            cfg = qemu_config(
                image,
                accel,
                res,
                name=f"warm-template/{image.name}",
                disk=work / "disk.qcow2",
                seed=work / "seed.iso",
                port=port,
                rundir=work,
                qmp=qmp,
                identity=ident,
                cmdline=machine_cmdline(image, secrets.token_hex(16)),
                vmgenid=str(uuid.uuid4()),
                uefi_vars=uefi_vars,
                ram=work / RAM if inputs.get("shared_ram") else None,
            )
            proc = qemu.start(cfg, work / "qemu.log", die_with_parent=True)
            if _wait_banner_or_exit(proc, port, boot_timeout, image.name):
                break
            if "host forwarding" not in (work / "qemu.log").read_text(errors="replace"):
                raise BootError(
                    f"the template VM of {image.name} exited during boot", tail_file(work / "console.log", 50)
                )
        else:
            raise TTError(f"no usable host port for the template VM of {image.name} after 5 tries")
        what = f"template of {image.name}"
        provision(port, image.user, login, host_key.public, agent_source(), boot_timeout, what)
        running = proc  # as started: what the check below asks about
        await_agent(lambda: agent_request(ident, "ping", 5.0, what), lambda: running.poll() is None)
        agent_request(ident, "seal", AGENT_TIMEOUT, what, user=image.user)
        qemu.save_state(qmp, work / "state", SAVE_TIMEOUT, ignore_shared=bool(inputs.get("shared_ram")))
        qemu.stop(proc.pid, str(work), qmp)
        proc.wait(timeout=10)
        (work / "seed.iso").unlink()  # holds the template's host key; the VMs bring their own seeds
        template = store.install(work, key, inputs, started)
    except BaseException:
        if proc is not None:
            qemu.stop(proc.pid, str(work), sockets / "qmp", grace=1.0)
            proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    mib = template.meta["state_bytes"] / 2**20
    ram = " + its RAM file, shared by its VMs" if template.ram is not None else ""
    progress(
        f"{image.name}: warm template {key} saved after {template.meta['seconds']:.0f} s ({mib:.1f} MiB state{ram})"
    )
    return template


def _wait_banner_or_exit(proc: subprocess.Popen[bytes], port: int, timeout: float, image: str) -> bool:
    """True once sshd's banner answers on ``port``; False if qemu exited; BootError on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ssh_banner("127.0.0.1", port):
            return True
        time.sleep(0.2)
    raise BootError(f"the template VM of {image} did not answer SSH within {timeout:.0f} s")


def provision(port: int, user: str, login: KeyPair, host_key: str, source: str, timeout: float, what: str) -> None:
    """Over SSH (strict host key): wait until cloud-init, if the image has it, has finished its
    first boot (within ``timeout`` s: the saved state must not hold it half done), then put the
    agent into the guest's /run and start it as a unit (through sudo for a user other than root)."""
    settle = (
        "if command -v cloud-init >/dev/null; then cloud-init status --wait >/dev/null; rc=$?; "
        # 0: done; 2: done, with recoverable errors (cloud-init >= 23.4); else it failed
        'if [ $rc != 0 ] && [ $rc != 2 ]; then echo "cloud-init did not finish: $(cloud-init status)" >&2; exit 1; fi; '
        "fi"
    )
    command = agent_start_command(user)

    async def run() -> list[asyncssh.SSHCompletedProcess]:
        async with asyncssh.connect(
            "127.0.0.1",
            port,
            username=user,
            client_keys=[asyncssh.import_private_key(login.private)],
            known_hosts=([asyncssh.import_public_key(host_key)], [], []),
            config=None,
            agent_path=None,
            connect_timeout=AGENT_TIMEOUT,
        ) as conn:
            settled = await conn.run(settle, check=False, timeout=timeout)
            if settled.exit_status != 0:
                return [settled]
            return [settled, await conn.run(command, input=source, check=False, timeout=AGENT_TIMEOUT)]

    try:
        results = asyncio.run(run())
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
        raise TTError(f"{what}: starting the identity agent over SSH failed: {exc}") from None
    if results[-1].exit_status != 0:
        raise TTError(f"{what}: starting the identity agent failed: {clean_text(str(results[-1].stderr)).strip()}")
