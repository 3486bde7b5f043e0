"""Warm boot: VMs started from a saved post-boot state of their image instead of booting it.

A *template* is made once per image identity, arch, accelerator, vCPUs, memory, qemu version,
qemu device set, identity agent and owner (the inputs of its key): a VM of the image is booted
cold, the identity agent (``guest/ttenv-identity``) started in it over SSH with a provisioning key
used only then, SSH access sealed (no authorized key, no session left), its state migrated into a
file, and qemu quits. It lives next to the image and goes with it (``ttenv image rm``, a rebuild):

    <image dir>/warm/<key>/disk.qcow2   the template's frozen disk (backing file: the image's disk)
                          /state        the migration stream: devices and RAM
                          /meta.json    the key's inputs, sha256 of disk and state (written last)
                          /console.log  the template's boot log
    <image dir>/warm/.lock-<key>        flock: one process makes a template, the others wait
    <image dir>/warm/.tmp-<key>-<pid>   work in progress, renamed into place only when complete

Each warm VM gets a linked clone of the frozen disk (image <- template disk <- VM overlay) and a
qemu started with ``-incoming`` from the state, then, before anyone uses it, its own identity sent
over the virtio-serial port the agent serves: hostname, machine-id, SSH host key, the client's
authorized key, the wall clock, and fresh entropy with a CRNG reseed (plus a new VM generation ID,
which kernels with the vmgenid driver reseed on).

The state holds nothing of any client: the provisioning key's private half never leaves the
process that makes the template, and its public half is removed before the state is saved. The
owner is part of the key all the same, so a server never shares a template between owners.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pytest_ttenv.backend.engines import qemu, statecat
from pytest_ttenv.backend.engines.seed import SeedData, write_seed_iso
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import ImageInfo, Resources
from pytest_ttenv.core.paths import runtime_dir
from pytest_ttenv.errors import BootError, TTError
from pytest_ttenv.quiet import asyncssh

FORMAT = 1  # bump when the layout or the way a template is made changes
PROTOCOL = 2  # the identity agent's wire format (this file and guest/ttenv-identity): in the key, so a
# template whose saved agent speaks another protocol is never started by this host side
REPLY_MAX = 4096  # bytes: the longest reply line the host accepts from the agent
READ_MAX = 64 * 1024  # bytes the host reads per request at most, stale replies included
_REPLY = re.compile(rb"(ok|error) ([0-9a-f]{32}) (.*)", re.DOTALL)
AGENT_PATH = "/run/ttenv-identity"  # in the guest: tmpfs, so the template's disk stays the image's
META = "meta.json"
SAVE_TIMEOUT = 300.0
AGENT_TIMEOUT = 60.0
UNUSED_DAYS = 7.0  # a template no VM started from for this long is deleted
_verified: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime) -> sha256 seen this process


def template_budget(boot_limit: float) -> float:
    """Seconds allowed for making a template whose VM would have ``boot_limit`` s to boot: twice
    that for its cold boot (a busy host; a failure costs a cold boot of every waiting VM anyway),
    plus saving its state."""
    return 2 * boot_limit + 60


def agent_source() -> str:
    """The guest identity agent (a python3 script)."""
    text: str = resources.files("pytest_ttenv.backend.engines").joinpath("guest").joinpath("ttenv-identity").read_text()
    return text


def ineligible(image: ImageInfo, res: Resources) -> str:
    """Why VMs of ``image`` with ``res`` cannot start warm, or '' if they can."""
    if image.access != "ttenv":
        return f"{image.name} is set up by {image.access}; warm starts need an image ttenv built"
    if image.kernel is None or image.initrd is None:
        return f"{image.name} boots through firmware; warm starts need direct kernel boot"
    if image.user != "root":
        return f"{image.name} logs in as {image.user}; warm starts need root"
    if res.disk_mib > image.disk_mib:
        return f"a disk larger than the image's ({res.disk_mib} > {image.disk_mib} MiB) needs a cold boot"
    return ""


def image_identity(image: ImageInfo) -> str:
    """sha256 over the image's metadata and the size and modification time of each of its files:
    a rebuilt, replaced or touched image gets a new identity (and so new templates)."""
    if image.path is None:
        raise TTError(f"image {image.name} has no directory")
    h = hashlib.sha256()
    meta = image.path / "image.json"
    h.update(meta.read_bytes())
    for name in ("image.json", image.disk, image.kernel, image.initrd):
        if name:
            st = (image.path / name).stat()
            h.update(f"\0{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def qemu_config(
    image: ImageInfo, accel: str, res: Resources, *, name: str, disk: Path, seed: Path, port: int, rundir: Path,
    qmp: Path, identity: Path, cmdline: str, vmgenid: str, bind_addr: str = "127.0.0.1",
    incoming: str | None = None,
) -> qemu.QemuConfig:  # fmt: skip
    """The qemu config of a template or of a warm VM: one function, so both have one device set.
    ``cmdline``: the kernel's (a VM's own machine-id on it, so a reboot keeps it)."""
    assert image.kernel is not None and image.initrd is not None  # ineligible() said so
    return qemu.QemuConfig(
        name=name, arch=image.arch, accel=accel, resources=res, disk=disk, seed=seed,
        kernel=image.file(image.kernel), initrd=image.file(image.initrd),
        cmdline=cmdline, port=port,
        console=rundir / "console.log", qmp=qmp, pidfile=rundir / "qemu.pid",
        tcg_cx16=qemu.tcg_cx16_safe(image.arch), bind_addr=bind_addr,
        identity=identity, vmgenid=vmgenid, incoming=incoming,
    )  # fmt: skip


def machine_cmdline(image: ImageInfo, machine_id: str) -> str:
    """The image's kernel command line with a VM's machine-id."""
    return f"{image.cmdline} systemd.machine_id={machine_id}".strip()


def template_inputs(image: ImageInfo, accel: str, res: Resources, owner: str) -> dict[str, Any]:
    """Everything a template depends on; any change gives another key."""
    x = Path("/x")
    argv = qemu.build_argv(qemu_config(
        image, accel, Resources(res.cpu, res.mem_mib), name="x", disk=x, seed=x, port=1, rundir=x, qmp=x, identity=x,
        cmdline=machine_cmdline(image, "0"), vmgenid="0",
    ))  # fmt: skip
    return {
        "format": FORMAT, "image": image.name, "image_id": image_identity(image), "arch": image.arch,
        "accel": accel, "cpu": res.cpu, "mem_mib": res.mem_mib, "qemu": qemu.version(image.arch),
        "argv": argv, "agent": hashlib.sha256(agent_source().encode()).hexdigest(), "protocol": PROTOCOL,
        "owner": owner,
    }  # fmt: skip


def template_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Template:
    """A complete template: its directory and metadata (checked with ``TemplateStore.verify``)."""

    key: str
    path: Path
    meta: dict[str, Any]

    @property
    def disk(self) -> Path:
        return self.path / "disk.qcow2"

    @property
    def state(self) -> Path:
        return self.path / "state"

    def incoming(self) -> str:
        """qemu's ``-incoming`` source: the state streamed through statecat, which verifies its
        sha256 before the end of the stream reaches qemu (so a corrupt state never runs)."""
        argv = [sys.executable, "-I", "-S", statecat.__file__, str(self.state), str(self.meta.get("state_sha256"))]
        return "exec:" + " ".join(shlex.quote(a) for a in argv)


def sha256_file(path: Path) -> str:
    """The file's sha256, remembered for this process while its inode, size and mtime stay."""
    st = path.stat()
    memo = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if memo not in _verified:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _verified[memo] = h.hexdigest()
    return _verified[memo]


