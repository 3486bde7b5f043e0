"""Running the server: listen address, default quotas, uvicorn, the reaper, graceful shutdown.

``serve()`` binds the socket itself (a taken port is one TTError line), lifts its descriptor
limit, reports the ENVs it re-adopts from the state dir, starts the lease reaper, and runs
uvicorn until SIGINT/SIGTERM: requests in flight finish (long polls answer within a second),
ENVs stay up for the next start. Connections are capped and must send their request head in
time (``conn.py``); repeated log records are rate-limited. With ``tls_cert``/``tls_key`` it
serves https, and a TLS handshake must end within the header timeout too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import shutil
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pytest_ttenv.core.naming import parse_mib, parse_seconds
from pytest_ttenv.core.paths import image_dir, state_dir
from pytest_ttenv.errors import TTError, UsageError
from pytest_ttenv.server.quota import Amounts
from pytest_ttenv.server.reaper import Reaper
from pytest_ttenv.server.service import ServerConfig, Service

DEFAULT_PORT = 8730
GRACEFUL_SECONDS = 10
KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open after an answer
MAX_HEADERS = 16 * 1024  # bytes of a request head (h11's buffer for an incomplete event)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too; ``HOST`` alone takes port 8730) -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        host, port_text = text, str(DEFAULT_PORT)
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise UsageError(f"--listen {text!r}: bad port", "use HOST:PORT, e.g. 127.0.0.1:8730 or 0.0.0.0:8730")
    return host, port


def forward_addr(host: str) -> str:
    """The IPv4 address VM ports are forwarded on for API host ``host`` (qemu's user networking
    forwards IPv4 only): all addresses stay all addresses, a name is resolved."""
    if host in ("0.0.0.0", "::", ""):
        return "0.0.0.0"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        try:
            return socket.gethostbyname(host)
        except OSError as exc:
            raise UsageError(f"--listen host {host!r} does not resolve: {exc}") from None
    if addr.version != 4:
        raise UsageError(f"--listen {host}: VM ports can only be forwarded on IPv4 addresses", "use 0.0.0.0 or ::")
    return host


def default_totals(state: Path) -> Amounts:
    """Host CPUs, 80 % of RAM, 80 % of the free disk where the state dir is."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    probe = state
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free // 2**20
    return Amounts(os.cpu_count() or 1, int(mem * 0.8), int(free * 0.8))


def libvirt_totals(uris: Sequence[str], state: Path) -> Amounts:
    """The libvirt hosts' vCPUs, 80 % of their memory and of their pools' free space (a host's
    ``#cpu=``/``#mem=`` override counts as given); TTError if no host answers."""
    from pytest_ttenv.backend.engines.libvirt import host_totals

    cpu, mem, disk = host_totals(uris, state)
    if not cpu:
        raise TTError("no libvirt host answered", "check --libvirt-uri and that libvirtd runs on the hosts")
    return Amounts(cpu, mem, disk)


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise TTError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", "pick another --listen port") from None
    sock.set_inheritable(True)
    return sock


def check_tls(cert: str | None, key: str | None) -> bool:
    """True for https: both files given, readable and a matching certificate and key (else one
    UsageError line); False for neither."""
    if not cert and not key:
        return False
    if not cert or not key:
        raise UsageError("--tls-cert and --tls-key go together", "give both: the certificate (PEM) and its key")
    for what, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise UsageError(f"{what} {path!r}: cannot read it: {exc.strerror or exc}") from None
    try:  # no password: an encrypted key fails here instead of prompting (uvicorn would prompt)
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key, password=lambda: "")
    except ssl.SSLError as exc:
        raise UsageError(
            f"--tls-cert {cert!r} and --tls-key {key!r} are not a PEM certificate and its "
            f"unencrypted key ({exc.reason or exc})"
        ) from None
    return True


