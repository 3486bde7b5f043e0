"""Warm VM density benchmark (run by hand): how much host memory each warm VM costs, and how an
ENV of many warm VMs compares with an ENV of one.

For each variant, interleaved in one run: ENVs of 1 and of ``--count`` warm VMs of one image,
whose VMs map their template's RAM copy-on-write (``shared``, VM templating) or restore their
own copy of it (``plain``, ``TTENV_SHARED_RAM=0``: the peer). Per VM: PSS and RSS of its qemu
(``/proc/PID/smaps_rollup``) after ``--idle`` s, and qemu start -> ready (identity taken,
sshd answering); per ENV: ``env add`` -> every VM's first command, and host memory in use
(``free``'s "used" plus the page cache a RAM file holds: MemTotal - MemAvailable) before and
after.

    python3 bench/density.py --runs 3 [--count 8] [--image debian-12-x86_64]

Templates are made before the runs (one per variant). Prints medians with min/max; nothing here
is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pytest_ttenv.access import target
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvSpec, Resources, VmSpec
from pytest_ttenv.core.paths import image_dir
from pytest_ttenv.ssh import Connection

VARIANTS = {"shared": "1", "plain": "0"}  # TTENV_SHARED_RAM


def meminfo() -> dict[str, float]:
    """/proc/meminfo in MiB."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) / 1024
    return out


def in_use() -> float:
    """Host memory in use, MiB: MemTotal - MemAvailable."""
    m = meminfo()
    return m["MemTotal"] - m["MemAvailable"]


def used() -> float:
    """``free``'s "used", MiB: MemTotal - MemFree - Buffers - Cached - SReclaimable."""
    m = meminfo()
    return m["MemTotal"] - m["MemFree"] - m["Buffers"] - m["Cached"] - m["SReclaimable"]


def rollup(pid: int) -> dict[str, float]:
    """PSS and RSS of a process, MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("Pss:", "Rss:"):
            out[parts[0][:-1]] = int(parts[1]) / 1024
    return out


def one_env(image: str, count: int, idle: float) -> dict[str, list[float]]:
    """An ENV of ``count`` warm VMs of ``image``: timings and memory."""
    with tempfile.TemporaryDirectory(prefix="ttenv-density-") as state:
        backend = LocalBackend(image_dir(), state)
        key = KeyPair.generate("bench")
        key_file = Path(state) / "id"
        key.write_private(key_file)
        vms = tuple(VmSpec(f"vm{i}", image, Resources(cpu=2, mem_mib=512)) for i in range(count))
        before_use, before_used = in_use(), used()
        started = time.monotonic()
        env = backend.create_env(EnvSpec("DENSITY", vms, key.public, boot="warm"))
        try:

            def first_command(name: str) -> tuple[float, float]:
                vm = backend.wait_vm(env.id, name, 900)
                conn = Connection(target(vm, key_file), use_agent=False)
                try:
                    conn.run("true", timeout=60, check=True)
                finally:
                    conn.close()
                return time.monotonic() - started, vm.boot_seconds

            with ThreadPoolExecutor(count) as pool:
                got = list(pool.map(first_command, [v.name for v in vms]))
            time.sleep(idle)
            env = backend.show_env(env.id)
            mem = [rollup(vm.pid) for vm in env.vms]
            after_use, after_used = in_use(), used()
        finally:
            backend.delete_env(env.id)
    return {
        "first": [max(g[0] for g in got)],
        "ready": [g[1] for g in got],
        "pss": [m["Pss"] for m in mem],
        "rss": [m["Rss"] for m in mem],
        "in_use": [after_use - before_use],
        "used": [after_used - before_used],
    }


def fmt(values: list[float], unit: str = "") -> str:
    return f"{statistics.median(values):.1f}{unit} [{min(values):.1f}-{max(values):.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--image", default="debian-12-x86_64")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds idle before reading memory")
    args = parser.parse_args()
    for variant, flag in VARIANTS.items():
        os.environ["TTENV_SHARED_RAM"] = flag
        started = time.monotonic()
        one_env(args.image, 1, 0)  # makes the variant's template if there is none yet
        print(f"{variant}: first ENV (makes the template if missing) {time.monotonic() - started:.1f} s", flush=True)
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    for run in range(args.runs):
        for count in (1, args.count):
            for variant, flag in VARIANTS.items():  # interleaved: same conditions for both
                os.environ["TTENV_SHARED_RAM"] = flag
                got = one_env(args.image, count, args.idle)
                slot = results.setdefault((variant, count), {})
                for k, v in got.items():
                    slot.setdefault(k, []).extend(v)
                print(
                    f"run {run + 1} {variant} x{count}: first command after {got['first'][0]:.1f} s, "
                    f"PSS/VM {statistics.median(got['pss']):.0f} MiB, in use +{got['in_use'][0]:.0f} MiB",
                    flush=True,
                )
    print(f"\n{args.image}, warm, 2 vCPU / 512 MiB per VM, {args.runs} runs; median [min-max]")
    head = f"{'RAM':<7} {'VMs':>3} {'env add -> all first cmds':>26} {'qemu start -> ready':>22}"
    print(head + f" {'PSS/VM MiB':>20} {'RSS/VM MiB':>20} {'used +MiB':>20} {'in use +MiB':>20}")
    for (variant, count), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(
            f"{variant:<7} {count:>3} {fmt(r['first'], 's'):>26} {fmt(r['ready'], 's'):>22} {fmt(r['pss']):>20} "
            f"{fmt(r['rss']):>20} {fmt(r['used']):>20} {fmt(r['in_use']):>20}"
        )
    for variant in VARIANTS:
        one, many = results[(variant, 1)], results[(variant, args.count)]
        extra = (statistics.median(many["in_use"]) - statistics.median(one["in_use"])) / (args.count - 1)
        ratio = statistics.median(many["first"]) / statistics.median(one["first"])
        print(f"{variant}: host memory per additional VM {extra:.0f} MiB; ", end="")
        print(f"{args.count}-VM ENV ready in {ratio:.2f}x the time of a 1-VM ENV")


if __name__ == "__main__":
    main()
