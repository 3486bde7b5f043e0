"""Names: canonical image names, TTStack OS-prefix matching, arch aliases, sizes, durations.

Pure functions; every rejection is a UsageError whose text says what is accepted.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Iterable, Sequence

from pytest_ttenv.errors import UsageError

ARCHES = ("x86_64", "aarch64", "riscv64", "ppc64le", "s390x", "i386", "armhf")
# What users type for an arch (Debian's, uname -m's, other tools' names) -> its canonical form.
_ARCH_ALIASES = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "arm64": "aarch64",
    "riscv": "riscv64",
    "ppc64el": "ppc64le",
    "powerpc64le": "ppc64le",
    "i686": "i386",
    "armv7l": "armhf",
    "armv7": "armhf",
}
_DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64el"}  # where Debian's name differs

_IMAGE_RE = re.compile(rf"^([a-z][a-z0-9]*)-([0-9][a-z0-9.]*)-({'|'.join(ARCHES)})$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
SIZE_FORMS = "MiB, or a number with a unit: 512, 512M, 2G, 2GiB, 1T"
DURATION_FORMS = "seconds, or a number with a unit: 90, 90s, 30m, 2h, 1d, 1.5h"


def normalize(text: str) -> str:
    """Lower-case ``text`` and drop every separator: ``Ubuntu-20.04`` -> ``ubuntu2004``."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def canonical_arch(arch: str) -> str:
    """Map an arch name or alias (amd64, arm64) to its canonical form, or raise UsageError."""
    key = arch.strip().lower()
    key = _ARCH_ALIASES.get(key, key)
    if key not in ARCHES:
        raise UsageError(
            f"unknown arch {arch!r}",
            f"use one of {', '.join(ARCHES)}, or an alias: amd64, arm64, ppc64el, i686, armv7l",
        )
    return key


def host_arch(machine: str | None = None) -> str:
    """``machine`` (default: this host's ``uname -m``) in canonical form (``i686`` -> ``i386``,
    ``armv7l`` -> ``armhf``), or as given when it is no guest arch (then every guest is foreign)."""
    machine = machine or platform.machine()
    try:
        return canonical_arch(machine)
    except UsageError:
        return machine


def debian_arch(arch: str) -> str:
    """Debian's name for a canonical arch (``x86_64`` -> ``amd64``, ``ppc64le`` -> ``ppc64el``)."""
    return _DEBIAN_ARCH.get(arch, arch)


def image_name(os_name: str, version: str, arch: str) -> str:
    """Canonical image name ``<os>-<version>-<arch>``."""
    return f"{os_name}-{version}-{canonical_arch(arch)}"


def split_image_name(name: str) -> tuple[str, str, str]:
    """Split a canonical image name into (os, version, arch), or raise UsageError."""
    m = _IMAGE_RE.match(name)
    if not m:
        raise UsageError(f"bad image name {name!r}", "expected <os>-<version>-<arch>, e.g. debian-12-x86_64")
    return m.group(1), m.group(2), m.group(3)


def split_prefixes(values: Iterable[str]) -> list[str]:
    """Flatten comma-separated option values into a list of non-empty prefixes."""
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def prefix_matches(prefix: str, names: Iterable[str], arches: Iterable[str] = ()) -> list[str]:
    """The OS-prefix rule (TTStack's), the one place it is written: the names (in the order given)
    that ``prefix`` starts once both are lower-cased and stripped of separators, so ``cent`` matches
    every CentOS and ``ubuntu2004`` only Ubuntu 20.04 (an empty prefix matches every name); with
    ``arches`` (canonical names or aliases; UsageError for an unknown one) only names of those arches.
    """
    key = normalize(prefix)
    wanted = {canonical_arch(a) for a in arches}
    return [n for n in names if normalize(n).startswith(key) and (not wanted or n.rsplit("-", 1)[-1] in wanted)]


def match_prefixes(prefixes: Sequence[str], names: Iterable[str], arches: Sequence[str] = ()) -> list[str]:
    """Names matching any OS prefix (``prefix_matches``), optionally restricted to ``arches``.

    Result keeps the sorted order of ``names`` per prefix, in the order of the prefixes, without
    duplicates. An empty prefix, or one that matches nothing, raises UsageError listing what exists.
    """
    pool = sorted(set(names))
    wanted = sorted({canonical_arch(a) for a in arches})
    result: list[str] = []
    for prefix in prefixes:
        if not normalize(prefix):
            raise UsageError(f"empty OS prefix {prefix!r}", "give e.g. debian12 or cent")
        hits = prefix_matches(prefix, pool, wanted)
        if not hits:
            arch_note = f" for arch {','.join(wanted)}" if wanted else ""
            available = ", ".join(pool) if pool else "none (build one: ttenv image build debian-12)"
            raise UsageError(f"OS prefix {prefix!r} matches no image{arch_note}; available: {available}")
        result.extend(h for h in hits if h not in result)
    return result


def check_env_name(name: str) -> str:
    """Return ``name`` if it is a valid ENV name, else raise UsageError."""
    if not _ENV_NAME_RE.match(name):
        raise UsageError(
            f"bad ENV name {name!r}", "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def parse_mib(text: str | int, what: str) -> int:
    """Parse a size (``512``, ``512M``, ``2G``, ``2GiB``, ``1T``; bare numbers are MiB) into MiB > 0.

    The one size parser of every size option; ``what`` names the option (``--mem``, ``TTENV_MEM``).
    """
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(text)
        if not m:
            raise UsageError(f"bad {what} size {text!r}", f"use {SIZE_FORMS}")
        unit = (m.group(2) or "m")[0].lower()
        value = int(m.group(1)) * {"k": 1, "m": 1, "g": 1024, "t": 1024 * 1024}[unit]
        if unit == "k":
            value //= 1024
    if value <= 0:
        raise UsageError(f"{what} size must be positive, got {text!r}", f"use {SIZE_FORMS}")
    return value


def parse_seconds(text: str | float, what: str) -> float:
    """Parse a duration (``90``, ``90s``, ``30m``, ``2h``, ``1d``, ``1.5h``; bare numbers are seconds)
    into seconds > 0.

    The one duration parser of every duration option; ``what`` names the option (``--ttl``,
    ``TTENV_LEASE``). Zero is rejected too: no option takes it to mean "never" or "no wait".
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _DURATION_RE.match(text)
        if not m:
            raise UsageError(f"{what}={text!r} is not a duration", f"use {DURATION_FORMS}")
        value = float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    if not 0 < value < float("inf"):
        raise UsageError(f"{what}={text!r} must be positive", f"use {DURATION_FORMS}")
    return value
