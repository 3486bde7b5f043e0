"""The ENV of one pytest session: created by the controlling process, shared with xdist workers,
readied once per VM, destroyed at the end.

- The controller (the only process, or the xdist controller) calls ``EnvSession.create`` once
  collection shows that a selected test needs a VM (see plugin.py); the VMs boot while the first
  tests wait for theirs.
- Workers get ``to_workerinput()`` (through ``state.Handoff``) and ``attach`` to the same ENV;
  they never create or delete.
- ``ready(vm)`` in any process waits for that VM only; the first process to get there runs the
  ``pytest_ttenv_vm_ready`` hook and takes the post-boot snapshot, under a file lock in the session dir,
  and records the outcome there, so every process sees the same (and a failed boot fails fast).
- ``teardown`` (controller) deletes the ENV, or keeps it with a lease when asked.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_ttenv import envflow
from pytest_ttenv.access import ClientKeys, login_command, target, write_known_hosts
from pytest_ttenv.backend import Backend
from pytest_ttenv.backend.engines.accel import boot_timeout
from pytest_ttenv.config import TTConfig, open_backend
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvInfo, EnvSpec, Resources, VmInfo, VmSpec
from pytest_ttenv.core.paths import state_dir
from pytest_ttenv.errors import BootError, TTError, VmDied
from pytest_ttenv.lease import LeaseKeeper
from pytest_ttenv.ssh import Connection

BOOT_SNAPSHOT = "ttenv-boot"
KEY_FILE = "id_ed25519"  # the session's private login key, in its session dir
KEEP_TTL = 24 * 3600.0  # lease of an ENV kept by --tt-keep, renewable with the CLI
DEATH_GRACE = 15.0  # seconds a VM that lost SSH may take to finish powering off


@dataclass
class VmState:
    """What this process knows of one VM: its info once ready, its connection, why it failed,
    the last command a test ran on it (``EnvSession.note_command``)."""

    info: VmInfo | None = None
    conn: Connection | None = None
    error: str = ""
    console: str = ""
    last_command: str = ""
    generation: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def sessions_dir() -> Path:
    path = state_dir() / "sessions"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


@dataclass(frozen=True)
class SessionKeys:
    """Session dirs as an ``envflow.KeyHome``: ``<root>/<env id>/`` (0700) holds the session's
    private key and the spec of its backend (what ``reap_session_dirs`` goes by)."""

    root: Path
    backend: str

    def store(self, env: EnvInfo, key: KeyPair) -> Path:
        workdir = self.root / env.id
        workdir.mkdir(mode=0o700)
        (workdir / "backend").write_text(self.backend)
        key.write_private(workdir / KEY_FILE)
        return workdir / KEY_FILE

    def forget(self, env: EnvInfo) -> None:
        shutil.rmtree(self.root / env.id, ignore_errors=True)


def reap_session_dirs(backend: Backend, spec: str = "local") -> int:
    """Remove session dirs of backend ``spec`` whose ENV no longer exists (their session was
    killed); returns how many. Dirs of other backends are left alone."""
    live = {env.id for env in backend.list_envs()}
    stale = [
        d
        for d in sessions_dir().iterdir()
        if d.is_dir() and d.name not in live and _backend_of(d) == spec and not _live_handoff(d)
    ]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return len(stale)


def _live_handoff(workdir: Path) -> bool:
    """An xdist hand-off dir whose controller still runs (``state.Handoff``: ``xdist-<pid>-<hex>``;
    not imported from there, which would load pytest into the CLI)."""
    parts = workdir.name.split("-")
    return len(parts) == 3 and parts[0] == "xdist" and parts[1].isdigit() and Path(f"/proc/{parts[1]}").exists()


def _backend_of(workdir: Path) -> str:
    try:
        return (workdir / "backend").read_text().strip()
    except OSError:
        return "local"  # written before the backend file existed


class EnvSession:
    """One pytest session's ENV, as seen from one process."""

    def __init__(self, cfg: TTConfig, backend: Backend, env: EnvInfo, workdir: Path, controller: bool) -> None:
        self.cfg = cfg
        self.backend = backend
        self.env = env
        self.workdir = workdir  # holds the private key and the per-VM ready records
        self.controller = controller
        self.vms = {vm.name: VmState() for vm in env.vms}
        self.snapshots = False  # set when some collected test uses tt_vm_fresh
        self._held: dict[str, tuple[int, bool, int]] = {}  # VM -> (fd, exclusive, depth)
        self.lease: LeaseKeeper | None = None  # renews a server ENV's lease (controller only)

    @property
    def key_file(self) -> Path:
        return self.workdir / KEY_FILE

    @property
    def _keys(self) -> SessionKeys:
        return SessionKeys(self.workdir.parent, self.cfg.backend)

    @classmethod
    def create(
        cls, cfg: TTConfig, images: Sequence[str], backend: Backend, warn: Callable[[str], None] = print
    ) -> EnvSession:
        """Create the ENV (VMs start booting) owned by this process; returns at once. One VM per
        name of ``images``, named as its image, with the resources of ``cfg``.

        The session dir ``<state>/sessions/<env id>`` holds the private key (0600) and the
        per-VM records; a dir whose ENV is gone is removed by the next session or ``ttenv gc``.
        A local ENV dies with this process; a server's ENV gets a lease of ``cfg.lease``
        seconds that a LeaseKeeper renews until teardown (``warn`` hears about failures).
        On any failure, an interrupt too (SIGTERM), nothing of this session stays behind.
        """
        remote = backend.name != "local"
        reap_session_dirs(backend, cfg.backend)
        res = Resources(cpu=cfg.cpu, mem_mib=cfg.mem_mib, disk_mib=cfg.disk_mib)
        spec = EnvSpec(
            name=f"pytest-{os.getpid()}-{secrets.token_hex(2)}",
            vms=tuple(VmSpec(image, image, res) for image in images),
            client_pubkey="",  # envflow.created puts the new key's here
            accel=cfg.accel,
            ttl=cfg.lease if remote else None,
            owner_pid=None if remote else os.getpid(),
            die_with_owner=cfg.keep == "never",
            boot=cfg.boot,
        )
        home = SessionKeys(sessions_dir(), cfg.backend)
        with envflow.created(backend, spec, f"ttenv-pytest-{os.getpid()}", home) as new:
            session = cls(cfg, backend, new.env, new.key_file.parent, controller=True)
            if remote:
                session.lease = LeaseKeeper(backend, new.env.id, cfg.lease, warn).start()
        return session

    def to_workerinput(self) -> dict[str, Any]:
        return {"env": self.env.to_dict(), "workdir": str(self.workdir)}

    @classmethod
    def attach(cls, cfg: TTConfig, data: dict[str, Any]) -> EnvSession:
        """The ENV the controller created, in an xdist worker."""
        return cls(cfg, open_backend(cfg), EnvInfo.from_dict(data["env"]), Path(data["workdir"]), controller=False)

    # -- per VM --------------------------------------------------------------------------------
    def ready(self, name: str, on_ready: Callable[[str], None]) -> VmState:
        """Wait for VM ``name`` (only it); provision it once per session. Raises BootError."""
        state = self.vms[name]
        with state.lock:
            failed = self.workdir / f"{name}.failed"
            if not state.error and failed.exists():  # another process saw it fail or die
                state.error, state.console = failed.read_text(), self.console(name)
            if state.error:
                raise BootError(state.error, state.console)
            if state.info is not None:
                return state
            with self._vm_lock(name):
                record = self.workdir / f"{name}.ready"
                failed = self.workdir / f"{name}.failed"
                try:
                    if failed.exists():
                        raise BootError(failed.read_text(), self.backend.console(self.env.id, name))
                    info = self.backend.wait_vm(self.env.id, name, self.cfg.boot_timeout)
                    state.info = info
                    if not record.exists():
                        on_ready(name)
                        if self.snapshots:
                            self.close_connection(name)
                            self.backend.snapshot(self.env.id, name, BOOT_SNAPSHOT)
                        record.write_text("ok")
                except BootError as exc:
                    state.info, state.error, state.console = None, str(exc), exc.console_tail
                    failed.write_text(state.error)
                    raise
                except Exception as exc:
                    state.info = None
                    state.error = f"VM {name} could not be readied: {exc}"
                    state.console = self.backend.console(self.env.id, name)
                    failed.write_text(state.error)
                    raise BootError(state.error, state.console) from exc
            return state

    @contextmanager
    def _vm_lock(self, name: str) -> Iterator[None]:
        with open(self.workdir / f"{name}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def connection(self, name: str) -> Connection:
        """This process's connection to a ready VM (opened on first use, and again after any
        process reverted the VM: its guest-side TCP state is gone then)."""
        state = self.vms[name]
        if state.info is None:
            raise TTError(f"VM {name} is not ready")
        generation = self._generation(name)
        if state.conn is not None and state.generation != generation:
            self.close_connection(name)
        if state.conn is None:
            state.conn = Connection(target(state.info, self.key_file))
            state.generation = generation
        return state.conn

    def _generation(self, name: str) -> int:
        try:
            return int((self.workdir / f"{name}.generation").read_text() or 0)
        except (OSError, ValueError):
            return 0

    @contextmanager
    def use(self, names: Sequence[str], exclusive: bool) -> Iterator[None]:
        """Hold VMs for a test: shared (tt_vm, tt_env) or exclusive (tt_vm_fresh), across every
        process of the session (flock), so a revert never runs under another test using that VM.

        Locks are taken in name order; an exclusive holder holds one VM only, so no cycle forms.
        """
        taken: list[tuple[str, int]] = []
        try:
            for name in sorted(set(names)):
                held = self._held.get(name)
                if held is not None and (held[1] or not exclusive):
                    self._held[name] = (held[0], held[1], held[2] + 1)
                    taken.append((name, -1))
                    continue
                fd = held[0] if held else os.open(self.workdir / f"{name}.use", os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                self._held[name] = (fd, exclusive, held[2] + 1 if held else 1)
                taken.append((name, int(held is not None and not held[1])))  # 1: upgraded from shared
            yield
        finally:
            for name, kind in reversed(taken):
                fd, exclusive_now, count = self._held[name]
                if kind == 1:  # back from exclusive to the shared lock held before
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    self._held[name] = (fd, False, count - 1)
                elif count > 1:
                    self._held[name] = (fd, exclusive_now, count - 1)
                else:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
                    del self._held[name]

    def close_connection(self, name: str) -> None:
        state = self.vms[name]
        if state.conn is not None:
            state.conn.close()
            state.conn = None

    def revert(self, name: str) -> None:
        """Restore the VM's post-boot snapshot (memory and disk), then fix the guest clock (a
        warm-started VM's backend did that already, through its identity agent).

        Hold the VM exclusively (``use``) around this: other processes' connections die with it.
        """
        self.close_connection(name)
        self.backend.revert(self.env.id, name, BOOT_SNAPSHOT)
        self._new_generation(name)
        info = self.vms[name].info
        if info is None or info.boot != "warm":  # a warm VM's backend set its clock (identity agent)
            conn = self.connection(name)
            conn.run("true", timeout=30)  # connect first: under TCG that takes seconds, which the clock would lag by
            conn.run(f"date -s @{time.time():.3f} >/dev/null", timeout=30, sudo=True)  # sudo: none for root

    def reboot(self, name: str, timeout: float | None = None) -> None:
        """Reboot the guest; return once SSH answers in its new boot (within ``timeout``, default
        the boot timeout). The VM is held exclusively meanwhile, so no other test's command dies
        with the old boot; every process reconnects afterwards. The post-boot snapshot stays as it
        was: a later revert goes back to the boot it was taken in.
        """
        limit = timeout or self._boot_limit(name)
        with self.use([name], exclusive=True):
            conn = self.connection(name)
            try:
                conn.reboot(limit)
            finally:
                self.vms[name].generation = self._new_generation(name)  # this process's connection is new

    def wait_ssh(self, name: str) -> None:
        """Wait (the boot timeout) until SSH answers on ``name`` again, e.g. after a reboot the
        session did not ask for; Unreachable if it does not."""
        self.connection(name).wait_ssh(self._boot_limit(name))

    def _boot_limit(self, name: str) -> float:
        """Seconds a boot of ``name`` may take: --tt-boot-timeout, else scaled by accelerator and arch."""
        info = self.vms[name].info
        if info is None:
            raise TTError(f"VM {name} is not ready")
        return self.cfg.boot_timeout or boot_timeout(info.accel or "tcg", info.arch)

    def _new_generation(self, name: str) -> int:
        """Tell every process that its connection to ``name`` is stale (the guest's TCP state is gone)."""
        generation = self._generation(name) + 1
        (self.workdir / f"{name}.generation").write_text(str(generation))
        return generation

    def check_alive(self, name: str, grace: float = DEATH_GRACE) -> None:
        """Raise VmDied (and remember it for every process) if the VM is gone; else return.

        Called after SSH failed: a guest that is powering off keeps qemu up a few more seconds,
        so this watches for up to ``grace`` seconds before deciding the VM is alive.
        """
        state = self.vms[name]
        deadline = time.monotonic() + grace
        while True:
            try:
                vm: VmInfo | None = self.backend.show_env(self.env.id).vm(name)
            except (TTError, KeyError):
                vm = None
            console = self.console(name)
            alive = vm is not None and vm.state in ("running", "booting") and "Kernel panic" not in console
            if not alive:
                break
            if time.monotonic() >= deadline:
                return
            time.sleep(0.2)
        why = "the guest kernel panicked" if "Kernel panic" in console else "qemu is not running"
        state.error, state.console = f"VM {name} died ({why})", console
        (self.workdir / f"{name}.failed").write_text(state.error)
        self.close_connection(name)
        raise VmDied(state.error, console)

    def console(self, name: str, lines: int = 50) -> str:
        try:
            return self.backend.console(self.env.id, name, lines)
        except TTError:
            return ""

    # -- failure reports -----------------------------------------------------------------------
    def note_command(self, name: str, cmd: str | Sequence[str]) -> None:
        """Remember ``cmd`` as the last command a test ran on VM ``name`` (``failure_sections``)."""
        self.vms[name].last_command = cmd if isinstance(cmd, str) else " ".join(cmd)

    def failure_sections(self, name: str, lines: int = 50) -> list[tuple[str, str]]:
        """What a failed test's report shows of VM ``name``: the last command run on it, if
        any, and the tail of its console (the one saved when it failed to boot or died)."""
        vm = self.vms.get(name)
        if vm is None:
            return []
        sections = [(f"ttenv last command on {name}", vm.last_command)] if vm.last_command else []
        console = vm.console or self.console(name, lines)
        return [*sections, (f"ttenv console of {name} (last {lines} lines)", console or "(empty)")]

    # -- end -----------------------------------------------------------------------------------
    def teardown(self, keep: Sequence[str]) -> str:
        """Close connections; delete the ENV unless ``keep`` names VMs to keep. Returns one line."""
        for name in self.vms:
            self.close_connection(name)
        if not self.controller:
            return ""
        if self.lease is not None:
            self.lease.stop()
        try:
            if keep:
                env = self.backend.keep(self.env.id, KEEP_TTL)
                key = ClientKeys().store(env, KeyPair(self.key_file.read_text(), ""))
                self._keys.forget(env)
                where = "" if self.cfg.backend == "local" else f" --backend {self.cfg.backend}"
                hours = (env.expires - time.time()) / 3600 if env.expires else KEEP_TTL / 3600
                lines = [
                    f"ttenv: kept ENV {env.name} for {hours:.0f} h; delete it with: ttenv env del{where} {env.name}"
                ]
                known = write_known_hosts(env, key)
                lines += [f"  {vm.name}: {login_command(vm, key, known)}" for vm in env.vms if vm.name in keep]
                return "\n".join(lines)
            envflow.discard(self.backend, self.env.id, self._keys)
            return f"ttenv: ENV {self.env.name} deleted: {len(self.vms)} VM(s) stopped, overlays and ports released"
        except TTError as exc:
            return f"ttenv: teardown of ENV {self.env.name} failed: {exc}"
