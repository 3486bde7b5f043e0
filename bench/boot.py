"""Boot benchmark (run by hand): ENV creation to first SSH command, disk per VM, RSS per VM.

Compares, interleaved in one run, the tuned ttenv image against a plain (untuned, Debian
defaults) image of the same release, for ENVs of 1 and of 2 VMs:

    python3 bench/boot.py --runs 3 [--release debian-12] [--plain-dir /var/tmp/ttenv-plain]

With ``--warm``, compares instead a cold boot and a warm start (from the image's saved post-boot
state, made once before the runs) of the tuned image, for ENVs of 1 and 2 VMs, and times a
``tt_vm_fresh`` reset (snapshot revert, reconnect, first command) of a warm and a cold VM:

    python3 bench/boot.py --warm --runs 3

``--engine libvirt`` runs the VMs on this machine's libvirt (or ``--libvirt-uri`` hosts) instead:

    python3 bench/boot.py --warm --runs 3 --counts 1 --engine libvirt

``--image`` benchmarks another image of the store warm (one that is there: built, pulled or
imported), ``--firmware uefi`` boots it through OVMF instead of SeaBIOS (the same disk, described
as a UEFI image in a store of its own under /var/tmp), ``--counts 1`` skips the 2-VM ENVs:

    python3 bench/boot.py --warm --runs 3 --image debiancloud-12-x86_64 --firmware uefi --counts 1

Both images are built on first use. Prints medians with min/max; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from pytest_ttenv.access import target
from pytest_ttenv.backend.images.build import ImageBuilder
from pytest_ttenv.backend.images.recipe import parse_target
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvSpec, Resources, VmSpec
from pytest_ttenv.core.paths import image_dir
from pytest_ttenv.ssh import Connection


def ensure(store: ImageStore, release: str, tuned: bool) -> str:
    req = parse_target(release, platform.machine(), "tuned" if tuned else "plain")
    if req.name not in store.names():
        ImageBuilder(store, progress=lambda line: print(line, flush=True)).build(req)
    return req.name


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_run(
    images_root: Path, image: str, count: int, idle: float, mem_mib: int = 512, boot: str = "cold", **engine: Any
) -> dict[str, list[float]]:
    """Create an ENV of ``count`` VMs of ``image``; time to each VM's first command, disk, RSS.
    ``engine``: LocalBackend's engine options (``engine``, ``libvirt_uris``)."""
    with tempfile.TemporaryDirectory(prefix="ttenv-bench-") as state:
        backend = LocalBackend(images_root, state, **engine)
        key = KeyPair.generate("bench")
        key_file = Path(state) / "id"
        key.write_private(key_file)
        vms = tuple(VmSpec(f"vm{i}", image, Resources(cpu=2, mem_mib=mem_mib)) for i in range(count))
        started = time.monotonic()
        env = backend.create_env(EnvSpec("BENCH", vms, key.public, boot=boot))
        try:

            def first_command(name: str) -> float:
                vm = backend.wait_vm(env.id, name, 900)  # a busy host: slow, not failed
                conn = Connection(target(vm, key_file), use_agent=False)
                try:
                    conn.run("true", timeout=60, check=True)
                finally:
                    conn.close()
                return time.monotonic() - started

            with ThreadPoolExecutor(count) as pool:
                firsts = list(pool.map(first_command, [v.name for v in vms]))
            time.sleep(idle)
            env = backend.show_env(env.id)
            if engine.get("engine", "qemu") != "qemu":  # disks are libvirt volumes, qemu runs under libvirtd
                return {"first": [max(firsts)], "disk": [0.0], "rss": [0.0]}
            disk = [Path(env.rundir, vm.name, "overlay.qcow2").stat().st_blocks * 512 / 2**20 for vm in env.vms]
            rss = [rss_mib(vm.pid) for vm in env.vms]
        finally:
            backend.delete_env(env.id)
    return {"first": [max(firsts)], "disk": disk, "rss": rss}


def resets(images_root: Path, image: str, boot: str, count: int, **engine: Any) -> list[float]:
    """Seconds per ``tt_vm_fresh`` reset of one VM: revert to the post-boot snapshot (plus the clock
    fix the session makes over SSH for a cold VM), reconnect, first command."""
    with tempfile.TemporaryDirectory(prefix="ttenv-bench-") as state:
        backend = LocalBackend(images_root, state, **engine)
        key = KeyPair.generate("bench")
        key_file = Path(state) / "id"
        key.write_private(key_file)
        env = backend.create_env(
            EnvSpec("RESET", (VmSpec("vm0", image, Resources(cpu=2, mem_mib=512)),), key.public, boot=boot)
        )
        try:
            vm = backend.wait_vm(env.id, "vm0", 900)
            Connection(target(vm, key_file), use_agent=False).close()
            backend.snapshot(env.id, "vm0", "bench")
            took = []
            for _ in range(count):
                conn = Connection(target(vm, key_file), use_agent=False)
                conn.run("touch ~/dirty", timeout=60, check=True)
                conn.close()
                started = time.monotonic()
                backend.revert(env.id, "vm0", "bench")
                conn = Connection(target(vm, key_file), use_agent=False)
                if vm.boot != "warm":  # as the session does (sudo: none for root)
                    conn.run(f"date -s @{time.time():.3f} >/dev/null", timeout=60, check=True, sudo=True)
                conn.run("test ! -e ~/dirty", timeout=60, check=True)
                took.append(time.monotonic() - started)
                conn.close()
        finally:
            backend.delete_env(env.id)
    return took


