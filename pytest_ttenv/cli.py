"""``ttenv``: doctor, image list|pull|import|build|rm, env add|list|show|run|console|del, gc,
serve, token, status, report.

Every failure the user can act on prints one line ``ttenv: error: ...`` and exits 1
(runtime) or 2 (usage); Ctrl-C exits 130 after cleaning up what the command created.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, TypeVar

from pytest_ttenv import __version__
from pytest_ttenv.backend import Backend, get_backend
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.model import EnvInfo, EnvSpec, Resources, VmInfo, VmSpec
from pytest_ttenv.core.naming import canonical_arch, check_env_name, parse_mib, parse_seconds, split_prefixes
from pytest_ttenv.core.paths import image_dir
from pytest_ttenv.errors import BootError, TTError, UsageError

if TYPE_CHECKING:
    from pytest_ttenv.ssh import Connection


def _out(line: str) -> None:
    print(line, flush=True)


def _backend(args: argparse.Namespace, progress: bool = True) -> LocalBackend:
    return LocalBackend(args.image_dir, args.state_dir, progress=_out if progress else None)


def _env_backend(args: argparse.Namespace, progress: bool = True) -> Backend:
    """The backend of the env commands: ``--backend`` (local or a server URL, default
    ``$TTENV_BACKEND`` or local) with ``--token`` (default ``$TTENV_TOKEN``); ``env add`` also takes
    ``--engine``/``--libvirt-uri`` (local backend only: a server's engine is its own)."""
    spec = args.backend or os.environ.get("TTENV_BACKEND") or "local"
    engine, uris = getattr(args, "engine", "qemu"), _uris(args) if hasattr(args, "libvirt_uri") else []
    if spec != "local" and (engine != "qemu" or uris):
        raise UsageError("--engine and --libvirt-uri apply to the local backend",
                         "a server runs the engine it was started with: ttenv serve --engine libvirt")  # fmt: skip
    token = _token(args) if spec != "local" else None
    return get_backend(spec, image_dir=args.image_dir, state_dir=args.state_dir,
                       progress=_out if progress else None, token=token, engine=engine,
                       libvirt_uris=uris, ca_cert=args.ca_cert)  # fmt: skip


def _token(args: argparse.Namespace) -> str | None:
    """The server token: ``--token`` (deprecated: the process list shows it), ``--token-file``,
    else None (the backend takes ``$TTENV_TOKEN``, else ``$TTENV_TOKEN_FILE``'s)."""
    from pytest_ttenv.config import read_token_file

    if args.token:
        print("ttenv: warning: --token puts the token in the process list; use TTENV_TOKEN or --token-file",
              file=sys.stderr)  # fmt: skip
        return str(args.token)
    path, where = args.token_file, "--token-file"
    if not path and not os.environ.get("TTENV_TOKEN"):
        path, where = os.environ.get("TTENV_TOKEN_FILE"), "TTENV_TOKEN_FILE"
    if not path:
        return None
    token, warning = read_token_file(path, where)
    if warning:
        print(f"ttenv: warning: {warning}", file=sys.stderr)
    return token


def _engine_options(p: argparse.ArgumentParser, what: str) -> None:
    """``--engine`` and ``--libvirt-uri`` (repeatable; defaults ``$TTENV_ENGINE``, ``$TTENV_LIBVIRT_URI``)."""
    p.add_argument(
        "--engine",
        choices=("qemu", "libvirt"),
        default=os.environ.get("TTENV_ENGINE") or "qemu",
        help=f"how {what} VMs run: qemu processes (default) or libvirt domains on --libvirt-uri hosts",
    )
    env_uris = [u for u in os.environ.get("TTENV_LIBVIRT_URI", "").replace(",", " ").split() if u]
    p.add_argument("--libvirt-uri", action="append", metavar="URI", default=None,
                   help="a libvirt host, repeatable: qemu:///system (default), qemu+ssh://root@hostB/system, "
                   "each optionally URI#cpu=N&mem=SIZE&addr=ADDRESS to override its capacity and VM address"
                   + (f" (default from TTENV_LIBVIRT_URI: {' '.join(env_uris)})" if env_uris else ""))  # fmt: skip
    p.set_defaults(libvirt_uri_env=env_uris)


def _uris(args: argparse.Namespace) -> list[str]:
    uris: list[str] = args.libvirt_uri or args.libvirt_uri_env
    return uris


# -- doctor -------------------------------------------------------------------------------------
def cmd_doctor(args: argparse.Namespace) -> int:
    from pytest_ttenv.doctor import run_checks, usable

    backend = _backend(args)
    checks = run_checks(backend.image_store, probe=not args.no_probe)
    for check in checks:
        _out(check.line())
    ok = usable(checks)
    _out("local backend: ready" if ok else "local backend: NOT usable - install what is marked MISS")
    return 0 if ok else 1


# -- images -------------------------------------------------------------------------------------
def _image_store(args: argparse.Namespace) -> ImageStore:
    return ImageStore(image_dir(args.image_dir))


def cmd_image_list(args: argparse.Namespace) -> int:
    if args.available:
        return _list_available(args)
    images = _image_store(args).all()
    if not images:
        _out(f"no images in {_image_store(args).root} - build one: ttenv image build debian-12, "
             "or pull one: ttenv image list --available")  # fmt: skip
        return 0
    _out(f"{'NAME':<22} {'FILE':>8} {'VIRTUAL':>8} {'USER':<10} {'BOOT':<6} {'SOURCE':<7} CREATED")
    for img in images:
        size = img.file(img.disk).stat().st_size / 2**20 if img.file(img.disk).exists() else 0
        created = _when(img.created)
        _out(f"{img.name:<22} {size:>6.0f}Mi {img.disk_mib:>6}Mi {img.user:<10} {img.boot:<6} {img.source:<7} "
             f"{created}")  # fmt: skip
    return 0


def _list_available(args: argparse.Namespace) -> int:
    from pytest_ttenv.backend.images.catalog import load_catalog

    catalog = load_catalog()
    have = {img.name: img for img in _image_store(args).all()}
    try:
        host = canonical_arch(platform.machine())
    except UsageError:
        host = platform.machine()  # an arch ttenv does not run guests for: everything is "other"
    _out(f"catalog {catalog.version} ({catalog.source}); pull with: ttenv image pull NAME")
    header = f"  {'NAME':<24} {'IN STORE':<10} {'USER':<10} {'BOOT':<5} {'FORMAT':<9} NOTES"
    for title, images in (
        (f"for this host ({host}):", [i for i in catalog.images() if i.arch == host]),
        ("for other arches (emulated, slower):", [i for i in catalog.images() if i.arch != host]),
    ):
        if not images:
            continue
        _out(title)
        _out(header)
        for img in images:
            source = have[img.name].source if img.name in have else ""
            state = {"": "-", "build": "built", "pull": "pulled", "import": "imported"}.get(source, source)
            _out(f"  {img.name:<24} {state:<10} {img.user:<10} {img.boot:<5} {img.format:<9} {img.notes}".rstrip())
    return 0


def cmd_image_pull(args: argparse.Namespace) -> int:
    from pytest_ttenv.backend.images.catalog import load_catalog
    from pytest_ttenv.backend.images.pull import pull

    if args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout:g}")
    catalog = load_catalog()
    store = _image_store(args)
    images = [catalog.image(name, args.arch) for name in args.names]  # all names checked before any download
    for img in images:
        bar = _ByteBar(img.name) if _sized_terminal() else None
        try:
            pull(store, img.name, _out, catalog=catalog, timeout=args.timeout,
                 on_bytes=bar.update if bar and bar.usable else None)  # fmt: skip
        except KeyboardInterrupt:
            if bar:
                bar.close()
            print(f"ttenv: interrupted; the partial download of {img.name} is kept in "
                  f"{store.root / '.partial'} - rerun to resume", file=sys.stderr)  # fmt: skip
            return 130
        finally:
            if bar:
                bar.close()
    return 0


