"""The libvirt engine: VMs as libvirt domains on one or more hosts, each a libvirt URI
(``libvirt_place``: the hosts and where new VMs go; ``libvirt_xml``: the domain, snapshot and
volume XML; ``virt``: the typed wrapper over libvirt-python).

On each host everything lives in the storage pool ``ttenv`` (a dir pool, defined at
``/var/lib/libvirt/ttenv`` when the host has none) and is reached through libvirt alone, so a
remote host needs nothing but libvirtd:

- images: a host whose URI names no host (this machine) uses the image store in place; a remote
  host gets each image file uploaded once as volume ``ttenv-img-<image>-<created>-<file>``,
  read back and compared by SHA-256, then marked complete by the volume ``<that>.sha256``;
- per VM ``ttenv-<env id>-<vm>``: the domain (persistent, with ttenv metadata naming this
  machine, state dir and ENV) and the volumes ``<domain>-disk.qcow2`` (linked clone: a qcow2 overlay
  backed by the image), ``<domain>-seed.iso`` (the NoCloud seed, uploaded; a read-only virtio disk
  as with the qemu engine, where our images look for it) and ``<domain>-console.log`` (the serial
  console, read back through volume download).

Snapshots are libvirt internal snapshots (memory and disk, in the overlay). Deleting a VM
destroys the domain, deletes its volumes, then undefines it (the domain is the record that owns
them). A host that cannot be reached reports its VMs ``stopped`` with the reason; deleting them
succeeds and leaves their remains to ``gc``, which sweeps the hosts once they answer
(``<state>/libvirt-pending.json`` remembers which). Warm starts: ``libvirt_warm``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import re
import socket
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from pytest_ttenv.backend.engines import qemu
from pytest_ttenv.backend.engines.base import Boot, Machine, Saved, Start, host_label, waiting
from pytest_ttenv.backend.engines.console import tail_text
from pytest_ttenv.backend.engines.deferred import start_all
from pytest_ttenv.backend.engines.libvirt_place import Capacity, Host, parse_hosts, place
from pytest_ttenv.backend.engines.libvirt_upload import upload_once
from pytest_ttenv.backend.engines.libvirt_warm import LibvirtWarm
from pytest_ttenv.backend.engines.libvirt_xml import (
    NS,
    DomainConfig,
    domain_name,
    domain_xml,
    qcow2_virtual_size,
    snapshot_xml,
    volume_xml,
)
from pytest_ttenv.backend.engines.net import ssh_banner
from pytest_ttenv.backend.engines.qemu_arch import QEMU_ARCH
from pytest_ttenv.backend.engines.templates import Template
from pytest_ttenv.backend.engines.virt import (
    NO_SNAPSHOT,
    START_HINT,
    Conn,
    HostDown,
    Pool,
    VirtError,
    open_conn,
)
from pytest_ttenv.backend.engines.warm import template_budget
from pytest_ttenv.core.capture_manifest import CaptureSkipped
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, VmInfo, VmSpec
from pytest_ttenv.errors import BootError, NotFound, TTError, UsageError

POOL = "ttenv"
POOL_PATH = "/var/lib/libvirt/ttenv"
PENDING_FILE = "libvirt-pending.json"
OPEN_TIMEOUT = 20.0
DOWN_FOR = 10.0  # after a failed connect, the host counts as down this long without retrying
_VOLUME_OF_VM = re.compile(r"^(ttenv-[0-9a-f]{12}-.+?)-(disk\.qcow2|seed\.iso|restore\.save|console\.log(\.\d+)?)$")
_RUNS = {1, 2, 3, 4, 7}  # running, blocked, paused (snapshot in progress), shutting down, pm-suspended
_SHUTOFF_WHY = {
    1: "the guest powered off",
    2: "its domain was destroyed",
    3: "qemu crashed or was killed, or the guest panicked",
    4: "its domain was migrated away",
    5: "its domain was saved",
    6: "qemu failed",
    7: "its domain was restored from a snapshot that is shut off",
}


def machine_id() -> str:
    """This machine, as domain metadata names it (gc reaps only domains of this machine)."""
    try:
        return Path("/etc/machine-id").read_text().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


class LibvirtEngine:
    """VMs as libvirt domains on ``uris`` (see the module doc). ``state``: the backend's state dir
    (named in domain metadata, holds the pending-sweep file). ``bind_addr``/``probe_addr``: where
    a VM on this machine's libvirt forwards its SSH port and where it is reached from here."""

    name = "libvirt"

    def __init__(
        self,
        uris: Sequence[str],
        state: Path,
        *,
        bind_addr: str = "127.0.0.1",
        probe_addr: str = "127.0.0.1",
        progress: Callable[[str], None] | None = None,
    ) -> None:
        from pytest_ttenv.backend.engines.virt import available

        self.hosts = parse_hosts(uris)
        why = available()
        if why:
            raise TTError(why)
        self.state = state
        self.bind_addr = bind_addr
        self._probe_addr = probe_addr
        self.progress = progress or (lambda line: None)
        self.machine = machine_id()
        self._conns: dict[str, Conn] = {}
        self._down: dict[str, tuple[float, str]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.warm = LibvirtWarm(self.hosts, self.conn, self._pool, self._lock, self.progress, self.machine)

    # -- hosts ---------------------------------------------------------------------------------
    def _host(self, uri: str) -> Host:
        return next((h for h in self.hosts if h.uri == uri), None) or Host(uri)

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def conn(self, uri: str) -> Conn:
        """The open connection to ``uri`` (reconnecting once it died); HostDown when it cannot be
        reached (then not retried for DOWN_FOR seconds)."""
        with self._lock(f"conn {uri}"):
            conn = self._conns.get(uri)
            if conn is not None and conn.alive():
                return conn
            if conn is not None:
                conn.close()
                del self._conns[uri]
            down = self._down.get(uri)
            if down is not None and down[0] > time.monotonic():
                raise HostDown(down[1])
            try:
                conn = open_conn(uri, OPEN_TIMEOUT)
            except HostDown as exc:
                self._down[uri] = (time.monotonic() + DOWN_FOR, exc.message)
                raise
            self._down.pop(uri, None)
            self._conns[uri] = conn
            return conn

    def _pool(self, conn: Conn) -> Pool:
        return conn.pool(POOL, POOL_PATH)

    def capacities(self) -> tuple[list[Capacity], list[str]]:
        """Each reachable host's capacity (overrides applied), and one line per unreachable host."""
        caps, down = [], []
        for host in self.hosts:
            try:
                conn = self.conn(host.uri)
                cpus, mem = conn.node()
                free = None if host.mem_mib is not None else conn.free_mem_mib()
            except HostDown as exc:
                down.append(exc.message)
                continue
            caps.append(Capacity(host.uri, host.cpu or cpus, host.mem_mib or mem, free))
        return caps, down

    def totals(self) -> tuple[int, int, int]:
        """(vCPUs, memory MiB, pool space MiB) of the reachable hosts: 80 % of memory and space
        where not overridden. For the host server's default quotas."""
        cpu = mem = disk = 0
        caps, _ = self.capacities()
        for cap in caps:
            host = self._host(cap.uri)
            cpu += cap.cpu
            mem += cap.mem_mib if host.mem_mib is not None else int(cap.mem_mib * 0.8)
            with contextlib.suppress(TTError):
                disk += int(self._pool(self.conn(cap.uri)).space()[1] / 2**20 * 0.8)
        return cpu, mem, disk

    def place(self, vms: Sequence[VmSpec], held: Sequence[VmInfo]) -> list[str]:
        caps, down = self.capacities()
        if not caps:
            raise TTError(f"no libvirt host reachable: {'; '.join(down)}", START_HINT)
        for line in down:
            self.progress(f"{line}; placing VMs on the other hosts")
        live = [vm for vm in held if vm.state in ("creating", "booting", "running")]
        return place(vms, caps, live)

    def address(self, host: str) -> str:
        h = self._host(host)
        if h.addr:
            return h.addr
        return (urlsplit(host).hostname or "") if h.remote else ""

    def probe_addr(self, vm: VmInfo) -> str:
        return vm.address if self._host(vm.host).remote else self._probe_addr

    def plan(self, spec: EnvSpec, vm: VmSpec, image: ImageInfo, accel: str, owner: str) -> Boot:
        if QEMU_ARCH[image.arch].libvirt is None:
            runs = ", ".join(a for a, q in QEMU_ARCH.items() if q.libvirt)
            raise UsageError(f"the libvirt engine does not run {image.arch} guests (only {runs})", "use --engine qemu")
        return self.warm.plan(spec, vm, image, accel, owner)

    # -- start ---------------------------------------------------------------------------------
    def start(self, jobs: Sequence[Start]) -> None:
        """Each VM cold, or warm from its template, in order, recorded once its domain runs; VMs
        whose template does not exist yet wait (recorded with no console) while one thread per
        template makes it, then start (``deferred.start_all``); a warm VM whose host cannot run its
        template boots cold."""
        start_all(
            jobs, self.warm, self._launch, self.progress, lambda job: self.warm.unusable(job, self._host(job.info.host))
        )

    def _launch(self, job: Start, template: Template | None) -> None:
        self._start(job, template)
        job.record()
        where = f" on {host_label(job.info.host)}" if host_label(job.info.host) else ""
        how = f"warm start from template {template.key}" if template is not None else "booting"
        self.progress(f"{job.vm.name}: {how}{where} ({job.accel}, ssh port {job.info.port})")

    def _start(self, job: Start, template: Template | None = None) -> None:
        host = self._host(job.info.host)
        conn = self.conn(host.uri)
        pool = self._pool(conn)
        image, info = job.image, job.info
        name = domain_name(job.env.id, job.vm.name)
        disk, kernel, initrd = self._base(host, pool, image)
        uefi = qemu.uses_uefi(image)
        if uefi and not host.remote and not Path(qemu.UEFI_FIRMWARE.get(image.arch, ("/nonexistent",))[0]).exists():
            pkg = qemu.UEFI_PACKAGE.get(image.arch)
            raise TTError(f"no UEFI firmware for {image.arch} guests", f"apt-get install -y {pkg}" if pkg else None)
        meta = {"machine": self.machine, "state": str(self.state), "env": job.env.id, "vm": job.vm.name}
        size = max(qcow2_virtual_size(image.file(image.disk)), job.vm.resources.disk_mib * 2**20)
        cfg = DomainConfig(
            name=name,
            uuid=str(uuid.uuid4()),
            title=f"ttenv {job.spec.name}/{job.vm.name}",
            metadata=meta,
            arch=image.arch,
            accel=job.accel,
            cpu=job.vm.resources.cpu,
            mem_mib=job.vm.resources.mem_mib,
            pool=POOL,
            disk_volume=f"{name}-disk.qcow2",
            seed_volume=f"{name}-seed.iso",
            console=f"{pool.path}/{name}-console.log",
            port=info.port,
            bind_addr="0.0.0.0" if host.remote else self.bind_addr,
            kernel=kernel,
            initrd=initrd,
            cmdline=job.cmdline,
            uefi=uefi,
            tcg_cx16=qemu.tcg_cx16_safe(image.arch),
        )
        if template is not None:  # the warm VM's devices: its template's (libvirt_warm.blank_config)
            meta["template"] = template.key
            cfg = dataclasses.replace(cfg, metadata=meta, identity=True, genid=str(uuid.uuid4()))
            disk = self.warm.backing(host, pool, template, disk)
        conn.define(domain_xml(cfg))  # first: the domain is the record that owns the volumes below
        pool.create(volume_xml(cfg.disk_volume, size, "qcow2", backing=disk), cfg.disk_volume)
        seed = job.seed.read_bytes()
        pool.create(volume_xml(cfg.seed_volume, len(seed)), cfg.seed_volume)
        with open(job.seed, "rb") as f:
            for _ in pool.upload(cfg.seed_volume, f, len(seed)):
                pass
        pool.create(volume_xml(f"{name}-console.log", 0), f"{name}-console.log")
        info.pid, info.console = 0, cfg.console
        for _attempt in range(5):
            info.boot_seconds = time.time()  # start time until wait_vm turns it into the boot duration
            try:
                if template is not None:
                    self.warm.restore(job, host, conn, pool, template, cfg)
                else:
                    conn.start(name)
                return
            except VirtError as exc:
                if "host forwarding" not in exc.message:
                    raise BootError(
                        f"libvirt could not start VM {job.vm.name} on {host.label}: {exc.message}",
                        self.console_of(conn, name, 20),
                    ) from None
            info.port = job.move_port()  # its port was taken on that host: move it
            cfg = dataclasses.replace(cfg, port=info.port)
            conn.define(domain_xml(cfg))
        raise TTError(f"no usable port on {host.label} for VM {job.vm.name} after 5 tries")

    def _base(self, host: Host, pool: Pool, image: ImageInfo) -> tuple[str, str | None, str | None]:
        """Paths on the host of the image's disk, kernel and initrd (uploaded once to a remote host)."""

        def path(file: str | None) -> str | None:
            if file is None:
                return None
            return self._upload_once(host, pool, image, file) if host.remote else str(image.file(file))

        return path(image.disk) or "", path(image.kernel), path(image.initrd)

    def _upload_once(self, host: Host, pool: Pool, image: ImageInfo, file: str) -> str:
        """The path on the host of image file ``file``, uploaded once (``libvirt_upload``)."""
        vol = f"ttenv-img-{image.name}-{int(image.created)}-{file}"
        with self._lock(f"image {host.uri} {vol}"):
            return upload_once(pool, host.label, image.file(file), vol, image.name, self.progress)

    # -- state ---------------------------------------------------------------------------------
    def dead(self, env: EnvInfo, vm: VmInfo) -> str | None:
        try:
            state = self.conn(vm.host).state(domain_name(env.id, vm.name))
        except HostDown as exc:
            return f"host {host_label(vm.host) or vm.host} unreachable: {exc.message}"
        except VirtError as exc:
            return f"libvirt cannot tell its state: {exc.message}"
        if state is None:
            return "its libvirt domain is gone"
        kind, reason = state
        if kind in _RUNS:
            return None
        if kind == 6:
            return "the guest crashed"
        return _SHUTOFF_WHY.get(reason, "its domain is shut off")

    def ready(self, env: EnvInfo, vm: VmInfo, timeout: float) -> bool:
        if vm.boot == "warm":
            dom = domain_name(env.id, vm.name)
            return self.warm.ready(self.conn(vm.host), dom, Path(env.rundir) / vm.name, vm.name)
        return ssh_banner(self.probe_addr(vm), vm.port, timeout)

    def wait_budget(self, vm: VmInfo, boot_timeout: float) -> float:
        return boot_timeout + (template_budget(boot_timeout) if waiting(vm) and vm.boot == "warm" else 0.0)

    def boot_failure(self, env: EnvInfo, vm: VmInfo, why: str) -> str:
        return f"VM {vm.name} died during boot ({why})"

    def halt(self, env: EnvInfo, vm: VmInfo) -> None:
        with contextlib.suppress(HostDown):
            self.conn(vm.host).destroy(domain_name(env.id, vm.name))

    def remove(self, env: EnvInfo, vm: VmInfo) -> str | None:
        try:
            conn = self.conn(vm.host)
            self._remove_domain(conn, domain_name(env.id, vm.name))
        except HostDown as exc:
            self._pending(add=vm.host, why=exc.message)
            return (
                f"VM {vm.name}: host {host_label(vm.host) or vm.host} unreachable ({exc.message}); its domain "
                f"and volumes there are removed by ttenv gc once it answers"
            )
        return None

    def _remove_domain(self, conn: Conn, name: str) -> None:
        """Destroy, delete the volumes, undefine: the domain goes last (it owns the volumes).
        Its volumes are every one named ``<domain>-...`` (virtlogd may have rotated the console)."""
        conn.destroy(name)
        pool = conn.pool(POOL, POOL_PATH)
        for vol in pool.volumes():
            m = _VOLUME_OF_VM.match(vol)
            if m and m.group(1) == name:
                pool.delete(vol)
        conn.undefine(name)

    # -- snapshots, console --------------------------------------------------------------------
    def snapshot(self, env: EnvInfo, vm: VmInfo, name: str) -> None:
        conn, dom = self.conn(vm.host), domain_name(env.id, vm.name)
        conn.delete_snapshot(dom, name)
        conn.snapshot(dom, snapshot_xml(name))

    def revert(self, env: EnvInfo, vm: VmInfo, name: str) -> None:
        try:
            self.conn(vm.host).revert(domain_name(env.id, vm.name), name)
        except VirtError as exc:
            if exc.code == NO_SNAPSHOT:
                raise NotFound(f"VM {vm.name} has no snapshot named {name!r}", "snapshot it first") from None
            raise
        if vm.boot == "warm":
            self.warm.refresh(self.conn(vm.host), domain_name(env.id, vm.name), vm.name)

    def console(self, env: EnvInfo, vm: VmInfo, tail: int) -> str:
        try:
            return self.console_of(self.conn(vm.host), domain_name(env.id, vm.name), tail)
        except HostDown:
            return ""

    def console_of(self, conn: Conn, name: str, tail: int) -> str:
        """The console tail of domain ``name``, read through volume download ('' if none yet)."""
        vol = f"{name}-console.log"
        try:
            pool = self._pool(conn)
            size, _ = pool.size(vol)
            data = b"".join(pool.download(vol, max(0, size - 64 * 1024)))
        except VirtError:
            return ""
        return tail_text(data, tail)

    def capture(self, env: EnvInfo, vm: VmInfo, image: ImageInfo, work: Path) -> Saved:
        raise CaptureSkipped(f"VM {vm.name} runs on the libvirt engine: captures are made on the qemu engine only")

    def restore(self, job: Start, machine: Machine) -> None:
        raise UsageError("a capture is replayed on the qemu engine", "replay it with the local backend's qemu engine")

    # -- gc ------------------------------------------------------------------------------------
    def abandon(self, env_id: str, rundir: Path) -> None:
        """Nothing at once: the domains of an ENV that is not in the store are swept by
        ``reap_strays`` (its ENV is not live)."""

    def reap_saved(self, images: Sequence[ImageInfo]) -> None:
        """Warm templates: here as the qemu engine's, and their copies on remote hosts."""
        self.warm.reap(images, self._templates_in_use)

    def _templates_in_use(self, conn: Conn) -> set[str]:
        """Keys of the templates the ttenv domains of this machine on the host start from."""
        used = set()
        for name in conn.domains():
            meta = _parse_meta(conn.metadata(name, NS)) if name.startswith("ttenv-") else None
            if meta is not None and meta.get("machine") == self.machine and meta.get("template"):
                used.add(meta["template"])
        return used

    def reap_strays(self, state: Path, live: Callable[[str], bool]) -> None:
        """Sweep the configured hosts and those with leftovers of deletes they missed: remove
        domains (and their volumes) of this machine whose state dir is gone, or that belong to
        ``state`` but to no live ENV, and volumes of VMs whose domain is gone. Hosts that cannot
        be reached are skipped (and remain pending)."""
        pending = self._pending()
        for uri in dict.fromkeys([*(h.uri for h in self.hosts), *pending]):
            try:
                self._sweep(self.conn(uri), state, live)
            except HostDown:
                continue
            if uri in pending:
                self._pending(drop=uri)

    def _sweep(self, conn: Conn, state: Path, live: Callable[[str], bool]) -> None:
        pool = conn.pool(POOL, POOL_PATH)
        volumes = pool.volumes()  # before the domains: a volume's domain is always defined first
        domains = set(conn.domains())
        for name in sorted(domains):
            if not name.startswith("ttenv-"):
                continue
            meta = _parse_meta(conn.metadata(name, NS))
            if meta is None or meta.get("machine") != self.machine:
                continue
            owner = Path(meta.get("state", ""))
            if not owner.is_absolute():
                continue
            if owner.exists() and not (owner == state and not live(meta.get("env", ""))):
                continue
            self.progress(f"gc: removing stray domain {name} on {host_label(conn.uri) or 'this machine'}")
            self._remove_domain(conn, name)
            domains.discard(name)
        for vol in volumes:
            m = _VOLUME_OF_VM.match(vol)
            if m and m.group(1) not in domains:
                pool.delete(vol)

    @contextlib.contextmanager
    def _pending_file(self) -> Iterator[Path]:
        self.state.mkdir(parents=True, exist_ok=True)
        with open(self.state / (PENDING_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield self.state / PENDING_FILE

    def _pending(self, add: str | None = None, why: str = "", drop: str | None = None) -> dict[str, str]:
        """Hosts that hold leftovers of deletes they missed (URI -> why); add or drop one."""
        with self._pending_file() as path:
            try:
                data: dict[str, str] = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            if add is None and drop is None:
                return data
            if add is not None:
                data[add] = why
            if drop is not None:
                data.pop(drop, None)
            if data:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data, indent=1))
                tmp.replace(path)
            else:
                path.unlink(missing_ok=True)
            return data


def _parse_meta(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    try:
        return dict(ET.fromstring(text).attrib)
    except ET.ParseError:
        return None


def host_totals(uris: Sequence[str], state: Path) -> tuple[int, int, int]:
    """(vCPUs, memory MiB, pool space MiB) the hosts offer, for the server's default quotas."""
    return LibvirtEngine(uris, state).totals()
