"""``ttenv gc``: reap this host's ENVs whose owner died or whose lease expired, stale image
builds and the session dirs of killed pytest sessions."""

from __future__ import annotations

import argparse

from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.cli.options import local_options, uris
from pytest_ttenv.cli.output import out


def add_arguments(p: argparse.ArgumentParser) -> None:
    local_options(p)
    p.add_argument(
        "--libvirt-uri",
        action="append",
        metavar="URI",
        default=None,
        help="also sweep these libvirt hosts for strays of this state dir (hosts that missed a delete "
        "are swept anyway)",
    )
    p.set_defaults(libvirt_uri_env=[])


def run(args: argparse.Namespace) -> int:
    from pytest_ttenv.session import reap_session_dirs

    hosts = uris(args)
    backend = LocalBackend(
        args.image_dir, args.state_dir, progress=out, engine="libvirt" if hosts else "qemu", libvirt_uris=hosts
    )
    reaped = backend.gc()
    stale = backend.image_store.remove_stale_builds()
    sessions = reap_session_dirs(backend)
    out(
        f"reaped {len(reaped)} ENV(s) whose owner is gone or lease expired; removed {len(stale)} stale "
        f"build(s) and {sessions} stale pytest session dir(s)"
    )
    return 0