class _HandshakeDeadline(asyncio.SelectorEventLoop):
    """asyncio's loop whose TLS servers give a handshake ``handshake_timeout`` s (asyncio's default
    is 60 s; the request-head deadline of ``conn.py`` starts only once the handshake is done)."""

    handshake_timeout = 10.0

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:
        if kwargs.get("ssl") is not None and kwargs.get("ssl_handshake_timeout") is None:
            kwargs["ssl_handshake_timeout"] = self.handshake_timeout
        return await super().create_server(*args, **kwargs)


def _run(server: Any, sock: socket.socket, handshake_timeout: float | None) -> None:
    """``server.run(sockets=[sock])``; for https (a handshake timeout; Python 3.11+) in a loop
    that bounds TLS handshakes."""
    if handshake_timeout is None or sys.version_info < (3, 11):
        server.run(sockets=[sock])
        return
    loop = type("HandshakeDeadlineLoop", (_HandshakeDeadline,), {"handshake_timeout": handshake_timeout})
    with asyncio.Runner(loop_factory=loop) as runner:
        runner.run(server.serve(sockets=[sock]))


def readoption_report(service: Service) -> list[str]:
    """One line per ENV found in the state dir at start: its VMs running, or why they are stopped."""
    lines = []
    for env in service.backend.list_envs():
        up = [vm for vm in env.vms if vm.state in ("running", "booting")]
        down = [f"{vm.name} {vm.state}{': ' + vm.error if vm.error else ''}" for vm in env.vms if vm not in up]
        left = f"{(env.expires - time.time()):.0f} s" if env.expires else "no"
        line = f"  ENV {env.name} ({env.id}) of {env.owner}: {len(up)}/{len(env.vms)} VM(s) up, lease {left} left"
        lines.append(line + (f"; {', '.join(down)}" if down else ""))
    return lines


