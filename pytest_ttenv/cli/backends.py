"""The backends ``ttenv`` commands act on, as their options name them."""

from __future__ import annotations

import argparse
import os
import sys

from pytest_ttenv.backend import Backend, get_backend
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.cli.options import uris
from pytest_ttenv.cli.output import out
from pytest_ttenv.errors import UsageError


def local_backend(args: argparse.Namespace, progress: bool = True) -> LocalBackend:
    """This host's backend in ``--image-dir``/``--state-dir``; ``progress`` lines go to stdout."""
    return LocalBackend(args.image_dir, args.state_dir, progress=out if progress else None)


def env_backend(args: argparse.Namespace, progress: bool = True) -> Backend:
    """The backend of the env commands: ``--backend`` (local or a server URL, default
    ``$TTENV_BACKEND`` or local) with ``--token`` (default ``$TTENV_TOKEN``); ``env add`` also takes
    ``--engine``/``--libvirt-uri`` (local backend only: a server's engine is its own)."""
    spec = backend_spec(args)
    engine, hosts = getattr(args, "engine", "qemu"), uris(args) if hasattr(args, "libvirt_uri") else []
    if spec != "local" and (engine != "qemu" or hosts):
        raise UsageError(
            "--engine and --libvirt-uri apply to the local backend",
            "a server runs the engine it was started with: ttenv serve --engine libvirt",
        )
    return get_backend(
        spec,
        image_dir=args.image_dir,
        state_dir=args.state_dir,
        progress=out if progress else None,
        token=token(args) if spec != "local" else None,
        engine=engine,
        libvirt_uris=hosts,
        ca_cert=args.ca_cert,
    )


def backend_spec(args: argparse.Namespace) -> str:
    """``--backend``, else ``$TTENV_BACKEND``, else ``local``."""
    return str(args.backend or os.environ.get("TTENV_BACKEND") or "local")


def token(args: argparse.Namespace) -> str | None:
    """The server token: ``--token`` (deprecated: the process list shows it), ``--token-file``,
    else None (the backend takes ``$TTENV_TOKEN``, else ``$TTENV_TOKEN_FILE``'s)."""
    from pytest_ttenv.config import read_token_file

    if args.token:
        print(
            "ttenv: warning: --token puts the token in the process list; use TTENV_TOKEN or --token-file",
            file=sys.stderr,
        )
        return str(args.token)
    path, where = args.token_file, "--token-file"
    if not path and not os.environ.get("TTENV_TOKEN"):
        path, where = os.environ.get("TTENV_TOKEN_FILE"), "TTENV_TOKEN_FILE"
    if not path:
        return None
    found, warning = read_token_file(path, where)
    if warning:
        print(f"ttenv: warning: {warning}", file=sys.stderr)
    return found
