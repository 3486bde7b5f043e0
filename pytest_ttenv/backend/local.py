"""The local backend: ENVs of VMs run by an engine, state in sqlite, one run dir per ENV.

Run dir layout: ``<state>/envs/<env id>/owner.json`` and one directory per VM holding
``seed.iso`` and, with the qemu engine, ``overlay.qcow2`` (linked clone of the image),
``console.log``, ``qemu.log`` and ``qemu.pid``. QMP sockets live in ``$TMPDIR/ttenv-<uid>/<env
id>/`` (short paths). Deleting an ENV stops its VMs and removes its run dir, socket dir and rows;
with the qemu engine nothing else on the host refers to it (the libvirt engine removes its
domains and volumes on their hosts: ``libvirt.py``).

Engines (``engine.py``): ``qemu`` (default; a process per VM) or ``libvirt`` (domains on the
hosts given by ``libvirt_uris``, placed by free capacity, an ENV may span hosts). Every VM
records its engine and host, so ENVs are shown and deleted whatever engine is configured.

Behind the host server (``ttenv serve``) the same backend forwards SSH ports on the server's
address (``bind_addr``), announces ``public_addr`` to clients, and keeps ENV names unique per
owner (``names_per_owner``: stored as ``<owner>:<name>``, shown as ``<name>``).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_ttenv.backend import accel as accel_mod
from pytest_ttenv.backend.engine import ENGINES, Engine, QemuEngine, Start, host_label, qmp_path, tail_file
from pytest_ttenv.backend.images import ImageStore
from pytest_ttenv.backend.model import EnvInfo, EnvSpec, ImageInfo, Resources, VmInfo, VmSpec
from pytest_ttenv.backend.naming import check_env_name, match_prefixes
from pytest_ttenv.backend.owner import is_alive, start_time
from pytest_ttenv.backend.paths import image_dir, runtime_dir, state_dir
from pytest_ttenv.backend.seed import KeyPair, SeedData, write_seed_iso
from pytest_ttenv.backend.store import Store
from pytest_ttenv.errors import BootError, NotFound, TTError, UsageError, from_os_error

if TYPE_CHECKING:
    from pytest_ttenv.backend.libvirt import LibvirtEngine

__all__ = ["PORT_RANGE", "LocalBackend", "ssh_banner", "tail_file"]

PORT_RANGE = (10022, 32767)  # below Linux's ephemeral range, so outgoing connections never take them
MAX_CPU = 64
MIN_MEM_MIB = 128
_SOCKET_PATH_MAX = 107


def _free_ports(bind_addr: str = "127.0.0.1") -> Iterator[int]:
    """Random ports in PORT_RANGE that nothing listens on right now (on ``bind_addr``)."""
    for _ in range(200):
        port = random.randint(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind((bind_addr, port))
            except OSError:
                continue
        yield port


def ssh_banner(host: str, port: int, timeout: float = 2.0) -> bool:
    """True if an SSH server answers with its ``SSH-`` banner on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False


