"""The test matrix: which VMs a session boots, and which of them each test runs on. Pure.

Session level: OS prefixes x arches against the image names (``naming.match_prefixes``).
Test level: ``@pytest.mark.tt_os(...)`` / ``@pytest.mark.tt_arch(...)`` narrow the session's VMs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pytest_ttenv.core.naming import canonical_arch, match_prefixes, normalize, split_image_name

BUILDABLE_VERSIONS = ("11", "12", "13")  # Debian releases the image builder knows


@dataclass(frozen=True)
class MatrixVm:
    """One VM of the session's matrix; ``name`` is also the test id (``debian-12-x86_64``)."""

    name: str
    os: str
    version: str
    arch: str

    @classmethod
    def from_image(cls, image: str) -> MatrixVm:
        os_name, version, arch = split_image_name(image)
        return cls(image, os_name, version, arch)


def buildable(arches: Sequence[str]) -> list[str]:
    """Image names the builder can make for ``arches`` (Debian releases)."""
    return [f"debian-{v}-{canonical_arch(a)}" for a in arches for v in BUILDABLE_VERSIONS]


def missing_images(
    prefixes: Sequence[str], have: Iterable[str], arches: Sequence[str], obtainable: Iterable[str]
) -> list[str]:
    """Obtainable images (buildable or pullable) that a prefix asks for but the store lacks.

    Only prefixes that match no image of ``arches`` in the store are considered: ``deb`` with
    Debian 12 present does not fetch 11 and 13.
    """
    have, obtainable = list(have), list(obtainable)
    wanted: list[str] = []
    for prefix in prefixes:
        key = normalize(prefix)
        if any(normalize(n).startswith(key) and n.rsplit("-", 1)[1] in arches for n in have):
            continue
        wanted += [
            n for n in obtainable
            if normalize(n).startswith(key) and n.rsplit("-", 1)[1] in arches and n not in wanted
        ]  # fmt: skip
    return wanted


def session_vms(prefixes: Sequence[str], arches: Sequence[str], images: Iterable[str]) -> list[MatrixVm]:
    """The VMs for ``--tt-os``/``--tt-arch``; UsageError if a prefix matches nothing."""
    return [MatrixVm.from_image(n) for n in match_prefixes(prefixes, images, arches)]


def select(vms: Sequence[MatrixVm], os_filters: Sequence[str], arch_filters: Sequence[str]) -> list[MatrixVm]:
    """The VMs a test runs on, given its ``tt_os`` prefixes and ``tt_arch`` markers (empty: all)."""
    keys = [normalize(p) for p in os_filters]
    arches = {canonical_arch(a) for a in arch_filters}
    return [
        vm
        for vm in vms
        if (not keys or any(normalize(vm.name).startswith(k) for k in keys)) and (not arches or vm.arch in arches)
    ]
