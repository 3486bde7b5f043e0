"""``ttenv image import``: your own qcow2 or raw disk into the store (real qemu-img, real files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_ttenv.backend.images.importer import import_image
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.errors import NotFound, TTError, UsageError

pytestmark = pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img not installed")

MIB = 1 << 20


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("own")
    raw = d / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MIB)
        f.seek(3 * MIB)
        f.write(os.urandom(MIB))
    qcow2 = d / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    overlay = d / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(qcow2), str(overlay)], check=True
    )
    return {"raw": raw, "qcow2": qcow2, "overlay": overlay}


def same_content(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


def info_of(path: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, check=True).stdout
    data: dict[str, object] = json.loads(out)
    return data


def test_import_qcow2_and_raw(tmp_path: Path, disks: dict[str, Path]) -> None:
    store = ImageStore(tmp_path / "images")
    img = import_image(store, disks["qcow2"], "myos-1.0-x86_64", user="admin", boot="uefi")
    assert img.file("disk.qcow2").read_bytes() == disks["qcow2"].read_bytes()  # copied as is
    assert (img.os, img.version, img.arch, img.user, img.boot) == ("myos", "1.0", "x86_64", "admin", "uefi")
    assert (img.access, img.source, img.kernel, img.initrd, img.disk_mib) == ("cloud-init", "import", None, None, 8)
    assert img.details == {"file": str(disks["qcow2"].resolve()), "format": "qcow2"}
    raw = import_image(store, disks["raw"], "myos-1.0-aarch64")
    disk = raw.file("disk.qcow2")
    assert info_of(disk)["format"] == "qcow2" and same_content(disks["raw"], disk)
    assert (raw.user, raw.boot, raw.details["format"]) == ("root", "bios", "raw")
    assert store.names() == ["myos-1.0-aarch64", "myos-1.0-x86_64"]
    assert sorted(p.name for p in store.root.iterdir()) == ["myos-1.0-aarch64", "myos-1.0-x86_64"]


def test_overlay_is_flattened(tmp_path: Path, disks: dict[str, Path]) -> None:
    img = import_image(ImageStore(tmp_path / "images"), disks["overlay"], "myos-1.0-x86_64")
    disk = img.file("disk.qcow2")
    assert "backing-filename" not in info_of(disk) and same_content(disks["qcow2"], disk)


def test_refuses_to_overwrite_without_force(tmp_path: Path, disks: dict[str, Path]) -> None:
    store = ImageStore(tmp_path / "images")
    import_image(store, disks["qcow2"], "myos-1.0-x86_64")
    with pytest.raises(UsageError, match=r"^image myos-1.0-x86_64 already exists in .* \(pass --force to replace"):
        import_image(store, disks["raw"], "myos-1.0-x86_64", user="other")
    assert store.get("myos-1.0-x86_64").user == "root"
    assert import_image(store, disks["raw"], "myos-1.0-x86_64", user="other", force=True).user == "other"
    assert store.get("myos-1.0-x86_64").details["format"] == "raw"


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "message"),
    [
        ("myos", {}, UsageError, "bad image name 'myos' (expected <os>-<version>-<arch>"),
        ("MyOS-1-x86_64", {}, UsageError, "bad image name 'MyOS-1-x86_64'"),
        ("myos-1-sparc", {}, UsageError, "bad image name 'myos-1-sparc'"),
        ("myos-1-x86_64", {"boot": "pxe"}, UsageError, "unknown boot method 'pxe'"),
        ("myos-1-x86_64", {"boot": "direct"}, UsageError, "--boot direct needs --kernel"),
        ("myos-1-x86_64", {"user": "Bad User"}, UsageError, "bad user name 'Bad User'"),
        ("myos-1-x86_64", {"kernel": "/vmlinuz"}, UsageError, "--kernel and --initrd are only used with --boot direct"),
    ],
)
def test_bad_input(
    tmp_path: Path, disks: dict[str, Path], name: str, kwargs: dict[str, str], error: type[TTError], message: str
) -> None:
    store = ImageStore(tmp_path / "images")
    with pytest.raises(error) as err:
        import_image(store, disks["qcow2"], name, **kwargs)  # type: ignore[arg-type]
    assert str(err.value).startswith(message)
    assert not store.root.exists() or list(store.root.iterdir()) == []


def test_not_a_disk(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    text = tmp_path / "notes.txt"
    text.write_text("not a disk\n")
    with pytest.raises(UsageError, match="is not a disk image"):
        import_image(store, text, "myos-1-x86_64")
    with pytest.raises(NotFound, match="no such file: "):
        import_image(store, tmp_path / "missing.qcow2", "myos-1-x86_64")
    with pytest.raises(UsageError, match="is not a regular file"):
        import_image(store, tmp_path, "myos-1-x86_64")
    assert store.names() == []


def test_direct_boot_copies_kernel_and_initrd(tmp_path: Path, disks: dict[str, Path]) -> None:
    kernel, initrd = tmp_path / "vmlinuz-6.1", tmp_path / "initrd-6.1"
    kernel.write_bytes(b"kernel")
    initrd.write_bytes(b"initrd")
    img = import_image(
        ImageStore(tmp_path / "images"),
        disks["qcow2"],
        "myos-1-x86_64",
        boot="direct",
        kernel=kernel,
        initrd=initrd,
        cmdline="root=/dev/vda console=ttyS0",
    )
    assert (img.kernel, img.initrd, img.cmdline) == ("vmlinuz", "initrd.img", "root=/dev/vda console=ttyS0")
    assert img.file("vmlinuz").read_bytes() == b"kernel" and img.file("initrd.img").read_bytes() == b"initrd"


def ttenv(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TTENV_STATE_DIR=str(tmp_path / "state"), TTENV_IMAGE_DIR=str(tmp_path / "images"))
    return subprocess.run(
        [sys.executable, "-m", "pytest_ttenv.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_cli_import(tmp_path: Path, disks: dict[str, Path]) -> None:
    res = ttenv(tmp_path, "image", "import", str(disks["raw"]), "--name", "myos-2-x86_64", "--user", "me")
    assert res.returncode == 0, res.stderr
    assert "imported" in res.stdout and "myos-2-x86_64" in res.stdout
    res = ttenv(tmp_path, "image", "import", str(disks["qcow2"]), "--name", "myos-2-x86_64")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == (
        f"ttenv: error: image myos-2-x86_64 already exists in {tmp_path / 'images'} (pass --force to replace it)"
    )
    res = ttenv(tmp_path, "image", "import", str(disks["qcow2"]), "--name", "myos-2-x86_64", "--force")
    assert res.returncode == 0, res.stderr
    images = ImageStore(tmp_path / "images").all()
    assert [(i.name, i.user, i.source, i.details["format"]) for i in images] == [
        ("myos-2-x86_64", "root", "import", "qcow2")
    ]
    res = ttenv(tmp_path, "image", "import", str(disks["qcow2"]), "--name", "bad")
    assert res.returncode == 2 and res.stderr.startswith("ttenv: error: bad image name 'bad'")
    assert len(res.stderr.splitlines()) == 1
