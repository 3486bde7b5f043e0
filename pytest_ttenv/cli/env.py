"""``ttenv env add|list|show|run|console|renew|del``: ENVs on the local backend or a server.

``env add`` goes through ``envflow`` (create -> wait -> clean up), as the pytest session does;
the ENV's private key stays in ``<state>/keys`` (``access.ClientKeys``) until ``env del``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pytest_ttenv.cli.backends import env_backend
from pytest_ttenv.cli.options import (
    boot_timeout_option,
    duration,
    engine_options,
    local_options,
    remote_options,
    size,
    ttl_option,
)
from pytest_ttenv.cli.output import out, when
from pytest_ttenv.core.model import EnvInfo, EnvSpec, Resources, VmInfo, VmSpec
from pytest_ttenv.core.naming import ARCHES, canonical_arch, check_env_name, parse_mib, split_prefixes
from pytest_ttenv.errors import TTError, UsageError

if TYPE_CHECKING:
    from pytest_ttenv.ssh import Connection


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="env_command", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help)
        local_options(p)
        remote_options(p)
        return p

    p = action("add", "create an ENV: one VM per image matching the prefixes")
    p.add_argument("name")
    p.add_argument("--os-prefix", action="append", required=True, help="e.g. debian12,debian11 (TTStack prefixes)")
    p.add_argument("--arch", action="append", help=f"restrict to arches, comma-separated: {', '.join(ARCHES)}")
    p.add_argument("--cpu", type=int, default=2, help="vCPUs per VM (default 2)")
    p.add_argument("--mem", type=size("--mem"), default="512", help="memory per VM: MiB, or 1G (default 512)")
    p.add_argument("--disk", type=size("--disk"), help="overlay disk size per VM: MiB, or 10G (default: the image's)")
    p.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    p.add_argument(
        "--boot",
        default="warm",
        choices=("warm", "cold"),
        help="warm (default): start from a saved post-boot state of the image; cold: boot",
    )
    boot_timeout_option(p, "how long to wait for SSH")
    ttl_option(p)
    engine_options(p, "the ENV's")
    action("list", "all ENVs")
    p = action("show", "one ENV: VMs, state, ports, resources, console")
    p.add_argument("name")
    p = action("run", "run a command (or reboot) on every VM concurrently")
    p.add_argument("name")
    p.add_argument("vms", nargs="*", metavar="VM", help="only these VMs (default: all)")
    p.add_argument("--cmd", help="the command, run by /bin/sh")
    p.add_argument("--reboot", action="store_true", help="reboot first and wait for SSH in the new boot")
    p.add_argument("--vm", action="append", help="only these VMs (as the VM arguments)")
    p.add_argument(
        "--timeout",
        type=duration("--timeout"),
        default=600.0,
        help="how long the command may take: seconds, or 90s, 30m, 2h (default 600)",
    )
    boot_timeout_option(p, "how long a reboot may take")
    p = action("console", "the tail of a VM's serial console")
    p.add_argument("name")
    p.add_argument("vm")
    p.add_argument("--lines", type=int, default=50)
    p = action("renew", "extend an ENV's lease (e.g. one kept by --tt-keep)")
    p.add_argument("name")
    p.add_argument(
        "--ttl", type=duration("--ttl"), required=True, help="the new lease from now: seconds, or 90s, 30m, 2h, 1d"
    )
    p = action("del", "delete ENVs: VMs stopped, everything released")
    p.add_argument("names", nargs="+")


def run(args: argparse.Namespace) -> int:
    action: Callable[[argparse.Namespace], int] = ACTIONS[args.env_command]
    return action(args)


def cmd_add(args: argparse.Namespace) -> int:
    """Create the ENV and wait until every VM runs a first command; if any VM fails, one error
    line each, the ENV is deleted and the exit is 1."""
    from pytest_ttenv import envflow
    from pytest_ttenv.access import ClientKeys

    backend = env_backend(args)
    check_env_name(args.name)
    prefixes = split_prefixes(args.os_prefix)
    if not prefixes:
        raise UsageError("--os-prefix is empty", "give e.g. --os-prefix=debian12,debian11")
    arches = [canonical_arch(a) for a in split_prefixes(args.arch or [])]
    mem = parse_mib(args.mem, "memory")
    res = Resources(cpu=args.cpu, mem_mib=mem, disk_mib=parse_mib(args.disk, "disk") if args.disk else 0)
    names = backend.resolve(prefixes, arches)
    vms = tuple(VmSpec(n, n, res) for n in names)
    spec = EnvSpec(name=args.name, vms=vms, client_pubkey="", accel=args.accel, ttl=args.ttl, boot=args.boot)

    def ready(vm: str, up: float, first: float) -> None:
        out(f"{vm}: ready - ssh up after {up:.1f} s, first command after {first:.1f} s")

    with envflow.created(backend, spec, f"ttenv-client-{args.name}", ClientKeys(args.state_dir)) as new:
        failures = new.wait_all(args.boot_timeout, ready)
    if failures:
        for failure in failures:
            print(f"ttenv: error: {failure}", file=sys.stderr)
        new.discard()
        print(f"ttenv: ENV {args.name} removed after {len(failures)} VM(s) failed to boot", file=sys.stderr)
        return 1
    print_env(backend.show_env(new.env.id), args.state_dir)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    envs = env_backend(args, progress=False).list_envs()
    if not envs:
        out("no ENVs")
        return 0
    out(f"{'NAME':<20} {'ID':<13} {'STATE':<8} {'VMS':>3}  {'OWNER':<10} CREATED")
    for env in envs:
        out(f"{env.name:<20} {env.id:<13} {env.state:<8} {len(env.vms):>3}  {env.owner:<10} {when(env.created)}")
    return 0


def print_env(env: EnvInfo, state_dir: str | None) -> None:
    """The ENV, one line per VM, and how to log into its first VM."""
    from pytest_ttenv.access import ClientKeys, login_command, write_known_hosts

    expires = when(env.expires) if env.expires else "never"
    out(f"ENV {env.name} (id {env.id}, owner {env.owner}, state {env.state}, expires {expires})")
    out(f"  {'VM':<22} {'STATE':<8} {'ACCEL':<5} {'BOOT':<4} {'CPU':>3} {'MEM':>6} {'SSH':<16} CONSOLE")
    for vm in env.vms:
        console = vm.console or "(ttenv env console)"
        out(
            f"  {vm.name:<22} {vm.state:<8} {vm.accel:<5} {vm.boot or '-':<4} {vm.resources.cpu:>3} "
            f"{vm.resources.mem_mib:>4}Mi {vm.address}:{vm.port:<6} {console}"
        )
    if env.vms:
        key = ClientKeys(state_dir).path(env)
        out(f"  login: {login_command(env.vms[0], key, write_known_hosts(env, key))}")


def cmd_show(args: argparse.Namespace) -> int:
    print_env(env_backend(args, progress=False).show_env(args.name), args.state_dir)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Reboot (``--reboot``) and/or run ``--cmd`` on the chosen VMs at once; each VM's exit and
    output in name order; exit 1 when any VM failed."""
    from pytest_ttenv.access import ClientKeys, target
    from pytest_ttenv.ssh import Connection, SshError, fan_out

    if args.cmd is None and not args.reboot:
        raise UsageError("env run needs --cmd, --reboot or both", "e.g. ttenv env run NAME --cmd 'uname -a'")
    env = env_backend(args, progress=False).show_env(args.name)
    wanted = [*(args.vm or []), *args.vms]
    vms = [vm for vm in env.vms if not wanted or vm.name in wanted]
    unknown = [name for name in wanted if name not in {vm.name for vm in env.vms}]
    if unknown or not vms:
        raise UsageError(
            f"no VM named {', '.join(unknown or wanted)} in ENV {env.name}",
            f"VMs: {', '.join(v.name for v in env.vms)}",
        )
    down = [vm.name for vm in vms if vm.state != "running"]
    if down:
        raise TTError(f"VM(s) not running in ENV {env.name}: {', '.join(down)}", f"ttenv env show {env.name}")
    key = ClientKeys(args.state_dir).path(env)
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
            out(f"== {name}: error: {res}")
            continue
        failed += not res.ok
        out(f"== {name}: exit {res.exit_status} ({res.duration * 1000:.0f} ms)")
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
    from pytest_ttenv.envflow import at_once
    from pytest_ttenv.ssh import SshError

    def reboot(pair: tuple[Connection, VmInfo]) -> str:
        conn, vm = pair
        started = time.monotonic()
        conn.reboot(timeout or boot_timeout(vm.accel or "tcg", vm.arch, len(vms)))
        return f"== {vm.name}: rebooted, ssh up after {time.monotonic() - started:.1f} s"

    futures = at_once(reboot, zip(conns, vms, strict=True))
    up = []
    for fut, conn, vm in zip(futures, conns, vms, strict=True):
        try:
            out(fut.result())
            up.append(conn)
        except SshError as exc:
            out(f"== {vm.name}: error: reboot failed: {exc}")
    return up


def cmd_console(args: argparse.Namespace) -> int:
    from pytest_ttenv.backend.engines.console import clean_text

    # the guest writes its console: control characters never reach the terminal (also from a server)
    out(clean_text(env_backend(args, progress=False).console(args.name, args.vm, args.lines)))
    return 0


def cmd_renew(args: argparse.Namespace) -> int:
    env = env_backend(args, progress=False).renew(args.name, args.ttl)
    until = when(env.expires) if env.expires else "never"
    out(f"renewed ENV {env.name}: expires {until}")
    return 0


def cmd_del(args: argparse.Namespace) -> int:
    """Delete each ENV and forget its client key (``envflow.discard``)."""
    from pytest_ttenv.access import ClientKeys
    from pytest_ttenv.envflow import discard

    backend = env_backend(args, progress=False)
    for name in args.names:
        env = discard(backend, name, ClientKeys(args.state_dir))
        out(f"deleted ENV {env.name}: {len(env.vms)} VM(s) stopped, overlays, seeds and ports released")
    return 0


ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "add": cmd_add,
    "list": cmd_list,
    "show": cmd_show,
    "run": cmd_run,
    "console": cmd_console,
    "renew": cmd_renew,
    "del": cmd_del,
}