def _sized_terminal() -> bool:
    """stdout is a terminal with a size (a bar on a 0x0 pseudo-terminal shows nothing)."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return sys.stdout.isatty() and size.columns > 0 and size.lines > 0


class _ByteBar:
    """A tqdm progress bar for a download when tqdm is installed and stdout is a terminal."""

    def __init__(self, name: str) -> None:
        import importlib

        try:
            self._tqdm: Any = importlib.import_module("tqdm").tqdm
        except ImportError:
            self._tqdm = None
        self.name = name
        self.bar: Any = None

    @property
    def usable(self) -> bool:
        return self._tqdm is not None

    def update(self, done: int, total: int | None) -> None:
        if self.bar is None:
            self.bar = self._tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                                  desc=self.name, leave=True, file=sys.stdout)  # fmt: skip
        self.bar.update(done - self.bar.n)
        if total is not None and done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_image_import(args: argparse.Namespace) -> int:
    from pytest_ttenv.backend.images.importer import import_image

    import_image(_image_store(args), args.file, args.name, user=args.user, boot=args.boot, force=args.force,
                 kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline or "", progress=_out)  # fmt: skip
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pytest_ttenv.backend.images.build import ImageBuilder, parse_target

    arch = canonical_arch(args.arch)
    variant = "plain" if args.plain else args.variant or ""
    req = replace(parse_target(args.target, arch, variant), mirror=args.mirror, disk_mib=parse_mib(args.disk, "disk"))
    started = time.monotonic()

    def progress(line: str) -> None:
        if args.verbose or not line.startswith("  ") or line.startswith("  I: "):
            _out(f"[{time.monotonic() - started:5.0f}s] {line.strip()}")

    ImageBuilder(_backend(args).image_store, progress).build(req)
    return 0


def cmd_image_rm(args: argparse.Namespace) -> int:
    store = _image_store(args)
    for name in args.names:
        store.remove(name)
        _out(f"removed image {name}")
    return 0


# -- ENVs ---------------------------------------------------------------------------------------
def cmd_env_add(args: argparse.Namespace) -> int:
    from pytest_ttenv.access import save_key, target
    from pytest_ttenv.core.keys import KeyPair
    from pytest_ttenv.ssh import Connection

    backend = _env_backend(args)
    check_env_name(args.name)
    prefixes = split_prefixes(args.os_prefix)
    if not prefixes:
        raise UsageError("--os-prefix is empty", "give e.g. --os-prefix=debian12,debian11")
    arches = [canonical_arch(a) for a in split_prefixes(args.arch or [])]
    res = Resources(cpu=args.cpu, mem_mib=parse_mib(args.mem, "memory"), disk_mib=parse_mib(args.disk, "disk")
                    if args.disk else 0)  # fmt: skip
    names = backend.resolve(prefixes, arches)
    key = KeyPair.generate(f"ttenv-client-{args.name}")
    spec = EnvSpec(name=args.name, vms=tuple(VmSpec(n, n, res) for n in names), client_pubkey=key.public,
                   accel=args.accel, ttl=args.ttl, boot=args.boot)  # fmt: skip
    started = time.monotonic()
    env: EnvInfo | None = None
    try:
        env = backend.create_env(spec)
        key_file = save_key(env.id, key, args.state_dir)
        lock = threading.Lock()

        def boot(vm_name: str) -> str | None:
            try:
                vm = backend.wait_vm(env.id if env else "", vm_name, args.boot_timeout)
                up = time.monotonic() - started
                conn = Connection(target(vm, key_file), connect_timeout=30, use_agent=False)
                try:
                    conn.run("true", timeout=60, check=True)
                finally:
                    conn.close()
                with lock:
                    _out(f"{vm_name}: ready - ssh up after {up:.1f} s, first command after "
                         f"{time.monotonic() - started:.1f} s")  # fmt: skip
                return None
            except BootError as exc:
                return f"{exc}\n--- console tail ---\n{exc.console_tail}"
            except Exception as exc:  # noqa: BLE001 - reported per VM, the ENV is then removed
                return f"{vm_name}: {exc}"

        pool = ThreadPoolExecutor(max_workers=len(env.vms))
        try:
            futures = [pool.submit(boot, vm.name) for vm in env.vms]
            while wait(futures, timeout=0.2).not_done:  # short waits keep Ctrl-C responsive
                pass
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # on Ctrl-C: the ENV is deleted below
        failures = [f for f in (fut.result() for fut in futures) if f]
        if failures:
            for failure in failures:
                print(f"ttenv: error: {failure}", file=sys.stderr)
            backend.delete_env(env.id)
            print(f"ttenv: ENV {args.name} removed after {len(failures)} VM(s) failed to boot", file=sys.stderr)
            return 1
    except BaseException:
        if env is not None:
            backend.delete_env(env.id)
        raise
    _print_env(backend.show_env(env.id), args.state_dir)
    return 0


def cmd_env_list(args: argparse.Namespace) -> int:
    envs = _env_backend(args, progress=False).list_envs()
    if not envs:
        _out("no ENVs")
        return 0
    _out(f"{'NAME':<20} {'ID':<13} {'STATE':<8} {'VMS':>3}  {'OWNER':<10} CREATED")
    for env in envs:
        created = _when(env.created)
        _out(f"{env.name:<20} {env.id:<13} {env.state:<8} {len(env.vms):>3}  {env.owner:<10} {created}")
    return 0


def _when(ts: float) -> str:
    """A timestamp as the CLI shows it: local time to the minute."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _print_env(env: EnvInfo, state_dir: str | None) -> None:
    from pytest_ttenv.access import key_path, login_command, write_known_hosts

    expires = _when(env.expires) if env.expires else "never"
    _out(f"ENV {env.name} (id {env.id}, owner {env.owner}, state {env.state}, expires {expires})")
    _out(f"  {'VM':<22} {'STATE':<8} {'ACCEL':<5} {'BOOT':<4} {'CPU':>3} {'MEM':>6} {'SSH':<16} CONSOLE")
    for vm in env.vms:
        console = vm.console or "(ttenv env console)"
        _out(f"  {vm.name:<22} {vm.state:<8} {vm.accel:<5} {vm.boot or '-':<4} {vm.resources.cpu:>3} "
             f"{vm.resources.mem_mib:>4}Mi {vm.address}:{vm.port:<6} {console}")  # fmt: skip
    if env.vms:
        vm = env.vms[0]
        key = key_path(env, state_dir)
        _out(f"  login: {login_command(vm, key, write_known_hosts(env, key))}")


