"""``ttenv doctor``: what this host has and lacks for the local backend (checks: ``pytest_ttenv.doctor``)."""

from __future__ import annotations

import argparse

from pytest_ttenv.cli.backends import local_backend
from pytest_ttenv.cli.options import local_options
from pytest_ttenv.cli.output import out


def add_arguments(p: argparse.ArgumentParser) -> None:
    local_options(p)
    p.add_argument("--no-probe", action="store_true", help="do not boot a probe guest to test KVM")


def run(args: argparse.Namespace) -> int:
    """One line per check, then the verdict; exit 1 when a required check failed."""
    from pytest_ttenv.doctor import run_checks, usable

    checks = run_checks(local_backend(args).image_store, probe=not args.no_probe)
    for check in checks:
        out(check.line())
    ok = usable(checks)
    out("local backend: ready" if ok else "local backend: NOT usable - install what is marked MISS")
    return 0 if ok else 1