class TemplateStore:
    """The templates of one image: ``<image dir>/warm/``."""

    def __init__(self, image: ImageInfo) -> None:
        if image.path is None:
            raise TTError(f"image {image.name} has no directory")
        self.image = image
        self.root = image.path / "warm"

    def find(self, key: str) -> Template | None:
        """The complete template ``key``, or None (absent, or its metadata unreadable)."""
        path = self.root / key
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None
        return Template(key, path, meta)

    def verify(self, template: Template) -> None:
        """TTError unless the template's disk has the checksum it was saved with and its state the
        size; the state's checksum is verified on every use, as it streams (``incoming``)."""
        what = f"warm template {template.key} of {self.image.name}"
        try:
            digest = sha256_file(template.disk)
            size = template.state.stat().st_size
        except OSError as exc:
            raise TTError(f"{what} is unreadable: {exc}") from None
        if digest != template.meta.get("disk_sha256"):
            raise TTError(f"{what}: its disk fails its checksum")
        if size != template.meta.get("state_bytes"):
            raise TTError(f"{what}: its state is {size} bytes, not the {template.meta.get('state_bytes')} saved")

    def remove(self, key: str) -> None:
        """Delete template ``key`` (VMs started from it keep their open files)."""
        remove_dir(self.root / key)

    def lock(self, key: str, timeout: float) -> AbstractContextManager[None]:
        """The template's lock, held while making it: TTError after ``timeout`` s of waiting."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        what = f"the lock of warm template {key} of {self.image.name} (another process is making it)"
        return flock(self.root / f".lock-{key}", timeout, what)

    def mark_used(self, template: Template) -> None:
        """Note that a VM starts from ``template`` now (``reap`` keeps templates in use)."""
        (template.path / "used").touch()

    def reap(self, unused_days: float = UNUSED_DAYS) -> list[Path]:
        """Delete work dirs whose process is gone, templates of another image identity (the image
        changed since) and templates unused for ``unused_days`` (made by an older ttenv or qemu,
        or for resources nobody asks for any more); returns what was deleted."""
        if not self.root.is_dir():
            return []
        current = image_identity(self.image)
        stale = time.time() - unused_days * 86400
        removed = []
        for d in self.root.iterdir():
            m = re.match(r"^\.(?:tmp|old)-\w+-(\d+)(?:-\w+)?$", d.name)
            try:
                if m and d.is_dir() and not Path(f"/proc/{m.group(1)}").exists():
                    shutil.rmtree(d)
                    removed.append(d)
                elif not d.name.startswith(".") and d.is_dir():
                    template = self.find(d.name)
                    used = max((f.stat().st_mtime for f in (d / "used", d / META) if f.exists()), default=0.0)
                    if template is None or template.meta.get("inputs", {}).get("image_id") != current or used < stale:
                        self.remove(d.name)
                        removed.append(d)
                        (self.root / f".lock-{d.name}").unlink(missing_ok=True)
            except OSError:  # not ours to delete, or deleted meanwhile
                continue
        return removed

    def install(self, work: Path, key: str, inputs: dict[str, Any], started: float) -> Template:
        """Checksum, seal (read-only, fsynced) and rename a finished work dir into place."""
        meta = {
            "key": key, "inputs": inputs, "created": time.time(), "seconds": round(time.time() - started, 1),
            "disk_sha256": sha256_file(work / "disk.qcow2"), "state_sha256": sha256_file(work / "state"),
            "state_bytes": (work / "state").stat().st_size,
        }  # fmt: skip
        (work / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name in ("disk.qcow2", "state", META):
            (work / name).chmod(0o400)
            with open(work / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(work)
        self.remove(key)
        os.replace(work, self.root / key)
        _fsync_dir(self.root)
        found = self.find(key)
        assert found is not None
        return found


def remove_dir(template: Path) -> None:
    """Delete a template directory: renamed out of view at once (atomic), then deleted."""
    doomed = template.with_name(f".old-{template.name}-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        os.replace(template, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


@contextmanager
def flock(path: Path, timeout: float, what: str) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing); TTError naming ``what`` if it
    is not ours within ``timeout`` s."""
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TTError(f"waited {timeout:.0f} s for {what}") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the identity agent's channel ------------------------------------------------------------------
def agent_request(sock: Path, op: str, timeout: float, what: str, **fields: str | bytes) -> str:
    """Send one request to the identity agent behind ``sock``; its ``ok`` answer (the seconds it
    took). TTError naming ``what`` if it answers ``error``, sends a malformed reply, or gives no
    reply to *this* request within ``timeout`` s or ``READ_MAX`` bytes.

    Wire format (``PROTOCOL``), one line each way: ``<op> <nonce> key=<base64>...`` and
    ``ok <nonce> <seconds>`` or ``error <nonce> <text>``; the nonce (32 hex digits, new per
    request) matches a reply to its request, so a late reply to an earlier request is skipped.
    """
    nonce = secrets.token_hex(16)
    line = f"{op} {nonce}" + "".join(
        f" {k}={base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode()}" for k, v in fields.items()
    )
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            return exchange(s, line.encode() + b"\n", nonce, deadline, what)
    except TimeoutError:
        raise TTError(f"{what}: no answer from the identity agent within {timeout:.0f} s") from None
    except OSError as exc:
        raise TTError(f"{what}: cannot reach the identity agent at {sock}: {exc}") from None


