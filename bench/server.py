"""Benchmark the host server (run by hand: `python bench/server.py`; needs root and a built debian-12
image, like the VM tests).

1. Server-side overhead of create + delete, boot excluded: a 1-VM ENV (1 CPU, 256 MiB, TCG) created
   and deleted at once, through LocalBackend in this process and through HttpBackend against a
   `ttenv serve` on 127.0.0.1, interleaved rounds (drifts in machine load hit both alike). Both
   start a real qemu; the difference is what HTTP, auth, quota and the server add.
2. Requests/s of GET /v1/status under N concurrent clients (threads, one requests.Session each)
   for a fixed time, with latency percentiles.

Prints median [min-max] per figure.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import requests  # noqa: E402

from pytest_ttenv.backend.images.build import ensure_images  # noqa: E402
from pytest_ttenv.backend.images.store import ImageStore  # noqa: E402
from pytest_ttenv.backend.local import LocalBackend  # noqa: E402
from pytest_ttenv.core.keys import KeyPair  # noqa: E402
from pytest_ttenv.core.model import EnvSpec, Resources, VmSpec  # noqa: E402
from pytest_ttenv.core.paths import image_dir  # noqa: E402

from helpers.server import image_dir_with, start_server  # noqa: E402


def spread(xs: list[float], unit: str = "ms", scale: float = 1000.0) -> str:
    return f"{statistics.median(xs) * scale:.1f} {unit} [{min(xs) * scale:.1f}-{max(xs) * scale:.1f}] (n={len(xs)})"


def create_delete(rounds: int, tmp: Path, images: Path) -> None:
    (image,) = ensure_images(ImageStore(image_dir()), [f"debian-12-{platform.machine()}"])
    pool = image_dir_with(images, [image])
    server = start_server(tmp, pool, owners=["bench"], options=["--log-level", "warning"])
    local = LocalBackend(pool, tmp / "local-state")
    remote = server.backend("bench")
    pub = KeyPair.generate("bench").public
    times: dict[str, dict[str, list[float]]] = {n: {"create": [], "delete": [], "both": []} for n in ("local", "http")}
    try:
        for i in range(rounds):
            for name, backend in (("local", local), ("http", remote)):
                spec = EnvSpec(f"b{i}", (VmSpec("vm1", image.name, Resources(1, 256)),), pub, ttl=300, accel="tcg")
                t0 = time.perf_counter()
                env = backend.create_env(spec)
                t1 = time.perf_counter()
                backend.delete_env(env.id)
                t2 = time.perf_counter()
                times[name]["create"].append(t1 - t0)
                times[name]["delete"].append(t2 - t1)
                times[name]["both"].append(t2 - t0)
    finally:
        server.cleanup()
        for env in local.list_envs():
            local.delete_env(env.id)
    print(f"create+delete of a 1-VM ENV (boot excluded), {rounds} interleaved rounds:")
    for name in ("local", "http"):
        for what in ("create", "delete", "both"):
            print(f"  {name:<5} {what:<7} {spread(times[name][what])}")
    over = [h - lo for h, lo in zip(times["http"]["both"], times["local"]["both"], strict=True)]
    print(f"  server overhead per create+delete (http - local, same round): {spread(over)}")


def status_rps(clients: int, seconds: float, tmp: Path) -> None:
    (tmp / "empty-images").mkdir(exist_ok=True)
    server = start_server(tmp / "rps", tmp / "empty-images", owners=["bench"], options=["--log-level", "warning"])
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0]
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        session = requests.Session()
        headers = server.headers("bench")
        start.wait()
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            res = session.get(f"{server.url}/v1/status", headers=headers, timeout=30)
            latencies[i].append(time.perf_counter() - t0)
            if res.status_code != 200:
                errors[0] += 1

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        stop_at[0] = time.perf_counter() + seconds
        began = time.perf_counter()
        start.wait()
        for t in threads:
            t.join()
        wall = time.perf_counter() - began
    finally:
        server.cleanup()
    per_client = [len(lat) / wall for lat in latencies]
    flat = sorted(x for lat in latencies for x in lat)
    total = len(flat)
    print(
        f"GET /v1/status, {clients} concurrent clients for {wall:.1f} s: {total / wall:.0f} requests/s "
        f"({total} requests, {errors[0]} errors)"
    )
    print(f"  per client: {statistics.median(per_client):.1f} req/s [{min(per_client):.1f}-{max(per_client):.1f}]")
    print(
        f"  latency: {spread(flat)}, p90 {flat[int(0.9 * total)] * 1000:.1f} ms, "
        f"p99 {flat[int(0.99 * total)] * 1000:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="create+delete rounds per backend (default 15)")
    parser.add_argument("--clients", type=int, default=20, help="concurrent status clients (default 20)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the status run (default 10)")
    parser.add_argument("--skip-create", action="store_true", help="only the status run (no VMs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ttenv-bench-") as tmp:
        if not args.skip_create:
            create_delete(args.rounds, Path(tmp), Path(tmp) / "images")
        status_rps(args.clients, args.seconds, Path(tmp))


if __name__ == "__main__":
    main()
