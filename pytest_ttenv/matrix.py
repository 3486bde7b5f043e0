"""The test matrix: which VMs a session boots, and which of them each test runs on. Pure.

Both levels apply the one OS-prefix rule, ``core.naming.prefix_matches``:
session level, ``--tt-os`` prefixes x ``--tt-arch`` against the image names (``session_vms``);
test level, ``@pytest.mark.tt_os(...)`` / ``@pytest.mark.tt_arch(...)`` narrow the session's VMs
(``select``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pytest_ttenv.core.naming import match_prefixes, prefix_matches, split_image_name


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


def session_vms(prefixes: Sequence[str], arches: Sequence[str], images: Iterable[str]) -> list[MatrixVm]:
    """The VMs for ``--tt-os``/``--tt-arch``; UsageError if a prefix matches nothing."""
    return [MatrixVm.from_image(n) for n in match_prefixes(prefixes, images, arches)]


def select(vms: Sequence[MatrixVm], os_filters: Sequence[str], arch_filters: Sequence[str]) -> list[MatrixVm]:
    """The VMs a test runs on, given its ``tt_os`` prefixes and ``tt_arch`` markers (empty: all),
    in the session's order; UsageError for an unknown arch."""
    names = [vm.name for vm in vms]
    chosen = {n for prefix in os_filters or [""] for n in prefix_matches(prefix, names, arch_filters)}
    return [vm for vm in vms if vm.name in chosen]