def exchange(s: socket.socket, request: bytes, nonce: str, deadline: float, what: str) -> str:
    """Send ``request`` on the connected socket ``s`` and read the agent's reply to ``nonce``
    (see ``agent_request``), giving up at ``deadline`` (``time.monotonic()``; TimeoutError) or
    after ``READ_MAX`` bytes (TTError): a guest that keeps talking never keeps the host reading,
    nor its memory growing. Every line is checked; a well-formed reply to another nonce is skipped."""
    s.settimeout(max(0.001, deadline - time.monotonic()))
    s.sendall(request)
    buf, total = bytearray(), 0
    while True:
        end = buf.find(b"\n")
        if end < 0 and len(buf) <= REPLY_MAX:
            if total >= READ_MAX:
                raise TTError(f"{what}: the identity agent sent {total} bytes without answering this request")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            s.settimeout(remaining)
            data = s.recv(min(REPLY_MAX + 1, READ_MAX - total))
            if not data:
                raise TTError(f"{what}: the identity agent's channel closed before it answered")
            total += len(data)
            buf += data
            continue
        if end < 0 or end > REPLY_MAX:
            raise TTError(f"{what}: the identity agent sent a line longer than {REPLY_MAX} bytes")
        frame = bytes(buf[:end])
        del buf[: end + 1]
        status, got, rest = _parse_reply(frame, what)
        if got != nonce:
            continue  # a late reply to an earlier request (that one timed out): not ours
        if status == "error":
            raise TTError(f"{what}: the identity agent failed: {rest}")
        return rest


