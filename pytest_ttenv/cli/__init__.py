"""``ttenv``: doctor, image list|pull|import|build|rm, env add|list|show|run|console|renew|del, replay, gc,
serve, token add|list|rm, status, report.

One module per noun (``doctor``, ``image``, ``env``, ``replay``, ``gc``, ``serve``, ``token``, ``status``; ``report``
is ``pytest_ttenv.report.command``), each with the same two functions:

- ``add_arguments(parser)`` fills the noun's parser: its options, or, for a noun with actions
  (``image``, ``env``, ``token``), one subparser per action (``dest="<noun>_command"``);
- ``run(args) -> int`` runs the parsed command and returns the exit code (a noun with actions
  looks the action up in its ``ACTIONS`` table of ``cmd_<action>`` functions).

Shared pieces: ``options`` (shared options, size and duration types), ``backends`` (the backend
the options name), ``output`` (stdout lines, timestamps), ``progress`` (a download's bar).

Every failure the user can act on prints one line ``ttenv: error: ...`` and exits 1
(runtime) or 2 (usage); Ctrl-C exits 130 after cleaning up what the command created.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from pytest_ttenv import __version__
from pytest_ttenv.cli import doctor, env, gc, image, replay, serve, status, token
from pytest_ttenv.cli.output import out
from pytest_ttenv.errors import TTError
from pytest_ttenv.report import command as report


class Noun(NamedTuple):
    """A ``ttenv`` command: its name and help line in ``ttenv --help``, its module's two functions."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


NOUNS = (  # in the order ``ttenv --help`` lists them
    Noun("doctor", "what this host has and lacks", doctor.add_arguments, doctor.run),
    Noun("image", "list, pull, import, build or remove images", image.add_arguments, image.run),
    Noun("env", "create, inspect, use and delete ENVs", env.add_arguments, env.run),
    Noun("replay", "bring a captured VM (--tt-capture) back, running, as an ENV", replay.add_arguments, replay.run),
    Noun("gc", "reap ENVs whose owner died or whose lease expired", gc.add_arguments, gc.run),
    Noun("serve", "run the host server: this host's VMs behind a REST API", serve.add_arguments, serve.run),
    Noun("token", "bearer tokens of the host server (in its --state-dir)", token.add_arguments, token.run),
    Noun(
        "status",
        "resources held by this host's ENVs, or a server's totals/used/free (--backend URL)",
        status.add_arguments,
        status.run,
    ),
    Noun(
        "report",
        "merge JUnit files into the tests x VMs matrix: Markdown, HTML, JSON",
        report.add_arguments,
        functools.partial(report.run, say=out),
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttenv", description="Real VMs across an OS x arch matrix.")
    parser.add_argument("--version", action="version", version=f"ttenv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for noun in NOUNS:
        p = sub.add_parser(noun.name, help=noun.help)
        noun.add_arguments(p)
        p.set_defaults(run=noun.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except TTError as exc:
        print(f"ttenv: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ttenv: interrupted; what this command created was removed", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ttenv ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
