"""The image store: listing, atomic install, builds in progress never listed (real files); the
build recipe; which images a session plans and how the missing ones are obtained (``acquire``)."""

import json
import os
import struct
from pathlib import Path

import pytest

from pytest_ttenv.backend.images import build, pull
from pytest_ttenv.backend.images.acquire import obtain, plan
from pytest_ttenv.backend.images.build import host_mirror
from pytest_ttenv.backend.images.build_cloud import CLOUD_ESP, CLOUD_ROOT_START, mbr
from pytest_ttenv.backend.images.recipe import buildable, parse_target
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.errors import NotFound, TTError, UsageError


def info(name: str = "debian-12-x86_64") -> ImageInfo:
    os_, version, arch = name.split("-")[0], name.split("-")[1], name.rsplit("-", 1)[1]
    return ImageInfo(name=name, os=os_, version=version, arch=arch, created=1.0)


def make(tmp_path: Path, name: str) -> Path:
    src = tmp_path / f"src-{name}"
    src.mkdir()
    (src / "disk.qcow2").write_bytes(b"qcow")
    return src


def test_install_then_list_and_get(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    store.root.mkdir()
    store.install(make(tmp_path, "a"), info())
    assert store.names() == ["debian-12-x86_64"]
    got = store.get("debian-12-x86_64")
    assert got.path == store.root / "debian-12-x86_64"
    assert got.file(got.disk).read_bytes() == b"qcow"


def test_install_replaces_existing(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    store.root.mkdir()
    store.install(make(tmp_path, "a"), info())
    newer = make(tmp_path, "b")
    (newer / "disk.qcow2").write_bytes(b"new")
    store.install(newer, info())
    assert store.get("debian-12-x86_64").file("disk.qcow2").read_bytes() == b"new"
    assert [p.name for p in store.root.iterdir()] == ["debian-12-x86_64"]


def test_half_built_and_dropped_in_images(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    building = store.root / f".build-debian-13-x86_64-{os.getpid()}"
    building.mkdir(parents=True)
    (building / "image.json").write_text(json.dumps(info("debian-13-x86_64").to_dict()))
    assert store.names() == []  # a build in progress is invisible
    dropped = store.root / "debian-11-x86_64"
    dropped.mkdir()
    (dropped / "image.json").write_text(json.dumps(info("debian-11-x86_64").to_dict()))
    assert store.names() == ["debian-11-x86_64"]  # picked up without a restart of anything
    (store.root / "broken").mkdir()
    (store.root / "broken" / "image.json").write_text("{not json")
    assert store.names() == ["debian-11-x86_64"]


def test_stale_builds_removed_live_ones_kept(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    live = tmp_path / f".build-debian-12-x86_64-{os.getpid()}"
    dead = tmp_path / ".build-debian-12-x86_64-999999999"
    live.mkdir()
    dead.mkdir()
    assert store.remove_stale_builds() == [dead]
    assert live.exists() and not dead.exists()


def test_missing_image_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="ttenv image build debian-13 --arch x86_64"):
        ImageStore(tmp_path).get("debian-13-x86_64")


@pytest.mark.parametrize(("target", "version"), [("debian-12", "12"), ("debian11", "11"), ("debian-trixie", "13")])
def test_parse_build_target(target: str, version: str) -> None:
    req = parse_target(target, "x86_64")
    assert (req.os, req.version, req.name) == ("debian", version, f"debian-{version}-x86_64")


@pytest.mark.parametrize(
    ("target", "variant"), [("debiancloud-12", ""), ("debian-12", "cloud"), ("debiancloud12", "cloud")]
)
def test_cloud_variant_has_its_own_name(target: str, variant: str) -> None:
    req = parse_target(target, "x86_64", variant)
    assert (req.variant, req.name, req.os) == ("cloud", "debiancloud-12-x86_64", "debian")
    assert not req.name.replace("-", "").startswith("debian12")  # --tt-os=debian12 never selects it


@pytest.mark.parametrize(
    ("target", "arch", "variant", "error"),
    [
        ("debiancloud-12", "x86_64", "plain", "is the cloud variant"),
        ("debian-12", "aarch64", "cloud", "x86_64 only"),
        ("debian-12", "x86_64", "shiny", "unknown variant 'shiny'"),
    ],
)
def test_bad_variant(target: str, arch: str, variant: str, error: str) -> None:
    with pytest.raises(UsageError, match=error):
        parse_target(target, arch, variant)


def test_mbr_has_grub_code_a_bootable_root_and_an_esp() -> None:
    boot_img, size = bytes(range(256)) * 2, 3072 * 2**20
    record = mbr(boot_img, [(True, 0x83, CLOUD_ROOT_START, size - CLOUD_ROOT_START), (False, 0xEF, *CLOUD_ESP)])
    assert len(record) == 512 and record[510:] == b"\x55\xaa"
    assert record[:0x66] == boot_img[:0x66] and record[0x66:0x68] == b"\x90\x90"  # drive check off
    entries = [struct.unpack("<B3xB3xII", record[446 + 16 * i : 462 + 16 * i]) for i in range(4)]
    root, esp = entries[0], entries[1]
    assert root[:2] == (0x80, 0x83) and root[2] * 512 == CLOUD_ROOT_START and (root[2] + root[3]) * 512 == size
    assert esp[:2] == (0, 0xEF) and (esp[2] * 512, esp[3] * 512) == CLOUD_ESP
    assert CLOUD_ESP[0] + CLOUD_ESP[1] <= CLOUD_ROOT_START  # no overlap; the BIOS core image fits before the ESP
    assert entries[2:] == [(0, 0, 0, 0), (0, 0, 0, 0)]


def test_an_arch_a_release_does_not_ship_is_said_plainly() -> None:
    assert parse_target("debian-12", "s390x").name == "debian-12-s390x"
    with pytest.raises(
        UsageError, match=r"Debian 13 \(trixie\) ships no i386 kernel.*build debian-11, debian-12 for i386"
    ):
        parse_target("debian-13", "i386")
    with pytest.raises(UsageError, match=r"Debian 12 \(bookworm\) ships no riscv64 kernel.*build debian-13"):
        parse_target("debian-12", "riscv64")
    assert buildable(["i686", "ppc64el"]) == [
        "debian-11-i386",
        "debian-12-i386",
        "debian-11-ppc64le",
        "debian-12-ppc64le",
        "debian-13-ppc64le",
    ]


def test_unbuildable_target() -> None:
    with pytest.raises(UsageError, match="buildable here: debian-11, debian-12, debian-13"):
        parse_target("ubuntu-22.04", "x86_64")


def test_host_mirror_is_a_debian_http_mirror() -> None:
    assert host_mirror().startswith("http") and "/debian" in host_mirror()


# -- acquire: plan and obtain -------------------------------------------------------------------
def _listed(root: Path, *names: str) -> ImageStore:
    """A store whose images are metadata only (what listing sees)."""
    store = ImageStore(root)
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "image.json").write_text(json.dumps(info(name).to_dict()))
    return store


class Fetches:
    """Stands in for the builder and the puller: records every (how, name) ``obtain`` asks for and
    puts the image in the store, except that a pull of a name in ``failing`` fails."""

    def __init__(self, failing: set[str]) -> None:
        self.done: list[tuple[str, str]] = []
        self.failing = failing

    def by(self, how: str):  # type: ignore[no-untyped-def]
        def run(store: ImageStore, names: list[str], progress: object = None, **_: object) -> list[ImageInfo]:
            for name in names:
                self.done.append((how, name))
                if how == "pull" and name in self.failing:
                    raise TTError(f"cannot download {name}: connection refused")
                _listed(store.root, name)
            return [store.get(n) for n in names]

        return run


@pytest.fixture
def fetches(monkeypatch: pytest.MonkeyPatch) -> Fetches:
    monkeypatch.delenv("TTENV_CATALOG", raising=False)
    f = Fetches({"debian-11-x86_64", "ubuntu-22.04-x86_64"})
    monkeypatch.setattr(build, "ensure_images", f.by("build"))
    monkeypatch.setattr(pull, "ensure_available", f.by("pull"))
    return f


def test_plan_adds_only_for_prefixes_the_store_lacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TTENV_CATALOG", raising=False)
    store = _listed(tmp_path / "images", "debian-12-x86_64")
    assert plan(store, ["deb"], ["x86_64"]) == ["debian-12-x86_64"]  # Debian 12 is there: no 11, no 13
    assert plan(store, ["debian11", "ubuntu2404"], ["x86_64"]) == [
        "debian-12-x86_64",
        "debian-11-x86_64",
        "ubuntu-24.04-x86_64",
    ]
    assert plan(store, ["nosuchos"], ["x86_64"]) == ["debian-12-x86_64"]  # the matrix then says what exists
    assert buildable(["amd64"]) == ["debian-11-x86_64", "debian-12-x86_64", "debian-13-x86_64"]


def test_obtain_by_source_policy(tmp_path: Path, fetches: Fetches) -> None:
    """pull: the catalog first, Debian built when its pull fails (said in one line); build: Debian
    built, the rest pulled; images in the store are left alone."""
    lines: list[str] = []
    store = _listed(tmp_path / "a", "debian-13-x86_64")
    names = ["debian-13-x86_64", "debian-12-x86_64", "debian-11-x86_64", "ubuntu-24.04-x86_64"]
    obtain(store, names, "pull", lines.append)
    assert fetches.done == [
        ("pull", "debian-12-x86_64"),
        ("pull", "debian-11-x86_64"),
        ("build", "debian-11-x86_64"),
        ("pull", "ubuntu-24.04-x86_64"),
    ]
    assert [line for line in lines if "building it instead" in line] == [
        "pulling debian-11-x86_64 failed (cannot download debian-11-x86_64: connection refused); building it instead"
    ]
    assert store.names() == sorted(names)
    fetches.done.clear()
    obtain(_listed(tmp_path / "b"), names, "build", lines.append)
    assert fetches.done == [
        ("build", "debian-13-x86_64"),
        ("build", "debian-12-x86_64"),
        ("build", "debian-11-x86_64"),
        ("pull", "ubuntu-24.04-x86_64"),
    ]


def test_obtain_refuses_what_nobody_has_before_fetching(tmp_path: Path, fetches: Fetches) -> None:
    """One line names the images neither the catalog nor the builder has, before anything is
    fetched; a failed pull of an image the builder cannot make is that pull's error."""
    store = _listed(tmp_path / "images")
    with pytest.raises(NotFound, match=r"^image\(s\) nope-1-x86_64, nope-2-x86_64 not in .* and not in the "):
        obtain(store, ["debian-12-x86_64", "nope-1-x86_64", "nope-2-x86_64"], "pull", print)
    assert fetches.done == []
    with pytest.raises(TTError, match=r"^cannot download ubuntu-22\.04-x86_64: connection refused$"):
        obtain(store, ["ubuntu-22.04-x86_64"], "build", print)
    assert fetches.done == [("pull", "ubuntu-22.04-x86_64")]
