"""Benchmark pytest_ttenv.ssh against its peers (run by hand: `python bench/ssh.py`).

Round trip of `true` over an already open channel, interleaved rounds (one sample of every peer per
round, so drifts in machine load hit all peers alike), median and p10/p90 in milliseconds:
  agent          pytest_ttenv.ssh Connection, python3 agent (the fast path)
  exec           pytest_ttenv.ssh Connection(use_agent=False): one SSH exec channel per command
  paramiko       paramiko.SSHClient.exec_command on one connection
  testinfra-pmk  pytest-testinfra `paramiko://` backend, host.run("true")
  testinfra-ssh  pytest-testinfra `ssh://` backend (OpenSSH client per command)
  ssh-fresh      `ssh host true`, a new OpenSSH connection per command
  ssh-cm         `ssh -S socket host true` through an OpenSSH ControlMaster
`agent b2b` / `exec b2b`: the same, 200 calls back to back after the interleaved rounds (the
interleaved numbers include the cost of waking idle CPUs between calls; these do not).
Then fan-out of `true` to N = 10, 100, 1000 asyncssh servers (in a child process): wall time of
the first call (connect, agent probe, command) and of a second one (connections reused), errors.

By default everything runs against an OpenSSH sshd started on 127.0.0.1 (needs root and
openssh-server; commands run as root through bash with SHLVL=1, see tests/helpers/sshd.py).
`--target HOST:PORT:USER:KEYFILE:HOSTKEYFILE` runs the round-trip comparison against another SSH
server (e.g. a VM; HOSTKEYFILE holds its public host key line) instead.
paramiko and pytest-testinfra are optional: `pip install paramiko pytest-testinfra`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pytest_ttenv.ssh import Connection, RunResult, SshTarget, close_all, fan_out  # noqa: E402

from helpers.sshd import have_sshd, start_farm, start_sshd  # noqa: E402

Probe = Callable[[], None]


@dataclass
class Peer:
    name: str
    probe: Probe | None
    every: int = 1  # sample in every n-th round only (slow peers)
    why: str = ""  # why it is skipped
    samples: list[float] = field(default_factory=list)
    close: Callable[[], None] = lambda: None


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def ssh_base(t: SshTarget, known_hosts: Path) -> list[str]:
    return [
        "ssh",
        "-F",
        "/dev/null",
        "-p",
        str(t.port),
        "-i",
        str(t.client_key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-l",
        t.user,
    ]


def check(r: subprocess.CompletedProcess[bytes]) -> None:
    if r.returncode != 0:
        raise RuntimeError(r.stderr.decode(errors="replace").strip())


def make_peers(t: SshTarget, work: Path) -> list[Peer]:
    peers: list[Peer] = []
    agent = Connection(t)
    exec_ = Connection(t, use_agent=False)

    def ours(c: Connection) -> Probe:
        def probe() -> None:
            c.run("true", check=True)

        return probe

    for name, c in (("agent", agent), ("exec", exec_)):
        c.run("true", check=True)
        peers.append(Peer(name, ours(c), close=c.close))
    if agent.agent_pid is None:
        peers[0].why = "agent unavailable on the target (no python3?); numbers are exec channels"

    host_field = t.host if t.port == 22 else f"[{t.host}]:{t.port}"
    known_hosts = work / "known_hosts"
    known_hosts.write_text(f"{host_field} {t.host_key}\n")
    ssh_config = work / "ssh_config"
    ssh_config.write_text(
        f"Host {t.host}\n  Port {t.port}\n  User {t.user}\n  IdentityFile {t.client_key}\n"
        f"  IdentitiesOnly yes\n  UserKnownHostsFile {known_hosts}\n  StrictHostKeyChecking yes\n"
        "  BatchMode yes\n"
    )

    try:
        import paramiko  # type: ignore[import-untyped,unused-ignore]

        client = paramiko.SSHClient()
        key_type, key_b64 = t.host_key.split()[:2]
        client.get_host_keys().add(
            host_field, key_type, paramiko.PKey.from_type_string(key_type, base64.b64decode(key_b64))
        )
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(t.host, t.port, t.user, key_filename=str(t.client_key), allow_agent=False, look_for_keys=False)

        def pmk() -> None:
            _, out, _ = client.exec_command("true")
            if out.channel.recv_exit_status() != 0:
                raise RuntimeError("paramiko: true failed")

        pmk()
        peers.append(Peer("paramiko", pmk, close=client.close))
    except ImportError as e:
        peers.append(Peer("paramiko", None, why=f"not importable: {e}"))
    except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
        peers.append(Peer("paramiko", None, why=f"failed: {e}"))

    try:
        import testinfra  # type: ignore[import-untyped,unused-ignore]

        for name, scheme, every in (("testinfra-pmk", "paramiko", 1), ("testinfra-ssh", "ssh", 5)):
            host = testinfra.get_host(f"{scheme}://{t.user}@{t.host}:{t.port}", ssh_config=str(ssh_config))

            def ti(host: testinfra.host.Host = host) -> None:
                if host.run("true").rc != 0:
                    raise RuntimeError("testinfra: true failed")

            ti()
            peers.append(Peer(name, ti, every=every))
    except ImportError as e:
        peers.append(Peer("testinfra-pmk", None, why=f"not importable: {e}"))
        peers.append(Peer("testinfra-ssh", None, why=f"not importable: {e}"))
    except Exception as e:  # noqa: BLE001
        peers.append(Peer("testinfra", None, why=f"failed: {e}"))

    base = ssh_base(t, known_hosts)
    fresh = [*base, t.host, "true"]
    peers.append(Peer("ssh-fresh", lambda: check(subprocess.run(fresh, capture_output=True)), every=5))
    sock = work / "cm.sock"
    master = subprocess.run([*base, "-M", "-S", str(sock), "-f", "-N", t.host], capture_output=True)
    if master.returncode == 0:
        via = [*base, "-S", str(sock), "-o", "ControlMaster=no", t.host, "true"]

        def stop_master() -> None:
            subprocess.run([*base, "-S", str(sock), "-O", "exit", t.host], capture_output=True)

        peers.append(Peer("ssh-cm", lambda: check(subprocess.run(via, capture_output=True)), close=stop_master))
    else:
        peers.append(Peer("ssh-cm", None, why=master.stderr.decode(errors="replace").strip()))
    for p in peers:
        if p.probe is not None:
            p.probe()  # warm-up, and fail early
    return peers


def round_trips(t: SshTarget, rounds: int) -> list[Peer]:
    with tempfile.TemporaryDirectory(prefix="ttenv-bench-") as d:
        peers = make_peers(t, Path(d))
        try:
            for r in range(rounds):
                for p in peers:
                    if p.probe is not None and r % p.every == 0:
                        t0 = time.perf_counter()
                        p.probe()
                        p.samples.append((time.perf_counter() - t0) * 1000)
            # the same two back to back: no idle gap for the CPUs to fall asleep in between
            for p in [p for p in peers if p.name in ("agent", "exec")]:
                b2b = Peer(f"{p.name} b2b", p.probe, why=p.why)
                assert b2b.probe is not None
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    b2b.probe()
                    b2b.samples.append((time.perf_counter() - t0) * 1000)
                peers.append(b2b)
        finally:
            for p in peers:
                p.close()
    return peers


def big_output(t: SshTarget) -> list[tuple[str, float, int]]:
    out = []
    for name, use_agent in (("agent", True), ("exec", False)):
        c = Connection(t, use_agent=use_agent)
        c.run("true")
        t0 = time.perf_counter()
        r = c.run("head -c 104857600 /dev/zero", timeout=120)
        out.append((name, time.perf_counter() - t0, len(r.stdout_bytes)))
        c.close()
    return out


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    logging.getLogger("pytest_ttenv.ssh").setLevel(logging.WARNING)
    yield


def fan_outs(sizes: list[int], work: Path) -> list[tuple[int, float, int, float, int]]:
    rows = []
    for n in sizes:
        farm = start_farm(work / f"farm{n}", n)
        try:
            conns = [Connection(farm.target(i)) for i in range(n)]
            t0 = time.perf_counter()
            first = fan_out(conns, "true", timeout=60)
            t1 = time.perf_counter()
            second = fan_out(conns, "true", timeout=60)
            t2 = time.perf_counter()

            def errors(res: dict[str, RunResult | Exception]) -> int:
                return sum(1 for r in res.values() if not (isinstance(r, RunResult) and r.ok))

            rows.append((n, t1 - t0, errors(dict(first)), t2 - t1, errors(dict(second))))
            close_all()
        finally:
            farm.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200, help="interleaved rounds (slow peers sample every 5th)")
    ap.add_argument("--target", help="HOST:PORT:USER:KEYFILE:HOSTKEYFILE of an external SSH server")
    ap.add_argument("--fan-out", default="10,100,1000", help="endpoint counts ('' to skip)")
    ap.add_argument("--no-big", action="store_true", help="skip the 100 MiB stdout transfer")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="ttenv-bench-") as d, quiet():
        work = Path(d)
        sshd = None
        if args.target:
            host, port, user, key, hostkey = args.target.split(":")
            t = SshTarget("target", host, int(port), user, Path(key), Path(hostkey).read_text().strip())
            where = f"{user}@{host}:{port}"
        else:
            if not have_sshd():
                print("needs root, /usr/sbin/sshd and ssh-keygen (apt-get install openssh-server)")
                return 2
            sshd = start_sshd(work / "sshd")
            t = sshd.target("bench")
            where = f"OpenSSH sshd on 127.0.0.1:{sshd.port} (root, bash, SHLVL=1)"
        try:
            print(f"round trip of `true` against {where}, {args.rounds} interleaved rounds, {os.cpu_count()} CPUs")
            peers = round_trips(t, args.rounds)
            print(f"\n{'peer':<15}{'n':>5}{'median ms':>11}{'p10':>9}{'p90':>9}")
            for p in peers:
                if not p.samples:
                    print(f"{p.name:<15}  skipped: {p.why}")
                    continue
                med = statistics.median(p.samples)
                print(
                    f"{p.name:<15}{len(p.samples):>5}{med:>11.2f}{pct(p.samples, 10):>9.2f}{pct(p.samples, 90):>9.2f}"
                    + (f"  ({p.why})" if p.why else "")
                )
            by = {p.name: statistics.median(p.samples) for p in peers if p.samples}
            goals = [] if args.target else [(f"agent median {by['agent']:.2f} ms <= 2.5 ms", by["agent"] <= 2.5)]
            goals.append(
                (f"agent {by['exec'] / by['agent']:.1f}x faster than exec (>= 2x)", by["exec"] >= 2 * by["agent"])
            )
            if not args.no_big:
                print(f"\n{'100 MiB stdout':<15}{'seconds':>11}{'MiB/s':>9}")
                for name, secs, size in big_output(t):
                    print(f"{name:<15}{secs:>11.2f}{size / secs / 2**20:>9.0f}")
        finally:
            if sshd is not None:
                sshd.stop()
        sizes = [int(x) for x in args.fan_out.split(",") if x]
        if sizes:
            print(f"\n{'fan-out N':<10}{'first s':>9}{'errors':>8}{'again s':>9}{'errors':>8}")
            for n, first, e1, again, e2 in fan_outs(sizes, work):
                print(f"{n:<10}{first:>9.2f}{e1:>8}{again:>9.2f}{e2:>8}")
                if n == 100:
                    goals.append((f"N=100 first fan-out {first:.2f} s <= 2 s", first <= 2.0))
                if n == 1000:
                    goals.append((f"N=1000 zero errors ({e1 + e2})", e1 + e2 == 0))
        print("\ngoals:")
        for text, ok in goals:
            print(f"  {'PASS' if ok else 'FAIL'}  {text}")
        return 0 if all(ok for _, ok in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
