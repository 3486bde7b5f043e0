"""The README's main job: an example check suite across a small Debian matrix, matrix printed.

Builds the Debian 11/12/13 images for this host's arch on first use (progress shown), boots
one ENV with a VM per image on the local qemu engine, installs ``hello-tool`` into every VM,
runs the checks on all VMs concurrently over SSH, prints checks x VMs, and deletes the ENV
(also on failure or Ctrl-C). Exit status 0 only if every check passed on every VM.

    python3 examples/matrix_demo.py [--os debian-11,debian-12,debian-13] [--keep]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from pytest_ttenv.access import target
from pytest_ttenv.backend.build import ensure_images
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.backend.model import EnvSpec, Resources, VmSpec
from pytest_ttenv.backend.seed import KeyPair
from pytest_ttenv.errors import TTError
from pytest_ttenv.ssh import Connection, RunResult, SshError, fan_out

HERE = Path(__file__).resolve().parent
# (check name, command, what its stdout must contain)
CHECKS = [
    ("tool installs", "install -m 0755 /tmp/hello-tt /usr/local/bin/hello-tt && echo installed", "installed"),
    ("tool --version", "hello-tt --version", "hello-tt 1.4"),
    ("tool runs", "hello-tt", "hello from"),
    ("python3 present", "python3 -c 'import sys; print(sys.version_info[0])'", "3"),
    ("systemd is PID 1", "cat /proc/1/comm", "systemd"),
    ("sshd via systemd", "systemctl is-active ssh", "active"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--os", default="debian-11,debian-12,debian-13")
    parser.add_argument("--keep", action="store_true", help="leave the ENV running (delete: ttenv env del ...)")
    args = parser.parse_args()
    backend = LocalBackend(progress=lambda line: print(line, flush=True))
    names = [f"{t.strip()}-{platform.machine()}" for t in args.os.split(",") if t.strip()]
    try:
        ensure_images(backend.image_store, names, progress=lambda line: print(f"  {line.strip()}", flush=True))
    except TTError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    key = KeyPair.generate("ttenv-demo")
    vms = tuple(VmSpec(n, n, Resources(cpu=2, mem_mib=512)) for n in names)
    started = time.monotonic()
    env = backend.create_env(EnvSpec(f"demo-{os.getpid()}", vms, key.public))
    from pytest_ttenv.access import save_key

    key_file = save_key(env.id, key)
    conns: list[Connection] = []
    try:
        for vm in env.vms:
            info = backend.wait_vm(env.id, vm.name)
            print(f"{vm.name}: ssh up after {time.monotonic() - started:.1f} s", flush=True)
            conns.append(Connection(target(info, key_file)))
        for conn in conns:
            conn.put(HERE / "hello-tool" / "hello-tt", "/tmp/hello-tt")
        matrix: dict[str, dict[str, RunResult | SshError]] = {}
        for check, cmd, _ in CHECKS:
            matrix[check] = fan_out(conns, cmd, timeout=120)
        return print_matrix(matrix, [vm.name for vm in env.vms])
    finally:
        for conn in conns:
            conn.close()
        if args.keep:
            print(f"kept ENV {env.name}: ttenv env show {env.name}; delete with ttenv env del {env.name}")
        else:
            backend.delete_env(env.id)
            key_file.unlink(missing_ok=True)
            print(f"ENV {env.name} deleted: no VM, overlay or port left")


def print_matrix(matrix: dict[str, dict[str, RunResult | SshError]], vms: list[str]) -> int:
    expect = {name: want for name, _, want in CHECKS}
    width = max(len(c) for c in matrix) + 2
    print("\n" + "check".ljust(width) + "".join(v.ljust(20) for v in vms))
    failures = 0
    for check, results in matrix.items():
        cells = []
        for vm in vms:
            res = results[vm]
            ok = isinstance(res, RunResult) and res.ok and expect[check] in res.stdout
            failures += not ok
            cells.append(("PASS" if ok else "FAIL").ljust(20))
        print(check.ljust(width) + "".join(cells))
    passed = len(matrix) * len(vms) - failures
    print(f"\n{passed} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