def warm_image(args: argparse.Namespace) -> tuple[Path, str]:
    """The store and name of the image to benchmark warm: the tuned release (built on first use),
    or ``--image`` from the store, described as booting through ``--firmware`` if asked."""
    root = image_dir()
    if not args.image:
        return root, ensure(ImageStore(root), args.release, True)
    image = ImageStore(root).get(args.image)
    if not args.firmware or args.firmware == image.boot:
        return root, image.name
    private = Path(f"/var/tmp/ttenv-bench-{args.firmware}")  # kept: its templates serve the next run
    mine = private / image.name / "image.json"
    if not mine.exists() or json.loads(mine.read_text()).get("created") != image.created:
        shutil.rmtree(private, ignore_errors=True)
        src = private.with_name(private.name + "-src")
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        private.mkdir(parents=True)
        (src / image.disk).symlink_to(image.file(image.disk))
        ImageStore(private).install(src, replace(image, boot=args.firmware))
    return private, image.name


def main_warm(args: argparse.Namespace) -> None:
    root, img = warm_image(args)
    counts = [int(c) for c in args.counts.split(",")]
    engine: dict[str, Any] = {"engine": args.engine, "libvirt_uris": tuple(args.libvirt_uri)}
    started = time.monotonic()
    one_run(root, img, 1, 0, boot="warm", **engine)  # makes the template if there is none yet
    print(f"first warm ENV (makes the template if missing): {time.monotonic() - started:.1f} s", flush=True)
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    for run in range(args.runs):
        for count in counts:
            for boot in ("cold", "warm"):  # interleaved: same conditions for both
                got = one_run(root, img, count, args.idle, boot=boot, **engine)
                print(f"run {run + 1} {boot} x{count}: first command after {got['first'][0]:.1f} s", flush=True)
                slot = results.setdefault((boot, count), {"first": [], "disk": [], "rss": []})
                for k, v in got.items():
                    slot[k] += v
    reset = {boot: resets(root, img, boot, args.runs, **engine) for boot in ("warm", "cold")}
    firmware = ImageStore(root).get(img).boot
    where = f"libvirt {', '.join(args.libvirt_uri) or 'qemu:///system'}" if args.engine == "libvirt" else "qemu engine"
    print(f"\n{img} ({firmware}, {where}), {args.runs} runs, TCG/KVM as detected; median [min-max]")
    print(f"{'boot':<5} {'VMs':>3} {'env add -> first command':>28} {'disk/VM (MiB)':>22} {'RSS/VM':>22}")
    for (boot, count), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{boot:<5} {count:>3} {fmt(r['first'], 's'):>28} {fmt(r['disk'], ''):>22} {fmt(r['rss'], 'Mi'):>22}")
    for boot, took in reset.items():
        print(f"tt_vm_fresh reset of a {boot} VM (revert -> first command): {fmt(took, 's')}")


def fmt(values: list[float], unit: str) -> str:
    return f"{statistics.median(values):7.1f}{unit} [{min(values):.1f}-{max(values):.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--release", default="debian-12")
    parser.add_argument("--plain-dir", default="/var/tmp/ttenv-plain", help="image store for the plain image")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds idle before reading RSS")
    parser.add_argument("--warm", action="store_true", help="cold boot vs warm start, and tt_vm_fresh resets")
    parser.add_argument("--image", default="", help="with --warm: an image of the store instead of the tuned release")
    parser.add_argument("--firmware", choices=("bios", "uefi"), help="with --image: boot it through this firmware")
    parser.add_argument("--counts", default="1,2", help="with --warm: ENV sizes, comma-separated (default 1,2)")
    parser.add_argument("--engine", choices=("qemu", "libvirt"), default="qemu", help="with --warm: the engine")
    parser.add_argument("--libvirt-uri", action="append", default=[], help="with --engine libvirt: a host (repeatable)")
    args = parser.parse_args()
    if args.warm:
        main_warm(args)
        return

    variants = {
        "tuned": (image_dir(), ensure(ImageStore(image_dir()), args.release, True)),
        "plain": (Path(args.plain_dir), ensure(ImageStore(Path(args.plain_dir)), args.release, False)),
    }
    image_mib = {
        name: ImageStore(root).get(img).file("disk.qcow2").stat().st_size / 2**20
        for name, (root, img) in variants.items()
    }
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    for run in range(args.runs):
        for count in (1, 2):
            for name, (root, img) in variants.items():  # interleaved: same conditions for both
                got = one_run(root, img, count, args.idle)
                print(f"run {run + 1} {name} x{count}: first command after {got['first'][0]:.1f} s", flush=True)
                slot = results.setdefault((name, count), {"first": [], "disk": [], "rss": []})
                for k, v in got.items():
                    slot[k] += v
    print(f"\n{args.release} on {platform.machine()}, {args.runs} runs, TCG/KVM as detected; median [min-max]")
    print(f"{'image':<7} {'VMs':>3} {'env add -> first command':>28} {'disk/VM (MiB, % image)':>30} {'RSS/VM':>22}")
    for (name, count), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0] != "tuned")):
        pct = 100 * statistics.median(r["disk"]) / image_mib[name]
        print(
            f"{name:<7} {count:>3} {fmt(r['first'], 's'):>28} {fmt(r['disk'], '') + f' ({pct:.1f} %)':>30} "
            f"{fmt(r['rss'], 'Mi'):>22}"
        )


if __name__ == "__main__":
    main()
