"""Boot benchmark per (OS, arch) (run by hand): ENV creation to the first SSH command, one VM,
booted cold and started warm.

For every image of the matrix present in the image store (Debian 11/12/13 x86_64, Debian 12 on
aarch64, ppc64le, s390x, i386 and armhf, Debian 13 riscv64, the cloud variant), each image's warm
template is made first (timed: a cold boot plus saving its state), then the runs go interleaved
so each image and boot kind sees the same host conditions, one VM at a time:

    python3 bench/matrix_boot.py --runs 3 [--images debian-12-s390x,debian-12-x86_64] [--cold-only]

Prints each run, then a Markdown table: cold and warm median [min-max] per image, and the
template's time; nothing is built and nothing asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

from boot import one_run

from pytest_ttenv.backend.engines import accel, qemu
from pytest_ttenv.backend.engines.qemu_arch import kvm_runs
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.core.paths import image_dir
from pytest_ttenv.errors import TTError
from pytest_ttenv.ssh import SshError

MATRIX = (
    "debian-11-x86_64",
    "debian-12-x86_64",
    "debian-13-x86_64",
    "debian-12-aarch64",
    "debian-13-riscv64",
    "debian-12-ppc64le",
    "debian-12-s390x",
    "debian-12-i386",
    "debian-12-armhf",
    "debiancloud-12-x86_64",
)


def timed(store: ImageStore, name: str, boot: str, mem: int, label: str) -> float | None:
    """Seconds from ENV creation to the first command of one VM of ``name``, or None if it failed
    (a boot timeout on a loaded host: counted, not fatal)."""
    try:
        got = one_run(store.root, name, 1, idle=0.0, mem_mib=mem, boot=boot)
    except (TTError, SshError) as exc:
        print(f"{label} {name} {boot}: FAILED {str(exc).splitlines()[0]}", flush=True)
        return None
    print(f"{label} {name} {boot}: first command after {got['first'][0]:.1f} s", flush=True)
    return got["first"][0]


def cell(values: list[float], runs: int) -> str:
    if not values:
        return "failed"
    text = f"{statistics.median(values):.1f} s [{min(values):.1f}-{max(values):.1f}]"
    return text + (f" ({runs - len(values)} of {runs} failed)" if len(values) < runs else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", help="comma-separated image names (default: the matrix images present)")
    parser.add_argument("--mem", type=int, default=512, help="MiB per VM (default 512)")
    parser.add_argument("--cold-only", action="store_true", help="no warm template, no warm runs")
    args = parser.parse_args()
    store = ImageStore(image_dir())
    wanted = args.images.split(",") if args.images else [n for n in MATRIX if n in store.names()]
    images = {name: store.get(name) for name in wanted}
    if not images:
        raise SystemExit(f"no matrix image in {store.root}: build one (ttenv image build debian-12)")
    kinds = ("cold",) if args.cold_only else ("cold", "warm")
    template: dict[str, float | None] = {}
    had: dict[str, bool] = {}
    if not args.cold_only:  # the first warm start of an image makes its template (if none): timed apart
        for name, image in images.items():
            warm_dir = image.file("warm")
            had[name] = warm_dir.is_dir() and any(not p.name.startswith(".") for p in warm_dir.iterdir())
            template[name] = timed(store, name, "warm", args.mem, "template")
    times: dict[tuple[str, str], list[float]] = {(n, k): [] for n in images for k in kinds}
    load_before = os.getloadavg()[0]
    for run in range(args.runs):
        for name in images:
            for kind in kinds:
                got = timed(store, name, kind, args.mem, f"run {run + 1}")
                if got is not None:
                    times[name, kind].append(got)
    print(
        f"\n{args.runs} runs interleaved, 1 VM of 2 vCPUs / {args.mem} MiB each, on {platform.machine()} "
        f"({qemu.version()}); env add -> first command over SSH, median [min-max]; host load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    print("| image | boot | accelerator | cold | warm | first warm start (makes the template) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, image in images.items():
        boot = "direct" if image.kernel else image.boot
        verdict = accel.cached_verdict(image.arch) if kvm_runs(image.arch, platform.machine()) else None
        accel_name = verdict.name if verdict is not None else "tcg"
        warm = cell(times[name, "warm"], args.runs) if not args.cold_only else "-"
        made = template.get(name)
        made_text = "-" if args.cold_only else ("failed" if made is None else f"{made:.1f} s")
        if had.get(name):
            made_text += " (a template existed)"
        print(f"| {name} | {boot} | {accel_name} | {cell(times[name, 'cold'], args.runs)} | {warm} | {made_text} |")


if __name__ == "__main__":
    main()