def cmd_env_show(args: argparse.Namespace) -> int:
    _print_env(_env_backend(args, progress=False).show_env(args.name), args.state_dir)
    return 0


def cmd_env_run(args: argparse.Namespace) -> int:
    from pytest_ttenv.access import key_path, target
    from pytest_ttenv.ssh import Connection, SshError, fan_out

    if args.cmd is None and not args.reboot:
        raise UsageError("env run needs --cmd, --reboot or both", "e.g. ttenv env run NAME --cmd 'uname -a'")
    backend = _env_backend(args, progress=False)
    env = backend.show_env(args.name)
    wanted = [*(args.vm or []), *args.vms]
    vms = [vm for vm in env.vms if not wanted or vm.name in wanted]
    unknown = [name for name in wanted if name not in {vm.name for vm in env.vms}]
    if unknown or not vms:
        raise UsageError(f"no VM named {', '.join(unknown or wanted)} in ENV {env.name}",
                         f"VMs: {', '.join(v.name for v in env.vms)}")  # fmt: skip
    down = [vm.name for vm in vms if vm.state != "running"]
    if down:
        raise TTError(f"VM(s) not running in ENV {env.name}: {', '.join(down)}", f"ttenv env show {env.name}")
    key = key_path(env, args.state_dir)
    if not key.exists():
        raise TTError(f"no client key for ENV {env.name} at {key}", "it was created by another user or host")
    conns = [Connection(target(vm, key)) for vm in vms]
    try:
        up = _reboot_all(conns, vms, args.boot_timeout) if args.reboot else conns
        failed = len(conns) - len(up)
        results = fan_out(up, args.cmd, timeout=args.timeout) if args.cmd is not None and up else {}
    finally:
        for conn in conns:
            conn.close()
    for name in sorted(results):
        res = results[name]
        if isinstance(res, SshError):
            failed += 1
            _out(f"== {name}: error: {res}")
            continue
        failed += not res.ok
        _out(f"== {name}: exit {res.exit_status} ({res.duration * 1000:.0f} ms)")
        if res.stdout:
            sys.stdout.write(res.stdout if res.stdout.endswith("\n") else res.stdout + "\n")
        if res.stderr:
            sys.stdout.write("".join(f"stderr: {ln}\n" for ln in res.stderr.splitlines()))
    sys.stdout.flush()
    return 1 if failed else 0


