"""Capture and replay benchmark (run by hand): what ``--tt-capture`` costs a failing test, and how
fast ``ttenv replay`` gives a shell in the failed VM.

Per run, for a VM of ``--image`` (``--mem`` MiB) started warm and one booted cold, after a
test-like step (a marker file, a background ``sleep``, ``--write`` MiB of files in /tmp): a
capture without the image (time, of which the VM was paused, and size) and one with the image
inside (time, size); then the capture without the image replayed into another state dir (as
another machine would: ``create_env`` with ``restore`` -> first command over SSH). The peer,
measured in the same run: a cold boot of the same image to its first command (what a developer
waits for without a replay, before re-running the test) and the raw size of what was saved
(state + disk delta, uncompressed).

    python3 bench/capture.py --runs 3 [--image debian-12-x86_64] [--mem 512] [--write 32]

Goals under TCG (issue 19): capture <= 5 s, replay <= 5 s, capture without the image <= 100 MiB.
Prints medians with min/max; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pytest_ttenv.access import target
from pytest_ttenv.backend.engines.identity import agent_start_command
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core import capture_format
from pytest_ttenv.core.capture_manifest import TestRecord
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvSpec, Resources, VmInfo, VmSpec
from pytest_ttenv.core.paths import image_dir
from pytest_ttenv.ssh import Connection

TEST = TestRecord("bench/capture.py::test_fails", "call", "failed")


def first_command(vm: VmInfo, key_file: Path) -> None:
    conn = Connection(target(vm, key_file), use_agent=False, connect_timeout=120)
    try:
        conn.run("true", timeout=120, check=True)
    finally:
        conn.close()


def step(vm: VmInfo, key_file: Path, write_mib: int, cold: bool) -> None:
    """What a failing test leaves: a marker, a background process, files in /tmp."""
    conn = Connection(target(vm, key_file), use_agent=False, connect_timeout=120)
    try:
        conn.run(
            "echo captured > ~/marker; (setsid sleep 100000 >/dev/null 2>&1 &); "
            f"head -c {write_mib}M /dev/urandom > /tmp/data",
            timeout=300,
            check=True,
        )
        if cold:
            conn.run(agent_start_command(vm.user, embedded=True), timeout=120, check=True)
    finally:
        conn.close()


def show(label: str, values: list[float], unit: str) -> None:
    if values:
        med = statistics.median(values)
        print(
            f"  {label:<44} median {med:8.2f} {unit}  (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image", default="debian-12-x86_64")
    parser.add_argument("--mem", type=int, default=512)
    parser.add_argument("--write", type=int, default=32, help="MiB the test-like step writes to /tmp")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ttenv-bench-capture-"))
    key = KeyPair.generate("bench")
    key_file = root / "id"
    key.write_private(key_file)
    backend = LocalBackend(image_dir(), root / "state-a")
    figures: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    res = Resources(cpu=2, mem_mib=args.mem)
    for run in range(args.runs):
        for boot in ("warm", "cold"):
            spec = EnvSpec(f"bench-{boot}-{run}", (VmSpec(args.image, args.image, res),), key.public, boot=boot)
            started = time.monotonic()
            env = backend.create_env(spec)
            try:
                vm = backend.wait_vm(env.id, args.image)
                first_command(vm, key_file)
                if boot == "cold":
                    add("peer: cold boot -> first command (s)", time.monotonic() - started)
                step(vm, key_file, args.write, boot == "cold")
                out = root / f"{boot}-{run}"
                for policy in ("never", "always"):
                    info = backend.capture(env.id, args.image, out / f"{policy}.ttcap", TEST, image=policy)
                    add(f"{boot}: capture, image {policy} (s)", info.seconds)
                    add(f"{boot}: capture, image {policy} (MiB)", info.size / 2**20)
                    if policy == "never":
                        add(f"{boot}: VM paused by the capture (s)", info.paused)
                        raw = capture_format.read_manifest(Path(info.path))
                        add(f"{boot}: peer: raw state + disk delta (MiB)", raw.total_size / 2**20)
            finally:
                backend.delete_env(env.id)
            other = LocalBackend(image_dir(), root / f"state-b-{boot}-{run}")
            capture = out / "never.ttcap"
            manifest = capture_format.read_manifest(capture)
            restore = VmSpec(args.image, args.image, Resources(manifest.vm.cpus, manifest.vm.mem_mib), str(capture))
            started = time.monotonic()
            replayed = other.create_env(EnvSpec(f"replay-{boot}-{run}", (restore,), key.public, boot="warm"))
            try:
                vm = other.wait_vm(replayed.id, args.image)
                first_command(vm, key_file)
                add(f"{boot}: replay -> first command (s)", time.monotonic() - started)
            finally:
                other.delete_env(replayed.id)
            capture.unlink()
            (out / "always.ttcap").unlink()
    print(f"capture/replay of {args.image} ({args.mem} MiB, {args.write} MiB written), {args.runs} run(s):")
    for name, values in figures.items():
        show(name.rsplit(" (", 1)[0], values, name.rsplit(" (", 1)[1].rstrip(")"))


if __name__ == "__main__":
    main()
