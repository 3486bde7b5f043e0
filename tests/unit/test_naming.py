"""OS-prefix matching (TTStack rule), arch aliases, names and sizes; every route that applies the
prefix rule (matrix, image planning, both backends' ``resolve``) agrees with ``core.naming``."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import pytest

from pytest_ttenv.backend.images.acquire import plan
from pytest_ttenv.backend.images.catalog import load_catalog
from pytest_ttenv.backend.images.recipe import buildable
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.core.naming import (
    canonical_arch,
    check_env_name,
    debian_arch,
    host_arch,
    image_name,
    match_prefixes,
    normalize,
    parse_mib,
    prefix_matches,
    split_image_name,
    split_prefixes,
)
from pytest_ttenv.core.paths import write_json_atomic
from pytest_ttenv.errors import UsageError
from pytest_ttenv.matrix import MatrixVm, select, session_vms

PACKAGE = Path(__file__).resolve().parents[2] / "pytest_ttenv"

IMAGES = [
    "centos-7-x86_64",
    "centos-stream-9-x86_64",
    "debian-11-x86_64",
    "debian-12-aarch64",
    "debian-12-x86_64",
    "debian-13-x86_64",
    "ubuntu-20.04-aarch64",
    "ubuntu-20.04-x86_64",
    "ubuntu-22.04-x86_64",
]


def test_normalize_drops_separators_and_case() -> None:
    assert normalize("Ubuntu-20.04_x86_64") == "ubuntu2004x8664"


@pytest.mark.parametrize(
    ("prefixes", "arches", "expected"),
    [
        (["cent"], [], ["centos-7-x86_64", "centos-stream-9-x86_64"]),
        (["ubuntu2004"], [], ["ubuntu-20.04-aarch64", "ubuntu-20.04-x86_64"]),
        (["ubuntu2004"], ["arm64"], ["ubuntu-20.04-aarch64"]),
        (["UBUNTU-20.04"], ["x86_64"], ["ubuntu-20.04-x86_64"]),
        (["debian12", "debian11"], ["x86_64"], ["debian-12-x86_64", "debian-11-x86_64"]),
        (["deb"], ["amd64"], ["debian-11-x86_64", "debian-12-x86_64", "debian-13-x86_64"]),
        (["debian12", "deb"], ["x86_64"], ["debian-12-x86_64", "debian-11-x86_64", "debian-13-x86_64"]),
    ],
)
def test_match_prefixes(prefixes: list[str], arches: list[str], expected: list[str]) -> None:
    assert match_prefixes(prefixes, IMAGES, arches) == expected


def test_prefix_matching_nothing_lists_available() -> None:
    with pytest.raises(UsageError) as err:
        match_prefixes(["fedora"], IMAGES)
    assert "'fedora' matches no image" in str(err.value)
    assert "debian-12-x86_64" in str(err.value)


def test_prefix_matching_nothing_for_arch_says_so() -> None:
    with pytest.raises(UsageError, match="for arch aarch64"):
        match_prefixes(["debian11"], IMAGES, ["arm64"])


def test_no_images_says_how_to_build() -> None:
    with pytest.raises(UsageError, match="ttenv image build"):
        match_prefixes(["debian"], [])


def test_split_prefixes_flattens_commas() -> None:
    assert split_prefixes(["cent,ubuntu2004", " deb ,", ""]) == ["cent", "ubuntu2004", "deb"]


@pytest.mark.parametrize(
    ("given", "canon"),
    [
        ("amd64", "x86_64"),
        ("ARM64", "aarch64"),
        ("riscv64", "riscv64"),
        ("ppc64el", "ppc64le"),
        ("ppc64le", "ppc64le"),
        ("s390x", "s390x"),
        ("i686", "i386"),
        ("armv7l", "armhf"),
    ],
)
def test_arch_aliases(given: str, canon: str) -> None:
    assert canonical_arch(given) == canon


def test_unknown_arch() -> None:
    with pytest.raises(UsageError, match="unknown arch 'sparc'"):
        canonical_arch("sparc")


def test_debian_names_its_arches_its_own_way() -> None:
    assert [debian_arch(a) for a in ("x86_64", "aarch64", "ppc64le", "s390x", "i386", "armhf")] == [
        "amd64",
        "arm64",
        "ppc64el",
        "s390x",
        "i386",
        "armhf",
    ]
    assert image_name("debian", "12", "ppc64el") == "debian-12-ppc64le"
    assert split_image_name("debian-12-armhf") == ("debian", "12", "armhf")


def test_image_names_round_trip() -> None:
    assert image_name("ubuntu", "20.04", "arm64") == "ubuntu-20.04-aarch64"
    assert split_image_name("ubuntu-20.04-aarch64") == ("ubuntu", "20.04", "aarch64")
    with pytest.raises(UsageError, match="expected <os>-<version>-<arch>"):
        split_image_name("debian12")


@pytest.mark.parametrize("name", ["TEST", "ci-42", "a.b_c", "x" * 63])
def test_good_env_names(name: str) -> None:
    assert check_env_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 64, "a/b", "../x"])
def test_bad_env_names(name: str) -> None:
    with pytest.raises(UsageError, match="bad ENV name"):
        check_env_name(name)


@pytest.mark.parametrize(("text", "mib"), [("512", 512), ("512M", 512), ("2G", 2048), ("2GiB", 2048), ("1t", 1048576)])
def test_parse_mib(text: str, mib: int) -> None:
    assert parse_mib(text, "disk") == mib


@pytest.mark.parametrize("text", ["lots", "-1", "0", "2X"])
def test_parse_mib_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="disk size"):
        parse_mib(text, "disk")


# -- one rule, every route ---------------------------------------------------------------------
ROUTE_IMAGES = [n.replace("centos-stream", "centosstream") for n in IMAGES]  # canonical: <os>-<version>-<arch>
ROUTE_CASES = [
    (["cent"], []),
    (["ubuntu2004"], ["arm64"]),
    (["UBUNTU-20.04"], ["x86_64"]),
    (["debian12", "debian11"], ["x86_64"]),
    (["deb"], ["amd64"]),
    (["debian12", "deb"], []),
    (["Debian_13", "centos-stream"], ["x86_64", "aarch64"]),
    (["CentOS"], ["x86_64"]),
]


def _store(root: Path, names: list[str]) -> ImageStore:
    """An image store holding metadata only for ``names`` (as the store lists them)."""
    for name in names:
        os_name, version, arch = split_image_name(name)
        (root / name).mkdir(parents=True)
        write_json_atomic(root / name / "image.json", ImageInfo(name, os_name, version, arch).to_dict())
    return ImageStore(root)


def test_prefix_matches_is_the_rule() -> None:
    assert prefix_matches("Ubuntu-20.04", IMAGES) == ["ubuntu-20.04-aarch64", "ubuntu-20.04-x86_64"]
    assert prefix_matches("deb", IMAGES[::-1], ["arm64"]) == ["debian-12-aarch64"]  # the order given
    assert prefix_matches("", IMAGES, ["aarch64"]) == ["debian-12-aarch64", "ubuntu-20.04-aarch64"]
    assert prefix_matches("fedora", IMAGES) == []
    with pytest.raises(UsageError, match="unknown arch 'sparc'"):
        prefix_matches("deb", IMAGES, ["sparc"])


@pytest.mark.parametrize(("prefixes", "arches"), ROUTE_CASES)
def test_routes_agree(prefixes: list[str], arches: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session matrix, a test's tt_os/tt_arch selection, the local and the HTTP backend's
    ``resolve`` all give the names ``match_prefixes`` gives."""
    from pytest_ttenv.backend.http import HttpBackend
    from pytest_ttenv.backend.local import LocalBackend

    expected = match_prefixes(prefixes, ROUTE_IMAGES, arches)
    assert expected == list(dict.fromkeys(n for p in prefixes for n in prefix_matches(p, sorted(ROUTE_IMAGES), arches)))
    assert [vm.name for vm in session_vms(prefixes, arches, ROUTE_IMAGES)] == expected
    everything = [MatrixVm.from_image(n) for n in sorted(ROUTE_IMAGES)]
    assert {vm.name for vm in select(everything, prefixes, arches)} == set(expected)
    local = LocalBackend(_store(tmp_path / "images", ROUTE_IMAGES).root, tmp_path / "state")
    assert local.resolve(prefixes, arches) == expected
    http = HttpBackend("http://127.0.0.1:9")
    monkeypatch.setattr(http, "images", local.images)  # the server's answer: the same images
    assert http.resolve(prefixes, arches) == expected


