"""``ttenv replay FILE``: a captured VM (``--tt-capture``) brought back running, as an ENV.

The capture is verified whole before anything starts; its image is this host's (found by the
digest of its disk) or the one inside the file. The VM resumes where it was saved - its processes,
files and /tmp - with a new host key, login key and port, and its clock set to now; from then on
it is an ordinary ENV (``ttenv env show/run/console/del``). Its login key stays in
``<state>/keys`` until ``ttenv env del``.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from pytest_ttenv.backend.engines.console import clean_text
from pytest_ttenv.cli.backends import env_backend
from pytest_ttenv.cli.env import print_env
from pytest_ttenv.cli.options import boot_timeout_option, local_options, remote_options, ttl_option
from pytest_ttenv.cli.output import out
from pytest_ttenv.core.capture_format import read_manifest
from pytest_ttenv.core.model import EnvSpec, Resources, VmSpec
from pytest_ttenv.core.naming import check_env_name
from pytest_ttenv.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a capture (.ttcap) made by --tt-capture")
    parser.add_argument("--name", help="the ENV's name (default: replay-<random>)")
    parser.add_argument(
        "--accel",
        default="auto",
        choices=("auto", "kvm", "tcg"),
        help="auto (default): the capture's (a KVM capture where this host has none: TCG is tried)",
    )
    ttl_option(parser)
    boot_timeout_option(parser, "how long the VM may take to resume")
    local_options(parser)
    remote_options(parser)


def run(args: argparse.Namespace) -> int:
    """Replay the capture and print the ENV with its login line; if qemu cannot load it here, one
    line saying why (and what differs from the host it was made on), nothing left, exit 1."""
    from pytest_ttenv import envflow
    from pytest_ttenv.access import ClientKeys

    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"no capture file {args.file}", "give the path of a .ttcap file")
    name = args.name or f"replay-{secrets.token_hex(3)}"
    check_env_name(name)
    manifest = read_manifest(path)  # the VM's name and size; the backend verifies the whole file
    vm = manifest.vm
    restore = VmSpec(vm.name, vm.image.name, Resources(vm.cpus, vm.mem_mib), restore=str(path.resolve()))
    # a capture made under TCG loads under TCG anywhere; one made under KVM wants KVM (else TCG is tried)
    accel = "tcg" if args.accel == "auto" and vm.accelerator == "tcg" else args.accel
    spec = EnvSpec(name=name, vms=(restore,), client_pubkey="", accel=accel, ttl=args.ttl, boot="warm")
    backend = env_backend(args)
    test = clean_text(manifest.test.nodeid)[:300]  # from the file: safe to print
    out(f"replaying {path.name}: VM {vm.name} ({vm.image.name}) of test {test}")

    def ready(vm_name: str, up: float, first: float) -> None:
        out(f"{vm_name}: resumed after {up:.1f} s, first command after {first:.1f} s")

    with envflow.created(backend, spec, f"ttenv-client-{name}", ClientKeys(args.state_dir)) as new:
        failures = new.wait_all(args.boot_timeout, ready)
    if failures:
        new.discard()
        print(f"ttenv: error: {failures[0].splitlines()[0]}", file=sys.stderr)
        return 1
    print_env(backend.show_env(new.env.id), args.state_dir)
    return 0