class LocalBackend:
    """ENVs on this host. ``progress`` receives one human-readable line per step.

    ``bind_addr``: host address VM SSH ports are forwarded on (an IPv4 address; 0.0.0.0 for
    all). ``public_addr``: the address put into ``VmInfo.address`` (default: ``bind_addr``, or
    127.0.0.1 when that is 0.0.0.0). ``names_per_owner``: ENV names are unique per owner, not per
    host (the server's mode). ``engine``: how new VMs run, ``qemu`` or ``libvirt`` on the hosts
    ``libvirt_uris`` (default ``qemu:///system``; see ``libvirt.parse_host`` for the syntax).
    """

    name = "local"

    def __init__(
        self,
        image_root: str | os.PathLike[str] | None = None,
        state_root: str | os.PathLike[str] | None = None,
        progress: Callable[[str], None] | None = None,
        *,
        bind_addr: str = "127.0.0.1",
        public_addr: str | None = None,
        names_per_owner: bool = False,
        engine: str = "qemu",
        libvirt_uris: Sequence[str] = (),
    ) -> None:
        if engine not in ENGINES:
            raise UsageError(f"unknown engine {engine!r}", f"use one of {', '.join(ENGINES)}")
        self.image_store = ImageStore(image_dir(image_root))
        self.state = state_dir(state_root)
        try:
            self.store = Store(self.state / "state.sqlite")
        except OSError as exc:
            raise from_os_error(exc, f"open the state store in {self.state}") from None
        except sqlite3.Error as exc:
            raise TTError(f"cannot open the state store {self.state / 'state.sqlite'}: {exc}",
                          "check permissions and free space, or set TTENV_STATE_DIR") from None  # fmt: skip
        self.progress = progress or (lambda line: None)
        self.bind_addr = bind_addr
        self._probe_addr = "127.0.0.1" if bind_addr == "0.0.0.0" else bind_addr  # where wait_vm looks for sshd
        self.public_addr = public_addr or self._probe_addr
        self.names_per_owner = names_per_owner
        self.engine = engine
        self.libvirt_uris = tuple(libvirt_uris)
        self._qemu = QemuEngine(bind_addr, self._probe_addr)
        self._libvirt: LibvirtEngine | None = None
        if engine == "libvirt":
            self._libvirt_engine()  # bad URIs and a missing libvirt-python are reported now
        elif self.libvirt_uris:
            raise UsageError("--libvirt-uri needs --engine libvirt")

    # -- engines ----------------------------------------------------------------------------
    def _libvirt_engine(self) -> LibvirtEngine:
        if self._libvirt is None:
            from pytest_ttenv.backend.libvirt import LibvirtEngine

            self._libvirt = LibvirtEngine(
                self.libvirt_uris, self.state, bind_addr=self.bind_addr, probe_addr=self._probe_addr,
                progress=self.progress,
            )  # fmt: skip
        return self._libvirt

    def _engine_of(self, vm: VmInfo) -> Engine:
        """The engine that runs ``vm`` (recorded with it, whatever this backend creates now)."""
        return self._libvirt_engine() if vm.engine == "libvirt" else self._qemu

    def _new_engine(self) -> Engine:
        return self._libvirt_engine() if self.engine == "libvirt" else self._qemu

    # -- images -----------------------------------------------------------------------------
    def images(self) -> list[ImageInfo]:
        return self.image_store.all()

    def resolve(self, prefixes: Sequence[str], arches: Sequence[str] = ()) -> list[str]:
        """Image names matching the OS prefixes (and arches); UsageError lists what exists."""
        return match_prefixes(prefixes, self.image_store.names(), arches)

    def _access(self, image: str) -> str:
        """How the image's VMs are reached (``ttenv`` or ``cloud-init``); cloud-init if it is gone."""
        try:
            return self.image_store.get(image).access
        except TTError:
            return "cloud-init"

    def _probe_image(self, arch: str) -> ImageInfo | None:
        """An image of ``arch`` with a kernel and initramfs: what the KVM probe boots."""
        return next((i for i in self.image_store.all() if i.arch == arch and i.kernel and i.initrd), None)

    # -- ENVs -------------------------------------------------------------------------------
    def create_env(self, spec: EnvSpec) -> EnvInfo:
        """Create the ENV and start every VM; returns at once while the VMs boot.

        Any failure before all VMs are started removes everything created so far; a failing
        file operation (disk full, no permission) becomes one TTError line.
        """
        try:
            return self._create_env(spec)
        except OSError as exc:
            raise from_os_error(exc, f"create ENV {spec.name}") from None

    def _create_env(self, spec: EnvSpec) -> EnvInfo:
        check_env_name(spec.name)
        if not spec.vms:
            raise UsageError("an ENV needs at least one VM")
        names = [vm.name for vm in spec.vms]
        if len(set(names)) != len(names):
            raise UsageError(f"VM names in an ENV must be unique: {', '.join(names)}")
        plan = [(vm, self.image_store.get(vm.image)) for vm in spec.vms]
        for vm, image in plan:
            check_env_name(vm.name)
            _check_resources(vm.resources, image)
        accels = {}
        for _, image in plan:
            if image.arch not in accels:
                probe = self._probe_image(image.arch) if image.kernel is None else None
                accels[image.arch] = accel_mod.choose(spec.accel, image, probe)
        self.gc()
        engine = self._new_engine()
        held = [vm for env in self.store.list_envs() for vm in env.vms if vm.engine == engine.name]
        hosts = engine.place([vm for vm, _ in plan], held)
        env_id = secrets.token_hex(6)
        rundir = self.state / "envs" / env_id
        longest = max(len(str(_qmp_path(env_id, n))) for n in names)
        if longest > _SOCKET_PATH_MAX:
            raise UsageError(
                f"{runtime_dir()} is too deep for qemu's monitor socket paths", "set TMPDIR to a shorter path"
            )
        now = time.time()
        owner = spec.owner or _user()
        stored = f"{owner}:{spec.name}" if self.names_per_owner else spec.name
        info = EnvInfo(
            id=env_id, name=stored, owner=owner, created=now,
            expires=now + spec.ttl if spec.ttl else None, state="booting", rundir=str(rundir),
        )  # fmt: skip
        sockets = runtime_dir() / env_id
        try:  # one guard over every step, so an interrupt anywhere (even between steps) cleans up
            rundir.mkdir(parents=True)
            sockets.mkdir(mode=0o700)
            (sockets / "rundir").write_text(str(rundir))
            owner_start = start_time(spec.owner_pid) if spec.owner_pid else None
            (rundir / "owner.json").write_text(json.dumps({"pid": spec.owner_pid, "start": owner_start}))
            self.store.add_env(info, spec.owner_pid, owner_start)
            for (vm, image), host in zip(plan, hosts, strict=True):
                self._start_vm(info, spec, vm, image, accels[image.arch], engine, host)
        except BaseException:
            self._undo_create(env_id, rundir, sockets)
            raise
        return self.show_env(env_id)

    def _start_vm(
        self, env: EnvInfo, spec: EnvSpec, vm: VmSpec, image: ImageInfo, acc: accel_mod.Accel, engine: Engine,
        host: str,
    ) -> None:  # fmt: skip
        vmdir = Path(env.rundir) / vm.name
        vmdir.mkdir()
        seed_iso = vmdir / "seed.iso"
        host_key = KeyPair.generate(f"ttenv-{vm.name}")
        resize = vm.resources.disk_mib > image.disk_mib
        write_seed_iso(
            SeedData(vm.name, f"{env.id}-{vm.name}", image.user, spec.client_pubkey, host_key, resize=resize),
            seed_iso,
        )
        info = VmInfo(
            name=vm.name, image=image.name, os=image.os, version=image.version, arch=image.arch,
            state="booting", address=engine.address(host) or self.public_addr, user=image.user,
            host_key=host_key.public, resources=vm.resources, accel=acc.name, engine=engine.name, host=host,
        )  # fmt: skip
        cmdline = f"{image.cmdline} systemd.machine_id={secrets.token_hex(16)}".strip()
        # a remote host's ports cannot be checked from here: its engine moves a VM whose port is taken
        ports = _any_ports() if engine.address(host) else _free_ports(self.bind_addr)
        info.port = self.store.reserve_port(env.id, info, ports)
        engine.start(Start(env, spec, vm, image, acc.name, info, vmdir, seed_iso, cmdline,
                           move_port=lambda: self.store.reserve_port(env.id, info, ports)))  # fmt: skip
        self.store.update_vm(env.id, info)
        where = f" on {host_label(host)}" if host_label(host) else ""
        self.progress(f"{vm.name}: booting{where} ({acc.name}, ssh port {info.port})")

    def _undo_create(self, env_id: str, rundir: Path, sockets: Path) -> None:
        """Remove whatever a failed or interrupted create_env made, whichever step it reached."""
        try:
            self.store.get_env(env_id)
        except TTError:
            self._qemu.reap_rundir(env_id, rundir)
        else:
            self.delete_env(env_id)
        shutil.rmtree(rundir, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)

    def wait_vm(self, env_ref: str, vm_name: str, timeout: float | None = None) -> VmInfo:
        """Wait until the VM's sshd answers; return its VmInfo (state ``running``).

        Raises BootError with the console tail if qemu exits or the timeout passes; a VM
        that timed out is stopped.
        """
        return self._wait(env_ref, vm_name, timeout, final=True)

    def poll_vm(self, env_ref: str, vm_name: str, timeout: float, stop: Callable[[], bool] | None = None) -> VmInfo:
        """Wait at most ``timeout`` s for the VM's sshd without giving up on it: its VmInfo,
        ``running`` or still ``booting`` (the server's long poll; also as soon as ``stop()`` is
        true). BootError if it died or failed. Probes as often as wait_vm: each probe is a TCP
        connection that qemu's user networking keeps retrying until the guest answers, so
        probing a slow guest more often only slows its boot down further."""
        return self._wait(env_ref, vm_name, timeout, final=False, stop=stop)

    def _wait(
        self, env_ref: str, vm_name: str, timeout: float | None, final: bool, stop: Callable[[], bool] | None = None
    ) -> VmInfo:
        env = self.store.get_env(env_ref)
        vm = _vm(env, vm_name)
        if vm.state == "running":
            return vm
        if vm.state != "booting":
            raise BootError(f"VM {vm.name} is {vm.state}: {vm.error}", self.console(env.id, vm.name))
        if timeout is None:
            booting = sum(v.state == "booting" for e in self.store.list_envs() for v in e.vms)
            timeout = accel_mod.boot_timeout(vm.accel, vm.arch, booting, self._access(vm.image))
        started = vm.boot_seconds
        deadline = time.monotonic() + timeout
        engine = self._engine_of(vm)
        probe = engine.probe_addr(vm)
        while True:
            why = engine.dead(env, vm)
            if why:
                detail = engine.boot_log(env, vm)
                return self._boot_failed(env, vm, f"VM {vm.name} died during boot ({why}) {detail}".strip())
            if ssh_banner(probe, vm.port, timeout=min(2.0, max(0.1, deadline - time.monotonic()))):
                vm.state, vm.boot_seconds = "running", time.time() - started
                self.store.update_vm(env.id, vm)
                if all(v.state == "running" for v in self.store.get_env(env.id).vms):
                    self.store.set_env_state(env.id, "running")
                return vm
            if time.monotonic() >= deadline or (stop is not None and stop()):
                if not final:
                    return vm
                engine.halt(env, vm)
                msg = f"VM {vm.name} did not answer SSH within {timeout:.0f} s ({vm.accel})"
                return self._boot_failed(env, vm, msg)
            time.sleep(0.1)

    def _boot_failed(self, env: EnvInfo, vm: VmInfo, message: str) -> VmInfo:
        vm.state, vm.error = "failed", message
        self.store.update_vm(env.id, vm)
        self.store.set_env_state(env.id, "failed")
        raise BootError(message, self.console(env.id, vm.name))

    def show_env(self, ref: str) -> EnvInfo:
        """The ENV by name or id, with each VM's state checked against its engine (a VM that does
        not run, or whose host cannot be reached, is ``stopped`` with the reason in ``error``)."""
        return self._refresh(self.store.get_env(ref))

    def list_envs(self) -> list[EnvInfo]:
        return [self._refresh(env) for env in self.store.list_envs()]

    def _refresh(self, env: EnvInfo) -> EnvInfo:
        self._plain_name(env)
        for vm in env.vms:
            if vm.state in ("booting", "running"):
                why = self._engine_of(vm).dead(env, vm)
                if why:
                    vm.state, vm.error = "stopped", why
        return env

    def delete_env(self, ref: str) -> EnvInfo:
        """Stop every VM of the ENV and remove its run dir and rows; returns what was deleted.

        A VM on a libvirt host that cannot be reached does not stop the delete: a progress line
        says so, and ``gc`` removes its domain and volumes once the host answers again.
        """
        env = self.store.get_env(ref)
        for vm in env.vms:
            note = self._engine_of(vm).remove(env, vm)
            if note:
                self.progress(note)
        shutil.rmtree(env.rundir, ignore_errors=True)
        shutil.rmtree(runtime_dir() / env.id, ignore_errors=True)
        self.store.delete_env(env.id)
        return self._plain_name(env)

    @staticmethod
    def _plain_name(env: EnvInfo) -> EnvInfo:
        """Show an owner-qualified stored name (``<owner>:<name>``) as ``<name>``."""
        if env.name.startswith(f"{env.owner}:"):
            env.name = env.name[len(env.owner) + 1 :]
        return env

    def renew(self, ref: str, ttl: float) -> EnvInfo:
        env = self.store.get_env(ref)
        self.store.set_expires(env.id, time.time() + ttl)
        return self.show_env(env.id)

    def keep(self, ref: str, ttl: float) -> EnvInfo:
        """Detach the ENV from its owner process (it survives it) with a lease of ``ttl`` seconds.

        Its VMs were started to die with the owner, so this only holds for ENVs created without
        an owner; the plugin starts them that way when ``--tt-keep`` is not ``never``.
        """
        env = self.store.get_env(ref)
        self.store.set_owner(env.id, None, None)
        return self.renew(env.id, ttl)

    def snapshot(self, env_ref: str, vm_name: str, name: str) -> None:
        """Save the running VM's memory and disk state as ``name`` (qemu: QMP ``savevm``;
        libvirt: an internal snapshot through its snapshot API)."""
        env, vm = self._running(env_ref, vm_name)
        self._engine_of(vm).snapshot(env, vm, name)

    def revert(self, env_ref: str, vm_name: str, name: str) -> None:
        """Restore the VM to snapshot ``name``; open SSH connections to it are dead afterwards.

        No snapshot of that name is NotFound, and the VM keeps running.
        """
        env, vm = self._running(env_ref, vm_name)
        self._engine_of(vm).revert(env, vm, name)

    def _running(self, env_ref: str, vm_name: str) -> tuple[EnvInfo, VmInfo]:
        """The ENV and its VM ``vm_name``; BootError (with the console tail) if the VM does not run."""
        env = self.store.get_env(env_ref)
        vm = _vm(env, vm_name)
        why = self._engine_of(vm).dead(env, vm)
        if why:
            raise BootError(f"VM {vm.name} died ({why})", self.console(env.id, vm.name))
        return env, vm

    def console(self, env_ref: str, vm_name: str, tail: int = 50) -> str:
        """The last ``tail`` lines of the VM's serial console."""
        env = self.store.get_env(env_ref)
        vm = _vm(env, vm_name)
        return self._engine_of(vm).console(env, vm, tail)

    def gc(self) -> list[EnvInfo]:
        """Delete ENVs whose owner process is gone or whose lease expired; returns them."""
        reaped = []
        now = time.time()
        for env in self.store.list_envs():
            pid, started = self.store.owner_of(env.id)
            orphaned = pid is not None and not is_alive(pid, started)
            expired = env.expires is not None and env.expires < now
            if orphaned or expired:
                try:
                    reaped.append(self.delete_env(env.id))
                except NotFound:  # deleted meanwhile by another process or thread
                    continue
        live = self._live
        self._qemu.reap_strays(self.state, live)
        if self.engine == "libvirt" or self._libvirt is not None or self._libvirt_pending():
            self._libvirt_engine().reap_strays(self.state, live)
        return reaped

    def _live(self, env_id: str) -> bool:
        """Whether the store holds ENV ``env_id`` right now."""
        return any(env.id == env_id for env in self.store.list_envs())

    def _libvirt_pending(self) -> bool:
        """Whether libvirt hosts hold leftovers of this state dir (they were unreachable at delete)."""
        from pytest_ttenv.backend.libvirt import PENDING_FILE

        return (self.state / PENDING_FILE).exists()


