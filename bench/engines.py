"""Engine benchmark (run by hand, as root): the same image booted by the qemu engine and by the
libvirt engine, cold or warm, interleaved in one run (the order rotates per run), one VM at a time:

    python3 bench/engines.py --runs 3 [--image debian-12-x86_64] [--libvirt-uri qemu:///system]
    python3 bench/engines.py --runs 5 --variants libvirt:cold,libvirt:warm,remote:warm

A variant is ``ENGINE:BOOT`` (``qemu``, ``libvirt``) or ``remote:BOOT``: the libvirt engine with
its VM on a remote host (a libvirtd in a network namespace reached by qemu+ssh, started for the
run; this machine's libvirt makes the templates). Without ``--libvirt-uri`` a libvirtd of its own
is started for the run (tests/helpers/libvirt_hosts.py). Warm variants make their template (and
copy it to the remote host) before the first run, untimed. Per run and variant: ``env add``
(create_env returns), ready (wait_vm: SSH banner, or warm: identity taken), first SSH command,
snapshot, revert, delete. Prints medians with min-max; ``--markdown FILE`` also writes them as a
table. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pytest_ttenv.access import target
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvSpec, Resources, VmSpec
from pytest_ttenv.core.paths import image_dir
from pytest_ttenv.ssh import Connection

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.libvirt_hosts import LibvirtHost, missing

STEPS = ("created", "ready", "first command", "snapshot", "revert", "delete")


def one_run(engine: str, uris: list[str], boot: str, image: str, res: Resources, timeout: float) -> dict[str, float]:
    """Seconds for each step of one VM's life on ``engine`` (libvirt: on ``uris``), started ``boot``."""
    with tempfile.TemporaryDirectory(prefix="ttenv-bench-") as state:
        backend = LocalBackend(image_dir(), state, engine=engine, libvirt_uris=uris if engine == "libvirt" else [])
        key = KeyPair.generate("bench")
        key_file = Path(state) / "id"
        key.write_private(key_file)
        got: dict[str, float] = {}
        started = time.monotonic()
        env = backend.create_env(EnvSpec("BENCH", (VmSpec("vm1", image, res),), key.public, accel="tcg", boot=boot))
        try:
            got["created"] = time.monotonic() - started
            vm = backend.wait_vm(env.id, "vm1", timeout)
            got["ready"] = time.monotonic() - started
            if vm.boot != boot:
                print(f"  ({engine} VM started {vm.boot}, not {boot})", flush=True)
            conn = Connection(target(vm, key_file), use_agent=False, connect_timeout=60)
            conn.run("true", timeout=120, check=True)
            got["first command"] = time.monotonic() - started
            conn.close()
            t = time.monotonic()
            backend.snapshot(env.id, "vm1", "bench")
            got["snapshot"] = time.monotonic() - t
            t = time.monotonic()
            backend.revert(env.id, "vm1", "bench")
            got["revert"] = time.monotonic() - t
        finally:
            t = time.monotonic()
            backend.delete_env(env.id)
            got["delete"] = time.monotonic() - t
    return got


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image", default="debian-12-x86_64")
    parser.add_argument("--cpu", type=int, default=2)
    parser.add_argument("--mem", type=int, default=384, help="MiB per VM")
    parser.add_argument("--libvirt-uri", help="an existing libvirtd (default: start one for the run)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a VM may take to answer SSH")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--variants", default="qemu:cold,libvirt:cold", help="ENGINE:BOOT,... (see above)")
    args = parser.parse_args()
    variants = [tuple(v.split(":", 1)) for v in args.variants.split(",")]

    started: list[tuple[LibvirtHost, Path]] = []
    uri = args.libvirt_uri
    remote_uris: list[str] = []
    try:
        if uri is None or any(e == "remote" for e, _ in variants):
            why = missing()
            if why:
                sys.exit(f"bench/engines.py: cannot start a libvirtd here: {why}")
        if uri is None:
            root = Path(tempfile.mkdtemp(prefix="ttlv-bench-", dir="/tmp"))
            started.append((LibvirtHost(root).start(), root))
            uri = started[-1][0].uri
        if any(e == "remote" for e, _ in variants):
            root = Path(tempfile.mkdtemp(prefix="ttlv-bench-", dir="/tmp"))
            started.append((LibvirtHost(root, remote=True).start(), root))
            remote_uris = [f"{uri}#mem=1", started[-1][0].uri]  # nothing fits here: the VM goes there
        res = Resources(args.cpu, args.mem)

        def run_one(variant: tuple[str, ...]) -> dict[str, float]:
            engine, boot = variant
            if engine == "remote":
                return one_run("libvirt", remote_uris, boot, args.image, res, args.timeout)
            return one_run(engine, [uri], boot, args.image, res, args.timeout)

        for variant in variants:  # templates made (and copied) before anything is timed
            if variant[1] == "warm":
                run_one(variant)
        names = [":".join(v) for v in variants]
        results: dict[str, dict[str, list[float]]] = {n: {s: [] for s in STEPS} for n in names}
        for run in range(args.runs):
            shift = run % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                got = run_one(variant)
                name = ":".join(variant)
                for step, secs in got.items():
                    results[name][step].append(secs)
                print(f"run {run + 1} {name}: " + ", ".join(f"{s} {v:.2f} s" for s, v in got.items()), flush=True)
    finally:
        for host, root in started:
            host.close()
            shutil.rmtree(root, ignore_errors=True)
    lines = [
        f"{args.image}, {args.cpu} vCPU, {args.mem} MiB, TCG, {args.runs} runs per variant interleaved; "
        "seconds, median [min-max]; created/ready/first command counted from env add",
        "",
        "| step | " + " | ".join(results) + " |",
        "| --- | " + " | ".join("---" for _ in results) + " |",
    ]
    lines += [f"| {step} | " + " | ".join(fmt(results[e][step]) for e in results) + " |" for step in STEPS]
    print("\n" + "\n".join(lines))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
