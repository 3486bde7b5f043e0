"""The local backend: ENVs of VMs run by an engine, state in sqlite, one run dir per ENV.

Run dir layout: ``<state>/envs/<env id>/owner.json``, ``creator.json`` (the process that created
it) and one directory per VM holding ``seed.iso``, ``machine-id`` and what its engine keeps there
(the qemu engine: ``qemu_engine``). Sockets live in the user's runtime dir
(``$XDG_RUNTIME_DIR/ttenv/<env id>/`` or ``$TMPDIR/ttenv-<uid>/<env id>/``: short paths). All of it
is private to the user: directories 0700, files 0600. Deleting an ENV stops its VMs through their
engines and removes its run dir, socket dir and rows.

Engines (``engines/``, chosen by name in ``engines.registry``): ``qemu`` (default; a process per
VM) or ``libvirt`` (domains on the hosts given by ``libvirt_uris``, placed by free capacity, an ENV
may span hosts). The engine decides whether a VM starts warm or cold and says why; this backend
knows no engine by name. Every VM records its engine and host, so ENVs are shown and deleted
whatever engine is configured. Garbage collection: ``sweep``; waiting for VMs: ``readiness``.

Behind the host server (``ttenv serve``) the same backend forwards SSH ports on the server's
address (``bind_addr``), announces ``public_addr`` to clients, and keeps ENV names unique per
owner (``names_per_owner``: stored as ``<owner>:<name>``, shown as ``<name>``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pytest_ttenv.backend import capture, readiness, replay, sweep
from pytest_ttenv.backend.engines import accel as accel_mod
from pytest_ttenv.backend.engines.base import Boot, Engine, Start, waiting
from pytest_ttenv.backend.engines.net import any_ports, free_ports
from pytest_ttenv.backend.engines.qemu_arch import kvm_runs
from pytest_ttenv.backend.engines.registry import Engines
from pytest_ttenv.backend.engines.seed import SeedData, instance_id, write_seed_iso
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.backend.owner import current, start_time
from pytest_ttenv.backend.store import Store
from pytest_ttenv.backend.validate import check_resources, current_user, vm_of
from pytest_ttenv.core.capture_manifest import CaptureInfo, CaptureSkipped, TestRecord
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, VmInfo, VmSpec
from pytest_ttenv.core.naming import check_env_name, host_arch, match_prefixes
from pytest_ttenv.core.paths import image_dir, private_dir, runtime_dir, socket_dir, state_dir, write_private
from pytest_ttenv.errors import BootError, NotFound, TTError, UsageError, from_os_error

__all__ = ["LocalBackend"]

_WARNED: set[str] = set()  # TCG fallback reasons already said in this process (said once)


class LocalBackend:
    """ENVs on this host. ``progress`` receives one human-readable line per step.

    ``bind_addr``: host address VM SSH ports are forwarded on (an IPv4 address; 0.0.0.0 for
    all). ``public_addr``: the address put into ``VmInfo.address`` (default: ``bind_addr``, or
    127.0.0.1 when that is 0.0.0.0). ``names_per_owner``: ENV names are unique per owner, not per
    host (the server's mode). ``engine``: how new VMs run, ``qemu`` or ``libvirt`` on the hosts
    ``libvirt_uris`` (default ``qemu:///system``; see ``libvirt_place.parse_host`` for the syntax).
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
        self.image_store = ImageStore(image_dir(image_root))
        self.state = state_dir(state_root)
        self.progress = progress or (lambda line: None)
        self.bind_addr = bind_addr
        probe_addr = "127.0.0.1" if bind_addr == "0.0.0.0" else bind_addr  # where this machine reaches the VMs
        self.public_addr = public_addr or probe_addr
        self.names_per_owner = names_per_owner
        self.engine = engine
        self.libvirt_uris = tuple(libvirt_uris)
        self.engines = Engines(  # an unknown engine, bad URIs or a missing libvirt-python: said before anything is made
            engine,
            self.state,
            bind_addr=bind_addr,
            probe_addr=probe_addr,
            progress=self._say,
            libvirt_uris=libvirt_uris,
        )
        try:
            sweep.private_store(self.state)
            self.store = Store(self.state / "state.sqlite")
        except OSError as exc:
            raise from_os_error(exc, f"open the state store in {self.state}") from None
        except sqlite3.Error as exc:
            raise TTError(
                f"cannot open the state store {self.state / 'state.sqlite'}: {exc}",
                "check permissions and free space, or set TTENV_STATE_DIR",
            ) from None
        self._lock = threading.RLock()  # starting a VM vs deleting its ENV, within this process
        sweep.fail_abandoned(self.store)

    def _say(self, line: str) -> None:
        """A progress line (to whatever ``progress`` is now: callers replace it)."""
        self.progress(line)

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
        """Say once per process why VMs this host's KVM could run fall back to TCG (not when TCG was
        asked for, nor for a foreign arch, which is always emulated)."""
        if acc.name != "tcg" or acc.reason == "requested" or not kvm_runs(image.arch, host_arch()):
            return
        if acc.reason not in _WARNED:
            _WARNED.add(acc.reason)
            self.progress(f"warning: {acc.reason}")

    def _probe_image(self, arch: str) -> ImageInfo | None:
        """An image of ``arch`` with a kernel and initramfs: what the KVM probe boots."""
        return next((i for i in self.image_store.all() if i.arch == arch and i.kernel and i.initrd), None)

    def _booting(self) -> int:
        """How many VMs of this state dir boot now (boot timeouts grow with it)."""
        return sum(v.state == "booting" for e in self.store.list_envs() for v in e.vms)

    # -- ENVs -------------------------------------------------------------------------------
    def create_env(self, spec: EnvSpec) -> EnvInfo:
        """Create the ENV and start every VM; returns at once while the VMs boot (a VM whose
        engine makes something first, its warm template, waits ``booting`` meanwhile).

        Any failure before all VMs are started removes everything created so far; a failing
        file operation (disk full, no permission) becomes one TTError line. A VM with ``restore``
        is the capture replayed (``replay``), alone in its ENV.
        """
        if not spec.vms:
            raise UsageError("an ENV needs at least one VM")
        if any(vm.restore for vm in spec.vms[1:]) or (spec.vms[0].restore and len(spec.vms) > 1):
            raise UsageError("a replay is an ENV of its one VM")
        restore = (
            replay.prepare(Path(spec.vms[0].restore), self.image_store, self.state) if spec.vms[0].restore else None
        )
        try:
            return self._create_env(spec, restore)
        except OSError as exc:
            raise from_os_error(exc, f"create ENV {spec.name}") from None
        except sqlite3.OperationalError as exc:  # SQLITE_FULL: the state dir's disk is full
            if "full" not in str(exc):
                raise
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.state))
            raise from_os_error(full, f"create ENV {spec.name}") from None
        finally:
            if restore is not None:
                restore.discard()

    def _create_env(self, spec: EnvSpec, restore: replay.Restore | None) -> EnvInfo:
        check_env_name(spec.name)
        names = [vm.name for vm in spec.vms]
        if len(set(names)) != len(names):
            raise UsageError(f"VM names in an ENV must be unique: {', '.join(names)}")
        plan = [(vm, restore.image if restore else self.image_store.get(vm.image)) for vm in spec.vms]
        for vm, image in plan:
            check_env_name(vm.name)
            check_resources(vm.resources, image)
        accels = {}
        for _, image in plan:
            if image.arch not in accels:
                probe = self._probe_image(image.arch) if image.kernel is None else None
                accels[image.arch] = accel_mod.choose(spec.accel, image, probe)
                self._warn_tcg(accels[image.arch], image)
        owner = spec.owner or current_user()
        engine = self.engines.new
        boots = [
            Boot("warm", "a replay") if restore else self._plan(engine, spec, vm, image, accels[image.arch].name, owner)
            for vm, image in plan
        ]
        self.gc()
        held = [vm for env in self.store.list_envs() for vm in env.vms if vm.engine == engine.name]
        hosts = engine.place([vm for vm, _ in plan], held)
        env_id = secrets.token_hex(6)
        rundir = self.state / "envs" / env_id
        now = time.time()
        stored = f"{owner}:{spec.name}" if self.names_per_owner else spec.name
        info = EnvInfo(
            id=env_id,
            name=stored,
            owner=owner,
            created=now,
            expires=now + spec.ttl if spec.ttl else None,
            state="booting",
            rundir=str(rundir),
        )
        sockets = runtime_dir() / env_id
        try:  # one guard over every step, so an interrupt anywhere (even between steps) cleans up
            private_dir(self.state / "envs")
            rundir.mkdir(mode=0o700)
            sockets.mkdir(mode=0o700)
            write_private(sockets / "rundir", str(rundir))
            owner_start = start_time(spec.owner_pid) if spec.owner_pid else None
            write_private(rundir / "owner.json", json.dumps({"pid": spec.owner_pid, "start": owner_start}))
            write_private(rundir / sweep.CREATOR, json.dumps(current()))  # starts its VMs (waiting ones later)
            self.store.add_env(info, spec.owner_pid, owner_start)
            booting = self._booting() + len(plan)
            jobs = [
                self._prepare(info, spec, vm, image, accels[image.arch], engine, host, boot, booting, restore)
                for (vm, image), host, boot in zip(plan, hosts, boots, strict=True)
            ]
            if restore is not None:
                replay.restore(engine, jobs[0], restore, self.progress)
            else:
                engine.start(jobs)
        except BaseException:
            self._undo_create(env_id, rundir, sockets, engine)
            raise
        return self.show_env(env_id)

    def _plan(self, engine: Engine, spec: EnvSpec, vm: VmSpec, image: ImageInfo, accel: str, owner: str) -> Boot:
        """How the engine starts ``vm``; a warm start asked for but not possible is said, with why."""
        boot = engine.plan(spec, vm, image, accel, owner)
        if spec.boot == "warm" and boot.how != "warm":
            self.progress(f"{vm.name}: cold boot ({boot.why})")
        return boot

    def _prepare(
        self,
        env: EnvInfo,
        spec: EnvSpec,
        vm: VmSpec,
        image: ImageInfo,
        acc: accel_mod.Accel,
        engine: Engine,
        host: str,
        boot: Boot,
        booting: int,
        restore: replay.Restore | None = None,
    ) -> Start:
        """The VM's run dir, host key, seed, machine-id and port, recorded (``booting``): its job
        for the engine."""
        vmdir = Path(env.rundir) / vm.name
        vmdir.mkdir(mode=0o700)
        host_key = KeyPair.generate(f"ttenv-{vm.name}")
        resize = vm.resources.disk_mib > image.disk_mib
        machine_id = restore.machine.machine_id if restore else secrets.token_hex(16)
        write_seed_iso(
            SeedData(vm.name, instance_id(env.id, vm.name), image.user, spec.client_pubkey, host_key, resize=resize),
            vmdir / "seed.iso",
        )
        info = VmInfo(
            name=vm.name,
            image=image.name,
            os=image.os,
            version=image.version,
            arch=image.arch,
            state="booting",
            address=engine.address(host) or self.public_addr,
            user=image.user,
            host_key=host_key.public,
            resources=vm.resources,
            accel=acc.name,
            engine=engine.name,
            host=host,
            boot=boot.how,
            boot_seconds=time.time(),
        )
        write_private(vmdir / "machine-id", machine_id)
        # a remote host's ports cannot be checked from here: its engine moves a VM whose port is taken
        ports = any_ports() if engine.address(host) else free_ports(self.bind_addr)
        info.port = self.store.reserve_port(env.id, info, ports)
        return Start(
            env,
            spec,
            vm,
            image,
            acc.name,
            info,
            vmdir,
            vmdir / "seed.iso",
            host_key,
            machine_id,
            boot,
            move_port=lambda: self.store.reserve_port(env.id, info, ports),
            record=lambda: self.store.update_vm(env.id, info),
            resume=lambda: self._resume(env.id, vm.name),
            fail=lambda message: self._fail_start(env.id, info, message),
            boot_timeout=accel_mod.boot_timeout(acc.name, image.arch, booting, image.access),
        )

    @contextlib.contextmanager
    def _resume(self, env_id: str, vm_name: str) -> Iterator[bool]:
        """Held while a VM that waited is started (its ENV is not deleted meanwhile, within this
        process): True if it still waits to be started."""
        with self._lock:
            try:
                vm: VmInfo | None = self.store.get_env(env_id).vm(vm_name)
            except (NotFound, KeyError):  # deleted meanwhile
                vm = None
            yield vm is not None and waiting(vm)

    def _fail_start(self, env_id: str, info: VmInfo, message: str) -> None:
        """A VM started later could not be started: whatever of it already runs is stopped (no
        process left waiting for what it never gets), and it and its ENV are failed."""
        with contextlib.suppress(TTError):
            self.engines.of(info).halt(self.store.get_env(env_id), info)
        info.state, info.error = "failed", message
        self.store.update_vm(env_id, info)
        self.store.set_env_state(env_id, "failed")

    def _undo_create(self, env_id: str, rundir: Path, sockets: Path, engine: Engine) -> None:
        """Remove whatever a failed or interrupted create_env made, whichever step it reached."""
        for last in (False, True):
            try:
                try:
                    self.store.get_env(env_id)
                except NotFound:
                    engine.abandon(env_id, rundir)
                else:
                    self.delete_env(env_id)
                break
            except TTError:  # a full disk: the store cannot even read until the run dir's files go
                if last:
                    raise
                engine.abandon(env_id, rundir)
                shutil.rmtree(rundir, ignore_errors=True)
        shutil.rmtree(rundir, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)

    def wait_vm(self, env_ref: str, vm_name: str, timeout: float | None = None) -> VmInfo:
        """Wait until the VM is ready (``Engine.ready``: its sshd answers; a warm VM has first taken
        its identity, so sshd then presents its own host key and only the client's key logs in);
        return its VmInfo (state ``running``). By default a VM still waiting for its warm template
        also gets the time to make that.

        Raises BootError with the console tail if the VM dies or the timeout passes; a VM
        that timed out is stopped.
        """
        return self._wait(env_ref, vm_name, timeout, final=True)

    def poll_vm(self, env_ref: str, vm_name: str, timeout: float, stop: Callable[[], bool] | None = None) -> VmInfo:
        """Wait at most ``timeout`` s for the VM to be ready without giving up on it: its VmInfo,
        ``running`` or still ``booting`` (the server's long poll; also as soon as ``stop()`` is
        true). BootError if it died or failed. Probes as often as wait_vm: each probe is a TCP
        connection that qemu's user networking keeps retrying until the guest answers, so
        probing a slow guest more often only slows its boot down further."""
        return self._wait(env_ref, vm_name, timeout, final=False, stop=stop)

    def _wait(
        self, env_ref: str, vm_name: str, timeout: float | None, final: bool, stop: Callable[[], bool] | None = None
    ) -> VmInfo:
        env = self.store.get_env(env_ref)
        vm = vm_of(env, vm_name)
        if vm.state == "running":
            return vm
        if vm.state != "booting":
            raise BootError(f"VM {vm.name} is {vm.state}: {vm.error}", self.console(env.id, vm.name))
        engine = self.engines.of(vm)
        if timeout is None:
            limit = accel_mod.boot_timeout(vm.accel, vm.arch, self._booting(), self._access(vm.image))
            timeout = engine.wait_budget(vm, limit)
        return readiness.Wait(self.store, engine, env, vm, self.console).run(timeout, final, stop)

    def show_env(self, ref: str) -> EnvInfo:
        """The ENV by name or id, with each VM's state checked against its engine (a VM that does
        not run, or whose host cannot be reached, is ``stopped`` with the reason in ``error``)."""
        return self._refresh(self.store.get_env(ref))

    def list_envs(self) -> list[EnvInfo]:
        return [self._refresh(env) for env in self.store.list_envs()]

    def _refresh(self, env: EnvInfo) -> EnvInfo:
        self._plain_name(env)
        for vm in env.vms:
            if vm.state in ("booting", "running") and not waiting(vm):
                why = self.engines.of(vm).dead(env, vm)
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
                note = self.engines.of(vm).remove(env, vm)
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
        self.engines.of(vm).snapshot(env, vm, name)

    def revert(self, env_ref: str, vm_name: str, name: str) -> None:
        """Restore the VM to snapshot ``name``; open SSH connections to it are dead afterwards.
        A warm-started VM's clock is then set to now and its RNG reseeded (its identity agent).

        No snapshot of that name is NotFound, and the VM keeps running.
        """
        env, vm = self._running(env_ref, vm_name)
        self.engines.of(vm).revert(env, vm, name)

    def _running(self, env_ref: str, vm_name: str) -> tuple[EnvInfo, VmInfo]:
        """The ENV and its VM ``vm_name``; BootError (with the console tail) if the VM does not run."""
        env = self.store.get_env(env_ref)
        vm = vm_of(env, vm_name)
        why = self.engines.of(vm).dead(env, vm)
        if why:
            raise BootError(f"VM {vm.name} died ({why})", self.console(env.id, vm.name))
        return env, vm

    def capture(
        self,
        env_ref: str,
        vm_name: str,
        dest: Path,
        test: TestRecord,
        *,
        image: str = "auto",
        max_bytes: int | None = None,
        report: str = "",
    ) -> CaptureInfo:
        """Capture the running VM into ``dest`` (``capture.make``); it runs on afterwards."""
        env, vm = self._running(env_ref, vm_name)
        try:
            info = self.image_store.get(vm.image)
        except TTError:
            raise CaptureSkipped(f"image {vm.image} of VM {vm.name} is gone: nothing to capture it on") from None
        engine = self.engines.of(vm)
        return capture.make(
            engine, env, vm, info, self.state, dest, test, policy=image, report=report, max_bytes=max_bytes
        )

    def console(self, env_ref: str, vm_name: str, tail: int = 50) -> str:
        """The last ``tail`` lines of the VM's serial console."""
        env = self.store.get_env(env_ref)
        vm = vm_of(env, vm_name)
        return self.engines.of(vm).console(env, vm, tail)

    def gc(self) -> list[EnvInfo]:
        """Delete ENVs whose owner process is gone or whose lease expired; returns them. Also
        deletes stray VMs, and warm templates of images that changed or that nobody used lately."""
        reaped = sweep.reap_envs(self.store, self.delete_env)
        for engine in self.engines.sweeping():
            engine.reap_strays(self.state, self._live)
            engine.reap_saved(self.image_store.all())
        return reaped

    def _live(self, env_id: str) -> bool:
        """Whether the store holds ENV ``env_id`` right now."""
        return any(env.id == env_id for env in self.store.list_envs())
