"""Options several ``ttenv`` commands share, and the argparse types of sizes and durations.

A bad value of a size or duration option is the usual one line ``ttenv: error: ...`` with exit
2, without argparse's usage text.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from pytest_ttenv.core.naming import parse_mib, parse_seconds
from pytest_ttenv.errors import UsageError

_T = TypeVar("_T")


def local_options(p: argparse.ArgumentParser) -> None:
    """``--image-dir`` and ``--state-dir``: where this host keeps images and state."""
    p.add_argument("--image-dir", help="image store (default: $TTENV_IMAGE_DIR or ~/.cache/ttenv/images)")
    p.add_argument("--state-dir", help="local state (default: $TTENV_STATE_DIR or ~/.local/state/ttenv)")


def remote_options(p: argparse.ArgumentParser) -> None:
    """``--backend`` (local or a server URL) and how to reach a server: token, CA certificates."""
    p.add_argument(
        "--backend", help="local, or a ttenv server URL http(s)://host:port (default: $TTENV_BACKEND or local)"
    )
    p.add_argument("--token", help="deprecated (the process list shows it): use $TTENV_TOKEN or --token-file")
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="file whose first line is the server's bearer token (default: $TTENV_TOKEN, else $TTENV_TOKEN_FILE)",
    )
    p.add_argument(
        "--ca-cert",
        metavar="FILE",
        help="CA certificates (PEM) to verify an https server with (default: $TTENV_CA_CERT, else the system's)",
    )


def engine_options(p: argparse.ArgumentParser, what: str) -> None:
    """``--engine`` and ``--libvirt-uri`` (repeatable; defaults ``$TTENV_ENGINE``, ``$TTENV_LIBVIRT_URI``)."""
    p.add_argument(
        "--engine",
        choices=("qemu", "libvirt"),
        default=os.environ.get("TTENV_ENGINE") or "qemu",
        help=f"how {what} VMs run: qemu processes (default) or libvirt domains on --libvirt-uri hosts",
    )
    env_uris = [u for u in os.environ.get("TTENV_LIBVIRT_URI", "").replace(",", " ").split() if u]
    p.add_argument(
        "--libvirt-uri",
        action="append",
        metavar="URI",
        default=None,
        help="a libvirt host, repeatable: qemu:///system (default), qemu+ssh://root@hostB/system, "
        "each optionally URI#cpu=N&mem=SIZE&addr=ADDRESS to override its capacity and VM address"
        + (f" (default from TTENV_LIBVIRT_URI: {' '.join(env_uris)})" if env_uris else ""),
    )
    p.set_defaults(libvirt_uri_env=env_uris)


def ttl_option(p: argparse.ArgumentParser) -> None:
    """``--ttl``: the lease of an ENV made by the command (default: none)."""
    p.add_argument(
        "--ttl",
        type=duration("--ttl"),
        help="lease: seconds, or 90s, 30m, 2h, 1d (default: none); ttenv gc reaps expired ENVs",
    )


def boot_timeout_option(p: argparse.ArgumentParser, how_long: str) -> None:
    """``--boot-timeout``, its help starting with ``how_long`` (e.g. "how long to wait for SSH")."""
    p.add_argument(
        "--boot-timeout",
        type=duration("--boot-timeout"),
        help=f"{how_long}: seconds, or 90s, 5m (default: scaled by accel/arch)",
    )


def uris(args: argparse.Namespace) -> list[str]:
    """The libvirt hosts asked for: ``--libvirt-uri``, else ``$TTENV_LIBVIRT_URI``'s."""
    found: list[str] = args.libvirt_uri or args.libvirt_uri_env
    return found


def _value_type(parse: Callable[[str, str], _T], flag: str) -> Callable[[str], _T]:
    """An argparse ``type=`` parsing ``flag``'s value with ``parse`` (the one parser of its kind)."""

    def convert(text: str) -> _T:
        try:
            return parse(text, flag)
        except UsageError as exc:
            print(f"ttenv: error: {exc}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None

    return convert


def duration(flag: str) -> Callable[[str], float]:
    """argparse type of a duration option: seconds, or 90s, 30m, 2h, 1d (``parse_seconds``)."""
    return _value_type(parse_seconds, flag)


def size(flag: str) -> Callable[[str], int]:
    """argparse type of a size option: MiB, or 512M, 2G, 2GiB, 1T (``parse_mib``)."""
    return _value_type(parse_mib, flag)
