"""``ttenv token add|list|rm``: the host server's bearer tokens, in its ``--state-dir``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from pytest_ttenv.cli.options import local_options, size
from pytest_ttenv.cli.output import out, when

if TYPE_CHECKING:
    from pytest_ttenv.server.auth import TokenStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    p = actions.add_parser("add", help="create a token for owner NAME; prints it once")
    local_options(p)
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="GET /v1/status shows this token the whole server")
    p.add_argument("--max-cpu", type=int, metavar="N", help="vCPUs NAME's ENVs may hold at once (default: no cap)")
    p.add_argument(
        "--max-mem",
        type=size("--max-mem"),
        metavar="SIZE",
        help="memory NAME's ENVs may hold at once: MiB, or 8G (default: no cap)",
    )
    p.add_argument("--max-vms", type=int, metavar="N", help="VMs NAME's ENVs may hold at once (default: no cap)")
    p = actions.add_parser("list", help="token names and when they were created")
    local_options(p)
    p = actions.add_parser("rm", help="revoke NAME's token")
    local_options(p)
    p.add_argument("name")


def run(args: argparse.Namespace) -> int:
    action: Callable[[argparse.Namespace], int] = ACTIONS[args.token_command]
    return action(args)


def _tokens(args: argparse.Namespace) -> TokenStore:
    from pytest_ttenv.core.paths import state_dir
    from pytest_ttenv.server.auth import TokenStore

    return TokenStore(state_dir(args.state_dir))


def cmd_add(args: argparse.Namespace) -> int:
    """The token goes to stdout alone (for a pipe); the notice that it is shown once to stderr."""
    from pytest_ttenv.server.auth import Limits

    token = _tokens(args).add(args.name, admin=args.admin, limits=Limits(args.max_cpu, args.max_mem, args.max_vms))
    print(f"ttenv: token of {args.name} (shown once; the server keeps only its hash):", file=sys.stderr)
    out(token)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    tokens = _tokens(args).list()
    if not tokens:
        out("no tokens - add one: ttenv token add NAME")
    for name, created in tokens:
        out(f"{name:<32} created {when(created)}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    _tokens(args).remove(args.name)
    out(f"removed token {args.name}; its ENVs stay until deleted or their lease expires")
    return 0


ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {"add": cmd_add, "list": cmd_list, "rm": cmd_rm}
