"""The image catalog: every built-in entry validates and renders; overrides; clear errors."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from pytest_ttenv.backend.images.catalog import BUILTIN, builtin_text, catalog_version, load_catalog
from pytest_ttenv.backend.images.catalog_entry import CHECKSUM_FORMATS, DEFAULT_BOOT, ONLY_BOOT
from pytest_ttenv.backend.images.catalog_schema import JSON_SCHEMA, CatalogError
from pytest_ttenv.backend.images.pull import pullable_names
from pytest_ttenv.core.naming import ARCHES, split_image_name
from pytest_ttenv.errors import NotFound, UsageError

RAW = yaml.load(builtin_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TTENV_CATALOG", raising=False)


def test_builtin_has_the_promised_releases() -> None:
    cat = load_catalog()
    assert cat.source == BUILTIN
    for key in (
        "ubuntu-20.04",
        "ubuntu-22.04",
        "ubuntu-24.04",
        "debian-11",
        "debian-12",
        "debian-13",
        "centos-9",
        "rocky-9",
        "almalinux-9",
        "fedora-42",
        "alpine-3.24",
        "opensuse-15.6",
        "freebsd-14.4",
    ):
        assert key in cat.entries, key
        assert {"x86_64", "aarch64"} <= set(cat.entries[key].arches), key
    assert {e.checksum_format for e in cat.entries.values()} == {"sums", "bsd", "sidecar"}
    # the arches beyond x86_64/aarch64/riscv64 that vendors publish cloud images for (none for i386)
    new_arches = {k: sorted(set(e.arches) & {"ppc64le", "s390x", "i386", "armhf"}) for k, e in cat.entries.items()}
    assert {k: v for k, v in new_arches.items() if v} == {
        "ubuntu-20.04": ["armhf", "ppc64le", "s390x"],
        "ubuntu-22.04": ["armhf", "ppc64le", "s390x"],
        "ubuntu-24.04": ["armhf", "ppc64le", "s390x"],
        "ubuntu-26.04": ["ppc64le", "s390x"],
        "debian-11": ["ppc64le"],
        "debian-12": ["ppc64le"],
        "debian-13": ["ppc64le"],
        "centos-9": ["ppc64le", "s390x"],
        "rocky-9": ["ppc64le", "s390x"],
        "almalinux-9": ["ppc64le", "s390x"],
    }
    assert {e.format for e in cat.entries.values()} == {"qcow2", "qcow2.xz"}


@pytest.mark.parametrize("key", list(RAW["entries"]))
def test_every_entry_renders_for_every_arch(key: str) -> None:
    entry = load_catalog().entries[key]
    raw = RAW["entries"][key]
    assert set(raw) <= set(JSON_SCHEMA["properties"]["entries"]["additionalProperties"]["properties"])
    for arch in entry.arches:
        img = entry.render(arch)
        assert split_image_name(img.name) == (entry.os, entry.version, arch)
        assert img.name == f"{key}-{arch}"
        for url in (img.url, img.checksum_url):
            parts = urlsplit(url)
            assert parts.scheme == "https" and parts.netloc and "{" not in url and "}" not in url, url
            assert "//" not in parts.path, url
        assert img.file and img.url.endswith("/" + img.file)
        assert img.checksum_format in CHECKSUM_FORMATS and img.hash in ("sha256", "sha512")
        assert img.boot == DEFAULT_BOOT[arch]  # no entry names its boot
        assert img.access == "cloud-init" and img.user and img.user != "root"
        if img.compression:
            assert img.file.endswith("." + img.compression)


def test_vendor_arch_names_appear_in_urls() -> None:
    cat = load_catalog()
    assert cat.image("ubuntu-24.04-x86_64").url.endswith("ubuntu-24.04-server-cloudimg-amd64.img")
    assert cat.image("debian-12-aarch64").url.endswith("debian-12-genericcloud-arm64.qcow2")
    assert cat.image("debian-13-riscv64").url.endswith("debian-13-generic-riscv64.qcow2")
    assert cat.image("alpine-3.24-aarch64").url.endswith("generic_alpine-3.24.1-aarch64-uefi-cloudinit-r0.qcow2")
    assert cat.image("alpine-3.24-x86_64").url.endswith("generic_alpine-3.24.1-x86_64-bios-cloudinit-r0.qcow2")
    bsd = cat.image("freebsd-14.4-aarch64")
    assert "/14.4-RELEASE/aarch64/Latest/FreeBSD-14.4-RELEASE-arm64-aarch64-BASIC-CLOUDINIT-ufs.qcow2.xz" in bsd.url
    assert (bsd.format, bsd.compression, bsd.disk_format) == ("qcow2.xz", "xz", "qcow2")
    assert cat.image("centos-9-x86_64").checksum_url == cat.image("centos-9-x86_64").url + ".SHA256SUM"
    # the new arches, by the vendors' names for them
    ubuntu = "https://cloud-images.ubuntu.com/releases/jammy/release/ubuntu-22.04-server-cloudimg-"
    for arch, vendor in (("ppc64le", "ppc64el"), ("s390x", "s390x"), ("armhf", "armhf")):
        assert cat.image("ubuntu-22.04", arch).url == f"{ubuntu}{vendor}.img"
    power = cat.image("debian-12-ppc64le")
    assert power.url == "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-generic-ppc64el.qcow2"
    assert (power.checksum_url, power.hash, power.boot) == (
        "https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS",
        "sha512",
        "bios",
    )
    assert cat.image("debian-12-x86_64").file == "debian-12-genericcloud-amd64.qcow2"  # the variant stays per arch
    z = cat.image("rocky-9-s390x")
    assert z.url == "https://dl.rockylinux.org/pub/rocky/9/images/s390x/Rocky-9-GenericCloud-Base.latest.s390x.qcow2"
    assert (z.checksum_url, z.boot) == (z.url + ".CHECKSUM", "bios")
    assert cat.image("almalinux-9-ppc64le").url.endswith(
        "/9/cloud/ppc64le/images/AlmaLinux-9-GenericCloud-latest.ppc64le.qcow2"
    )
    assert cat.image("ubuntu-24.04-armhf").boot == "uefi"


def test_every_arch_has_a_default_boot() -> None:
    """Each arch boots a vendor image somehow; an arch with one kind of firmware defaults to it."""
    assert set(DEFAULT_BOOT) == set(ARCHES)
    assert all(DEFAULT_BOOT[arch] == boot for arch, boot in ONLY_BOOT.items())


def test_names_and_lookup() -> None:
    cat = load_catalog()
    names = cat.available()
    assert names == sorted(names) and all(split_image_name(n) for n in names)
    assert pullable_names(["aarch64"]) == cat.available(["arm64"]) == [n for n in names if n.endswith("-aarch64")]
    assert {"riscv64", "ppc64le", "s390x", "armhf"} <= {n.rsplit("-", 1)[1] for n in names}
    assert pullable_names(["ppc64el"]) == [n for n in names if n.endswith("-ppc64le")]
    assert cat.image("debian-12", "ppc64el").name == "debian-12-ppc64le"
    assert cat.image("ubuntu-22.04", "armv7l").name == "ubuntu-22.04-armhf"
    assert "ubuntu-22.04-x86_64" in cat and "ubuntu-22.04" not in cat and "freebsd-14.4-riscv64" not in cat
    assert cat.entry_for("ubuntu2204").key == cat.entry_for("ubuntu-22.04-aarch64").key == "ubuntu-22.04"
    assert cat.image("Ubuntu-22.04", "arm64").name == "ubuntu-22.04-aarch64"
    host = platform.machine()
    if host in ARCHES:
        assert cat.image("debian-12").arch == host
    with pytest.raises(NotFound, match=r"^'windows-11' is not in the built-in catalog \(pullable: ubuntu-20.04, "):
        cat.entry_for("windows-11")
    with pytest.raises(
        NotFound,
        match=r"^freebsd-14.4 is not published for riscv64 \(the built-in catalog has it "
        r"for: x86_64, aarch64\)$",
    ):
        cat.image("freebsd-14.4-riscv64")
    with pytest.raises(
        NotFound,
        match=r"^debian-12 is not published for s390x \(the built-in catalog has it for: x86_64, aarch64, ppc64le\)$",
    ):
        cat.image("debian-12", "s390x")
    with pytest.raises(UsageError, match="names arch x86_64 but --arch is aarch64"):
        cat.image("debian-12-x86_64", "aarch64")
    with pytest.raises(UsageError, match="unknown arch 'sparc'"):
        cat.image("debian-12", "sparc")


def test_version_is_stable_and_follows_content(tmp_path: Path) -> None:
    cat = load_catalog()
    declared = RAW["version"]
    assert cat.version == catalog_version() == load_catalog().version
    assert cat.version.startswith(declared + "-") and len(cat.version) == len(declared) + 13
    copy = tmp_path / "same.yaml"
    copy.write_text(builtin_text())
    assert load_catalog(copy).version == cat.version  # same content, same key, wherever it is read from
    data = json.loads(json.dumps(RAW))
    data["entries"]["debian-12"]["user"] = "admin"
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    assert load_catalog(changed).version != cat.version


def test_override_file_replaces_or_extends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = {
        "os": "myos",
        "version": "1",
        "user": "me",
        "arches": ["x86_64"],
        "format": "raw.xz",
        "url": "http://files.lan/myos-1.raw.xz",
        "checksum": {"url": "http://files.lan/SUMS", "format": "sums", "hash": "sha256"},
    }
    alone = tmp_path / "alone.yaml"
    alone.write_text(yaml.safe_dump({"schema": 1, "version": "lab-3", "entries": {"myos-1": own}}))
    monkeypatch.setenv("TTENV_CATALOG", str(alone))
    cat = load_catalog()
    assert cat.source == str(alone) and cat.available() == ["myos-1-x86_64"] and cat.version.startswith("lab-3-")
    assert cat.image("myos-1").boot == "bios"

    extended = tmp_path / "extended.yaml"
    extended.write_text(
        yaml.safe_dump(
            {
                "extends": "builtin",
                "entries": {"myos-1": own, "fedora-42": None},
                "mirrors": {"ubuntu": "http://mirror.lan/ubuntu/", "debian-12": "http://mirror.lan/debian"},
            }
        )
    )
    monkeypatch.setenv("TTENV_CATALOG", str(extended))
    cat = load_catalog()
    assert "myos-1-x86_64" in cat and "fedora-42-x86_64" not in cat and "fedora-44-x86_64" in cat
    ubuntu = cat.image("ubuntu-24.04-aarch64")
    assert ubuntu.url == "http://mirror.lan/ubuntu/releases/noble/release/ubuntu-24.04-server-cloudimg-arm64.img"
    assert ubuntu.checksum_url == "http://mirror.lan/ubuntu/releases/noble/release/SHA256SUMS"
    assert cat.image("debian-12-x86_64").url.startswith("http://mirror.lan/debian/bookworm/latest/")
    assert cat.image("debian-13-x86_64").url.startswith("https://cloud.debian.org/")
    assert cat.version != load_catalog(alone).version


def base_doc(**entry: Any) -> dict[str, Any]:
    good = {
        "os": "myos",
        "version": "1",
        "user": "me",
        "arches": {"x86_64": {}, "aarch64": {"vendor_arch": "arm64"}},
        "mirror": "https://example.org",
        "url": "{mirror}/{vendor_arch}/img.qcow2",
        "checksum": {"url": "{mirror}/{vendor_arch}/SUMS", "format": "sums", "hash": "sha256"},
        "format": "qcow2",
    }
    good.update(entry)
    return {"schema": 1, "version": "t", "entries": {"myos-1": {k: v for k, v in good.items() if v is not None}}}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (base_doc(), None),
        (base_doc(color="red"), "entries.myos-1.color: unknown field (allowed: os, version, user, mirror, vars"),
        (base_doc(user=None), "entries.myos-1.user: is required"),
        (base_doc(version=1), 'entries.myos-1.version: must be a string (quote it: version: "1")'),
        (base_doc(os="other"), "entries.myos-1: key must be <os>-<version> = other-1"),
        (base_doc(format="iso"), "entries.myos-1.format: 'iso' is not one of qcow2, qcow2.xz"),
        (base_doc(arches={"sparc": {}}), f"entries.myos-1.arches.sparc: unknown arch (use {', '.join(ARCHES)})"),
        (
            base_doc(arches={"aarch64": {"boot": "bios"}}),
            "entries.myos-1.arches.aarch64.boot: aarch64 images boot with uefi",
        ),
        (base_doc(arches={"armhf": {"boot": "bios"}}), "entries.myos-1.arches.armhf.boot: armhf images boot with uefi"),
        (base_doc(boot="uefi", arches={"s390x": {}}), "entries.myos-1.arches.s390x.boot: s390x images boot with bios"),
        (
            base_doc(arches={"ppc64le": {"boot": "uefi"}}),
            "entries.myos-1.arches.ppc64le.boot: ppc64le images boot with bios",
        ),
        (base_doc(url="{mirror}/{flavour}/img.qcow2"), "entries.myos-1.url: unknown placeholder {flavour} for x86_64"),
        (base_doc(url="{mirror/img"), "entries.myos-1.url: bad template"),
        (base_doc(mirror=None), "entries.myos-1.url: uses {mirror} but the entry has no mirror"),
        (
            base_doc(checksum={"url": "x", "format": "md5sums", "hash": "md5"}),
            "entries.myos-1.checksum.format: 'md5sums' is not one of sums, bsd, sidecar, json (and 1 more",
        ),
        (
            base_doc(checksum={"url": "{mirror}/x.json", "format": "json", "hash": "sha256"}),
            "entries.myos-1.checksum.key: is required for format json",
        ),
        (
            base_doc(url="ftp://host/img.qcow2"),
            "entries.myos-1.url: renders to 'ftp://host/img.qcow2' for x86_64, not an http(s) URL",
        ),
        (base_doc(user="Bad User"), "entries.myos-1.user: 'Bad User' is not a valid login name"),
        (base_doc(vars={"arch": "x"}), "entries.myos-1.vars.arch: bad variable name"),
        ({"schema": 2, "version": "t", "entries": {}}, "schema: must be 1 (got 2)"),
        ({"schema": 1, "entries": {"x": {}}}, "version: must be a non-empty string"),
        ({"schema": 1, "version": "t", "entries": {}}, "entries: must be a non-empty mapping"),
        ({"extends": "builtin", "mirrors": {"plan9": "http://m"}}, "mirrors.plan9: names no entry key or OS"),
        ({"extends": "builtin", "mirrors": {"ubuntu": "file:///srv"}}, "mirrors: must map entry keys or OS names"),
        ({"extends": "elsewhere"}, "extends: only 'builtin' is known"),
    ],
)
def test_bad_catalogs_are_one_clear_line(tmp_path: Path, doc: dict[str, Any], message: str | None) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(doc))
    if message is None:
        assert load_catalog(path).available() == ["myos-1-aarch64", "myos-1-x86_64"]
        return
    with pytest.raises(CatalogError) as err:
        load_catalog(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"catalog {path}: ") and message in text, text
    assert err.value.exit_code == 2


def test_unreadable_and_non_yaml_catalogs(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries: [unclosed\n")
    with pytest.raises(CatalogError, match=rf"^catalog {bad} is not valid YAML at line 2: "):
        load_catalog(bad)
    bad.write_text("- a list\n")
    with pytest.raises(CatalogError, match="must be a mapping with schema, version and entries"):
        load_catalog(bad)
    with pytest.raises(CatalogError, match=rf"^cannot read catalog {tmp_path / 'none.yaml'}: No such file"):
        load_catalog(tmp_path / "none.yaml")