def _parse_reply(frame: bytes, what: str) -> tuple[str, str, str]:
    """(status, nonce, rest) of one reply line; TTError if it is not a well-formed reply."""
    from pytest_ttenv.backend.engines.base import clean_text  # engine imports this module

    m = _REPLY.fullmatch(frame.rstrip(b"\r"))
    if m is None or (m.group(1) == b"ok" and not re.fullmatch(rb"\d{1,9}(\.\d{1,9})?", m.group(3))):
        shown = clean_text(frame[:80].decode("ascii", errors="replace"))
        raise TTError(f"{what}: the identity agent sent a malformed reply: {shown!r}")
    return m.group(1).decode(), m.group(2).decode(), clean_text(m.group(3).decode(errors="replace"))


@dataclass(frozen=True)
class Identity:
    """What makes a warm VM its own machine (kept 0600 in its run dir until applied)."""

    hostname: str
    machine_id: str
    user: str
    authorized_key: str
    host_key: KeyPair

    def to_dict(self) -> dict[str, str]:
        return {"hostname": self.hostname, "machine_id": self.machine_id, "user": self.user,
                "authorized_key": self.authorized_key, "host_key": self.host_key.private,
                "host_key_pub": self.host_key.public}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> Identity:
        return cls(data["hostname"], data["machine_id"], data["user"], data["authorized_key"],
                   KeyPair(data["host_key"], data["host_key_pub"]))  # fmt: skip


def apply_identity(sock: Path, ident: Identity, timeout: float, what: str) -> None:
    """Make the restored VM behind ``sock`` its own machine: entropy and a CRNG reseed, the clock
    set to now, hostname, machine-id, host key, and ``authorized_key`` as the only login."""
    agent_request(
        sock, "identity", timeout, what, time=f"{time.time():.6f}", entropy=os.urandom(64),
        hostname=ident.hostname, machine_id=ident.machine_id, host_key=ident.host_key.private,
        host_key_pub=ident.host_key.public + "\n", user=ident.user, authorized_keys=ident.authorized_key + "\n",
    )  # fmt: skip


def refresh(sock: Path, timeout: float, what: str) -> None:
    """After a snapshot revert: the clock set to now, fresh entropy and a CRNG reseed."""
    agent_request(sock, "refresh", timeout, what, time=f"{time.time():.6f}", entropy=os.urandom(64))


