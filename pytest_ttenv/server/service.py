"""What the API does, without HTTP: owner scoping, leases, quotas, the long poll (standard library
and the local backend only; app.py maps it onto routes).

Every ENV belongs to an owner (the token's name); another owner's ENV is NotFound, as if it did
not exist. Every ENV has a lease: ``default_lease`` when none is asked for, capped at
``max_lease``. VMs run without PDEATHSIG (no owner pid), so a server that dies leaves them up
for the next server to re-adopt from the store.

Requests read only what they need, in deferred (non-locking) transactions: one owner's ENVs, or
one ENV, and check only those VMs against their engine. A VM found dead (failed, or its qemu or
domain gone) for ``dead_grace`` seconds stops counting against the quota (``health``, run by the
reaper thread); its ENV stays, ``stopped``/``failed``, until it is deleted or its lease ends.

Every change of an ENV is recorded in ``events`` (the dashboard's log): created, a VM's first
``running`` (ready) or failure seen by a wait, renewed, kept, deleted, reaped. The dashboard's
``*_for`` lookups take a Grant: an admin reaches every owner's ENVs, anyone else only their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pytest_ttenv import __version__
from pytest_ttenv.backend.engines import accel as accel_mod
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, Resources, VmInfo, VmSpec
from pytest_ttenv.errors import BootError, NotFound, UsageError, VmDied
from pytest_ttenv.server.auth import Grant, TokenStore
from pytest_ttenv.server.events import EventLog
from pytest_ttenv.server.quota import Amounts, Quota

LONG_POLL = 30.0  # longest single wait answer; the client asks again until its own deadline
USAGE_TTL = 1.0  # seconds the server-wide usage shown by status may be old
_LAST_PROBE = 2.0  # the last wait: its final seconds are LocalBackend.wait_vm's (which stops a VM not up)


@dataclass(frozen=True)
class ServerConfig:
    """The server's settings (``ttenv serve`` options)."""

    state_dir: Path
    image_dir: Path
    totals: Amounts
    bind_addr: str = "127.0.0.1"
    public_addr: str = "127.0.0.1"
    engine: str = "qemu"
    libvirt_uris: tuple[str, ...] = ()  # with engine libvirt: its hosts (default qemu:///system)
    default_lease: float = 600.0
    max_lease: float = 7 * 24 * 3600.0
    reap_interval: float = 1.0
    dead_grace: float = 300.0  # a VM dead this long stops counting against the quota
    health_interval: float = 5.0  # how often the reaper thread checks every VM for death
    max_requests_per_owner: int = 64  # requests of one owner in flight at once; more are 429
    max_polls_per_owner: int = 32  # long polls (wait) of one owner at once; more are 429
    poll_threads: int = 96  # threads serving long polls, apart from the other requests' pool
    max_connections: int | None = None  # open connections at once (None: from the descriptor limit)
    header_timeout: float = 10.0  # seconds a connection may take to send a request head


