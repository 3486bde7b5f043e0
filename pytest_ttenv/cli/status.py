"""``ttenv status``: what this host's ENVs hold, or a server's totals, used and free (``--backend URL``)."""

from __future__ import annotations

import argparse
import os

from pytest_ttenv.backend import get_backend
from pytest_ttenv.cli.backends import backend_spec, local_backend, token
from pytest_ttenv.cli.options import local_options, remote_options
from pytest_ttenv.cli.output import out
from pytest_ttenv.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    local_options(p)
    remote_options(p)
    p.add_argument("--server", action="store_true", help="the server's status (needs --backend URL or $TTENV_BACKEND)")


def run(args: argparse.Namespace) -> int:
    spec = backend_spec(args)
    if spec == "local":
        if args.server:
            raise UsageError(
                "status --server needs the server's URL", "give --backend http://host:8730 or set TTENV_BACKEND"
            )
        return _local(args)
    backend = get_backend(spec, token=token(args), ca_cert=args.ca_cert)
    status = getattr(backend, "status", None)
    if status is None:
        raise UsageError(f"backend {spec} has no server status")
    data = status()
    out(f"ttenv server {spec}: version {data['version']}, engine {data['engine']}, VM ports on {data['public_addr']}")
    out(f"  {'':<9} {'TOTAL':>9} {'USED':>9} {'FREE':>9}")
    for key, label in (("cpu", "CPU"), ("mem_mib", "MEM MiB"), ("disk_mib", "DISK MiB")):
        out(f"  {label:<9} {data['totals'][key]:>9} {data['used'][key]:>9} {data['free'][key]:>9}")
    out(f"  {data['envs']} ENV(s) of {data['owners']} owner(s), {data['vms']} VM(s), {data['vms_running']} running")
    return 0


def _local(args: argparse.Namespace) -> int:
    backend = local_backend(args, progress=False)
    envs = backend.list_envs()
    vms = [vm for env in envs for vm in env.vms]
    live = [vm for vm in vms if vm.state in ("booting", "running")]
    host_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    disk = sum(f.stat().st_size for f in backend.state.glob("envs/*/*/overlay.qcow2") if f.exists()) // 2**20
    states = ", ".join(
        f"{sum(vm.state == s for vm in vms)} {s}"
        for s in ("running", "booting", "failed", "stopped")
        if any(vm.state == s for vm in vms)
    )
    out(f"local backend ({backend.state}): {len(envs)} ENV(s), {len(vms)} VM(s)" + (f" ({states})" if vms else ""))
    out(f"  CPU  {sum(vm.resources.cpu for vm in live)} vCPU(s) of live VMs on {os.cpu_count()} host CPU(s)")
    out(f"  MEM  {sum(vm.resources.mem_mib for vm in live)} MiB of live VMs of {host_mem} MiB host memory")
    out(f"  DISK {disk} MiB in overlays")
    return 0
