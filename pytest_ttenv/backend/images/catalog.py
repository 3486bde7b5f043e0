"""The catalog of vendor cloud images that ``ttenv image pull`` knows: load, validate, render.

The built-in catalog is ``catalog.yaml`` (package data). ``$TTENV_CATALOG`` (or an explicit
path) names a file in the same format that replaces it or, with ``extends: builtin``, adds
entries to it and re-points entries at a mirror (``mirrors:``). Pure data: no network here.

Every entry is validated when loaded; a bad catalog is one CatalogError line naming the file,
the entry and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from pytest_ttenv.core.naming import ARCHES, canonical_arch, normalize, split_image_name
from pytest_ttenv.errors import NotFound, TTError, UsageError

SCHEMA = 1
HASHES = {"sha256": 64, "sha512": 128}  # algorithm -> length of its hex digest
CHECKSUM_FORMATS = ("sums", "bsd", "sidecar", "json")
DISK_FORMATS = ("qcow2", "raw", "vmdk", "vhdx")
COMPRESSIONS = ("xz", "gz", "bz2")
BOOTS = ("bios", "uefi")
DEFAULT_BOOT = {"x86_64": "bios", "aarch64": "uefi", "riscv64": "uefi"}
ACCESS = ("cloud-init",)
BUILTIN = "built-in catalog"
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_KEY_RE = re.compile(r"^[a-z][a-z0-9]*-[0-9][a-z0-9.]*$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_VAR_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
_BUILTIN_FIELDS = ("mirror", "os", "version", "arch", "vendor_arch", "boot")

# The catalog format, as a JSON Schema (documentation and for external tools; validated in pure
# Python below, which gives one clear line per problem and checks the URL templates too).
JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema", "version", "entries"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA},
        "version": {"type": "string", "minLength": 1},
        "extends": {"const": "builtin"},
        "mirrors": {"type": "object", "additionalProperties": {"type": "string", "pattern": "^https?://"}},
        "entries": {
            "type": "object",
            "propertyNames": {"pattern": _KEY_RE.pattern},
            "additionalProperties": {
                "type": "object",
                "required": ["os", "version", "user", "arches", "url", "checksum", "format"],
                "additionalProperties": False,
                "properties": {
                    "os": {"type": "string"},
                    "version": {"type": "string"},
                    "user": {"type": "string", "pattern": _USER_RE.pattern},
                    "mirror": {"type": "string", "pattern": "^https?://"},
                    "vars": {"type": "object", "additionalProperties": {"type": "string"}},
                    "arches": {
                        "type": "object",
                        "propertyNames": {"enum": list(ARCHES)},
                        "minProperties": 1,
                        "additionalProperties": {
                            "type": ["object", "null"],
                            "additionalProperties": False,
                            "properties": {
                                "vendor_arch": {"type": "string"},
                                "boot": {"enum": list(BOOTS)},
                                "url": {"type": "string"},
                                "vars": {"type": "object", "additionalProperties": {"type": "string"}},
                            },
                        },
                    },
                    "url": {"type": "string"},
                    "checksum": {
                        "type": "object",
                        "required": ["url", "format", "hash"],
                        "additionalProperties": False,
                        "properties": {
                            "url": {"type": "string"},
                            "format": {"enum": list(CHECKSUM_FORMATS)},
                            "hash": {"enum": list(HASHES)},
                            "key": {"type": "string", "pattern": "^/"},
                        },
                    },
                    "format": {"enum": [f"{d}.{c}" if c else d for d in DISK_FORMATS for c in ("", *COMPRESSIONS)]},
                    "boot": {"enum": list(BOOTS)},
                    "access": {"enum": list(ACCESS)},
                    "notes": {"type": "string"},
                },
            },
        },
    },
}


class CatalogError(TTError):
    """The catalog file cannot be used: unreadable, not YAML, or an entry breaks the format."""

    exit_code = 2


@dataclass(frozen=True)
class CatalogImage:
    """One entry rendered for one arch: everything ``pull`` needs, URLs filled in."""

    name: str  # canonical <os>-<version>-<arch>
    entry: str  # <os>-<version>
    os: str
    version: str
    arch: str
    url: str
    file: str  # the image's file name as published (looked up in the checksum file)
    checksum_url: str
    checksum_format: str
    checksum_key: str | None
    hash: str
    format: str  # qcow2 | raw | vmdk | vhdx, optionally .xz | .gz | .bz2
    boot: str
    user: str
    access: str = "cloud-init"
    notes: str = ""

    @property
    def disk_format(self) -> str:
        return self.format.split(".")[0]

    @property
    def compression(self) -> str | None:
        parts = self.format.split(".")
        return parts[1] if len(parts) > 1 else None


@dataclass(frozen=True)
class ArchSpec:
    vendor_arch: str
    boot: str
    url: str | None = None
    vars: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    """One OS release as the vendor publishes it, for one or more arches."""

    key: str
    os: str
    version: str
    user: str
    url: str
    checksum_url: str
    checksum_format: str
    hash: str
    format: str
    arches: Mapping[str, ArchSpec]
    checksum_key: str | None = None
    mirror: str | None = None
    vars: Mapping[str, str] = field(default_factory=dict)
    access: str = "cloud-init"
    notes: str = ""

    def names(self) -> list[str]:
        return [f"{self.key}-{arch}" for arch in self.arches]

    def render(self, arch: str) -> CatalogImage:
        """The image for ``arch`` with every URL template filled in."""
        spec = self.arches[arch]
        values = {**self.vars, **spec.vars, "mirror": self.mirror or "", "os": self.os, "version": self.version,
                  "arch": arch, "vendor_arch": spec.vendor_arch, "boot": spec.boot}  # fmt: skip
        url = (spec.url or self.url).format_map(values)
        file = Path(urlsplit(url).path).name
        values["file"] = file
        return CatalogImage(
            name=f"{self.key}-{arch}", entry=self.key, os=self.os, version=self.version, arch=arch, url=url,
            file=file, checksum_url=self.checksum_url.format_map(values), checksum_format=self.checksum_format,
            checksum_key=self.checksum_key.format_map(values) if self.checksum_key else None, hash=self.hash,
            format=self.format, boot=spec.boot, user=self.user, access=self.access, notes=self.notes,
        )  # fmt: skip


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
            raise NotFound(f"{entry.key} is not published for {wanted}",
                           f"the {self.where} has it for: {', '.join(entry.arches)}")  # fmt: skip
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
        raise CatalogError(f"cannot read catalog {where}{env}: {exc.strerror or exc}",
                           "fix the path, or unset TTENV_CATALOG to use the built-in catalog") from None  # fmt: skip
    data = _read(text, where)
    if data.get("extends") == "builtin":
        merged = dict(builtin)
        entries = {**builtin.get("entries", {}), **(data.get("entries") or {})}
        merged["entries"] = {k: v for k, v in entries.items() if v is not None}  # null removes an entry
        merged["version"] = data.get("version", builtin["version"])
        merged["mirrors"] = data.get("mirrors") or {}
        _check_top(data, where, partial=True)
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
    errors = _Errors(where)
    _check_top(data, where)
    mirrors = data.get("mirrors") or {}
    entries: dict[str, Entry] = {}
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, dict) or not raw_entries:
        errors.add("entries", "must be a non-empty mapping of <os>-<version> to an entry")
    else:
        for key, raw in raw_entries.items():
            entry = _entry(str(key), raw, errors)
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
                entries[k] = _replace_mirror(entries[k], str(base).rstrip("/"))
    errors.raise_if_any()
    canonical = json.dumps({k: _entry_dict(e) for k, e in entries.items()}, sort_keys=True)
    return Catalog(entries=entries, declared_version=str(data["version"]), source=where,
                   fingerprint=hashlib.sha256(canonical.encode()).hexdigest()[:12])  # fmt: skip


def _replace_mirror(entry: Entry, base: str) -> Entry:
    from dataclasses import replace

    return replace(entry, mirror=base)


def _entry_dict(entry: Entry) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(entry)


def _check_top(data: dict[str, Any], where: str, partial: bool = False) -> None:
    errors = _Errors(where)
    if "extends" in data and data["extends"] != "builtin":
        errors.add("extends", f"only 'builtin' is known (got {data['extends']!r})")
    allowed = set(JSON_SCHEMA["properties"])
    for key in data:
        if key not in allowed:
            errors.add(str(key), f"unknown field (allowed: {', '.join(sorted(allowed))})")
    if "schema" in data or not partial:
        if data.get("schema") != SCHEMA:
            errors.add("schema", f"must be {SCHEMA} (got {data.get('schema')!r})")
    if not partial and not (isinstance(data.get("version"), str) and data["version"]):
        errors.add("version", 'must be a non-empty string (quote it: version: "2026.1")')
    mirrors = data.get("mirrors")
    if mirrors is not None and not (isinstance(mirrors, dict) and all(
            isinstance(v, str) and re.match(r"^https?://", v) for v in mirrors.values())):  # fmt: skip
        errors.add("mirrors", "must map entry keys or OS names to http(s):// base URLs")
    errors.raise_if_any()


class _Errors:
    def __init__(self, where: str) -> None:
        self.where = where
        self.items: list[str] = []

    def add(self, path: str, problem: str) -> None:
        self.items.append(f"{path}: {problem}")

    def raise_if_any(self) -> None:
        if self.items:
            more = f" (and {len(self.items) - 1} more problem(s))" if len(self.items) > 1 else ""
            raise CatalogError(f"catalog {self.where}: {self.items[0]}{more}")


def _string(raw: Mapping[str, Any], key: str, path: str, errors: _Errors, required: bool = True) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            errors.add(f"{path}.{key}", "is required")
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        errors.add(f"{path}.{key}", f'must be a string (quote it: {key}: "{value}")')
        return None
    if not isinstance(value, str) or not value:
        errors.add(f"{path}.{key}", "must be a non-empty string")
        return None
    return value


def _choice(raw: Mapping[str, Any], key: str, path: str, errors: _Errors, choices: Iterable[str],
            required: bool = True) -> str | None:  # fmt: skip
    value = _string(raw, key, path, errors, required)
    options = list(choices)
    if value is not None and value not in options:
        errors.add(f"{path}.{key}", f"{value!r} is not one of {', '.join(options)}")
        return None
    return value


def _vars(raw: Any, path: str, errors: _Errors) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.add(path, "must be a mapping of names to strings")
        return {}
    out: dict[str, str] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not _VAR_RE.match(k) or k in (*_BUILTIN_FIELDS, "file"):
            errors.add(f"{path}.{k}", "bad variable name (lower-case identifier, not a built-in placeholder)")
        elif not isinstance(v, str):
            errors.add(f"{path}.{k}", f'must be a string (quote it: {k}: "{v}")')
        else:
            out[k] = v
    return out


def _unknown(raw: Mapping[str, Any], allowed: Iterable[str], path: str, errors: _Errors) -> None:
    allowed = list(allowed)
    for key in raw:
        if key not in allowed:
            errors.add(f"{path}.{key}", f"unknown field (allowed: {', '.join(allowed)})")


def _entry(key: str, raw: Any, errors: _Errors) -> Entry | None:
    path = f"entries.{key}"
    before = len(errors.items)
    if not _KEY_RE.match(key):
        errors.add(path, "entry keys are <os>-<version>, e.g. ubuntu-22.04")
    if not isinstance(raw, dict):
        errors.add(path, "must be a mapping")
        return None
    props = JSON_SCHEMA["properties"]["entries"]["additionalProperties"]["properties"]
    _unknown(raw, props, path, errors)
    os_name = _string(raw, "os", path, errors)
    version = _string(raw, "version", path, errors)
    if os_name and version and f"{os_name}-{version}" != key:
        errors.add(path, f"key must be <os>-<version> = {os_name}-{version}")
    user = _string(raw, "user", path, errors)
    if user and not _USER_RE.match(user):
        errors.add(f"{path}.user", f"{user!r} is not a valid login name")
    mirror = _string(raw, "mirror", path, errors, required=False)
    if mirror and not re.match(r"^https?://\S+$", mirror):
        errors.add(f"{path}.mirror", "must be an http(s):// base URL")
    variables = _vars(raw.get("vars"), f"{path}.vars", errors)
    url = _string(raw, "url", path, errors)
    fmt = _choice(raw, "format", path, errors, props["format"]["enum"])
    boot_default = _choice(raw, "boot", path, errors, BOOTS, required=False)
    access = _choice(raw, "access", path, errors, ACCESS, required=False) or "cloud-init"
    notes = raw.get("notes") or ""
    if not isinstance(notes, str):
        errors.add(f"{path}.notes", "must be a string")
        notes = ""
    checksum = raw.get("checksum")
    ck_url = ck_fmt = ck_hash = ck_key = None
    if not isinstance(checksum, dict):
        errors.add(f"{path}.checksum", "is required: a mapping with url, format and hash")
    else:
        cpath = f"{path}.checksum"
        _unknown(checksum, props["checksum"]["properties"], cpath, errors)
        ck_url = _string(checksum, "url", cpath, errors)
        ck_fmt = _choice(checksum, "format", cpath, errors, CHECKSUM_FORMATS)
        ck_hash = _choice(checksum, "hash", cpath, errors, HASHES)
        ck_key = _string(checksum, "key", cpath, errors, required=False)
        if ck_fmt == "json" and not ck_key:
            errors.add(f"{cpath}.key", "is required for format json: a JSON pointer such as /{file}/sha256")
        if ck_key and not ck_key.startswith("/"):
            errors.add(f"{cpath}.key", "must be a JSON pointer starting with '/'")
        if ck_key and ck_fmt != "json":
            errors.add(f"{cpath}.key", "is only used with format json")
    arches: dict[str, ArchSpec] = {}
    raw_arches = raw.get("arches")
    if isinstance(raw_arches, list):
        raw_arches = {a: {} for a in raw_arches}
    if not isinstance(raw_arches, dict) or not raw_arches:
        errors.add(f"{path}.arches", f"is required: a mapping of arches ({', '.join(ARCHES)}) to settings")
        raw_arches = {}
    arch_props = props["arches"]["additionalProperties"]["properties"]
    for arch, spec in raw_arches.items():
        apath = f"{path}.arches.{arch}"
        if arch not in ARCHES:
            errors.add(apath, f"unknown arch (use {', '.join(ARCHES)})")
            continue
        spec = spec or {}
        if not isinstance(spec, dict):
            errors.add(apath, "must be a mapping (vendor_arch, boot, url, vars) or empty")
            continue
        _unknown(spec, arch_props, apath, errors)
        boot = _choice(spec, "boot", apath, errors, BOOTS, required=False) or boot_default or DEFAULT_BOOT[arch]
        if arch == "aarch64" and boot != "uefi":
            errors.add(f"{apath}.boot", "aarch64 images boot with uefi")
        vendor_arch = _string(spec, "vendor_arch", apath, errors, required=False) or arch
        arch_url = _string(spec, "url", apath, errors, required=False)
        arches[arch] = ArchSpec(vendor_arch, boot, arch_url, _vars(spec.get("vars"), f"{apath}.vars", errors))
    if len(errors.items) > before or None in (os_name, version, user, url, fmt, ck_url, ck_fmt, ck_hash):
        return None
    assert os_name and version and user and url and fmt and ck_url and ck_fmt and ck_hash
    try:
        split_image_name(f"{key}-x86_64")
    except UsageError:
        errors.add(path, f"{key}-<arch> is not a canonical image name (<os>-<version>-<arch>)")
        return None
    ordered = {a: arches[a] for a in ARCHES if a in arches}
    entry = Entry(
        key=key, os=os_name, version=version, user=user, url=url, checksum_url=ck_url, checksum_format=ck_fmt,
        hash=ck_hash, format=fmt, arches=ordered, checksum_key=ck_key, mirror=mirror.rstrip("/") if mirror else None,
        vars=variables, access=access, notes=notes,
    )  # fmt: skip
    _check_templates(entry, path, errors)
    return entry if len(errors.items) == before else None


def _placeholders(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise KeyError(str(exc)) from None


def _check_templates(entry: Entry, path: str, errors: _Errors) -> None:
    before = len(errors.items)
    for arch, spec in entry.arches.items():
        known = {*_BUILTIN_FIELDS, *entry.vars, *spec.vars}
        templates = [("url", spec.url or entry.url, known), ("checksum.url", entry.checksum_url, {*known, "file"})]
        if entry.checksum_key:
            templates.append(("checksum.key", entry.checksum_key, {*known, "file"}))
        for what, template, allowed in templates:
            try:
                fields = _placeholders(template)
            except KeyError as exc:
                errors.add(f"{path}.{what}", f"bad template: {exc}")
                continue
            for name in fields:
                if name not in allowed:
                    errors.add(f"{path}.{what}", f"unknown placeholder {{{name}}} for {arch} "
                                                 f"(known: {', '.join(sorted(allowed))})")  # fmt: skip
            if "mirror" in fields and entry.mirror is None:
                errors.add(f"{path}.{what}", "uses {mirror} but the entry has no mirror")
        if len(errors.items) > before:
            return
        image = entry.render(arch)
        for what, url in (("url", image.url), ("checksum.url", image.checksum_url)):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                errors.add(f"{path}.{what}", f"renders to {url!r} for {arch}, not an http(s) URL")
        if not image.file:
            errors.add(f"{path}.url", f"renders to {image.url!r} for {arch}, which names no file")


def catalog_version(path: str | os.PathLike[str] | None = None) -> str:
    """The version of the catalog in force, for CI cache keys: ``2026.11.1-<content hash>``."""
    return load_catalog(path).version


def available(arches: Sequence[str] = (), path: str | os.PathLike[str] | None = None) -> list[str]:
    """Canonical names of the images the catalog in force has for ``arches`` (all if empty)."""
    return load_catalog(path).available(arches)


def entry_for(name: str, path: str | os.PathLike[str] | None = None) -> Entry:
    """The catalog entry for ``name`` (key, image name or separator-free form)."""
    return load_catalog(path).entry_for(name)
