"""``ttenv serve``: this host's VMs behind the REST API (``pytest_ttenv.server``)."""

from __future__ import annotations

import argparse

from pytest_ttenv.cli.options import duration, engine_options, local_options, size, uris
from pytest_ttenv.cli.output import out
from pytest_ttenv.core.naming import parse_mib


def add_arguments(p: argparse.ArgumentParser) -> None:
    local_options(p)
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
    p.add_argument(
        "--mem-total",
        type=size("--mem-total"),
        metavar="SIZE",
        help="memory all ENVs may hold: MiB, or 32G (default: 80%% of RAM)",
    )
    p.add_argument(
        "--disk-total",
        type=size("--disk-total"),
        metavar="SIZE",
        help="overlay disk all ENVs may hold: MiB, or 200G (default: 80%% of the free disk of the state dir)",
    )
    engine_options(p, "the server's")
    p.add_argument(
        "--default-lease",
        type=duration("--default-lease"),
        default=600.0,
        metavar="DURATION",
        help="lease of an ENV created without one: seconds, or 90s, 30m, 2h, 1d (default 600 s)",
    )
    p.add_argument(
        "--max-lease",
        type=duration("--max-lease"),
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
    p.add_argument(
        "--dead-grace",
        type=duration("--dead-grace"),
        default=300.0,
        metavar="DURATION",
        help="a VM dead this long stops counting against the quota (default 300 s)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="open connections at once (default: from the descriptor limit, at most 4096)",
    )
    p.add_argument(
        "--header-timeout",
        type=duration("--header-timeout"),
        default=10.0,
        metavar="DURATION",
        help="time a connection has to send a request head (default 10 s)",
    )
    p.add_argument(
        "--max-requests-per-owner",
        type=int,
        default=64,
        metavar="N",
        help="requests of one owner in flight at once; more are 429 (default 64)",
    )
    p.add_argument(
        "--max-polls-per-owner",
        type=int,
        default=32,
        metavar="N",
        help="long polls (VM waits) of one owner at once; more are 429 (default 32)",
    )
    p.add_argument("--tls-cert", metavar="FILE", help="serve https: the certificate (PEM, with its chain)")
    p.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM (``server.serve.serve``'s exit code)."""
    from pytest_ttenv.server.serve import serve

    return serve(
        args.listen,
        public_addr=args.public_addr,
        state=args.state_dir,
        images=args.image_dir,
        cpu_total=args.cpu_total,
        mem_total=parse_mib(args.mem_total, "--mem-total") if args.mem_total else None,
        disk_total=parse_mib(args.disk_total, "--disk-total") if args.disk_total else None,
        engine=args.engine,
        libvirt_uris=uris(args),
        default_lease=args.default_lease,
        max_lease=args.max_lease,
        log_level=args.log_level,
        dead_grace=args.dead_grace,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        max_requests_per_owner=args.max_requests_per_owner,
        max_polls_per_owner=args.max_polls_per_owner,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        out=out,
    )
