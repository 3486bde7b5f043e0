"""testinfra over ttenv's channel vs testinfra's own SSH backends, on one VM (run by hand).

    python3 bench/testinfra_host.py [--os debian12] [--rounds 50]

One pytest session boots the VM; one test then times ``host.run("true")`` through each peer,
interleaved (one sample of every peer per round; ``ssh://`` every 5th round), ms:
  ttenv           tt_vm.host: the ``ttenv://`` backend (agent channel)
  Vm.run          tt_vm.run("true"): the same channel without testinfra, for reference
  paramiko        testinfra's ``paramiko://`` backend, one connection
  ssh             testinfra's ``ssh://`` backend (an OpenSSH client per command)
Needs pytest-testinfra and paramiko. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TEST = """
import json, os, time
import testinfra

def test_bench(tt_vm, tmp_path):
    info, key = tt_vm.info, tt_vm._session.key_file
    known = tmp_path / "known_hosts"
    known.write_text(f"[{info.address}]:{info.port} {info.host_key}\\n")
    config = tmp_path / "ssh_config"
    config.write_text(f"Host {info.address}\\n  Port {info.port}\\n  User {info.user}\\n  IdentityFile {key}\\n"
                      f"  IdentitiesOnly yes\\n  UserKnownHostsFile {known}\\n  StrictHostKeyChecking yes\\n"
                      "  BatchMode yes\\n")
    spec = f"{info.user}@{info.address}:{info.port}"
    peers = {
        "ttenv": (tt_vm.host.run, 1),
        "Vm.run": (tt_vm.run, 1),
        "paramiko": (testinfra.get_host(f"paramiko://{spec}", ssh_config=str(config)).run, 1),
        "ssh": (testinfra.get_host(f"ssh://{spec}", ssh_config=str(config)).run, 5),
    }
    samples = {name: [] for name in peers}
    for run, _ in peers.values():
        assert run("true").exit_status == 0  # warm-up: connect, agent
    for r in range(int(os.environ["ROUNDS"])):
        for name, (run, every) in peers.items():
            if r % every == 0:
                t0 = time.perf_counter()
                assert run("true").exit_status == 0
                samples[name].append((time.perf_counter() - t0) * 1000)
    with open(os.environ["BENCH_OUT"], "w") as f:
        json.dump(samples, f)
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--os", default="debian12", help="OS prefix of the one VM (default debian12)")
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ttenv-bench-testinfra-") as d:
        work = Path(d)
        (work / "test_bench.py").write_text(TEST)
        out = work / "samples.json"
        env = dict(os.environ, ROUNDS=str(args.rounds), BENCH_OUT=str(out), TTENV_STATE_DIR=str(work / "state"))
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-o",
                "timeout=0",
                f"--tt-os={args.os}",
                f"--tt-arch={platform.machine()}",
                "test_bench.py",
            ],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            print(res.stdout[-3000:], res.stderr[-2000:])
            return 1
        samples: dict[str, list[float]] = json.loads(out.read_text())
    print(
        f"host.run('true') on {args.os} ({platform.machine()}), {args.rounds} interleaved rounds, {os.cpu_count()} CPUs"
    )
    print(f"{'peer':<10}{'n':>5}{'median ms':>11}{'p10':>9}{'p90':>9}{'min':>9}{'max':>9}")
    for name, xs in samples.items():
        print(
            f"{name:<10}{len(xs):>5}{statistics.median(xs):>11.1f}{pct(xs, 10):>9.1f}{pct(xs, 90):>9.1f}"
            f"{min(xs):>9.1f}{max(xs):>9.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