def _reboot_all(conns: list[Connection], vms: list[VmInfo], timeout: float | None) -> list[Connection]:
    """Reboot the VMs at once, each waiting for SSH in its new boot (default: the boot timeout for
    that many VMs booting); one line per VM; returns the connections of those that came back."""
    from pytest_ttenv.backend.engines.accel import boot_timeout
    from pytest_ttenv.ssh import SshError

    def reboot(conn: Connection, vm: VmInfo) -> str:
        started = time.monotonic()
        conn.reboot(timeout or boot_timeout(vm.accel or "tcg", vm.arch, len(vms)))
        return f"== {vm.name}: rebooted, ssh up after {time.monotonic() - started:.1f} s"

    pool = ThreadPoolExecutor(max_workers=len(conns))
    try:
        futures = [pool.submit(reboot, conn, vm) for conn, vm in zip(conns, vms, strict=True)]
        while wait(futures, timeout=0.2).not_done:  # short waits keep Ctrl-C responsive
            pass
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    up = []
    for fut, conn, vm in zip(futures, conns, vms, strict=True):
        try:
            _out(fut.result())
            up.append(conn)
        except SshError as exc:
            _out(f"== {vm.name}: error: reboot failed: {exc}")
    return up


def cmd_env_console(args: argparse.Namespace) -> int:
    from pytest_ttenv.backend.engines.base import clean_text

    # the guest writes its console: control characters never reach the terminal (also from a server)
    _out(clean_text(_env_backend(args, progress=False).console(args.name, args.vm, args.lines)))
    return 0


def cmd_env_del(args: argparse.Namespace) -> int:
    from pytest_ttenv.access import forget_key

    backend = _env_backend(args, progress=False)
    for name in args.names:
        env = backend.delete_env(name)
        forget_key(env, args.state_dir)
        _out(f"deleted ENV {env.name}: {len(env.vms)} VM(s) stopped, overlays, seeds and ports released")
    return 0


