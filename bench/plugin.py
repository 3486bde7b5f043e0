"""Plugin benchmark (run by hand): the example suite's wall time with -n 0 vs -n 2, and the
plugin's own overhead per test once the VM is booted.

    python3 bench/plugin.py [--runs 2] [--os debian11,debian12,debian13] [--tests 200]

Overhead: one session runs N trivial tests that take ``tt_vm`` and N that take nothing, on
one VM; the per-test times come from the JUnit file (setup + call + teardown). The first VM
test, which waits for the boot, is left out. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pytest(*args: str, cwd: Path = ROOT) -> float:
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=cwd, capture_output=True, text=True
    )
    if res.returncode != 0:
        print(res.stdout[-3000:], res.stderr[-2000:])
        raise SystemExit(f"pytest {' '.join(args)} failed ({res.returncode})")
    return time.monotonic() - started


def overhead(n: int, os_prefix: str) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory(prefix="ttenv-bench-plugin-") as tmp:
        suite = Path(tmp) / "test_overhead.py"
        body = ["def test_vm_{i}(tt_vm):\n    pass\n", "def test_plain_{i}():\n    pass\n"]
        suite.write_text("\n".join(b.format(i=i) for i in range(n) for b in body))
        junit = Path(tmp) / "junit.xml"
        pytest(
            str(suite),
            f"--tt-os={os_prefix}",
            f"--tt-arch={platform.machine()}",
            f"--junitxml={junit}",
            "-o",
            "timeout=0",
            cwd=Path(tmp),
        )
        vm: list[float] = []
        plain: list[float] = []
        for case in ET.parse(junit).getroot().iter("testcase"):
            (vm if case.get("name", "").startswith("test_vm_") else plain).append(float(case.get("time", 0)))
        return vm[1:], plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--os", default="debian11,debian12,debian13")
    parser.add_argument("--tests", type=int, default=200)
    args = parser.parse_args()
    walls: dict[str, list[float]] = {"-n 0": [], "-n 2": []}
    for run in range(args.runs):
        for mode, extra in (("-n 0", []), ("-n 2", ["-n", "2"])):  # interleaved
            wall = pytest("examples", f"--tt-os={args.os}", f"--tt-arch={platform.machine()}", *extra)
            walls[mode].append(wall)
            print(f"run {run + 1} example suite {mode}: {wall:.1f} s", flush=True)
    vm, plain = overhead(args.tests, args.os.split(",")[0])
    print(f"\nexample suite on {args.os} ({args.runs} runs, median [min-max]):")
    for mode, values in walls.items():
        print(f"  {mode}: {statistics.median(values):.1f} s [{min(values):.1f}-{max(values):.1f}]")
    q = statistics.quantiles
    print(f"per test, {len(vm)} tt_vm tests vs {len(plain)} plain tests in one session (ms, median p10/p90):")
    for name, values in (("tt_vm", vm), ("plain", plain)):
        p10, *_, p90 = q([v * 1000 for v in values], n=10)
        print(f"  {name:<6} {statistics.median(values) * 1000:6.2f}  {p10:.2f}/{p90:.2f}")
    print(f"  plugin overhead per VM test: {(statistics.median(vm) - statistics.median(plain)) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