@pytest.mark.parametrize(
    ("prefixes", "arches"),
    [(["debian12"], ["x86_64"]), (["deb", "ubuntu24"], ["aarch64"]), (["fedora"], ["x86_64", "aarch64"])],
)
def test_planned_images_follow_the_rule(prefixes: list[str], arches: list[str], tmp_path: Path) -> None:
    """``acquire.plan`` adds for a prefix the obtainable images the rule matches, and only for a
    prefix that matches nothing in the store; the plugin's matrix over the plan then holds them."""
    obtainable = [*buildable(arches), *load_catalog().available(arches)]
    empty = _store(tmp_path / "empty", [])
    planned = plan(empty, prefixes, arches)
    assert planned == list(dict.fromkeys(n for p in prefixes for n in prefix_matches(p, obtainable, arches)))
    assert set(match_prefixes(prefixes, planned, arches)) == set(planned)
    have = prefix_matches(prefixes[0], obtainable, arches)[:1]  # the store already has one match of the first
    store = _store(tmp_path / "some", have)
    asking = [p for p in prefixes[1:] if not prefix_matches(p, have, arches)]
    more = dict.fromkeys(n for p in asking for n in prefix_matches(p, obtainable, arches) if n not in have)
    assert plan(store, prefixes, arches) == [*have, *more]


def test_the_rule_is_written_once() -> None:
    """No module but core/naming.py compares normalized names by prefix."""
    pattern = re.compile(r"normalize\([^)]*\)\.startswith")
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == ["core/naming.py"]


def test_host_arch_is_canonical_or_as_given() -> None:
    """``uname -m`` names (i686, armv7l) compare with guest arches in canonical form; a host no guest
    arch matches stays as it is (every guest is foreign there)."""
    assert [host_arch(m) for m in ("x86_64", "i686", "armv7l", "ppc64le", "mips64")] == [
        "x86_64",
        "i386",
        "armhf",
        "ppc64le",
        "mips64",
    ]
    assert host_arch() == host_arch(platform.machine())
