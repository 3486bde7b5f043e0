"""The local backend: ENVs of VMs run by an engine, state in sqlite, one run dir per ENV.

Run dir layout: ``<state>/envs/<env id>/owner.json``, ``creator.json`` (the process that created
it) and one directory per VM holding ``seed.iso`` and, with the qemu engine, ``overlay.qcow2``
(linked clone of the image), ``console.log`` (capped: ``engine.cap_log``), ``qemu.log`` and
``qemu.pid``. QMP sockets live in the user's runtime dir (``$XDG_RUNTIME_DIR/ttenv/<env id>/`` or
``$TMPDIR/ttenv-<uid>/<env id>/``: short paths). All of it is private to the user: directories
0700, files 0600. Deleting an ENV stops its VMs and removes its run dir, socket dir and rows;
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

import errno
import functools
import json
import os
import platform
import queue
import random
import secrets
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_ttenv.backend.engines import accel as accel_mod
from pytest_ttenv.backend.engines import qemu, warm
from pytest_ttenv.backend.engines.base import (
    ENGINES,
    Engine,
    QemuEngine,
    Start,
    host_label,
    identity_path,
    qmp_path,
    tail_file,
)
from pytest_ttenv.backend.engines.seed import SeedData, write_seed_iso
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.backend.owner import current, is_alive, record_alive, start_time
from pytest_ttenv.backend.store import Store
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, Resources, VmInfo, VmSpec
from pytest_ttenv.core.naming import check_env_name, match_prefixes
from pytest_ttenv.core.paths import image_dir, private_dir, runtime_dir, socket_dir, state_dir, write_private
from pytest_ttenv.errors import BootError, NotFound, TTError, UsageError, from_os_error

if TYPE_CHECKING:
    from pytest_ttenv.backend.engines.libvirt import LibvirtEngine

__all__ = ["PORT_RANGE", "LocalBackend", "ssh_banner", "tail_file"]

PORT_RANGE = (10022, 32767)  # below Linux's ephemeral range, so outgoing connections never take them
MAX_CPU = 64
MIN_MEM_MIB = 128
_SOCKET_PATH_MAX = 107
CREATOR = "creator.json"  # in a run dir: the process that created the ENV (and starts its VMs)
_WARNED: set[str] = set()  # TCG fallback reasons already said in this process (said once)


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
            _private_store(self.state)
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
        self._qemu = QemuEngine(bind_addr, self._probe_addr, self.progress)
        self._libvirt: LibvirtEngine | None = None
        self._lock = threading.RLock()  # starting a VM vs deleting its ENV, within this process
        self._starter: _Starter | None = None
        if engine == "libvirt":
            self._libvirt_engine()  # bad URIs and a missing libvirt-python are reported now
        elif self.libvirt_uris:
            raise UsageError("--libvirt-uri needs --engine libvirt")
        self._fail_abandoned()

    # -- engines ----------------------------------------------------------------------------
    def _libvirt_engine(self) -> LibvirtEngine:
        if self._libvirt is None:
            from pytest_ttenv.backend.engines.libvirt import LibvirtEngine

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

    def _warn_tcg(self, acc: accel_mod.Accel, image: ImageInfo) -> None:
        """Say once per process why VMs of the host's arch fall back to TCG (not when TCG was asked
        for, nor for a foreign arch, which is always emulated)."""
        if acc.name != "tcg" or acc.reason == "requested" or image.arch != platform.machine():
            return
        if acc.reason not in _WARNED:
            _WARNED.add(acc.reason)
            self.progress(f"warning: {acc.reason}")

    def _probe_image(self, arch: str) -> ImageInfo | None:
        """An image of ``arch`` with a kernel and initramfs: what the KVM probe boots."""
        return next((i for i in self.image_store.all() if i.arch == arch and i.kernel and i.initrd), None)

    # -- ENVs -------------------------------------------------------------------------------
    def create_env(self, spec: EnvSpec) -> EnvInfo:
        """Create the ENV and start every VM; returns at once while the VMs boot (warm VMs whose
        template does not exist yet wait, ``booting``, while this process makes it).

        Any failure before all VMs are started removes everything created so far; a failing
        file operation (disk full, no permission) becomes one TTError line.
        """
        try:
            return self._create_env(spec)
        except OSError as exc:
            raise from_os_error(exc, f"create ENV {spec.name}") from None
        except sqlite3.OperationalError as exc:  # SQLITE_FULL: the state dir's disk is full
            if "full" not in str(exc):
                raise
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.state))
            raise from_os_error(full, f"create ENV {spec.name}") from None

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
                self._warn_tcg(accels[image.arch], image)
        owner = spec.owner or _user()
        engine = self._new_engine()
        warm_keys = {vm.name: self._warm_key(spec, vm, image, accels[image.arch].name, owner, engine)
                     for vm, image in plan}  # fmt: skip
        self.gc()
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
        stored = f"{owner}:{spec.name}" if self.names_per_owner else spec.name
        info = EnvInfo(
            id=env_id, name=stored, owner=owner, created=now,
            expires=now + spec.ttl if spec.ttl else None, state="booting", rundir=str(rundir),
        )  # fmt: skip
        sockets = runtime_dir() / env_id
        try:  # one guard over every step, so an interrupt anywhere (even between steps) cleans up
            private_dir(self.state / "envs")
            rundir.mkdir(mode=0o700)
            sockets.mkdir(mode=0o700)
            write_private(sockets / "rundir", str(rundir))
            owner_start = start_time(spec.owner_pid) if spec.owner_pid else None
            write_private(rundir / "owner.json", json.dumps({"pid": spec.owner_pid, "start": owner_start}))
            write_private(rundir / CREATOR, json.dumps(current()))  # starts its VMs (warm ones later)
            self.store.add_env(info, spec.owner_pid, owner_start)
            pending: dict[str, list[tuple[VmSpec, ImageInfo, accel_mod.Accel]]] = {}
            for (vm, image), host in zip(plan, hosts, strict=True):
                acc, keyed = accels[image.arch], warm_keys[vm.name]
                template = self._template(image, keyed[0]) if keyed else None
                self._start_vm(info, spec, vm, image, acc, engine, host, warm_start=keyed is not None,
                               template=template)  # fmt: skip
                if keyed and template is None:
                    pending.setdefault(keyed[0], []).append((vm, image, acc))
        except BaseException:
            self._undo_create(env_id, rundir, sockets)
            raise
        for key, vms in pending.items():  # made (or waited for) in the background; the VMs start then
            keyed = warm_keys[vms[0][0].name]
            assert keyed is not None
            threading.Thread(target=self._make_then_start, args=(env_id, spec, key, keyed[1], vms),
                             name=f"ttenv-template-{key}", daemon=True).start()  # fmt: skip
        return self.show_env(env_id)

    def _start_vm(
        self, env: EnvInfo, spec: EnvSpec, vm: VmSpec, image: ImageInfo, acc: accel_mod.Accel, engine: Engine,
        host: str, *, warm_start: bool = False, template: warm.Template | None = None,
    ) -> None:  # fmt: skip
        """Prepare the VM (run dir, host key, seed, port) and start it: cold, or (``warm_start``) from
        ``template`` - or, with none yet, leave it ``booting`` with pid 0 until its template is made."""
        vmdir = Path(env.rundir) / vm.name
        vmdir.mkdir(mode=0o700)
        host_key = KeyPair.generate(f"ttenv-{vm.name}")
        resize = vm.resources.disk_mib > image.disk_mib
        machine_id = secrets.token_hex(16)
        write_seed_iso(
            SeedData(vm.name, f"{env.id}-{vm.name}", image.user, spec.client_pubkey, host_key, resize=resize),
            vmdir / "seed.iso",
        )
        info = VmInfo(
            name=vm.name, image=image.name, os=image.os, version=image.version, arch=image.arch,
            state="booting", address=engine.address(host) or self.public_addr, user=image.user,
            host_key=host_key.public, resources=vm.resources, accel=acc.name, engine=engine.name, host=host,
            boot="warm" if warm_start else "cold", boot_seconds=time.time(),
        )  # fmt: skip
        write_private(vmdir / "machine-id", machine_id)
        if warm_start:  # what makes it its own machine once it runs (wait_vm sends it, then deletes this)
            ident = warm.Identity(vm.name, machine_id, image.user, spec.client_pubkey, host_key)
            with open(os.open(vmdir / "identity.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                json.dump(ident.to_dict(), f)
        info.port = self.store.reserve_port(env.id, info, self._ports(engine, host))
        if warm_start and template is None:
            self.store.update_vm(env.id, info)
            self.progress(f"{vm.name}: waiting for the warm template of {image.name}")
            return
        self._launch(env, spec, vm, image, acc, engine, host, info, template)

    def _ports(self, engine: Engine, host: str) -> Iterator[int]:
        # a remote host's ports cannot be checked from here: its engine moves a VM whose port is taken
        return _any_ports() if engine.address(host) else _free_ports(self.bind_addr)

    def _launch(
        self, env: EnvInfo, spec: EnvSpec, vm: VmSpec, image: ImageInfo, acc: accel_mod.Accel, engine: Engine,
        host: str, info: VmInfo, template: warm.Template | None,
    ) -> None:  # fmt: skip
        """Hand the prepared VM to its engine: cold, or from ``template``'s saved state."""
        vmdir = Path(env.rundir) / vm.name
        cmdline = warm.machine_cmdline(image, (vmdir / "machine-id").read_text())
        ports = self._ports(engine, host)
        move = lambda: self.store.reserve_port(env.id, info, ports)  # noqa: E731
        record = lambda: self.store.update_vm(env.id, info)  # noqa: E731
        engine.start(Start(env, spec, vm, image, acc.name, info, vmdir, vmdir / "seed.iso", cmdline, move, template,
                           record))  # fmt: skip
        self.store.update_vm(env.id, info)
        where = f" on {host_label(host)}" if host_label(host) else ""
        how = f"warm start from template {template.key}" if template is not None else "booting"
        self.progress(f"{vm.name}: {how}{where} ({acc.name}, ssh port {info.port})")

    # -- warm boot --------------------------------------------------------------------------------
    def _warm_key(
        self, spec: EnvSpec, vm: VmSpec, image: ImageInfo, accel: str, owner: str, engine: Engine
    ) -> tuple[str, dict[str, object]] | None:
        """The key and inputs of the template ``vm`` starts from, or None: a cold boot (with a
        progress line saying why, unless cold was asked for)."""
        if spec.boot != "warm":
            return None
        why = warm.ineligible(image, vm.resources)
        if engine.name != "qemu":
            why = f"warm starts need the qemu engine, not {engine.name}"
        if not why:
            qemu.require(image.arch)  # said now, not by a background template maker
            try:
                inputs = warm.template_inputs(image, accel, vm.resources, owner)
                return warm.template_key(inputs), inputs
            except (OSError, TTError) as exc:
                why = f"{image.name}'s warm template cannot be keyed: {exc}"
        self.progress(f"{vm.name}: cold boot ({why})")
        return None

    def _template(self, image: ImageInfo, key: str) -> warm.Template | None:
        """The complete, verified template ``key`` of ``image``, or None (made in the background
        then). A template that fails its checks is removed, saying so."""
        store = warm.TemplateStore(image)
        template = store.find(key)
        if template is None:
            return None
        try:
            store.verify(template)
        except TTError as exc:
            self.progress(f"{exc}: removing it, a new one is made")
            store.remove(key)
            return None
        store.mark_used(template)
        return template

    def _make_then_start(
        self, env_id: str, spec: EnvSpec, key: str, inputs: dict[str, object],
        vms: list[tuple[VmSpec, ImageInfo, accel_mod.Accel]],
    ) -> None:  # fmt: skip
        """Make template ``key`` (or wait while another process makes it), then start ``vms``
        from it - or cold, saying why, if that failed."""
        _, image, acc = vms[0]
        res = vms[0][0].resources
        booting = sum(v.state == "booting" for e in self.store.list_envs() for v in e.vms)
        limit = accel_mod.boot_timeout(acc.name, image.arch, booting)
        template, why = None, ""
        try:
            store = warm.TemplateStore(image)
            with store.lock(key, warm.template_budget(limit)):
                template = self._template(image, key)
                if template is None:
                    template = warm.make_template(store, key, inputs, res, 2 * limit, self.progress)
        except Exception as exc:  # noqa: BLE001 - any failure: the VMs boot cold, saying why
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        for vm, image, acc in vms:
            self._starter_thread().submit(functools.partial(self._start_pending, env_id, spec, vm, image, acc,
                                                            template, why))  # fmt: skip

    def _start_pending(
        self, env_id: str, spec: EnvSpec, vm: VmSpec, image: ImageInfo, acc: accel_mod.Accel,
        template: warm.Template | None, why: str,
    ) -> None:  # fmt: skip
        """Start a VM that waited for its template (on the starter thread); a failure marks it failed."""
        with self._lock:
            try:
                env = self.store.get_env(env_id)
                info = env.vm(vm.name)
            except (NotFound, KeyError):
                return  # deleted meanwhile
            try:
                if template is None:
                    self.progress(f"{vm.name}: cold boot (no warm template: {why})")
                    info.boot = "cold"
                    (Path(env.rundir) / vm.name / "identity.json").unlink(missing_ok=True)
                info.boot_seconds = time.time()  # its boot is timed from here
                self._launch(env, spec, vm, image, acc, self._qemu, "", info, template)
            except Exception as exc:  # noqa: BLE001 - reported through the VM's state and wait_vm
                info.state, info.error = "failed", f"VM {vm.name} could not be started: {exc}"
                self.store.update_vm(env.id, info)
                self.store.set_env_state(env.id, "failed")

    def _starter_thread(self) -> _Starter:
        with self._lock:
            if self._starter is None:
                self._starter = _Starter()
            return self._starter

    def _apply_identity(self, env: EnvInfo, vm: VmInfo) -> None:
        """Send a warm VM its identity once (whichever process gets here first); TTError on failure."""
        vmdir = Path(env.rundir) / vm.name
        pending = vmdir / "identity.json"
        if not pending.exists():
            return
        with warm.flock(vmdir / "identity.lock", warm.AGENT_TIMEOUT + 10, f"the identity lock of VM {vm.name}"):
            if not pending.exists():
                return
            ident = warm.Identity.from_dict(json.loads(pending.read_text()))
            warm.apply_identity(identity_path(env.id, vm.name), ident, warm.AGENT_TIMEOUT, f"VM {vm.name}")
            pending.unlink()

    def _undo_create(self, env_id: str, rundir: Path, sockets: Path) -> None:
        """Remove whatever a failed or interrupted create_env made, whichever step it reached."""
        for last in (False, True):
            try:
                try:
                    self.store.get_env(env_id)
                except NotFound:
                    self._qemu.reap_rundir(env_id, rundir)
                else:
                    self.delete_env(env_id)
                break
            except TTError:  # a full disk: the store cannot even read until the run dir's files go
                if last:
                    raise
                self._qemu.reap_rundir(env_id, rundir)
                shutil.rmtree(rundir, ignore_errors=True)
        shutil.rmtree(rundir, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)

    def wait_vm(self, env_ref: str, vm_name: str, timeout: float | None = None) -> VmInfo:
        """Wait until the VM's sshd answers; return its VmInfo (state ``running``). A warm VM is
        first given its identity (so sshd then presents its own host key and only the client's key
        logs in); by default one still waiting for its template also gets the time to make that.

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
            if _pending(vm):  # waiting for its warm template: that is made first, then the VM starts
                timeout += warm.template_budget(timeout)
        started = vm.boot_seconds
        deadline = time.monotonic() + timeout
        engine = self._engine_of(vm)
        probe = engine.probe_addr(vm)
        identified = vm.boot != "warm"
        while True:
            if _pending(vm):  # started by the process making its template
                if time.monotonic() >= deadline or (stop is not None and stop()):
                    if not final:
                        return vm
                    msg = f"VM {vm.name} was not started within {timeout:.0f} s: its warm template was not ready"
                    return self._boot_failed(env, vm, msg)
                time.sleep(0.2)
                vm = _vm(self.store.get_env(env.id), vm_name)
                if vm.state != "booting":
                    raise BootError(f"VM {vm.name} is {vm.state}: {vm.error}", self.console(env.id, vm.name))
                identified, started = vm.boot != "warm", vm.boot_seconds
                continue
            why = engine.dead(env, vm)
            if why:
                detail = engine.boot_log(env, vm)
                if not identified:
                    dropped = self._drop_bad_template(Path(env.rundir) / vm.name, detail)
                    msg = f"VM {vm.name} died during its warm start ({why}) {detail}".strip()
                    return self._boot_failed(env, vm, msg + ("; its template was removed" if dropped else ""))
                return self._boot_failed(env, vm, f"VM {vm.name} died during boot ({why}) {detail}".strip())
            if not identified:  # a warm VM: its identity first, once it runs (it loads its state before)
                if qemu.run_state(qmp_path(env.id, vm.name)) == "running":
                    try:
                        self._apply_identity(env, vm)
                    except TTError as exc:
                        engine.halt(env, vm)
                        return self._boot_failed(env, vm, str(exc))
                    return self._mark_running(env, vm, started)  # its sshd was listening when it was saved
                if time.monotonic() < deadline and not (stop is not None and stop()):
                    time.sleep(0.05)
                    continue
            elif ssh_banner(probe, vm.port, timeout=min(2.0, max(0.1, deadline - time.monotonic()))):
                return self._mark_running(env, vm, started)
            if time.monotonic() >= deadline or (stop is not None and stop()):
                if not final:
                    return vm
                engine.halt(env, vm)
                what = "answer SSH" if identified else "load its saved state (warm start)"
                msg = f"VM {vm.name} did not {what} within {timeout:.0f} s ({vm.accel})"
                return self._boot_failed(env, vm, msg)
            time.sleep(0.1)

    def _mark_running(self, env: EnvInfo, vm: VmInfo, started: float) -> VmInfo:
        vm.state, vm.boot_seconds = "running", time.time() - started
        self.store.update_vm(env.id, vm)
        if all(v.state == "running" for v in self.store.get_env(env.id).vms):
            self.store.set_env_state(env.id, "running")
        return vm

    @staticmethod
    def _drop_bad_template(vmdir: Path, qemu_log: str) -> bool:
        """If a warm VM's qemu could not load its template's state, remove the template (the next
        ENV makes a new one) and return True."""
        if "load of migration failed" not in qemu_log:
            return False  # died for another reason (killed, out of memory): the template is not suspect
        try:
            template = Path((vmdir / "template").read_text())
        except OSError:
            return False
        if template.parent.name != "warm" or not (template / warm.META).exists():
            return False
        warm.remove_dir(template)
        return True

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
            if vm.state in ("booting", "running") and not _pending(vm):
                why = self._engine_of(vm).dead(env, vm)
                if why:
                    vm.state, vm.error = "stopped", why
        return env

    def delete_env(self, ref: str) -> EnvInfo:
        """Stop every VM of the ENV and remove its run dir and rows; returns what was deleted.

        A VM on a libvirt host that cannot be reached does not stop the delete: a progress line
        says so, and ``gc`` removes its domain and volumes once the host answers again.
        """
        with self._lock:  # no VM of it starts meanwhile (one waiting for its warm template)
            env = self.store.get_env(ref)
            for vm in env.vms:
                note = self._engine_of(vm).remove(env, vm)
                if note:
                    self.progress(note)
            shutil.rmtree(env.rundir, ignore_errors=True)
            shutil.rmtree(socket_dir(env.id), ignore_errors=True)
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
        A warm-started VM's clock is then set to now and its RNG reseeded (its identity agent).

        No snapshot of that name is NotFound, and the VM keeps running.
        """
        env, vm = self._running(env_ref, vm_name)
        self._engine_of(vm).revert(env, vm, name)
        if vm.boot == "warm":
            warm.refresh(identity_path(env.id, vm.name), warm.AGENT_TIMEOUT, f"VM {vm.name}")

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
        """Delete ENVs whose owner process is gone or whose lease expired; returns them. Also
        deletes stray VMs, and warm templates of images that changed or that nobody used lately."""
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
        for image in self.image_store.all():
            try:
                warm.TemplateStore(image).reap()
            except (OSError, TTError):
                continue
        return reaped

    def _fail_abandoned(self) -> None:
        """VMs never started whose creating process is gone (killed, a server restarted while they
        waited ``booting`` with pid 0 for their warm template) fail, saying why: nobody would
        start them, and failed they are shown, deleted and reaped like any other."""
        for env in self.store.list_envs():
            for vm in env.vms:
                if vm.state != "booting" or vm.engine != "qemu" or vm.pid:
                    continue
                creator = Path(env.rundir) / CREATOR
                if record_alive(creator):
                    continue
                vm.state = "failed"
                vm.error = f"VM {vm.name} was never started: the process that created ENV {env.id} is gone"
                self.store.update_vm(env.id, vm)
                self.store.set_env_state(env.id, "failed")

    def _live(self, env_id: str) -> bool:
        """Whether the store holds ENV ``env_id`` right now."""
        return any(env.id == env_id for env in self.store.list_envs())

    def _libvirt_pending(self) -> bool:
        """Whether libvirt hosts hold leftovers of this state dir (they were unreachable at delete)."""
        from pytest_ttenv.backend.engines.libvirt import PENDING_FILE

        return (self.state / PENDING_FILE).exists()