_T = TypeVar("_T")


def _value_type(parse: Callable[[str, str], _T], flag: str) -> Callable[[str], _T]:
    """An argparse ``type=`` parsing ``flag``'s value with ``parse`` (the one parser of its kind);
    a bad value is the usual one line ``ttenv: error: ...`` and exit 2, without argparse's usage."""

    def convert(text: str) -> _T:
        try:
            return parse(text, flag)
        except UsageError as exc:
            print(f"ttenv: error: {exc}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None

    return convert


def _duration(flag: str) -> Callable[[str], float]:
    """argparse type of a duration option: seconds, or 90s, 30m, 2h, 1d (``parse_seconds``)."""
    return _value_type(parse_seconds, flag)


def _size(flag: str) -> Callable[[str], int]:
    """argparse type of a size option: MiB, or 512M, 2G, 2GiB, 1T (``parse_mib``)."""
    return _value_type(parse_mib, flag)


def cmd_env_renew(args: argparse.Namespace) -> int:
    env = _env_backend(args, progress=False).renew(args.name, args.ttl)
    until = _when(env.expires) if env.expires else "never"
    _out(f"renewed ENV {env.name}: expires {until}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    uris = _uris(args)
    backend = LocalBackend(args.image_dir, args.state_dir, progress=_out, engine="libvirt" if uris else "qemu",
                           libvirt_uris=uris)  # fmt: skip
    from pytest_ttenv.session import reap_session_dirs

    reaped = backend.gc()
    stale = backend.image_store.remove_stale_builds()
    sessions = reap_session_dirs(backend)
    _out(f"reaped {len(reaped)} ENV(s) whose owner is gone or lease expired; removed {len(stale)} stale "
         f"build(s) and {sessions} stale pytest session dir(s)")  # fmt: skip
    return 0


# -- report -------------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from pytest_ttenv.report.command import run

    return run(args, _out)


# -- the host server ----------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from pytest_ttenv.server.serve import serve

    return serve(
        args.listen, public_addr=args.public_addr, state=args.state_dir, images=args.image_dir,
        cpu_total=args.cpu_total,
        mem_total=parse_mib(args.mem_total, "--mem-total") if args.mem_total else None,
        disk_total=parse_mib(args.disk_total, "--disk-total") if args.disk_total else None,
        engine=args.engine, libvirt_uris=_uris(args), default_lease=args.default_lease, max_lease=args.max_lease,
        log_level=args.log_level, dead_grace=args.dead_grace, max_connections=args.max_connections,
        header_timeout=args.header_timeout, max_requests_per_owner=args.max_requests_per_owner,
        max_polls_per_owner=args.max_polls_per_owner, tls_cert=args.tls_cert, tls_key=args.tls_key, out=_out,
    )  # fmt: skip


def _tokens(args: argparse.Namespace) -> Any:
    from pytest_ttenv.core.paths import state_dir
    from pytest_ttenv.server.auth import TokenStore

    return TokenStore(state_dir(args.state_dir))


def cmd_token_add(args: argparse.Namespace) -> int:
    from pytest_ttenv.server.auth import Limits

    token = _tokens(args).add(args.name, admin=args.admin, limits=Limits(args.max_cpu, args.max_mem, args.max_vms))
    print(f"ttenv: token of {args.name} (shown once; the server keeps only its hash):", file=sys.stderr)
    _out(token)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    tokens = _tokens(args).list()
    if not tokens:
        _out("no tokens - add one: ttenv token add NAME")
    for name, created in tokens:
        _out(f"{name:<32} created {_when(created)}")
    return 0


def cmd_token_rm(args: argparse.Namespace) -> int:
    _tokens(args).remove(args.name)
    _out(f"removed token {args.name}; its ENVs stay until deleted or their lease expires")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """This host's ENVs and what they hold; with a server URL, the server's totals/used/free."""
    spec = args.backend or os.environ.get("TTENV_BACKEND") or "local"
    if spec == "local":
        if args.server:
            raise UsageError(
                "status --server needs the server's URL", "give --backend http://host:8730 or set TTENV_BACKEND"
            )
        return _local_status(args)
    backend = get_backend(spec, token=_token(args), ca_cert=args.ca_cert)
    status = getattr(backend, "status", None)
    if status is None:
        raise UsageError(f"backend {spec} has no server status")
    data = status()
    _out(f"ttenv server {spec}: version {data['version']}, engine {data['engine']}, VM ports on {data['public_addr']}")
    _out(f"  {'':<9} {'TOTAL':>9} {'USED':>9} {'FREE':>9}")
    for key, label in (("cpu", "CPU"), ("mem_mib", "MEM MiB"), ("disk_mib", "DISK MiB")):
        _out(f"  {label:<9} {data['totals'][key]:>9} {data['used'][key]:>9} {data['free'][key]:>9}")
    _out(f"  {data['envs']} ENV(s) of {data['owners']} owner(s), {data['vms']} VM(s), {data['vms_running']} running")
    return 0


def _local_status(args: argparse.Namespace) -> int:
    backend = _backend(args, progress=False)
    envs = backend.list_envs()
    vms = [vm for env in envs for vm in env.vms]
    live = [vm for vm in vms if vm.state in ("booting", "running")]
    host_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    disk = sum(f.stat().st_size for f in backend.state.glob("envs/*/*/overlay.qcow2") if f.exists()) // 2**20
    states = ", ".join(f"{sum(vm.state == s for vm in vms)} {s}" for s in ("running", "booting", "failed", "stopped")
                       if any(vm.state == s for vm in vms))  # fmt: skip
    _out(f"local backend ({backend.state}): {len(envs)} ENV(s), {len(vms)} VM(s)" + (f" ({states})" if vms else ""))
    _out(f"  CPU  {sum(vm.resources.cpu for vm in live)} vCPU(s) of live VMs on {os.cpu_count()} host CPU(s)")
    _out(f"  MEM  {sum(vm.resources.mem_mib for vm in live)} MiB of live VMs of {host_mem} MiB host memory")
    _out(f"  DISK {disk} MiB in overlays")
    return 0


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--image-dir", help="image store (default: $TTENV_IMAGE_DIR or ~/.cache/ttenv/images)")
    common.add_argument("--state-dir", help="local state (default: $TTENV_STATE_DIR or ~/.local/state/ttenv)")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--backend", help="local, or a ttenv server URL http(s)://host:port "
                        "(default: $TTENV_BACKEND or local)")  # fmt: skip
    remote.add_argument("--token", help="deprecated (the process list shows it): use $TTENV_TOKEN or --token-file")
    remote.add_argument("--token-file", metavar="FILE", help="file whose first line is the server's bearer token "
                        "(default: $TTENV_TOKEN, else $TTENV_TOKEN_FILE)")  # fmt: skip
    remote.add_argument("--ca-cert", metavar="FILE", help="CA certificates (PEM) to verify an https server with "
                        "(default: $TTENV_CA_CERT, else the system's)")  # fmt: skip
    parser = argparse.ArgumentParser(prog="ttenv", description="Real VMs across an OS x arch matrix.")
    parser.add_argument("--version", action="version", version=f"ttenv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("doctor", parents=[common], help="what this host has and lacks")
    p.add_argument("--no-probe", action="store_true", help="do not boot a probe guest to test KVM")
    p.set_defaults(func=cmd_doctor)

    image = sub.add_parser("image", help="list, pull, import, build or remove images").add_subparsers(
        dest="image_command", required=True, metavar="ACTION")  # fmt: skip
    p = image.add_parser("list", parents=[common], help="images in the store (--available: what can be pulled)")
    p.add_argument("--available", action="store_true", help="the catalog's images, for this host's arch and others")
    p.set_defaults(func=cmd_image_list)
    p = image.add_parser("pull", parents=[common], help="download a vendor cloud image from the catalog")
    p.add_argument("names", nargs="+", metavar="NAME", help="ubuntu-24.04 (with --arch) or ubuntu-24.04-aarch64")
    p.add_argument("--arch", help="x86_64, aarch64, riscv64 (default: the name's, else this host's)")
    p.add_argument("--timeout", type=_duration("--timeout"), default=30.0,
                   help="how long to wait for a connection or data: seconds, or 90s, 2m (default 30)")  # fmt: skip
    p.set_defaults(func=cmd_image_pull)
    p = image.add_parser("import", parents=[common], help="add your own qcow2 or raw disk as an image")
    p.add_argument("file", help="the disk: qcow2 or raw (or vmdk, vdi, vhdx, vpc)")
    p.add_argument("--name", required=True, help="canonical <os>-<version>-<arch>, e.g. myos-1.0-x86_64")
    p.add_argument("--user", default="root", help="login user, created by cloud-init (default root)")
    p.add_argument("--boot", default="bios", choices=("bios", "uefi", "direct"), help="how it boots (default bios)")
    p.add_argument("--kernel", help="kernel for --boot direct")
    p.add_argument("--initrd", help="initrd for --boot direct")
    p.add_argument("--cmdline", help="kernel command line for --boot direct")
    p.add_argument("--force", action="store_true", help="replace an image of that name")
    p.set_defaults(func=cmd_image_import)
    p = image.add_parser("build", parents=[common], help="build a Debian image with mmdebstrap")
    p.add_argument("target", help="debian-11, debian-12 or debian-13")
    p.add_argument("--arch", default=platform.machine(), help="x86_64 (default: this host's), aarch64, riscv64")
    p.add_argument("--mirror", help="Debian mirror URL (default: the one this host's apt uses)")
    p.add_argument("--disk", type=_size("--disk"), default="3G", help="root file system size: MiB, or 2G (default 3G)")
    p.add_argument("-v", "--verbose", action="store_true", help="show every line of the bootstrap")
    p.add_argument("--plain", action="store_true", help="untuned reference image (Debian defaults), for benchmarks")
    p.add_argument("--variant", choices=("tuned", "plain", "cloud"),
                   help="cloud: vendor-style (GRUB, cloud-init), named debiancloud-<version>-<arch>")  # fmt: skip
    p.set_defaults(func=cmd_image_build)
    p = image.add_parser("rm", parents=[common], help="remove images")
    p.add_argument("names", nargs="+")
    p.set_defaults(func=cmd_image_rm)

    env = sub.add_parser("env", help="create, inspect, use and delete ENVs").add_subparsers(
        dest="env_command", required=True, metavar="ACTION")  # fmt: skip
    p = env.add_parser("add", parents=[common, remote], help="create an ENV: one VM per image matching the prefixes")
    p.add_argument("name")
    p.add_argument("--os-prefix", action="append", required=True, help="e.g. debian12,debian11 (TTStack prefixes)")
    p.add_argument("--arch", action="append", help="restrict to arches, e.g. x86_64,aarch64")
    p.add_argument("--cpu", type=int, default=2, help="vCPUs per VM (default 2)")
    p.add_argument("--mem", type=_size("--mem"), default="512", help="memory per VM: MiB, or 1G (default 512)")
    p.add_argument("--disk", type=_size("--disk"), help="overlay disk size per VM: MiB, or 10G (default: the image's)")
    p.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    p.add_argument("--boot", default="warm", choices=("warm", "cold"),
                   help="warm (default): start from a saved post-boot state of the image; cold: boot")  # fmt: skip
    p.add_argument("--boot-timeout", type=_duration("--boot-timeout"),
                   help="how long to wait for SSH: seconds, or 90s, 5m (default: scaled by accel/arch)")  # fmt: skip
    p.add_argument("--ttl", type=_duration("--ttl"),
                   help="lease: seconds, or 90s, 30m, 2h, 1d (default: none); ttenv gc reaps expired ENVs")  # fmt: skip
    _engine_options(p, "the ENV's")
    p.set_defaults(func=cmd_env_add)
    p = env.add_parser("list", parents=[common, remote], help="all ENVs")
    p.set_defaults(func=cmd_env_list)
    p = env.add_parser("show", parents=[common, remote], help="one ENV: VMs, state, ports, resources, console")
    p.add_argument("name")
    p.set_defaults(func=cmd_env_show)
    p = env.add_parser("run", parents=[common, remote], help="run a command (or reboot) on every VM concurrently")
    p.add_argument("name")
    p.add_argument("vms", nargs="*", metavar="VM", help="only these VMs (default: all)")
    p.add_argument("--cmd", help="the command, run by /bin/sh")
    p.add_argument("--reboot", action="store_true", help="reboot first and wait for SSH in the new boot")
    p.add_argument("--vm", action="append", help="only these VMs (as the VM arguments)")
    p.add_argument("--timeout", type=_duration("--timeout"), default=600.0,
                   help="how long the command may take: seconds, or 90s, 30m, 2h (default 600)")  # fmt: skip
    p.add_argument("--boot-timeout", type=_duration("--boot-timeout"),
                   help="how long a reboot may take: seconds, or 90s, 5m (default: scaled by accel/arch)")  # fmt: skip
    p.set_defaults(func=cmd_env_run)
    p = env.add_parser("console", parents=[common, remote], help="the tail of a VM's serial console")
    p.add_argument("name")
    p.add_argument("vm")
    p.add_argument("--lines", type=int, default=50)
    p.set_defaults(func=cmd_env_console)
    p = env.add_parser("renew", parents=[common, remote], help="extend an ENV's lease (e.g. one kept by --tt-keep)")
    p.add_argument("name")
    p.add_argument("--ttl", type=_duration("--ttl"), required=True,
                   help="the new lease from now: seconds, or 90s, 30m, 2h, 1d")  # fmt: skip
    p.set_defaults(func=cmd_env_renew)
    p = env.add_parser("del", parents=[common, remote], help="delete ENVs: VMs stopped, everything released")
    p.add_argument("names", nargs="+")
    p.set_defaults(func=cmd_env_del)

    p = sub.add_parser("gc", parents=[common], help="reap ENVs whose owner died or whose lease expired")
    p.add_argument("--libvirt-uri", action="append", metavar="URI", default=None,
                   help="also sweep these libvirt hosts for strays of this state dir (hosts that missed a delete "
                   "are swept anyway)")  # fmt: skip
    p.set_defaults(func=cmd_gc, libvirt_uri_env=[])

    p = sub.add_parser("serve", parents=[common], help="run the host server: this host's VMs behind a REST API")
    p.add_argument(
        "--listen",
        default="127.0.0.1:8730",
        metavar="HOST:PORT",
        help="where the API listens; VM ports are forwarded on HOST too (default 127.0.0.1:8730)",
    )
    p.add_argument(
        "--public-addr",
        metavar="ADDR",
        help="address clients reach VM ports on (default: the "
        "listen host, or this host's name when listening on all addresses)",
    )
    p.add_argument("--cpu-total", type=int, metavar="N", help="vCPUs all ENVs may hold (default: host CPUs)")
    p.add_argument("--mem-total", type=_size("--mem-total"), metavar="SIZE",
                   help="memory all ENVs may hold: MiB, or 32G (default: 80%% of RAM)")  # fmt: skip
    p.add_argument(
        "--disk-total",
        type=_size("--disk-total"),
        metavar="SIZE",
        help="overlay disk all ENVs may hold: MiB, or 200G (default: 80%% of the free disk of the state dir)",
    )
    _engine_options(p, "the server's")
    p.add_argument(
        "--default-lease",
        type=_duration("--default-lease"),
        default=600.0,
        metavar="DURATION",
        help="lease of an ENV created without one: seconds, or 90s, 30m, 2h, 1d (default 600 s)",
    )
    p.add_argument(
        "--max-lease",
        type=_duration("--max-lease"),
        default=7 * 24 * 3600.0,
        metavar="DURATION",
        help="longest lease granted: seconds, or 12h, 7d (default 7 days)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="info logs every request (default); warning only problems",
    )
    p.add_argument("--dead-grace", type=_duration("--dead-grace"), default=300.0, metavar="DURATION",
                   help="a VM dead this long stops counting against the quota (default 300 s)")  # fmt: skip
    p.add_argument("--max-connections", type=int, metavar="N",
                   help="open connections at once (default: from the descriptor limit, at most 4096)")  # fmt: skip
    p.add_argument("--header-timeout", type=_duration("--header-timeout"), default=10.0, metavar="DURATION",
                   help="time a connection has to send a request head (default 10 s)")  # fmt: skip
    p.add_argument("--max-requests-per-owner", type=int, default=64, metavar="N",
                   help="requests of one owner in flight at once; more are 429 (default 64)")  # fmt: skip
    p.add_argument("--max-polls-per-owner", type=int, default=32, metavar="N",
                   help="long polls (VM waits) of one owner at once; more are 429 (default 32)")  # fmt: skip
    p.add_argument("--tls-cert", metavar="FILE", help="serve https: the certificate (PEM, with its chain)")
    p.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    p.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="bearer tokens of the host server (in its --state-dir)").add_subparsers(
        dest="token_command", required=True, metavar="ACTION"
    )
    p = token.add_parser("add", parents=[common], help="create a token for owner NAME; prints it once")
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="GET /v1/status shows this token the whole server")
    p.add_argument("--max-cpu", type=int, metavar="N", help="vCPUs NAME's ENVs may hold at once (default: no cap)")
    p.add_argument("--max-mem", type=_size("--max-mem"), metavar="SIZE",
                   help="memory NAME's ENVs may hold at once: MiB, or 8G (default: no cap)")  # fmt: skip
    p.add_argument("--max-vms", type=int, metavar="N", help="VMs NAME's ENVs may hold at once (default: no cap)")
    p.set_defaults(func=cmd_token_add)
    p = token.add_parser("list", parents=[common], help="token names and when they were created")
    p.set_defaults(func=cmd_token_list)
    p = token.add_parser("rm", parents=[common], help="revoke NAME's token")
    p.add_argument("name")
    p.set_defaults(func=cmd_token_rm)

    p = sub.add_parser("status", parents=[common, remote], help="resources held by this host's ENVs, or a "
                       "server's totals/used/free (--backend URL)")  # fmt: skip
    p.add_argument("--server", action="store_true", help="the server's status (needs --backend URL or $TTENV_BACKEND)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", help="merge JUnit files into the tests x VMs matrix: Markdown, HTML, JSON")
    from pytest_ttenv.report.command import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TTError as exc:
        print(f"ttenv: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ttenv: interrupted; what this command created was removed", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ttenv ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
