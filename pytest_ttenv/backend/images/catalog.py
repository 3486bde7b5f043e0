"""The catalog of vendor cloud images that ``ttenv image pull`` knows: load, merge, look up.

The built-in catalog is ``catalog.yaml`` (package data). ``$TTENV_CATALOG`` (or an explicit
path) names a file in the same format that replaces it or, with ``extends: builtin``, adds
entries to it and re-points entries at a mirror (``mirrors:``). Pure data: no network here.

Every entry is validated when loaded (``catalog_schema``); a bad catalog is one CatalogError
line naming the file, the entry and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pytest_ttenv.backend.images.catalog_entry import CatalogImage, Entry
from pytest_ttenv.backend.images.catalog_schema import CatalogError, Errors, check_top, parse_entry
from pytest_ttenv.core.naming import canonical_arch, normalize
from pytest_ttenv.errors import NotFound, UsageError

BUILTIN = "built-in catalog"
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Catalog:
    """A validated catalog: entries by key, where it came from, its version."""

    entries: Mapping[str, Entry]
    declared_version: str
    source: str = BUILTIN
    fingerprint: str = ""

    @property
    def version(self) -> str:
        """``<declared version>-<content hash>``: changes whenever any entry changes (CI cache keys)."""
        return f"{self.declared_version}-{self.fingerprint}"

    def entry_for(self, name: str) -> Entry:
        """The entry for a key (``ubuntu-22.04``), an image name (``ubuntu-22.04-aarch64``) or
        the same with separators dropped (``ubuntu2204``); NotFound lists what the catalog has."""
        return self._split(name)[0]

    def image(self, name: str, arch: str | None = None) -> CatalogImage:
        """The image for ``name`` (entry key or full image name) and ``arch`` (default: the name's,
        else this host's); NotFound when the vendor does not publish that arch."""
        entry, named_arch = self._split(name)
        if arch is not None and named_arch is not None and canonical_arch(arch) != named_arch:
            raise UsageError(f"{name} names arch {named_arch} but --arch is {arch}", "give one of them")
        wanted = canonical_arch(arch) if arch else named_arch or canonical_arch(platform.machine())
        if wanted not in entry.arches:
            raise NotFound(
                f"{entry.key} is not published for {wanted}", f"the {self.where} has it for: {', '.join(entry.arches)}"
            )
        return entry.render(wanted)

    def _split(self, name: str) -> tuple[Entry, str | None]:
        key = normalize(name)
        for entry in self.entries.values():
            if key == normalize(entry.key):
                return entry, None
        arch = _arch_suffix(name)
        if arch is not None:
            base = normalize(name.rsplit("-", 1)[0])
            for entry in self.entries.values():
                if base == normalize(entry.key):
                    return entry, arch
        raise NotFound(f"{name!r} is not in the {self.where}", f"pullable: {', '.join(self.entries) or 'none'}")

    def images(self, arches: Sequence[str] = ()) -> list[CatalogImage]:
        """Every image of the catalog (for these arches), in catalog order."""
        wanted = {canonical_arch(a) for a in arches}
        return [e.render(a) for e in self.entries.values() for a in e.arches if not wanted or a in wanted]

    def available(self, arches: Sequence[str] = ()) -> list[str]:
        """Canonical names of every image (for these arches), sorted: ``ubuntu-22.04-x86_64``..."""
        return sorted(img.name for img in self.images(arches))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(name in e.names() for e in self.entries.values())

    @property
    def where(self) -> str:
        """``built-in catalog`` or ``catalog <path>``, for messages."""
        return BUILTIN if self.source == BUILTIN else f"catalog {self.source}"


def _arch_suffix(name: str) -> str | None:
    tail = name.rsplit("-", 1)[-1] if "-" in name else ""
    try:
        return canonical_arch(tail) if tail else None
    except UsageError:
        return None


# -- loading ------------------------------------------------------------------------------------
def builtin_text() -> str:
    text: str = resources.files("pytest_ttenv.backend.images").joinpath("catalog.yaml").read_text()
    return text


def load_catalog(path: str | os.PathLike[str] | None = None) -> Catalog:
    """The catalog in force: ``path``, else ``$TTENV_CATALOG``, else the built-in one.

    A file with ``extends: builtin`` starts from the built-in catalog: its ``entries`` add or
    replace whole entries and its ``mirrors`` (by entry key or by OS) replace ``{mirror}``.
    """
    chosen = path or os.environ.get("TTENV_CATALOG") or None
    builtin = _read(builtin_text(), BUILTIN)
    if not chosen:
        return _build(builtin, BUILTIN)
    where = str(chosen)
    try:
        text = Path(chosen).read_text()
    except OSError as exc:
        env = "" if path else " (from TTENV_CATALOG)"
        raise CatalogError(
            f"cannot read catalog {where}{env}: {exc.strerror or exc}",
            "fix the path, or unset TTENV_CATALOG to use the built-in catalog",
        ) from None
    data = _read(text, where)
    if data.get("extends") == "builtin":
        merged = dict(builtin)
        entries = {**builtin.get("entries", {}), **(data.get("entries") or {})}
        merged["entries"] = {k: v for k, v in entries.items() if v is not None}  # null removes an entry
        merged["version"] = data.get("version", builtin["version"])
        merged["mirrors"] = data.get("mirrors") or {}
        check_top(data, where, partial=True)
        data = merged
    return _build(data, where)


def _read(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_LOADER)  # a safe loader (in C where available)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CatalogError(f"catalog {where} is not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise CatalogError(f"catalog {where} must be a mapping with schema, version and entries")
    return data


def _build(data: dict[str, Any], where: str) -> Catalog:
    errors = Errors(where)
    check_top(data, where)
    mirrors = data.get("mirrors") or {}
    entries: dict[str, Entry] = {}
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, dict) or not raw_entries:
        errors.add("entries", "must be a non-empty mapping of <os>-<version> to an entry")
    else:
        for key, raw in raw_entries.items():
            entry = parse_entry(str(key), raw, errors)
            if entry is not None:
                entries[entry.key] = entry
    for target, base in mirrors.items():
        hits = [k for k, e in entries.items() if target in (k, e.os)]
        if not hits:
            errors.add(f"mirrors.{target}", "names no entry key or OS of the catalog")
        for k in hits:
            if entries[k].mirror is None:
                errors.add(f"mirrors.{target}", f"entry {k} has no mirror to replace (its URLs do not use {{mirror}})")
            else:
                entries[k] = replace(entries[k], mirror=str(base).rstrip("/"))
    errors.raise_if_any()
    canonical = json.dumps({k: asdict(e) for k, e in entries.items()}, sort_keys=True)
    return Catalog(
        entries=entries,
        declared_version=str(data["version"]),
        source=where,
        fingerprint=hashlib.sha256(canonical.encode()).hexdigest()[:12],
    )


def catalog_version(path: str | os.PathLike[str] | None = None) -> str:
    """The version of the catalog in force, for CI cache keys: ``2026.11.1-<content hash>``."""
    return load_catalog(path).version


def available(arches: Sequence[str] = (), path: str | os.PathLike[str] | None = None) -> list[str]:
    """Canonical names of the images the catalog in force has for ``arches`` (all if empty)."""
    return load_catalog(path).available(arches)


def entry_for(name: str, path: str | os.PathLike[str] | None = None) -> Entry:
    """The catalog entry for ``name`` (key, image name or separator-free form)."""
    return load_catalog(path).entry_for(name)
