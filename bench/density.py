"""Warm VM density benchmark (run by hand): how much host memory each warm VM costs, and how an
ENV of many warm VMs compares with an ENV of one.

For each variant, interleaved in one run: ENVs of 1 and of ``--count`` warm VMs of one image,
whose VMs map their template's RAM copy-on-write (``shared``, VM templating) or restore their
own copy of it (``plain``, ``TTENV_SHARED_RAM=0``: the peer). Per VM: PSS and RSS of its qemu
(``/proc/PID/smaps_rollup``) and CPU seconds of its qemu after ``--idle`` s, and qemu start ->
ready (identity taken, sshd answering); per ENV: ``env add`` -> every VM ready and -> every VM's
first command, and host memory in use (MemTotal - MemAvailable: ``free``'s "used"; the page
cache that holds a template's RAM file counts as available) before and after. ``--ksm`` adds
the variant ``shared+ksm``: KSM merging while idle (root; turned off, unmerged, afterwards).

    python3 bench/density.py --runs 3 [--count 8] [--image debian-12-x86_64] [--ksm]

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


def rollup(pid: int) -> dict[str, float]:
    """PSS and RSS of a process, MiB, and the CPU seconds it used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out = {"cpu": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("Pss:", "Rss:"):
            out[parts[0][:-1]] = int(parts[1]) / 1024
    return out


def ksm(on: bool) -> dict[str, int]:
    """Turn KSM on (scanning 1000 pages per 20 ms) or off (unmerging); returns its counters as
    they were before."""
    root = Path("/sys/kernel/mm/ksm")
    counters = {f: int((root / f).read_text()) for f in ("pages_sharing", "pages_shared", "full_scans")}
    if on:
        (root / "pages_to_scan").write_text("1000")
    (root / "run").write_text("1" if on else "2")
    return counters


def kernel_thread_cpu(name: str) -> float:
    """CPU seconds used so far by the kernel thread ``name`` (0 if there is none)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == name:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    return 0.0


def one_env(image: str, count: int, idle: float, merge: bool = False) -> dict[str, list[float]]:
    """An ENV of ``count`` warm VMs of ``image``: timings and memory (``merge``: KSM on while idle)."""
    with tempfile.TemporaryDirectory(prefix="ttenv-density-") as state:
        backend = LocalBackend(image_dir(), state)
        key = KeyPair.generate("bench")
        key_file = Path(state) / "id"
        key.write_private(key_file)
        vms = tuple(VmSpec(f"vm{i}", image, Resources(cpu=2, mem_mib=512)) for i in range(count))
        before = in_use()
        started = time.monotonic()
        env = backend.create_env(EnvSpec("DENSITY", vms, key.public, boot="warm"))
        try:

            def first_command(name: str) -> tuple[float, float, float]:
                vm = backend.wait_vm(env.id, name, 900)
                ready = time.monotonic() - started
                conn = Connection(target(vm, key_file), use_agent=False)
                try:
                    conn.run("true", timeout=60, check=True)
                finally:
                    conn.close()
                return ready, time.monotonic() - started, vm.boot_seconds

            with ThreadPoolExecutor(count) as pool:
                got = list(pool.map(first_command, [v.name for v in vms]))
            ksmd = kernel_thread_cpu("ksmd")
            if merge:
                ksm(True)
            time.sleep(idle)
            env = backend.show_env(env.id)
            mem = [rollup(vm.pid) for vm in env.vms]
            after = in_use()
            merged = ksm(False) if merge else {}
            ksmd = kernel_thread_cpu("ksmd") - ksmd
        finally:
            backend.delete_env(env.id)
    return {
        "ready": [max(g[0] for g in got)],
        "first": [max(g[1] for g in got)],
        "vm_ready": [g[2] for g in got],
        "pss": [m["Pss"] for m in mem],
        "rss": [m["Rss"] for m in mem],
        "cpu": [m["cpu"] for m in mem],
        "in_use": [after - before],
        "ksm": [merged.get("pages_sharing", 0) * 4 / 1024],
        "ksmd": [ksmd],
    }


def fmt(values: list[float], unit: str = "") -> str:
    return f"{statistics.median(values):.1f}{unit} [{min(values):.1f}-{max(values):.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--image", default="debian-12-x86_64")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds idle before reading memory")
    parser.add_argument("--ksm", action="store_true", help="also: shared RAM with KSM merging while idle (root)")
    args = parser.parse_args()
    variants = dict(VARIANTS)
    if args.ksm:
        variants["shared+ksm"] = "1"
    for variant, flag in VARIANTS.items():
        os.environ["TTENV_SHARED_RAM"] = flag
        started = time.monotonic()
        one_env(args.image, 1, 0)  # makes the variant's template if there is none yet
        print(f"{variant}: first ENV (makes the template if missing) {time.monotonic() - started:.1f} s", flush=True)
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    for run in range(args.runs):
        for count in (1, args.count):
            for variant, flag in variants.items():  # interleaved: same conditions for all
                os.environ["TTENV_SHARED_RAM"] = flag
                got = one_env(args.image, count, args.idle, merge=variant.endswith("ksm"))
                slot = results.setdefault((variant, count), {})
                for k, v in got.items():
                    slot.setdefault(k, []).extend(v)
                print(
                    f"run {run + 1} {variant} x{count}: all ready {got['ready'][0]:.1f} s, first commands "
                    f"{got['first'][0]:.1f} s, PSS/VM {statistics.median(got['pss']):.0f} MiB, "
                    f"in use +{got['in_use'][0]:.0f} MiB",
                    flush=True,
                )
    report(args, variants, results)


def report(
    args: argparse.Namespace, variants: dict[str, str], results: dict[tuple[str, int], dict[str, list[float]]]
) -> None:
    print(f"\n{args.image}, warm, 2 vCPU / 512 MiB per VM, {args.runs} runs, idle {args.idle:.0f} s; median [min-max]")
    cols = ("env add -> all ready", "-> all first cmds", "qemu start -> ready", "PSS/VM MiB", "RSS/VM MiB")
    print(f"{'RAM':<10} {'VMs':>3} " + " ".join(f"{c:>22}" for c in (*cols, "qemu CPU s/VM", "in use +MiB")))
    for (variant, count), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = [fmt(r["ready"], "s"), fmt(r["first"], "s"), fmt(r["vm_ready"], "s"), fmt(r["pss"]), fmt(r["rss"])]
        cells += [fmt(r["cpu"]), fmt(r["in_use"])]
        extra = f"  KSM merged {fmt(r['ksm'])} MiB, ksmd {fmt(r['ksmd'])} CPU s" if variant.endswith("ksm") else ""
        print(f"{variant:<10} {count:>3} " + " ".join(f"{c:>22}" for c in cells) + extra)
    for variant in variants:
        one, many = results[(variant, 1)], results[(variant, args.count)]
        extra = (statistics.median(many["in_use"]) - statistics.median(one["in_use"])) / (args.count - 1)
        ready = statistics.median(many["ready"]) / statistics.median(one["ready"])
        first = statistics.median(many["first"]) / statistics.median(one["first"])
        print(
            f"{variant}: host memory per additional VM {extra:.0f} MiB; an ENV of {args.count} is ready in "
            f"{ready:.2f}x the time of an ENV of 1 ({first:.2f}x to every first command)"
        )


if __name__ == "__main__":
    main()
