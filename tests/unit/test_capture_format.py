"""The capture file format (``core/capture_format.py``, ``core/capture_manifest.py``): a round trip,
and a hostile, damaged or oversized file refused in one line with nothing left behind. The hostile
files are made here, byte by byte where ``tarfile`` would not write them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import zstandard

from pytest_ttenv.core import capture_format as cf
from pytest_ttenv.core.capture_manifest import schema

STATE = os.urandom(300_000) + b"\0" * 700_000  # a migration stream: some entropy, many zero pages
OVERLAY = b"QFI\xfb" + os.urandom(70_000)
CONSOLE = b"[    0.000000] Linux version 6.1\nlogin: \x1b[0m\n"
REPORT = b"E   assert 1 == 2\n"


def vm(bundled: bool = False) -> cf.VmRecord:
    image = cf.ImageRef("debian-12-x86_64", "ab" * 32, bundled)
    return cf.VmRecord(
        "vm1", "x86_64", "pc-q35-7.2", "7.2.11", "tcg", "max", 2, 512, "warm", "0" * 32, True, True, image
    )


TEST = cf.TestRecord("tests/test_x.py::test_fails[debian-12-x86_64]", "call", "failed")


def sources(tmp_path: Path) -> list[cf.Source]:
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "state").write_bytes(STATE)
    (tmp_path / "src" / "overlay.qcow2").write_bytes(OVERLAY)
    return [
        cf.Source("state", "state", path=tmp_path / "src" / "state"),
        cf.Source("overlay.qcow2", "overlay", path=tmp_path / "src" / "overlay.qcow2"),
        cf.Source("console.log", "console", data=CONSOLE),
        cf.Source("report.txt", "report", data=REPORT),
    ]


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    path = tmp_path / "t--vm1.ttcap"
    cf.write(path, TEST, vm(), sources(tmp_path))
    return path


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def refused(path: Path, dest: Path, *, max_bytes: int = cf.MAX_BYTES) -> str:
    """The one line ``read`` refuses ``path`` with; ``dest`` is left empty."""
    with pytest.raises(cf.CaptureError) as info:
        cf.read(path, dest, max_bytes=max_bytes)
    line = str(info.value)
    assert "\n" not in line and line.startswith(("capture ", "cannot ")), line
    assert info.value.exit_code == 2
    assert list(dest.iterdir()) == [], f"left behind: {list(dest.rglob('*'))}"
    return line


# -- crafting files --------------------------------------------------------------------------------
def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_doc(members: list[tuple[str, str, bytes]], **changes: Any) -> dict[str, Any]:
    doc = cf.Manifest(
        TEST, vm(), tuple(cf.Member(n, r, len(d), sha(d)) for n, r, d in members), "2025-01-31T12:00:00Z", "test"
    ).to_dict()
    doc.update(changes)
    return doc


PLAIN = [("state", "state", STATE), ("overlay.qcow2", "overlay", OVERLAY)]


def entry(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **attrs: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode = kind, len(data), 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def tar(entries: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for info, data in entries:
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def craft(
    tmp_path: Path,
    after: list[tuple[tarfile.TarInfo, bytes]],
    doc: dict[str, Any] | bytes | None = None,
    fmt: int = tarfile.GNU_FORMAT,
) -> Path:
    """A capture of ``doc`` (default: the manifest of PLAIN) as manifest.json, then ``after``."""
    raw = doc if isinstance(doc, bytes) else json.dumps(doc if doc is not None else manifest_doc(PLAIN)).encode()
    path = tmp_path / "crafted.ttcap"
    path.write_bytes(zstd(tar([entry("manifest.json", raw), *after], fmt)))
    return path


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


def plain_members() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [entry(n, d) for n, _, d in PLAIN]


# -- the round trip --------------------------------------------------------------------------------
def test_round_trip(capture: Path, dest: Path) -> None:
    written = cf.read_manifest(capture)
    assert written.test == TEST and written.vm == vm()
    assert [(m.name, m.role, m.size) for m in written.members] == [
        ("state", "state", len(STATE)),
        ("overlay.qcow2", "overlay", len(OVERLAY)),
        ("console.log", "console", len(CONSOLE)),
        ("report.txt", "report", len(REPORT)),
    ]
    assert written.member("state") == cf.Member("state", "state", len(STATE), sha(STATE))
    assert cf.read(capture, dest) == written
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == {
        "state": STATE,
        "overlay.qcow2": OVERLAY,
        "console.log": CONSOLE,
        "report.txt": REPORT,
    }
    assert {stat.S_IMODE(p.stat().st_mode) for p in dest.iterdir()} == {0o600}
    assert capture.stat().st_size < len(STATE) // 2  # compressed
    assert [p.name for p in capture.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_standard_tar_reader_lists_it(capture: Path) -> None:
    """Anyone can look inside with ``tar --zstd -tvf``: plain GNU tar, manifest first."""
    with capture.open("rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        assert t.getnames() == ["manifest.json", "state", "overlay.qcow2", "console.log", "report.txt"]
        manifest_file = t.extractfile("manifest.json")
        assert manifest_file is not None
        doc = json.load(manifest_file)
    jsonschema.Draft202012Validator.check_schema(schema())
    jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker()).validate(doc)
    assert doc["vm"]["image"] == {"name": "debian-12-x86_64", "sha256": "ab" * 32, "bundled": False}


def test_round_trip_with_the_image_bundled(tmp_path: Path, dest: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(b"QFI\xfb" + b"\0" * 200_000 + b"end")
    extra = [
        cf.Source("image/disk.qcow2", "image", path=disk, sha256=sha(disk.read_bytes())),
        cf.Source("image/image.json", "image", data=b'{"name": "debian-12-x86_64"}'),
    ]
    path = tmp_path / "b.ttcap"
    manifest = cf.write(path, TEST, vm(bundled=True), [*sources(tmp_path), *extra], threads=0)
    assert cf.read(path, dest) == manifest
    assert (dest / "image" / "disk.qcow2").read_bytes() == disk.read_bytes()
    assert stat.S_IMODE((dest / "image").stat().st_mode) == 0o700


def test_the_writer_refuses_what_the_reader_would(tmp_path: Path) -> None:
    path = tmp_path / "w.ttcap"
    with pytest.raises(ValueError, match=r"manifest\.json at members/0/name"):
        cf.write(path, TEST, vm(), [cf.Source("../state", "state", data=b"x"), *sources(tmp_path)[1:]])
    with pytest.raises(ValueError, match="0 member\\(s\\) of role state"):
        cf.write(path, TEST, vm(), sources(tmp_path)[1:])
    with pytest.raises(ValueError, match="image members do not match"):
        cf.write(path, TEST, vm(bundled=True), sources(tmp_path))
    assert list(tmp_path.glob("*.ttcap")) == []


def test_a_file_that_changes_while_written_leaves_nothing(tmp_path: Path) -> None:
    wrong = [cf.Source("state", "state", path=sources(tmp_path)[0].path, sha256="0" * 64), *sources(tmp_path)[1:]]
    with pytest.raises(cf.CaptureError, match=r"member state .* changed while it was written"):
        cf.write(tmp_path / "c.ttcap", TEST, vm(), wrong)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


# -- hostile archives ---------------------------------------------------------------------------------
HOSTILE: dict[str, tuple[Callable[[], list[tuple[tarfile.TarInfo, bytes]]], str]] = {
    "absolute": (lambda: [entry("/etc/passwd", b"x"), *plain_members()], "member /etc/passwd points outside"),
    "dotdot": (lambda: [entry("a/../../x", b"x"), *plain_members()], "member a/../../x points outside"),
    "symlink": (lambda: [entry("state", kind=tarfile.SYMTYPE, linkname="/etc/shadow")], "is a symbolic link"),
    "hardlink": (lambda: [entry("state", kind=tarfile.LNKTYPE, linkname="/etc/shadow")], "is a hard link"),
    "chardev": (lambda: [entry("state", kind=tarfile.CHRTYPE, devmajor=1, devminor=3)], "is a character device"),
    "blockdev": (lambda: [entry("state", kind=tarfile.BLKTYPE, devmajor=8, devminor=0)], "is a block device"),
    "fifo": (lambda: [entry("state", kind=tarfile.FIFOTYPE)], "is a FIFO"),
    "directory": (lambda: [entry("state", kind=tarfile.DIRTYPE)], "is a directory"),
    "not listed": (lambda: [entry("evil.sh", b"#!/bin/sh\n"), *plain_members()], "member evil.sh is not in the"),
    "extra at the end": (lambda: [*plain_members(), entry("evil.sh", b"x")], "member evil.sh is not in the manifest"),
    "twice": (lambda: [entry("state", STATE), entry("state", STATE)], "member state appears twice"),
    "manifest twice": (lambda: [entry("manifest.json", b"{}"), *plain_members()], "manifest.json appears twice"),
    "out of order": (lambda: list(reversed(plain_members())), "overlay.qcow2 is out of the manifest's order"),
    "larger": (lambda: [entry("state", STATE + b"more"), entry("overlay.qcow2", OVERLAY)], "the manifest says"),
    "smaller": (lambda: [entry("state", STATE[:-1]), entry("overlay.qcow2", OVERLAY)], "the manifest says"),
    "swapped": (lambda: [entry("state", STATE[::-1]), entry("overlay.qcow2", OVERLAY)], "swapped for another"),
    "missing": (lambda: [entry("state", STATE)], "ends before member overlay.qcow2"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_members_are_refused(case: str, tmp_path: Path, dest: Path) -> None:
    members, expected = HOSTILE[case]
    assert expected in refused(craft(tmp_path, members()), dest)


def test_a_pax_header_is_refused_before_it_is_read(tmp_path: Path, dest: Path) -> None:
    """tarfile would read a pax header of any size into memory; ours refuses the kind."""
    state = entry("state", STATE, pax_headers={"comment": "x" * 100})
    path = craft(tmp_path, [state, entry("overlay.qcow2", OVERLAY)], fmt=tarfile.PAX_FORMAT)
    assert "is a pax extended header" in refused(path, dest)


def test_a_member_written_before_the_refusal_is_removed(tmp_path: Path, dest: Path) -> None:
    doc = manifest_doc([*PLAIN, ("image/disk.qcow2", "image", b"d")])
    doc["vm"]["image"]["bundled"] = True
    members = [*plain_members(), entry("image/disk.qcow2", b"D")]  # the last one is swapped
    assert "member image/disk.qcow2 has sha256" in refused(craft(tmp_path, members, doc), dest)


# -- hostile manifests -------------------------------------------------------------------------------
def bad_doc(change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    doc = manifest_doc(PLAIN)
    change(doc)
    return doc


MANIFESTS: dict[str, tuple[dict[str, Any] | bytes, str]] = {
    "absolute name": (bad_doc(lambda d: d["members"][0].update(name="/state")), "at members/0/name"),
    "dotdot name": (bad_doc(lambda d: d["members"][0].update(name="a/../state")), "at members/0/name"),
    "bad digest": (bad_doc(lambda d: d["members"][1].update(sha256="X" * 64)), "at members/1/sha256"),
    "unknown key": (bad_doc(lambda d: d["vm"].update(extra=1)), "at vm: Additional properties"),
    "no arch": (bad_doc(lambda d: d["vm"].pop("arch")), "at vm: 'arch' is a required property"),
    "listed twice": (bad_doc(lambda d: d["members"].append(d["members"][1])), "lists member overlay.qcow2 twice"),
    "file and dir": (
        bad_doc(lambda d: d["members"].extend({**d["members"][1], "name": n, "role": "other"} for n in ("x", "x/y"))),
        "member x is both a file and a directory",
    ),
    "two states": (bad_doc(lambda d: d["members"].append({**d["members"][0], "name": "s2"})), "2 member(s) of role"),
    "newer": (bad_doc(lambda d: d.update(version=2)), "format version 2; this pytest-ttenv reads version 1"),
    "other format": (bad_doc(lambda d: d.update(format="x")), "not a ttenv capture manifest"),
    "not json": (b"\xff\xfe not json", "manifest.json is not valid JSON"),
    "duplicate key": (b'{"format": "pytest-ttenv-capture", "format": "x"}', "duplicate key 'format'"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, "manifest.json is not valid JSON"),
}


@pytest.mark.parametrize("case", MANIFESTS)
def test_hostile_manifests_are_refused(case: str, tmp_path: Path, dest: Path) -> None:
    doc, expected = MANIFESTS[case]
    assert expected in refused(craft(tmp_path, plain_members(), doc), dest)


def test_the_manifest_must_come_first(tmp_path: Path, dest: Path) -> None:
    path = tmp_path / "x.ttcap"
    path.write_bytes(zstd(tar(plain_members())))
    assert "starts with state, not manifest.json" in refused(path, dest)


def test_a_huge_manifest_is_refused_unread(tmp_path: Path, dest: Path) -> None:
    path = craft(tmp_path, plain_members(), b" " * (cf.MAX_MANIFEST + 1))
    assert f"manifest.json is {cf.MAX_MANIFEST + 1} bytes, over the cap" in refused(path, dest)


def test_a_long_hostile_value_stays_one_short_line(tmp_path: Path, dest: Path) -> None:
    path = craft(tmp_path, plain_members(), bad_doc(lambda d: d["test"].update(nodeid="x\n" * 5000)))
    assert len(refused(path, dest)) < 400


# -- damage, size caps, what is around the archive -----------------------------------------------------
def test_truncation_anywhere_is_one_line(capture: Path, tmp_path: Path, dest: Path) -> None:
    data = capture.read_bytes()
    for cut in (1, 2, 4, 5, 100, len(data) // 2, len(data) - 8, len(data) - 1):
        short = tmp_path / f"cut{cut}.ttcap"
        short.write_bytes(data[: len(data) - cut])
        assert refused(short, dest)


def test_a_flipped_byte_anywhere_is_one_line(tmp_path: Path, dest: Path) -> None:
    """Every byte of a small capture flipped in turn (one bit, each bit position in turn): refused
    in one line, or - where zstd has bits that do not change what it decodes (the window
    descriptor, unused entropy-table bits) - read back exactly as written."""
    (tmp_path / "state").write_bytes(os.urandom(3000) + b"\0" * 5000)
    small = [cf.Source("state", "state", path=tmp_path / "state"), cf.Source("overlay.qcow2", "overlay", data=b"o")]
    path = tmp_path / "small.ttcap"
    written = cf.write(path, TEST, vm(), small)
    data = path.read_bytes()
    harmless = 0
    for at in range(len(data)):
        flipped = bytearray(data)
        flipped[at] ^= 1 << (at % 8)
        path.write_bytes(bytes(flipped))
        try:
            assert cf.read(path, dest) == written
        except cf.CaptureError as exc:
            assert "\n" not in str(exc) and list(dest.iterdir()) == []
            continue
        assert (dest / "state").read_bytes() == (tmp_path / "state").read_bytes()
        harmless += 1
        for member in dest.iterdir():
            member.unlink()
    assert harmless < len(data) // 50, f"{harmless} of {len(data)} flips read back"


def test_the_size_cap(capture: Path, dest: Path) -> None:
    line = refused(capture, dest, max_bytes=len(STATE))
    assert "over the cap of" in line and "raise the cap" in line
    with pytest.raises(cf.CaptureError, match="over the cap"):
        cf.read_manifest(capture, max_bytes=len(STATE))
    assert cf.read(capture, dest, max_bytes=2 * len(STATE)).member("state")


def test_a_decompression_bomb_after_the_archive_is_stopped(tmp_path: Path, dest: Path) -> None:
    archive = tar([entry("manifest.json", json.dumps(manifest_doc(PLAIN)).encode()), *plain_members()])
    path = tmp_path / "bomb.ttcap"
    path.write_bytes(zstd(archive + b"\0" * (256 << 20)))  # 256 MiB of zeros: ~10 KiB compressed
    assert "decompresses to more than its manifest allows" in refused(path, dest)


def test_data_after_the_archive_or_the_frame(capture: Path, tmp_path: Path, dest: Path) -> None:
    with capture.open("rb") as f:
        body = zstandard.ZstdDecompressor().stream_reader(f).read()
    (tmp_path / "a.ttcap").write_bytes(zstd(body + b"\0" * 1024 + b"hidden"))
    assert "holds data after the end of its archive" in refused(tmp_path / "a.ttcap", dest)
    for extra in (b"junk", zstd(b"another frame")):
        (tmp_path / "b.ttcap").write_bytes(capture.read_bytes() + extra)
        assert "after its zstd frame" in refused(tmp_path / "b.ttcap", dest)


def test_not_a_capture(tmp_path: Path, dest: Path) -> None:
    (tmp_path / "plain.tar").write_bytes(tar(plain_members()))
    assert "not a ttenv capture (not zstd-compressed)" in refused(tmp_path / "plain.tar", dest)
    assert "cannot read capture" in refused(tmp_path / "missing.ttcap", dest)
    (tmp_path / "empty.ttcap").write_bytes(zstd(b""))
    assert "truncated" in refused(tmp_path / "empty.ttcap", dest)


def test_the_destination_must_be_an_empty_directory(capture: Path, dest: Path) -> None:
    (dest / "link").symlink_to("/etc")
    with pytest.raises(cf.CaptureError, match="the directory is not empty"):
        cf.read(capture, dest)
    with pytest.raises(cf.CaptureError, match="cannot extract"):
        cf.read(capture, dest / "missing")
