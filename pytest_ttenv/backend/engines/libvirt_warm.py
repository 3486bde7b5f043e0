"""The libvirt engine's warm starts (``warm`` says what they are; ``qemu_warm`` is the qemu
engine's): which VMs start warm, their templates, their restore, their identity.

They start what the qemu engine starts warm (``warm.ineligible``: direct-kernel images ttenv
built, and images set up by cloud-init that boot through their own boot loader) except UEFI
images (``uefi_cold`` says why). A template is made once per key on this machine's libvirt host
(the first ``--libvirt-uri`` that names no host): a transient domain boots the image cold from
files in the template's work dir (its kernel, or SeaBIOS and the image's boot loader), waits for
cloud-init's first boot if the image has it and gets the identity agent over SSH (``warm``'s
provisioning, through sudo for a user other than root), is sealed, and is saved with
virDomainSave into ``<image dir>/warm/<key>/state`` (libvirt's save image: a header with the
domain XML, then qemu's migration stream); ``templates`` installs it like a qemu template.

A warm VM is the cold VM's domain plus the identity channel and a VM generation ID, defined as
usual, with an overlay backed by the template's disk; it runs by virDomainRestore of a copy of
the save image whose header holds *its* domain XML (libvirt's restore with an edited XML keeps
the saved UUID and name, so it cannot start several VMs from one image): on this machine a copy
in its run dir (the state checked against its sha256 first), on a remote host a copy made there
from the template's volumes ``ttenv-tpl-<key>-disk.qcow2`` and ``-state``, uploaded once and read
back (sha256) like image files, the disk pointed at the host's copy of the image. Its identity
(``warm_vm``; in a cloud-init guest with its seed's instance-id and user-data, so a reboot is the
same instance) goes over the channel through virDomainOpenChannel, so it reaches remote hosts
through libvirt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import secrets
import select
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pytest_ttenv.backend.engines import identity as agent
from pytest_ttenv.backend.engines import qemu, warm
from pytest_ttenv.backend.engines.base import Boot, Start, machine_cmdline
from pytest_ttenv.backend.engines.console import tail_file
from pytest_ttenv.backend.engines.deferred import StartLater
from pytest_ttenv.backend.engines.identity import AGENT_TIMEOUT, agent_request, agent_source, await_agent
from pytest_ttenv.backend.engines.libvirt_place import Host
from pytest_ttenv.backend.engines.libvirt_upload import upload_once
from pytest_ttenv.backend.engines.libvirt_xml import (
    DomainConfig,
    SaveImage,
    domain_xml,
    read_save_head,
    save_head_with,
    volume_xml,
)
from pytest_ttenv.backend.engines.net import free_port, ssh_banner
from pytest_ttenv.backend.engines.seed import SeedData, write_seed_iso
from pytest_ttenv.backend.engines.templates import Template, TemplateStore, image_identity, sha256_file
from pytest_ttenv.backend.engines.virt import Channel, Conn, HostDown, Pool, VirtError
from pytest_ttenv.backend.engines.warm_vm import PendingIdentity
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvSpec, ImageInfo, Resources, VmSpec
from pytest_ttenv.core.paths import runtime_dir
from pytest_ttenv.errors import BootError, TTError

FORMAT = "libvirt-1"  # bump when the layout or the way a libvirt template is made changes
TEMPLATE_VOLUME = "ttenv-tpl-"  # ttenv-tpl-<key>-disk.qcow2 / -state (+ .sha256) on remote hosts
SAVE_TIMEOUT = 300.0


def blank_config(image: ImageInfo, accel: str, res: Resources) -> DomainConfig:
    """A warm VM's domain with every per-VM value blanked: its XML is part of the template key, so
    a device added to ``domain_xml`` makes new templates."""
    x = "/x"
    return DomainConfig(
        name="x",
        uuid="00000000-0000-0000-0000-000000000000",
        title="x",
        metadata={},
        arch=image.arch,
        accel=accel,
        cpu=res.cpu,
        mem_mib=res.mem_mib,
        pool="x",
        disk_volume="x",
        seed_volume="x",
        console=x,
        port=1,
        bind_addr="x",
        kernel=x if image.kernel else None,
        initrd=x if image.initrd else None,
        cmdline=machine_cmdline(image, "0") if image.kernel else "",
        uefi=qemu.uses_uefi(image),
        tcg_cx16=qemu.tcg_cx16_safe(image.arch),
        identity=True,
        genid="00000000-0000-0000-0000-000000000000",
    )


def uefi_cold(image: ImageInfo) -> str:
    """Why VMs of ``image`` boot cold on the libvirt engine although the qemu engine starts them
    warm ('' if nothing here says so): UEFI. libvirt (9.0 here) refuses internal snapshots of a
    domain with pflash firmware and keeps its variable store raw, so a warm UEFI VM could never
    be reset to a snapshot (``tt_vm_fresh``), nor its store be part of one."""
    if not qemu.uses_uefi(image):
        return ""
    return (
        "the libvirt engine starts UEFI images cold: libvirt cannot snapshot a VM with UEFI (pflash) firmware, "
        "so a warm one could not be reset (tt_vm_fresh)"
    )


class LibvirtWarm(PendingIdentity):
    """Warm starts for one LibvirtEngine, which lends its hosts, connections and pools."""

    def __init__(
        self,
        hosts: Sequence[Host],
        conn: Callable[[str], Conn],
        pool: Callable[[Conn], Pool],
        lock: Callable[[str], threading.Lock],
        progress: Callable[[str], None],
        machine: str,
    ) -> None:
        self.hosts, self.conn, self.pool, self.lock, self.progress = hosts, conn, pool, lock, progress
        self.machine = machine  # this machine, as domain metadata names it
        self.later = StartLater()
        self._heads: dict[str, SaveImage] = {}

    def maker(self) -> Host | None:
        """The host templates are made on: this machine's libvirt, if it is one of the hosts."""
        return next((h for h in self.hosts if not h.remote), None)

    # -- deciding ----------------------------------------------------------------------------------
    def plan(self, spec: EnvSpec, vm: VmSpec, image: ImageInfo, accel: str, owner: str) -> Boot:
        if spec.boot != "warm":
            return Boot("cold", "cold requested")
        why = warm.ineligible(image, vm.resources, firmware=True, cloud_init=True) or uefi_cold(image)
        if why:
            return Boot("cold", why)
        maker = self.maker()
        if maker is None:
            return Boot("cold", "libvirt warm starts need this machine's libvirt among the hosts (it makes templates)")
        try:
            inputs = {
                "format": FORMAT,
                "image": image.name,
                "image_id": image_identity(image),
                "arch": image.arch,
                "accel": accel,
                "cpu": vm.resources.cpu,
                "mem_mib": vm.resources.mem_mib,
                "libvirt": list(self.conn(maker.uri).versions()),
                "xml": domain_xml(blank_config(image, accel, vm.resources)),
                "agent": hashlib.sha256(agent_source().encode()).hexdigest(),
                "protocol": agent.PROTOCOL,
                "owner": owner,
            }
        except (OSError, TTError) as exc:
            return Boot("cold", f"{image.name}'s warm template cannot be keyed: {exc}")
        key = warm.template_key(inputs)
        return Boot("warm", f"from the warm template {key} of {image.name}", key, inputs)

    def unusable(self, job: Start, host: Host) -> str:
        """Why ``job`` cannot start warm on its host after all ('' if it can)."""
        if not host.remote:
            return ""
        try:
            there = list(self.conn(host.uri).versions())
        except TTError as exc:
            return str(exc)
        made = job.boot.inputs.get("libvirt")
        if there != made:
            return f"{host.label} runs qemu/libvirt {there}, its template was made with {made}"
        return ""

    # -- templates ---------------------------------------------------------------------------------
    def find(self, image: ImageInfo, key: str) -> Template | None:
        """The complete, verified template ``key`` of ``image`` whose save image's header reads,
        marked used; or None (none yet). A template that fails its checks is removed, saying so."""
        return TemplateStore(image).usable(key, self.progress, self.head)

    def head(self, template: Template) -> SaveImage:
        """The parsed header of the template's save image (remembered while the file stays)."""
        st = template.state.stat()
        memo = f"{template.state}:{st.st_ino}:{st.st_mtime_ns}"
        if memo not in self._heads:
            with open(template.state, "rb") as f:
                start = f.read(92)
                need = 92 + int.from_bytes(start[20:24], "little")
                self._heads[memo] = read_save_head(start + f.read(max(0, need - 92)))
        return self._heads[memo]

    def make(self, job: Start) -> Template:
        """The template ``job`` waits for: made now, or found once another process made it."""
        store, key = TemplateStore(job.image), job.boot.key
        with store.lock(key, warm.template_budget(job.boot_timeout)):
            template = self.find(job.image, key)
            if template is None:
                template = self._make(store, key, job.boot.inputs, job.vm.resources, 2 * job.boot_timeout)
        return template

    def _make(
        self, store: TemplateStore, key: str, inputs: dict[str, Any], res: Resources, boot_timeout: float
    ) -> Template:
        """Boot a transient template domain on this machine's libvirt, provision and seal it, save it."""
        maker = self.maker()
        assert maker is not None  # plan() said so
        conn, image, accel = self.conn(maker.uri), store.image, str(inputs["accel"])
        started = time.time()
        work = store.workdir(key)
        name = f"ttenv-tpl-{key}-{os.getpid()}"
        what = f"template of {image.name}"
        self.progress(
            f"{image.name}: making a warm template on libvirt (a cold boot; {res.cpu} CPU, {res.mem_mib} MiB, {accel})"
        )
        try:
            qemu.create_overlay(image.file(image.disk), work / "disk.qcow2")
            host_key = KeyPair.generate("ttenv-template")
            login = KeyPair.generate("ttenv-template-provisioning")
            seed = SeedData("ttenv-template", f"template-{key}", image.user, login.public, host_key)
            write_seed_iso(seed, work / "seed.iso")
            for _attempt in range(5):
                port = free_port(what="a template VM")
                cfg = dataclasses.replace(
                    blank_config(image, accel, res),
                    name=name,
                    uuid=str(uuid.uuid4()),
                    title=f"ttenv warm template {key} of {image.name}",
                    # gc leaves it alone while its work dir exists (a sweep of another process)
                    metadata={"machine": self.machine, "state": str(work), "env": "template", "vm": key},
                    pool="",
                    disk_file=str(work / "disk.qcow2"),
                    seed_file=str(work / "seed.iso"),
                    console=str(work / "console.log"),
                    port=port,
                    bind_addr="127.0.0.1",
                    kernel=str(image.file(image.kernel)) if image.kernel else None,
                    initrd=str(image.file(image.initrd)) if image.initrd else None,
                    cmdline=machine_cmdline(image, secrets.token_hex(16)) if image.kernel else "",
                    genid=str(uuid.uuid4()),
                )
                try:
                    conn.create_transient(domain_xml(cfg))
                    break
                except VirtError as exc:
                    if "host forwarding" not in exc.message:
                        raise BootError(f"libvirt could not start the {what}: {exc.message}") from None
            else:
                raise TTError(f"no usable host port for the {what} after 5 tries")
            deadline = time.monotonic() + boot_timeout
            while not ssh_banner("127.0.0.1", port):
                state = conn.state(name)
                if state is None or state[0] not in (1, 2, 3):
                    raise BootError(f"the {what} died during boot", tail_file(work / "console.log", 50))
                if time.monotonic() >= deadline:
                    raise BootError(f"the {what} did not answer SSH within {boot_timeout:.0f} s")
                time.sleep(0.2)
            # cloud-init's first boot is waited for within what is left of the boot budget
            settle = max(AGENT_TIMEOUT, deadline - time.monotonic())
            warm.provision(port, image.user, login, host_key.public, agent_source(), settle, what)
            await_agent(lambda: self.request(conn, name, "ping", 5.0, what))
            self.request(conn, name, "seal", AGENT_TIMEOUT, what, user=image.user)
            conn.save(name, str(work / "state"))
            (work / "seed.iso").unlink()
            template = store.install(work, key, inputs, started)
        except BaseException:
            with contextlib.suppress(TTError):
                conn.destroy(name)
            shutil.rmtree(work, ignore_errors=True)
            raise
        mib = template.meta["state_bytes"] / 2**20
        secs = template.meta["seconds"]
        self.progress(
            f"{image.name}: warm template {key} saved on libvirt after {secs:.0f} s ({mib:.0f} MiB state; "
            "each VM restores its own copy of the RAM: libvirt's restore cannot map a template's memory)"
        )
        return template

    # -- one warm VM -------------------------------------------------------------------------------
    def backing(self, host: Host, pool: Pool, template: Template, image_disk: str) -> str:
        """The template's disk on ``host`` (uploaded once to a remote host, backed by its copy of
        the image's disk), for the VM's overlay."""
        if not host.remote:
            return str(template.disk)
        vol = f"{TEMPLATE_VOLUME}{template.key}-disk.qcow2"
        with self.lock(f"image {host.uri} {vol}"):
            return upload_once(
                pool, host.label, template.disk, vol, f"warm template {template.key} disk", self.progress, image_disk
            )

    def restore(self, job: Start, host: Host, conn: Conn, pool: Pool, template: Template, cfg: DomainConfig) -> None:
        """Run the defined domain of ``cfg`` from the template's saved state (see the module doc)."""
        head = save_head_with(self.head(template), domain_xml(cfg))
        if not host.remote:
            if sha256_file(template.state) != template.meta.get("state_sha256"):
                TemplateStore(job.image).remove(template.key)
                raise TTError(f"warm template {template.key} of {job.image.name}: its state fails its checksum")
            copy = job.vmdir / "restore.save"
            shutil.copyfile(template.state, copy)
            copy.chmod(0o600)
            fd = os.open(copy, os.O_WRONLY)
            try:
                os.pwrite(fd, head, 0)
            finally:
                os.close(fd)
            try:
                conn.restore(str(copy))
            finally:
                copy.unlink(missing_ok=True)
            return
        state = f"{TEMPLATE_VOLUME}{template.key}-state"
        with self.lock(f"image {host.uri} {state}"):
            upload_once(pool, host.label, template.state, state, f"warm template {template.key} state", self.progress)
        vol = f"{cfg.name}-restore.save"
        pool.delete(vol)
        pool.clone(volume_xml(vol, template.meta["state_bytes"]), vol, state)
        try:
            for _ in pool.upload(vol, io.BytesIO(head), len(head)):
                pass
            conn.restore(f"{pool.path}/{vol}")
        finally:
            pool.delete(vol)

    def ready(self, conn: Conn, dom: str, vmdir: Path, vm: str) -> bool:
        """True once the VM has taken its identity (its sshd listened when its state was saved)."""
        self.send_identity(vmdir, vm, lambda: self.channel(conn, dom))
        return True

    def refresh(self, conn: Conn, dom: str, vm: str) -> None:
        """After a revert: the VM's clock set to now and its RNG reseeded."""
        with self.channel(conn, dom) as sock:
            agent.refresh(sock, AGENT_TIMEOUT, f"VM {vm}")

    def request(self, conn: Conn, dom: str, op: str, timeout: float, what: str, **fields: str) -> str:
        with self.channel(conn, dom) as sock:
            return agent_request(sock, op, timeout, what, **fields)

    @contextlib.contextmanager
    def channel(self, conn: Conn, dom: str) -> Iterator[Path]:
        """A unix socket on this machine that leads to the domain's identity channel (opened with
        virDomainOpenChannel, so on any host; TTError if it cannot be): one connection, for
        ``identity``'s requests."""
        chan = conn.channel(dom, qemu.IDENTITY_PORT)
        where = runtime_dir() / f"lvch-{os.getpid()}-{secrets.token_hex(4)}"
        stop = threading.Event()
        try:
            where.mkdir(mode=0o700)
            with socket.socket(socket.AF_UNIX) as srv:
                srv.bind(str(where / "s"))
                srv.listen(1)
                pump = threading.Thread(target=_pump, args=(srv, chan, stop), name="ttenv-channel", daemon=True)
                pump.start()
                try:
                    yield where / "s"
                finally:
                    stop.set()
                    pump.join(5)
        finally:
            chan.close()
            shutil.rmtree(where, ignore_errors=True)

    # -- gc ----------------------------------------------------------------------------------------
    def reap(self, images: Sequence[ImageInfo], in_use: Callable[[Conn], set[str]]) -> None:
        """Templates of images that changed or that nobody used lately deleted here (``templates``),
        then their copies on remote hosts, unless a VM there still names them (``in_use``)."""
        kept: set[str] = set()
        for image in images:
            try:
                store = TemplateStore(image)
                store.reap()
                kept |= (
                    {d.name for d in store.root.iterdir() if not d.name.startswith(".")}
                    if store.root.is_dir()
                    else set()
                )
            except (OSError, TTError):
                continue
        for host in self.hosts:
            if not host.remote:
                continue
            try:
                conn = self.conn(host.uri)
                pool, used = self.pool(conn), in_use(conn)
                for vol in pool.volumes():
                    if not vol.startswith(TEMPLATE_VOLUME):
                        continue
                    key = vol[len(TEMPLATE_VOLUME) :].split("-", 1)[0]
                    if key not in kept and key not in used:
                        self.progress(f"gc: removing warm template copy {vol} on {host.label}")
                        pool.delete(vol)
            except (HostDown, VirtError):
                continue


def _pump(srv: socket.socket, chan: Channel, stop: threading.Event) -> None:
    """Accept one connection on ``srv`` and relay it to and from the channel ``chan`` until
    either side closes or ``stop`` is set."""
    srv.settimeout(0.05)
    client = None
    while client is None and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            client, _ = srv.accept()
    if client is None:
        return
    with client:
        out = b""
        try:
            while not stop.is_set():
                readable, _, _ = select.select([client], [], [], 0.01)
                if readable:
                    data = client.recv(65536)
                    if not data:
                        return
                    out += data
                while out:
                    n = chan.send(out)
                    if n == 0:
                        break
                    out = out[n:]
                got = chan.recv(65536)
                if got == b"":
                    return
                if got:
                    client.sendall(got)
        except (OSError, TTError):
            return  # the caller reads a closed channel and says so
