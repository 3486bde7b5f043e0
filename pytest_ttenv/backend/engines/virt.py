"""A typed wrapper over libvirt-python: the only module that imports ``libvirt``.

libvirt-python has no type information; everything it returns is converted here to plain
types, and every ``libvirtError`` becomes one of two exceptions with one clear line:
``HostDown`` (the connection to the host is gone or cannot be made: the caller treats the host as
unreachable) or ``VirtError`` (the host answered and refused; ``code`` is libvirt's error code).

Connections run libvirt's default event loop in a daemon thread, so remote connections keep
alive (5 s interval, 3 misses): a host that vanishes fails the calls in flight within ~20 s
instead of a TCP timeout. Opening a connection has its own timeout (a thread that gives up).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

from pytest_ttenv.errors import TTError

T = TypeVar("T")

INSTALL_HINT = (
    "pip install 'pytest-ttenv[libvirt]' (it builds against libvirt: apt-get install -y libvirt-dev pkg-config gcc)"
)
START_HINT = (
    "start libvirtd: virtlogd -d && libvirtd -d (or systemctl start libvirtd); for a remote URI check that this "
    "machine reaches the host (ssh, tcp) and libvirtd runs there"
)

# libvirt error codes callers test for
NO_DOMAIN = 42
NO_METADATA = 80
NO_SNAPSHOT = 72
NO_VOLUME = 50
VOLUME_EXISTS = 90
NO_POOL = 49
OPERATION_INVALID = 55

_lock = threading.Lock()
_loop_started = False


class HostDown(TTError):
    """The libvirt host cannot be reached (connection refused, lost, or timed out)."""


class VirtError(TTError):
    """libvirt answered and refused; ``code`` is its error code (``virErrorNumber``)."""

    def __init__(self, message: str, code: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.code = code


def _module() -> Any:
    """The libvirt module, with its stderr error printing silenced and its event loop running."""
    global _loop_started
    try:
        import libvirt
    except ImportError:
        raise TTError("the libvirt engine needs libvirt-python", INSTALL_HINT) from None
    with _lock:
        if not _loop_started:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(target=_run_loop, args=(libvirt,), name="ttenv-libvirt-events", daemon=True).start()
            _loop_started = True
    return libvirt


def _run_loop(libvirt: Any) -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def available() -> str | None:
    """None if libvirt-python can be imported, else why not (one line with the fix)."""
    try:
        _module()
    except TTError as exc:
        return str(exc)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_conn(uri: str, timeout: float = 20.0) -> Conn:
    """A connection to ``uri``; HostDown (saying how to start libvirtd) if it cannot be made
    within ``timeout`` seconds."""
    libvirt = _module()
    result: list[Any] = []
    error: list[BaseException] = []
    abandoned = threading.Event()

    def connect() -> None:
        try:
            conn = libvirt.open(uri)
        except Exception as exc:  # noqa: BLE001 - reported to the waiting caller
            error.append(exc)
            return
        if abandoned.is_set():  # the caller gave up: do not leak the connection
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a connection nobody uses
                pass
            return
        result.append(conn)

    worker = threading.Thread(target=connect, name=f"ttenv-libvirt-open {uri}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        abandoned.set()
        raise HostDown(f"libvirt host {uri} did not answer within {timeout:.0f} s", START_HINT)
    if error:
        raise HostDown(f"cannot connect to libvirt at {uri}: {_first_line(error[0])}", START_HINT)
    conn = result[0]
    if "://" in uri and not uri.split("://", 1)[1].startswith("/"):  # remote: keepalive
        try:
            conn.setKeepAlive(5, 3)
        except Exception:  # noqa: BLE001 - keepalive is best effort
            pass
    return Conn(uri, conn, libvirt)


class Conn:
    """One libvirt connection. Methods raise HostDown or VirtError (never libvirtError)."""

    def __init__(self, uri: str, conn: Any, libvirt: Any) -> None:
        self.uri = uri
        self._c = conn
        self._lv = libvirt

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except self._lv.libvirtError as exc:
            if not self.alive():
                raise HostDown(f"libvirt host {self.uri} unreachable ({what}: {_first_line(exc)})") from None
            raise VirtError(f"{what} on {self.uri} failed: {_first_line(exc)}", int(exc.get_error_code())) from None

    def alive(self) -> bool:
        try:
            return bool(self._c.isAlive())
        except Exception:  # noqa: BLE001 - a connection that cannot even say is dead
            return False

    def close(self) -> None:
        try:
            self._c.close()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass

    # -- the host ------------------------------------------------------------------------------
    def node(self) -> tuple[int, int]:
        """(CPUs, memory MiB) of the host."""
        info = self._call("getInfo", lambda: self._c.getInfo())
        return int(info[2]), int(info[1])

    def free_mem_mib(self) -> int:
        return int(self._call("getFreeMemory", lambda: self._c.getFreeMemory())) // 2**20

    # -- domains -------------------------------------------------------------------------------
    def _dom(self, name: str) -> Any:
        return self._call(f"looking up domain {name}", lambda: self._c.lookupByName(name))

    def define(self, xml: str) -> None:
        """Define (or redefine) a persistent domain."""
        self._call("defining a domain", lambda: self._c.defineXML(xml))

    def start(self, name: str) -> None:
        dom = self._dom(name)
        self._call(f"starting domain {name}", lambda: dom.create())

    def state(self, name: str) -> tuple[int, int] | None:
        """(virDomainState, reason) of domain ``name``, or None if there is no such domain."""
        try:
            dom = self._dom(name)
            state = self._call(f"state of domain {name}", lambda: dom.state())
        except VirtError as exc:
            if exc.code == NO_DOMAIN:
                return None
            raise
        return int(state[0]), int(state[1])

    def destroy(self, name: str) -> None:
        """Stop the domain at once (qemu killed); nothing if it is missing or not running."""
        try:
            dom = self._dom(name)
            self._call(f"destroying domain {name}", lambda: dom.destroy())
        except VirtError as exc:
            if exc.code not in (NO_DOMAIN, OPERATION_INVALID):
                raise

    def undefine(self, name: str) -> None:
        """Forget the domain with its NVRAM, managed save and snapshot metadata; nothing if missing."""
        flags = (
            self._lv.VIR_DOMAIN_UNDEFINE_NVRAM
            | self._lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | self._lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        )
        try:
            dom = self._dom(name)
            self._call(f"undefining domain {name}", lambda: dom.undefineFlags(flags))
        except VirtError as exc:
            if exc.code != NO_DOMAIN:
                raise

    def create_transient(self, xml: str) -> None:
        """Create and start a transient domain (gone once it stops)."""
        self._call("creating a domain", lambda: self._c.createXML(xml, 0))

    def save(self, name: str, path: str) -> None:
        """virDomainSave: the running domain's memory and devices into the file ``path`` on the
        host (libvirt's save image); the domain stops (a transient one is gone)."""
        dom = self._dom(name)
        self._call(f"saving domain {name}", lambda: dom.save(path))

    def restore(self, path: str) -> None:
        """virDomainRestore from the save image ``path`` on the host: the domain its header names
        runs (a defined domain of that name and UUID runs as itself)."""
        self._call(f"restoring {path}", lambda: self._c.restore(path))

    def versions(self) -> tuple[int, int]:
        """(hypervisor version, libvirt version) of the host, as libvirt numbers them."""
        return int(self._call("getVersion", lambda: self._c.getVersion())), int(
            self._call("getLibVersion", lambda: self._c.getLibVersion())
        )

    def channel(self, name: str, port: str) -> Channel:
        """A non-blocking stream to the host end of the domain's channel ``port`` (its target name)."""
        dom = self._dom(name)
        stream = self._call("opening a stream", lambda: self._c.newStream(self._lv.VIR_STREAM_NONBLOCK))
        self._call(f"opening channel {port} of {name}", lambda: dom.openChannel(port, stream, 0))
        return Channel(self, stream)

    def domains(self) -> list[str]:
        """Names of every domain, running or defined."""
        doms = self._call("listing domains", lambda: self._c.listAllDomains(0))
        return [str(d.name()) for d in doms]

    def metadata(self, name: str, namespace: str) -> str | None:
        """The domain's metadata element in ``namespace`` (XML text), or None."""
        try:
            dom = self._dom(name)
            kind = self._lv.VIR_DOMAIN_METADATA_ELEMENT
            return str(self._call(f"metadata of domain {name}", lambda: dom.metadata(kind, namespace, 0)))
        except VirtError as exc:
            if exc.code in (NO_METADATA, NO_DOMAIN):
                return None
            raise

    def snapshot(self, name: str, snapshot_xml: str) -> None:
        dom = self._dom(name)
        self._call(f"snapshot of domain {name}", lambda: dom.snapshotCreateXML(snapshot_xml, 0))

    def delete_snapshot(self, name: str, snapshot: str) -> bool:
        """Delete a snapshot (its data and metadata); False if there is none of that name."""
        dom = self._dom(name)
        try:
            snap = self._call(f"looking up snapshot {snapshot}", lambda: dom.snapshotLookupByName(snapshot, 0))
        except VirtError as exc:
            if exc.code == NO_SNAPSHOT:
                return False
            raise
        self._call(f"deleting snapshot {snapshot} of {name}", lambda: snap.delete(0))
        return True

    def revert(self, name: str, snapshot: str) -> None:
        """Revert to a snapshot; VirtError with code NO_SNAPSHOT if there is none of that name."""
        dom = self._dom(name)
        snap = self._call(f"looking up snapshot {snapshot}", lambda: dom.snapshotLookupByName(snapshot, 0))
        self._call(f"reverting {name} to snapshot {snapshot}", lambda: dom.revertToSnapshot(snap, 0))

    # -- storage -------------------------------------------------------------------------------
    def pool(self, name: str, default_path: str) -> Pool:
        """The running storage pool ``name``; a dir pool at ``default_path`` is defined (built,
        autostarted) when the host has none of that name, and started when it is inactive."""
        try:
            pool = self._call(f"looking up storage pool {name}", lambda: self._c.storagePoolLookupByName(name))
        except VirtError as exc:
            if exc.code != NO_POOL:
                raise
            xml = f"<pool type='dir'><name>{name}</name><target><path>{default_path}</path></target></pool>"
            pool = self._call(f"defining storage pool {name}", lambda: self._c.storagePoolDefineXML(xml, 0))
            self._call(f"building storage pool {name}", lambda: pool.build(0))
            self._call(f"autostarting storage pool {name}", lambda: pool.setAutostart(1))
        if not self._call(f"state of storage pool {name}", lambda: pool.isActive()):
            self._call(f"starting storage pool {name}", lambda: pool.create(0))
        return Pool(self, name, pool)


class Pool:
    """A storage pool of a connection; volumes are addressed by name."""

    def __init__(self, conn: Conn, name: str, pool: Any) -> None:
        self.conn = conn
        self.name = name
        self._p = pool
        xml = conn._call(f"describing storage pool {name}", lambda: str(pool.XMLDesc(0)))
        start = xml.index("<path>") + len("<path>")
        self.path = xml[start : xml.index("</path>", start)]

    def _vol(self, name: str) -> Any:
        return self.conn._call(f"looking up volume {name}", lambda: self._p.storageVolLookupByName(name))

    def volumes(self) -> list[str]:
        self.conn._call(f"refreshing storage pool {self.name}", lambda: self._p.refresh(0))
        return [str(v) for v in self.conn._call("listing volumes", lambda: self._p.listVolumes())]

    def exists(self, name: str) -> bool:
        try:
            self._vol(name)
        except VirtError as exc:
            if exc.code == NO_VOLUME:
                return False
            raise
        return True

    def create(self, xml: str, name: str) -> str:
        """Create volume ``name`` from its XML; returns its path. VirtError VOLUME_EXISTS if taken."""
        vol = self.conn._call(f"creating volume {name}", lambda: self._p.createXML(xml, 0))
        return str(vol.path())

    def delete(self, name: str) -> bool:
        """Delete volume ``name``; False if there was none."""
        try:
            vol = self._vol(name)
        except VirtError as exc:
            if exc.code == NO_VOLUME:
                return False
            raise
        self.conn._call(f"deleting volume {name}", lambda: vol.delete(0))
        return True

    def size(self, name: str) -> tuple[int, int]:
        """(capacity, allocation) of volume ``name`` in bytes, as the host sees it now."""
        vol = self._vol(name)
        info = self.conn._call(f"size of volume {name}", lambda: vol.info())
        return int(info[1]), int(info[2])

    def space(self) -> tuple[int, int]:
        """(capacity, available) of the pool in bytes."""
        info = self.conn._call(f"size of storage pool {self.name}", lambda: self._p.info())
        return int(info[1]), int(info[3])

    def clone(self, xml: str, name: str, source: str) -> str:
        """Create volume ``name`` from its XML as a copy of volume ``source`` (made on the host);
        returns its path."""
        src = self._vol(source)
        vol = self.conn._call(f"copying volume {source}", lambda: self._p.createXMLFrom(xml, src, 0))
        return str(vol.path())

    def upload(self, name: str, src: IO[bytes], length: int, chunk: int = 1 << 20, offset: int = 0) -> Iterator[bytes]:
        """Write ``length`` bytes from ``src`` into volume ``name`` from ``offset``, yielding each
        chunk after it was sent (the caller may hash it). The stream is aborted on any failure."""
        vol = self._vol(name)
        stream = self.conn._call("opening a stream", lambda: self.conn._c.newStream(0))
        self.conn._call(f"uploading to volume {name}", lambda: vol.upload(stream, offset, length, 0))
        done = False
        try:
            sent = 0
            while sent < length:
                data = src.read(min(chunk, length - sent))
                if not data:
                    raise TTError(f"uploading to volume {name}: the source ended after {sent} of {length} bytes")
                view = memoryview(data)
                while view:
                    n = int(self.conn._call(f"uploading to volume {name}", lambda v=view: stream.send(bytes(v))))  # type: ignore[misc]
                    view = view[n:]
                sent += len(data)
                yield data
            self.conn._call(f"finishing the upload to volume {name}", lambda: stream.finish())
            done = True
        finally:
            if not done:
                try:
                    stream.abort()
                except Exception:  # noqa: BLE001 - the upload failed already
                    pass

    def download(self, name: str, offset: int = 0, length: int = 0, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The bytes of volume ``name`` from ``offset`` (``length`` 0: to its end), in chunks."""
        vol = self._vol(name)
        stream = self.conn._call("opening a stream", lambda: self.conn._c.newStream(0))
        self.conn._call(f"downloading volume {name}", lambda: vol.download(stream, offset, length, 0))
        done = False
        try:
            while True:
                data = self.conn._call(f"downloading volume {name}", lambda: stream.recv(chunk))
                if not isinstance(data, bytes) or not data:
                    break
                yield data
            self.conn._call(f"finishing the download of volume {name}", lambda: stream.finish())
            done = True
        finally:
            if not done:
                try:
                    stream.abort()
                except Exception:  # noqa: BLE001 - the download was cut short
                    pass


class Channel:
    """A non-blocking stream to a domain's channel (``Conn.channel``)."""

    def __init__(self, conn: Conn, stream: Any) -> None:
        self.conn = conn
        self._s = stream

    def send(self, data: bytes) -> int:
        """Bytes of ``data`` sent now (0: try again later)."""
        n = int(self.conn._call("writing to a channel", lambda: self._s.send(data)))
        return max(n, 0)

    def recv(self, size: int) -> bytes | None:
        """Bytes the guest sent; None if none yet; b'' once the channel closed."""
        data = self.conn._call("reading a channel", lambda: self._s.recv(size))
        if isinstance(data, bytes):
            return data
        return None if data == -2 else b""

    def close(self) -> None:
        try:
            self._s.abort()
        except Exception:  # noqa: BLE001 - closing a stream that failed or ended
            pass
