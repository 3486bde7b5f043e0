"""Fault soak (run by hand): kill pytest sessions that use VMs, again and again, and count what
is left behind; time SIGINT -> all VMs down.

    python3 bench/soak_faults.py [--iterations 20]

Each iteration runs three sessions on debian-12: SIGKILL while the VM boots, SIGKILL while a
test runs on it (both followed by ``ttenv gc``, the contract for a killed owner), and SIGINT
while a test runs (no gc: the session must clean up itself). Prints leftovers (processes, run
dirs, session dirs, rows, socket dirs: must all be 0) and SIGINT-to-down times (median, max).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from pytest_ttenv.core.paths import image_dir  # noqa: E402

from helpers.leftovers import interactive_signals, leftovers, qemu_pids_under  # noqa: E402

SUITE = """
import pathlib, os

def test_long(tt_vm):
    pathlib.Path(os.environ["MARKER"]).write_text("started")
    tt_vm.run("sleep 120", timeout=300)
"""


def session(tmp: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    (tmp / "test_soak.py").write_text(SUITE)
    state, marker = tmp / "state", tmp / "marker"
    env = dict(os.environ, TTENV_STATE_DIR=str(state), TTENV_IMAGE_DIR=str(image_dir()), MARKER=str(marker))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--tt-os=debian12",
            f"--tt-arch={platform.machine()}",
            "-o",
            "timeout=0",
            str(tmp),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=interactive_signals,
    )
    return proc, state, marker


def wait(check: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


def vms_running(state: Path) -> bool:
    return bool(qemu_pids_under(state))


def vms_stopped(state: Path) -> bool:
    return not vms_running(state)


def gc(state: Path) -> None:
    env = dict(os.environ, TTENV_STATE_DIR=str(state))
    subprocess.run([sys.executable, "-m", "pytest_ttenv.cli", "gc"], env=env, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    left: list[str] = []
    downs: list[float] = []
    for i in range(args.iterations):
        for mode in ("kill-boot", "kill-test", "sigint-test"):
            with tempfile.TemporaryDirectory(prefix="ttenv-soak-") as tmp:
                proc, state, marker = session(Path(tmp))
                if mode == "kill-boot":
                    wait(functools.partial(vms_running, state), 120)
                else:
                    wait(marker.exists, 300)
                sent = time.monotonic()
                proc.send_signal(signal.SIGKILL if mode.startswith("kill") else signal.SIGINT)
                wait(functools.partial(vms_stopped, state), 30)
                down = time.monotonic() - sent
                proc.wait(timeout=60)
                if mode == "sigint-test":
                    downs.append(down)
                else:
                    gc(state)
                found = leftovers(state)
                left += [f"{i}:{mode}:{x}" for x in found]
                print(f"iteration {i + 1} {mode}: down after {down:.2f} s, leftovers {len(found)}", flush=True)
    print(f"\n{args.iterations} iterations x 3 sessions: {len(left)} leftovers {left[:10]}")
    print(f"SIGINT during a test -> all VMs down: median {statistics.median(downs):.2f} s, max {max(downs):.2f} s")


if __name__ == "__main__":
    main()