# -- making a template -------------------------------------------------------------------------------
def make_template(
    store: TemplateStore, key: str, inputs: dict[str, Any], res: Resources, boot_timeout: float,
    progress: Callable[[str], None], login: KeyPair | None = None,
) -> Template:  # fmt: skip
    """Boot a template VM cold, start the identity agent in it, seal it, save its state; call it
    with the template's lock held. A failure or a kill at any point leaves only a work dir that
    ``reap`` removes (the template appears by one rename, when complete). TTError on failure.
    ``login``: the provisioning key (default: a new one, forgotten afterwards; tests pass theirs
    to prove it no longer logs in).
    """
    image, accel = store.image, str(inputs["accel"])
    started = time.time()
    store.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    store.reap()
    work = store.root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    sockets = runtime_dir() / f"warm-{os.getpid()}-{secrets.token_hex(3)}"
    sockets.mkdir(mode=0o700)
    proc = None
    progress(f"{image.name}: making a warm template (one cold boot; {res.cpu} vCPU, {res.mem_mib} MiB, {accel})")
    try:
        qemu.create_overlay(image.file(image.disk), work / "disk.qcow2")
        host_key = KeyPair.generate("ttenv-template")
        login = login or KeyPair.generate("ttenv-template-provisioning")
        write_seed_iso(SeedData("ttenv-template", f"template-{key}", image.user, login.public, host_key),
                       work / "seed.iso")  # fmt: skip
        qmp, ident = sockets / "qmp", sockets / "identity"
        for _attempt in range(5):
            port = _free_port()
            cfg = qemu_config(
                image, accel, res, name=f"warm-template/{image.name}", disk=work / "disk.qcow2", seed=work / "seed.iso",
                port=port, rundir=work, qmp=qmp, identity=ident, cmdline=machine_cmdline(image, secrets.token_hex(16)),
                vmgenid=str(uuid.uuid4()),
            )  # fmt: skip
            proc = qemu.start(cfg, work / "qemu.log", die_with_parent=True)
            if _wait_banner_or_exit(proc, port, boot_timeout, image.name):
                break
            if "host forwarding" not in (work / "qemu.log").read_text(errors="replace"):
                raise BootError(f"the template VM of {image.name} exited during boot",
                                _tail(work / "console.log"))  # fmt: skip
        else:
            raise TTError(f"no usable host port for the template VM of {image.name} after 5 tries")
        what = f"template of {image.name}"
        _provision(port, image.user, login, host_key.public, agent_source(), AGENT_TIMEOUT, what)
        deadline = time.monotonic() + AGENT_TIMEOUT
        while True:  # the agent needs a moment to start; the socket answers once it serves the port
            try:
                agent_request(ident, "ping", 5.0, what)
                break
            except TTError:
                if time.monotonic() >= deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        agent_request(ident, "seal", AGENT_TIMEOUT, what, user=image.user)
        qemu.save_state(qmp, work / "state", SAVE_TIMEOUT)
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
    progress(f"{image.name}: warm template {key} saved after {template.meta['seconds']:.0f} s ({mib:.0f} MiB state)")
    return template


def _free_port() -> int:
    for _ in range(200):
        port = secrets.randbelow(32767 - 10022) + 10022
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise TTError("no free TCP port on 127.0.0.1 for a template VM")


def _tail(path: Path, lines: int = 50) -> str:
    """The console tail of a template VM: ``engine.tail_file`` (bounded, made safe to print)."""
    from pytest_ttenv.backend.engines.base import tail_file  # engine imports this module

    return tail_file(path, lines)


def _wait_banner_or_exit(proc: subprocess.Popen[bytes], port: int, timeout: float, image: str) -> bool:
    """True once sshd's banner answers on ``port``; False if qemu exited; BootError on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
                s.settimeout(2.0)
                if s.recv(8).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    raise BootError(f"the template VM of {image} did not answer SSH within {timeout:.0f} s")


def _provision(port: int, user: str, login: KeyPair, host_key: str, source: str, timeout: float, what: str) -> None:
    """Over SSH (strict host key): put the agent into the guest's /run and start it as a unit."""
    command = (
        f"command -v python3 >/dev/null || {{ echo 'no python3 in the guest' >&2; exit 1; }}; "
        f"cat > {AGENT_PATH} && chmod 0755 {AGENT_PATH} && "
        f"systemd-run --quiet --unit=ttenv-identity /usr/bin/python3 {AGENT_PATH}"
    )

    async def run() -> asyncssh.SSHCompletedProcess:
        async with asyncssh.connect(
            "127.0.0.1", port, username=user, client_keys=[asyncssh.import_private_key(login.private)],
            known_hosts=([asyncssh.import_public_key(host_key)], [], []), config=None, agent_path=None,
            connect_timeout=timeout,
        ) as conn:  # fmt: skip
            return await conn.run(command, input=source, check=False, timeout=timeout)

    try:
        result = asyncio.run(run())
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
        raise TTError(f"{what}: starting the identity agent over SSH failed: {exc}") from None
    if result.exit_status != 0:
        raise TTError(f"{what}: starting the identity agent failed: {str(result.stderr).strip()}")