def _private_store(state: Path) -> None:
    """The state dir 0700 and its sqlite files 0600 (older versions left them 0755 and 0644): the
    database file is created 0600 before sqlite opens it, and sqlite gives its WAL and shared
    memory files the database file's mode."""
    private_dir(state)
    db = state / "state.sqlite"
    try:
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        try:
            st = path.lstat()
            if st.st_uid == os.getuid() and st.st_mode & 0o077:
                path.chmod(0o600)
        except FileNotFoundError:
            continue


def _vm(env: EnvInfo, name: str) -> VmInfo:
    """The ENV's VM called ``name``, or NotFound listing its VMs."""
    try:
        return env.vm(name)
    except KeyError:
        raise NotFound(f"no VM named {name!r} in ENV {env.id}",
                       f"VMs: {', '.join(v.name for v in env.vms) or 'none'}") from None  # fmt: skip


def _pending(vm: VmInfo) -> bool:
    """A warm VM waiting for its template: not started yet (no process), not dead."""
    return vm.state == "booting" and vm.boot == "warm" and vm.pid == 0


class _Starter:
    """One long-lived thread per backend that starts VMs which waited for a warm template.

    VMs started to die with their owner get PDEATHSIG, which follows the thread that forked them:
    so they are started from this thread, which lives as long as the process, never from the
    short-lived thread that made the template.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        threading.Thread(target=self._run, name="ttenv-starter", daemon=True).start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            self._jobs.get()()  # jobs report their own failures (the VM's state)


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
