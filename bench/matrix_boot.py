"""Boot benchmark per (OS, arch) (run by hand): ENV creation to the first SSH command, one VM.

For every image of the matrix present in the image store (Debian 11/12/13 x86_64, Debian 12
aarch64, the cloud variant, riscv64 if built), runs interleaved so each image sees the same
host conditions, one VM at a time:

    python3 bench/matrix_boot.py --runs 3 [--images debian-12-x86_64,debiancloud-12-x86_64]

Prints each run, then the median [min-max] per image; nothing is built and nothing asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

from boot import one_run

from pytest_ttenv.backend.engines import qemu
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.core.paths import image_dir
from pytest_ttenv.errors import TTError
from pytest_ttenv.ssh import SshError

MATRIX = (
    "debian-11-x86_64",
    "debian-12-x86_64",
    "debian-13-x86_64",
    "debian-12-aarch64",
    "debiancloud-12-x86_64",
    "debian-13-riscv64",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", help="comma-separated image names (default: the matrix images present)")
    parser.add_argument("--mem", type=int, default=512, help="MiB per VM (default 512)")
    args = parser.parse_args()
    store = ImageStore(image_dir())
    wanted = args.images.split(",") if args.images else [n for n in MATRIX if n in store.names()]
    images = {name: store.get(name) for name in wanted}
    if not images:
        raise SystemExit(f"no matrix image in {store.root}: build one (ttenv image build debian-12)")
    times: dict[str, list[float]] = {name: [] for name in images}
    failed = dict.fromkeys(images, 0)
    load_before = os.getloadavg()[0]
    for run in range(args.runs):
        for name in images:
            try:
                got = one_run(store.root, name, 1, idle=0.0, mem_mib=args.mem)
            except (TTError, SshError) as exc:  # a boot timeout on a loaded host: counted, not fatal
                failed[name] += 1
                print(f"run {run + 1} {name}: FAILED {str(exc).splitlines()[0]}", flush=True)
                continue
            times[name].append(got["first"][0])
            print(f"run {run + 1} {name}: first command after {got['first'][0]:.1f} s", flush=True)
    print(
        f"\n{args.runs} runs interleaved, 1 VM of 2 vCPUs / {args.mem} MiB each, on {platform.machine()} "
        f"({qemu.version()}); env add -> first command over SSH, median [min-max]; host load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(f"{'image':<24} {'boot':<7} {'access':<11} {'median':>8} {'range':>14}")
    for name, image in images.items():
        t = times[name]
        boot = "direct" if image.kernel else image.boot
        note = f"  ({failed[name]} of {args.runs} failed)" if failed[name] else ""
        if not t:
            print(f"{name:<24} {boot:<7} {image.access:<11} {'-':>8} {'-':>14}{note}")
            continue
        print(
            f"{name:<24} {boot:<7} {image.access:<11} {statistics.median(t):7.1f}s "
            f"{f'[{min(t):.1f}-{max(t):.1f}]':>14}{note}"
        )


if __name__ == "__main__":
    main()
