"""OS-prefix matching (TTStack rule), arch aliases, names and sizes."""

import pytest

from pytest_ttenv.core.naming import (
    canonical_arch,
    check_env_name,
    image_name,
    match_prefixes,
    normalize,
    parse_mib,
    split_image_name,
    split_prefixes,
)
from pytest_ttenv.errors import UsageError

IMAGES = [
    "centos-7-x86_64", "centos-stream-9-x86_64", "debian-11-x86_64", "debian-12-aarch64",
    "debian-12-x86_64", "debian-13-x86_64", "ubuntu-20.04-aarch64", "ubuntu-20.04-x86_64",
    "ubuntu-22.04-x86_64",
]  # fmt: skip


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


@pytest.mark.parametrize(("given", "canon"), [("amd64", "x86_64"), ("ARM64", "aarch64"), ("riscv64", "riscv64")])
def test_arch_aliases(given: str, canon: str) -> None:
    assert canonical_arch(given) == canon


def test_unknown_arch() -> None:
    with pytest.raises(UsageError, match="unknown arch 'sparc'"):
        canonical_arch("sparc")


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