class Service:
    """The server's state: its local backend, tokens and quota."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.backend = LocalBackend(
            cfg.image_dir,
            cfg.state_dir,
            bind_addr=cfg.bind_addr,
            public_addr=cfg.public_addr,
            names_per_owner=True,
            engine=cfg.engine,
            libvirt_uris=cfg.libvirt_uris,
        )
        self.tokens = TokenStore(cfg.state_dir)
        self.quota = Quota(cfg.totals, self._live)
        self._image_disk: dict[str, int] = {}
        self._dead_since: dict[tuple[str, str], float] = {}  # (ENV id, VM name) -> when first seen dead
        self._dead_lock = threading.Lock()
        self._health_at = 0.0
        self._usage_lock = threading.Lock()
        self._usage_at: float | None = None
        self._usage_snapshot: dict[str, Amounts] = {}
        self.events = EventLog()
        self._noted: dict[str, set[tuple[str, str]]] = {}  # ENV id -> (VM, kind) recorded once
        self._noted_lock = threading.Lock()

    # -- accounting ---------------------------------------------------------------------------
    def _disk_of(self, image: str, disk_mib: int) -> int:
        """A VM's disk charge: its overlay size, or its image's when it asked for none."""
        if disk_mib:
            return disk_mib
        if image not in self._image_disk:
            try:
                self._image_disk[image] = self.backend.image_store.get(image).disk_mib
            except NotFound:  # an image removed under a live VM: nothing to charge it by (and no
                self._image_disk[image] = 0  # directory scan per VM per request to find that out again)
        return self._image_disk[image]

    def _demand(self, vms: list[tuple[str, Resources]]) -> Amounts:
        total = Amounts()
        for image, res in vms:
            total += Amounts(res.cpu, res.mem_mib, self._disk_of(image, res.disk_mib), 1)
        return total

    def _live(self, envs: list[EnvInfo] | None = None) -> dict[str, Amounts]:
        """Stored ENV name (``<owner>:<name>``) -> what its VMs hold, for every ENV in the store
        (or in ``envs``); VMs dead for longer than the grace period hold nothing."""
        if envs is None:
            envs = self.backend.store.list_envs()
        cutoff = time.time() - self.cfg.dead_grace
        with self._dead_lock:
            gone = {key for key, since in self._dead_since.items() if since <= cutoff}
        return {
            env.name: self._demand([(vm.image, vm.resources) for vm in env.vms if (env.id, vm.name) not in gone])
            for env in envs
        }

    def reap(self) -> list[EnvInfo]:
        """One round of the reaper thread: expired ENVs deleted (returned); every
        ``health_interval`` s, every VM checked for death (``health``)."""
        reaped = self.backend.gc()
        for env in reaped:
            self._forget(env.id)
            self.events.record("reaped", env.name, env.owner, "lease expired")
        if time.monotonic() - self._health_at >= self.cfg.health_interval:
            self._health_at = time.monotonic()
            self.health()
        return reaped

    def health(self) -> None:
        """Note since when each VM is dead: failed, or its qemu/domain gone (not a libvirt host
        that cannot be reached: its VMs may still run). ``_live`` stops counting them after the grace."""
        now = time.time()
        dead: dict[tuple[str, str], float] = {}
        for env in self.backend.store.list_envs():
            self.backend._refresh(env)  # the local backend's check of each VM against its engine
            for vm in env.vms:
                unknown = vm.state == "stopped" and ("unreachable" in vm.error or "cannot tell" in vm.error)
                if vm.state in ("failed", "stopped") and not unknown:
                    with self._dead_lock:
                        dead[(env.id, vm.name)] = self._dead_since.get((env.id, vm.name), now)
        with self._dead_lock:
            self._dead_since = dead

    def _usage(self) -> dict[str, Amounts]:
        """``_live()`` of every ENV, at most USAGE_TTL seconds old: what ``status`` shows of the
        whole server costs one read of every VM per second, not per request (admission in
        ``create`` always reads the store afresh). One thread recomputes; the others wait for it."""
        with self._usage_lock:
            if self._usage_at is None or time.monotonic() - self._usage_at > USAGE_TTL:
                self._usage_snapshot = self._live()
                self._usage_at = time.monotonic()
            return self._usage_snapshot

    def status(self, who: Grant) -> dict[str, object]:
        """The server's state as ``who`` may see it: an admin everything; anyone else their own
        usage, ENVs and caps (read afresh, from the owner index), and ``free`` = the server's free
        capacity (at most USAGE_TTL s old) within their caps."""
        free = self.cfg.totals - self.quota.used(self._usage())
        if who.admin:
            envs = self.backend.store.list_envs()
            used = self.quota.used(self._live(envs))
        else:
            envs = self.backend.store.list_envs(who.name)
            used = self.quota.used(self._live(envs), who.name)
            room = Quota.room(who.limits, used)
            free = Amounts(min(free.cpu, room.cpu), min(free.mem_mib, room.mem_mib), free.disk_mib)
        running = sum(vm.state == "running" for env in envs for vm in env.vms)
        return {
            "version": __version__,
            "engine": self.cfg.engine,
            "public_addr": self.cfg.public_addr,
            "scope": "server" if who.admin else "owner",
            "totals": self.cfg.totals.as_dict(),
            "used": used.as_dict(),
            "free": Amounts(max(0, free.cpu), max(0, free.mem_mib), max(0, free.disk_mib)).as_dict(),
            "limits": who.limits.as_dict(),
            "envs": len(envs),
            "vms": sum(len(env.vms) for env in envs),
            "vms_running": running,
            "owners": len({env.owner for env in envs}),
        }

    # -- ENVs ---------------------------------------------------------------------------------
    def images(self) -> list[ImageInfo]:
        return self.backend.images()

    def lease(self, ttl: float | None) -> float:
        return min(ttl if ttl is not None else self.cfg.default_lease, self.cfg.max_lease)

    def create(self, owner: str, spec: EnvSpec) -> EnvInfo:
        """Create ``owner``'s ENV within the quota; returns at once (VMs booting)."""
        names = [vm.name for vm in spec.vms]
        if len(set(names)) != len(names):  # the request's own fault comes before the quota's verdict
            raise UsageError(f"VM names in an ENV must be unique: {', '.join(names)}")
        for vm in spec.vms:
            try:
                self.backend.image_store.get(vm.image)  # NotFound before anything is reserved
            except NotFound:  # its message names the image dir: the client gets the name only
                raise NotFound(f"no image named {vm.image!r} on the server", "see: GET /v1/images") from None
        demand = self._demand([(vm.image, vm.resources) for vm in spec.vms])
        spec = EnvSpec(
            name=spec.name,
            vms=spec.vms,
            client_pubkey=spec.client_pubkey,
            owner=owner,
            ttl=self.lease(spec.ttl),
            accel=spec.accel,
            owner_pid=None,
            die_with_owner=False,
            boot=spec.boot,
        )
        limits = self.tokens.grant_of(owner).limits
        with self.quota.reserve(f"{owner}:{spec.name}", demand, spec.name, limits):
            env = self.backend.create_env(spec)
        vms = ", ".join(f"{vm.name} ({vm.image})" for vm in env.vms)
        self.events.record("created", env.name, owner, f"{len(env.vms)} VM(s): {vms}")
        return env

    def owners(self, who: Grant) -> list[dict[str, object]]:
        """What each owner's ENVs hold (``owner``, ``cpu``, ``mem_mib``, ``disk_mib``, ``vms``,
        ``envs``): every token's owner for an admin, else only ``who``'s."""
        envs = self.backend.store.list_envs() if who.admin else self.backend.store.list_envs(who.name)
        names = [name for name, _ in self.tokens.list()] if who.admin else [who.name]
        held: dict[str, Amounts] = {name: Amounts() for name in names}
        count: dict[str, int] = {name: 0 for name in names}
        for key, amounts in self._live(envs).items():
            owner = key.partition(":")[0]
            held[owner] = held.get(owner, Amounts()) + amounts
            count[owner] = count.get(owner, 0) + 1
        return [{"owner": o, **a.as_dict(), "vms": a.vms, "envs": count[o]} for o, a in sorted(held.items())]

    def list_for(self, who: Grant) -> list[EnvInfo]:
        """The ENVs ``who`` may see: every owner's for an admin, else their own."""
        if not who.admin:
            return self.list(who.name)
        return [self.backend._refresh(env) for env in self.backend.store.list_envs()]

    def find(self, owner: str, ref: str) -> EnvInfo:
        """``owner``'s ENV whose name or id is ``ref`` (NotFound for any other, another owner's too),
        its VMs checked against their engine."""
        stored = f"{owner}:{ref}"
        for key in (stored, ref):  # by name (unique per owner), then by id
            try:
                env = self.backend.store.get_env(key)
            except NotFound:
                continue
            if env.owner == owner and (env.name == stored or env.id == ref):
                return self.backend._refresh(env)  # only this ENV's VMs are checked
        raise NotFound(f"no ENV named {ref!r}", "see: ttenv env list")

    def list(self, owner: str) -> list[EnvInfo]:
        """``owner``'s ENVs (one indexed read), their VMs checked against their engine."""
        return [self.backend._refresh(env) for env in self.backend.store.list_envs(owner)]

    def find_for(self, who: Grant, ref: str) -> EnvInfo:
        """``find`` for ``who``: an admin also finds another owner's ENV, by id or by a name only
        one owner uses (their own first); NotFound otherwise."""
        try:
            return self.find(who.name, ref)
        except NotFound:
            if not who.admin:
                raise
        matches = [env for env in self.backend.store.list_envs() if env.id == ref]
        if not matches:
            matches = [env for env in self.backend.store.list_envs() if env.name == f"{env.owner}:{ref}"]
        if len(matches) != 1:
            raise NotFound(f"no ENV named {ref!r}" + (" of one owner" if matches else ""), "see: ttenv env list")
        return self.find(matches[0].owner, matches[0].id)

    def delete(self, owner: str, ref: str, by: str | None = None) -> EnvInfo:
        env = self.backend.delete_env(self.find(owner, ref).id)
        self._forget(env.id)
        self.events.record("deleted", env.name, env.owner, f"by {by or owner}")
        return env

    def renew(self, owner: str, ref: str, ttl: float, by: str | None = None) -> EnvInfo:
        env = self.backend.renew(self.find(owner, ref).id, self.lease(ttl))
        self.events.record("renewed", env.name, env.owner, f"by {by or owner}: {_until(env)}")
        return env

    def keep(self, owner: str, ref: str, ttl: float) -> EnvInfo:
        env = self.backend.keep(self.find(owner, ref).id, self.lease(ttl))
        self.events.record("kept", env.name, env.owner, _until(env))
        return env

    def _note(self, env: EnvInfo, vm: VmInfo, kind: str, detail: str) -> None:
        """Record ``kind`` for ``vm`` once per ENV (a wait asked again answers the same)."""
        with self._noted_lock:
            noted = self._noted.setdefault(env.id, set())
            if (vm.name, kind) in noted:
                return
            noted.add((vm.name, kind))
        self.events.record(kind, env.name, env.owner, detail)

    def _forget(self, env_id: str) -> None:
        with self._noted_lock:
            self._noted.pop(env_id, None)

    def vm(self, owner: str, ref: str, vm_name: str) -> tuple[EnvInfo, VmInfo]:
        env = self.find(owner, ref)
        for vm in env.vms:
            if vm.name == vm_name:
                return env, vm
        raise NotFound(f"no VM named {vm_name!r} in ENV {ref}", f"VMs: {', '.join(v.name for v in env.vms)}")

    def wait(self, owner: str, ref: str, vm_name: str, timeout: float | None, stopping: Callable[[], bool]) -> VmInfo:
        """The long poll: the VM once ``running``, or still ``booting`` after min(timeout, LONG_POLL) s.

        ``timeout`` is the client's time left (None: the server's boot timeout for the VM, counted
        from its start). When it ends within this answer, this is the last wait and behaves as
        LocalBackend.wait_vm: a VM not up by then is stopped and BootError raised. Returns early
        (still ``booting``) when ``stopping()`` turns true: the server is shutting down.
        """
        env, vm = self.vm(owner, ref, vm_name)
        try:
            vm = self._wait(env, vm, timeout, stopping)
        except (BootError, VmDied) as exc:
            self._note(env, vm, "failed", f"VM {vm.name}: {exc.message}")
            raise
        if vm.state == "running":
            self._note(env, vm, "ready", f"VM {vm.name} running ({vm.boot or 'cold'} boot)")
        elif vm.state == "failed":
            self._note(env, vm, "failed", f"VM {vm.name}: {vm.error}")
        return vm

    def _wait(self, env: EnvInfo, vm: VmInfo, timeout: float | None, stopping: Callable[[], bool]) -> VmInfo:
        vm_name = vm.name
        if vm.state != "booting":
            return self.backend.wait_vm(env.id, vm_name, 0.1)  # running: at once; else BootError
        if timeout is None:
            booting = sum(v.state == "booting" for e in self.backend.store.list_envs() for v in e.vms)
            limit = accel_mod.boot_timeout(vm.accel, vm.arch, booting)
            # a VM waiting for its warm template also gets the time to make that (its engine says how long)
            timeout = vm.boot_seconds + self.backend.engines.of(vm).wait_budget(vm, limit) - time.time()
        window = min(timeout, LONG_POLL)
        end = time.monotonic() + window
        if timeout > LONG_POLL:  # not the last wait: never gives up on the VM
            return self.backend.poll_vm(env.id, vm_name, window, stop=stopping)
        vm = self.backend.poll_vm(env.id, vm_name, max(0.0, window - _LAST_PROBE), stop=stopping)
        if vm.state != "booting" or stopping():
            return vm
        return self.backend.wait_vm(env.id, vm_name, max(0.05, end - time.monotonic()))

    def snapshot(self, owner: str, ref: str, vm_name: str, name: str) -> None:
        env, _ = self.vm(owner, ref, vm_name)
        self.backend.snapshot(env.id, vm_name, name)

    def revert(self, owner: str, ref: str, vm_name: str, name: str) -> None:
        env, _ = self.vm(owner, ref, vm_name)
        self.backend.revert(env.id, vm_name, name)

    def console(self, owner: str, ref: str, vm_name: str, tail: int) -> str:
        env, _ = self.vm(owner, ref, vm_name)
        return self.backend.console(env.id, vm_name, tail)


def _until(env: EnvInfo) -> str:
    if env.expires is None:
        return "lease: never ends"
    return "lease until " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(env.expires))


def spec_of(
    name: str,
    vms: list[tuple[str, str, Resources]],
    client_pubkey: str,
    ttl: float | None,
    accel: str,
    boot: str = "cold",
) -> EnvSpec:
    """An EnvSpec from a create request's fields (``vms``: name, image, resources)."""
    return EnvSpec(
        name=name,
        vms=tuple(VmSpec(n, i, r) for n, i, r in vms),
        client_pubkey=client_pubkey,
        ttl=ttl,
        accel=accel,
        boot=boot,
    )
