"""Engine benchmark (run by hand, as root): the same image booted by the qemu engine and by the
libvirt engine, interleaved in one run (the engine order alternates per run), one VM at a time:

    python3 bench/engines.py --runs 3 [--image debian-12-x86_64] [--libvirt-uri qemu:///system]

Without ``--libvirt-uri`` a libvirtd of its own is started for the run (tests/helpers/libvirt_hosts.py).
Per run and engine: ``env add`` (create_env returns), SSH banner (wait_vm), first SSH command,
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

STEPS = ("created", "ssh banner", "first command", "snapshot", "revert", "delete")


def one_run(engine: str, uri: str, image: str, res: Resources, timeout: float) -> dict[str, float]:
    """Seconds for each step of one VM's life on ``engine``."""
    with tempfile.TemporaryDirectory(prefix="ttenv-bench-") as state:
        backend = LocalBackend(image_dir(), state, engine=engine, libvirt_uris=[uri] if engine == "libvirt" else [])
        key = KeyPair.generate("bench")
        key_file = Path(state) / "id"
        key.write_private(key_file)
        got: dict[str, float] = {}
        started = time.monotonic()
        env = backend.create_env(EnvSpec("BENCH", (VmSpec("vm1", image, res),), key.public, accel="tcg"))
        try:
            got["created"] = time.monotonic() - started
            vm = backend.wait_vm(env.id, "vm1", timeout)
            got["ssh banner"] = time.monotonic() - started
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
    args = parser.parse_args()

    host, root = None, None
    uri = args.libvirt_uri
    if uri is None:
        why = missing()
        if why:
            sys.exit(f"bench/engines.py: cannot start a libvirtd here: {why}")
        root = Path(tempfile.mkdtemp(prefix="ttlv-bench-", dir="/tmp"))
        host = LibvirtHost(root).start()
        uri = host.uri
    res = Resources(args.cpu, args.mem)
    results: dict[str, dict[str, list[float]]] = {e: {s: [] for s in STEPS} for e in ("qemu", "libvirt")}
    try:
        for run in range(args.runs):
            order = ("qemu", "libvirt") if run % 2 == 0 else ("libvirt", "qemu")
            for engine in order:
                got = one_run(engine, uri, args.image, res, args.timeout)
                for step, secs in got.items():
                    results[engine][step].append(secs)
                print(f"run {run + 1} {engine}: " + ", ".join(f"{s} {v:.2f} s" for s, v in got.items()), flush=True)
    finally:
        if host is not None:
            host.close()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    lines = [
        f"{args.image}, {args.cpu} vCPU, {args.mem} MiB, TCG, {args.runs} runs per engine interleaved; "
        "seconds, median [min-max]; created/banner/first command counted from env add",
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
