"""The tuned images' initramfs: busybox, the virtio/ext4/isofs modules (with their
dependencies) and our ``/init``, as an uncompressed cpio archive (fast to unpack under emulation).
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import subprocess
from pathlib import Path

from pytest_ttenv.backend.images.steps import guest_file

# Modules the initramfs loads (with their dependencies) when the kernel does not have them built in.
# crc32c_generic: ext4 asks the crypto API for crc32c at mount time (a module in the riscv64 kernel).
INITRAMFS_MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_ccw",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "crc32c_generic",
    "ext4",
    "isofs",
)


def _module_closure(moddir: Path, wanted: tuple[str, ...]) -> list[str]:
    """Module files (relative to ``moddir``) for ``wanted`` and their dependencies, deps first.

    Built-in modules and modules this kernel does not have are skipped.
    """
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {re.sub(r"\.ko(\.\w+)?$", "", Path(p).name).replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
    return order


def build_initramfs(root: Path, kver: str, dest: Path) -> None:
    """Write an uncompressed cpio initramfs: busybox, the virtio/ext4/isofs modules, our /init.

    Compressed modules are stored decompressed so busybox ``insmod`` can load them.
    """
    moddir = root / "lib" / "modules" / kver
    busybox = root / "bin" / "busybox"
    if not busybox.exists():
        busybox = root / "usr" / "bin" / "busybox"
    tree = dest.parent / "initramfs-tree"
    shutil.rmtree(tree, ignore_errors=True)
    for d in ("bin", "dev", "proc", "root", "etc", "lib/modules"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, tree / "bin" / "busybox")
    os.mknod(tree / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
    loaded: list[str] = []
    for rel in _module_closure(moddir, INITRAMFS_MODULES):
        src = moddir / rel
        name = re.sub(r"\.ko(\.\w+)?$", ".ko", src.name)
        data = src.read_bytes()
        if src.suffix == ".xz":
            data = lzma.decompress(data)
        elif src.suffix == ".zst":
            data = subprocess.run(["zstd", "-dc", str(src)], check=True, capture_output=True).stdout
        (tree / "lib" / "modules" / name).write_bytes(data)
        loaded.append(name)
    (tree / "etc" / "ttenv-modules").write_text("\n".join(loaded) + "\n")
    (tree / "init").write_text(guest_file("initramfs-init"))
    (tree / "init").chmod(0o755)
    files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    with open(dest, "wb") as f:
        subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            input="\n".join(files).encode(),
            stdout=f,
            cwd=tree,
            check=True,
        )
    shutil.rmtree(tree)
