"""``ttenv replay`` refusing what it must not start, through the real CLI, before any VM runs: a
machine type this host's qemu lacks, an image that is not here, a bundled image whose metadata
names a file outside it, and an overlay that would make qemu open another file (a qcow2 external
data file). Each is one line, exit 2, and leaves nothing in the state dir. (Damaged and truncated
files: tests/unit/test_capture_format.py; real captures replayed: tests/vm/test_capture.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from pytest_ttenv.core import capture_format as cf

from helpers.leftovers import leftovers

D12 = "debian-12-x86_64"
MACHINE_ID = "0123456789abcdef0123456789abcdef"


def qcow2_header(incompatible: int = 0) -> bytes:
    """A qcow2 v3 header (104 bytes) with the given incompatible feature bits, no backing file."""
    header = bytearray(104)
    header[0:4] = b"QFI\xfb"
    header[4:8] = (3).to_bytes(4, "big")
    header[20:24] = (16).to_bytes(4, "big")  # cluster bits
    header[72:80] = incompatible.to_bytes(8, "big")
    header[100:104] = (104).to_bytes(4, "big")  # header length
    return bytes(header)


def make_capture(
    tmp_path: Path,
    *,
    machine: str = "pc-q35-7.2",
    bundled: bool = False,
    image_json: Mapping[str, object] | None = None,
    overlay: bytes = b"",
) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "state").write_bytes(b"QEVM" + os.urandom(1000))
    (src / "overlay.qcow2").write_bytes(overlay or qcow2_header())
    sources = [
        cf.Source("state", "state", path=src / "state"),
        cf.Source("overlay.qcow2", "overlay", path=src / "overlay.qcow2"),
    ]
    digest = "ab" * 32
    if bundled:
        disk = qcow2_header() + b"\0" * 4096
        digest = hashlib.sha256(disk).hexdigest()
        meta = image_json or {"name": D12, "os": "debian", "version": "12", "arch": "x86_64"}
        sources += [
            cf.Source("image/image.json", "image", data=json.dumps(meta).encode()),
            cf.Source("image/disk.qcow2", "image", data=disk),
            cf.Source("image/vmlinuz", "image", data=b"kernel"),
            cf.Source("image/initrd.img", "image", data=b"initrd"),
        ]
    image = cf.ImageRef(D12, digest, bundled)
    vm = cf.VmRecord(D12, "x86_64", machine, "7.2.22", "tcg", "max", 1, 256, "warm", MACHINE_ID, False, True, image)
    path = tmp_path / f"t--{D12}.ttcap"
    cf.write(path, cf.TestRecord("tests/t.py::test_x"), vm, sources)
    return path


def replay(tmp_path: Path, capture: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    state = tmp_path / "state"
    env = dict(os.environ, TTENV_STATE_DIR=str(state), TTENV_IMAGE_DIR=str(tmp_path / "images"))
    argv = [sys.executable, "-m", "pytest_ttenv.cli", "replay", str(capture), "--accel", "tcg"]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120), state


def refused(res: subprocess.CompletedProcess[str], state: Path, *words: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("ttenv: error: "), res.stdout + res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert leftovers(state) == []
    assert not (state / "replays").exists() or not list((state / "replays").iterdir())


@pytest.fixture(autouse=True)
def _qemu() -> None:
    import shutil

    if not shutil.which("qemu-system-x86_64") or not shutil.which("qemu-img"):
        pytest.skip("qemu-system-x86_64 and qemu-img are needed (scripts/setup.sh)")


def test_a_machine_type_this_qemu_lacks(tmp_path: Path) -> None:
    res, state = replay(tmp_path, make_capture(tmp_path, machine="pc-q35-99.1"))
    refused(res, state, "pc-q35-99.1", "does not have")


def test_an_image_that_is_not_here(tmp_path: Path) -> None:
    res, state = replay(tmp_path, make_capture(tmp_path))
    refused(res, state, f"needs image {D12}", "ttenv image pull")


def test_a_bundled_image_that_names_a_file_outside_it(tmp_path: Path) -> None:
    meta = {"name": D12, "os": "debian", "version": "12", "arch": "x86_64", "kernel": "../../../etc/passwd"}
    res, state = replay(tmp_path, make_capture(tmp_path, bundled=True, image_json=meta))
    refused(res, state, "unusable", "etc/passwd")


def test_an_overlay_with_an_external_data_file(tmp_path: Path) -> None:
    res, state = replay(tmp_path, make_capture(tmp_path, bundled=True, overlay=qcow2_header(incompatible=1 << 2)))
    refused(res, state, "not a plain qcow2")