def serve(
    listen: str = f"127.0.0.1:{DEFAULT_PORT}",
    *,
    public_addr: str | None = None,
    state: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
    cpu_total: int | None = None,
    mem_total: int | str | None = None,
    disk_total: int | str | None = None,
    engine: str = "qemu",
    libvirt_uris: Sequence[str] = (),
    default_lease: float | str = 600.0,
    max_lease: float | str = 7 * 24 * 3600.0,
    log_level: str = "info",
    dead_grace: float | str = 300.0,
    max_connections: int | None = None,
    header_timeout: float | str = 10.0,
    max_requests_per_owner: int = 64,
    max_polls_per_owner: int = 32,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """Run the server until SIGINT/SIGTERM; returns the exit code (0 after a graceful stop).

    Sizes are MiB or strings like ``32G``, leases seconds or strings like ``2h`` (``parse_mib``,
    ``parse_seconds``: the CLI's forms). ``tls_cert`` and ``tls_key`` (PEM files, both or
    neither) make it serve https."""
    try:
        import uvicorn
    except ImportError:
        raise TTError("ttenv serve needs the server extra", "pip install 'pytest-ttenv[server]'") from None
    # after the check above: these import uvicorn and h11 (the server extra) at module level
    from pytest_ttenv.server.app import create_app
    from pytest_ttenv.server.conn import BACKLOG, default_max_connections, guarded_protocol, quiet_logs, raise_nofile

    if engine not in ("qemu", "libvirt"):
        raise UsageError(f"--engine {engine!r} is not available", "use --engine qemu or --engine libvirt")
    if libvirt_uris and engine != "libvirt":
        raise UsageError("--libvirt-uri needs --engine libvirt")
    default_s, max_s = parse_seconds(default_lease, "--default-lease"), parse_seconds(max_lease, "--max-lease")
    grace_s, head_s = parse_seconds(dead_grace, "--dead-grace"), parse_seconds(header_timeout, "--header-timeout")
    for what, value in (
        ("--max-connections", max_connections),
        ("--max-requests-per-owner", max_requests_per_owner),
        ("--max-polls-per-owner", max_polls_per_owner),
    ):
        if value is not None and value < 1:
            raise UsageError(f"{what} must be at least 1, got {value}")
    if cpu_total is not None and cpu_total < 0:
        raise UsageError(f"--cpu-total must not be negative, got {cpu_total}")
    mem_mib = parse_mib(mem_total, "--mem-total") if mem_total is not None else None
    disk_mib = parse_mib(disk_total, "--disk-total") if disk_total is not None else None
    host, port = parse_listen(listen)
    tls = check_tls(tls_cert, tls_key)
    bind = forward_addr(host)
    public = public_addr or (socket.gethostname() if bind == "0.0.0.0" else bind)
    sdir, idir = state_dir(state), image_dir(images)
    base = default_totals(sdir) if engine == "qemu" else libvirt_totals(libvirt_uris, sdir)
    totals = Amounts(
        cpu_total if cpu_total is not None else base.cpu,
        mem_mib if mem_mib is not None else base.mem_mib,
        disk_mib if disk_mib is not None else base.disk_mib,
    )
    nofile, _ = raise_nofile()
    conns = max_connections or default_max_connections(nofile)
    cfg = ServerConfig(
        state_dir=sdir,
        image_dir=idir,
        totals=totals,
        bind_addr=bind,
        public_addr=public,
        engine=engine,
        libvirt_uris=tuple(libvirt_uris),
        default_lease=default_s,
        max_lease=max_s,
        dead_grace=grace_s,
        max_requests_per_owner=max_requests_per_owner,
        max_polls_per_owner=max_polls_per_owner,
        max_connections=conns,
        header_timeout=head_s,
    )
    service = Service(cfg)
    sock = _bind(host, port, BACKLOG)
    url = f"{'https' if tls else 'http'}://{'[' + host + ']' if ':' in host else host}:{sock.getsockname()[1]}"

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="ttenv serve: %(message)s")
    logging.getLogger("qemu").setLevel(logging.WARNING)  # qemu.qmp logs every monitor disconnect
    reaper = Reaper(service.reap, cfg.reap_interval)
    server: Any = None

    app = create_app(service, stopping=lambda: bool(server is not None and server.should_exit))
    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        lifespan="on",
        access_log=log_level in ("debug", "info"),
        http=guarded_protocol(conns, head_s),
        timeout_keep_alive=KEEP_ALIVE,
        h11_max_incomplete_event_size=MAX_HEADERS,
        backlog=BACKLOG,
        ssl_certfile=tls_cert if tls else None,
        ssl_keyfile=tls_key if tls else None,
    )
    server = uvicorn.Server(config)
    quiet_logs("uvicorn.error", "asyncio", "ttenv.server")  # a flood of one failure is a few lines, not a flood
    quiet_logs("uvicorn.access", burst=500, window=1.0)

    if engine == "libvirt":
        hosts = ", ".join(service.backend.libvirt_uris) or "qemu:///system"
        out(f"ttenv serve: engine libvirt on {hosts}")
    out(f"ttenv serve: API on {url}/v1 (OpenAPI: {url}/v1/openapi.json); VM ports on {bind}, announced as {public}")
    out(f"ttenv serve: dashboard on {url}/ (log in with a token of `ttenv token add`)")
    out(
        f"ttenv serve: state {sdir}, images {idir} ({len(service.images())}), quotas {totals.text()}, "
        f"{len(service.tokens.list())} token(s)"
    )
    out(
        f"ttenv serve: up to {conns} connections (descriptor limit {nofile}), request heads within {head_s:g} s; "
        f"per owner {max_requests_per_owner} requests and {max_polls_per_owner} long polls at once; "
        f"dead VMs free their quota after {grace_s:g} s"
    )
    adopted = readoption_report(service)
    out(f"ttenv serve: re-adopted {len(adopted)} ENV(s) from the state dir" + (":" if adopted else ""))
    for line in adopted:
        out(line)
    sys.stdout.flush()

    # uvicorn re-raises the signal that stopped it once it is done; these handlers absorb it.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    reaper.start()
    try:
        _run(server, sock, head_s if tls else None)
    finally:
        reaper.stop()
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    left = len(service.backend.store.list_envs())
    out(f"ttenv serve: stopped; {left} ENV(s) left running, re-adopted at the next start")
    return 0 if server.started else 1