def _vm(env: EnvInfo, name: str) -> VmInfo:
    """The ENV's VM called ``name``, or NotFound listing its VMs."""
    try:
        return env.vm(name)
    except KeyError:
        raise NotFound(f"no VM named {name!r} in ENV {env.id}",
                       f"VMs: {', '.join(v.name for v in env.vms) or 'none'}") from None  # fmt: skip


def _qmp_path(env_id: str, vm_name: str) -> Path:
    """The VM's QMP socket (kept under this name for callers of the local backend)."""
    return qmp_path(env_id, vm_name)


def _any_ports() -> Iterator[int]:
    """Random ports in PORT_RANGE, for a host whose ports cannot be checked from here."""
    for _ in range(200):
        yield random.randint(*PORT_RANGE)


def _check_resources(res: Resources, image: ImageInfo) -> None:
    if not 1 <= res.cpu <= MAX_CPU:
        raise UsageError(f"--cpu must be between 1 and {MAX_CPU}, got {res.cpu}")
    if res.mem_mib < MIN_MEM_MIB:
        raise UsageError(f"--mem must be at least {MIN_MEM_MIB} MiB, got {res.mem_mib}")
    if res.disk_mib and res.disk_mib < image.disk_mib:
        raise UsageError(
            f"--disk {res.disk_mib} MiB is smaller than image {image.name} ({image.disk_mib} MiB)",
            "omit --disk or give a larger size",
        )


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):
        return str(os.getuid())
