"""The catalog format: its JSON Schema (``JSON_SCHEMA``, for documentation and external tools)
and the checks that turn a loaded mapping into validated ``Entry`` objects. The checks are pure
Python, so a bad catalog is one ``CatalogError`` line naming the file, the entry and the field
(URL templates are checked too, by rendering them for every arch).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from pytest_ttenv.backend.images.catalog_entry import (
    ACCESS,
    BOOTS,
    CHECKSUM_FORMATS,
    COMPRESSIONS,
    DEFAULT_BOOT,
    DISK_FORMATS,
    HASHES,
    ONLY_BOOT,
    ArchSpec,
    Entry,
)
from pytest_ttenv.core.naming import ARCHES, split_image_name
from pytest_ttenv.errors import TTError, UsageError

SCHEMA = 1
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


def check_top(data: dict[str, Any], where: str, partial: bool = False) -> None:
    errors = Errors(where)
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
    if mirrors is not None and not (
        isinstance(mirrors, dict) and all(isinstance(v, str) and re.match(r"^https?://", v) for v in mirrors.values())
    ):
        errors.add("mirrors", "must map entry keys or OS names to http(s):// base URLs")
    errors.raise_if_any()


class Errors:
    """The problems found in one catalog file; ``raise_if_any`` makes the first one (and how many
    more) a CatalogError line."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.items: list[str] = []

    def add(self, path: str, problem: str) -> None:
        self.items.append(f"{path}: {problem}")

    def raise_if_any(self) -> None:
        if self.items:
            more = f" (and {len(self.items) - 1} more problem(s))" if len(self.items) > 1 else ""
            raise CatalogError(f"catalog {self.where}: {self.items[0]}{more}")


def _string(raw: Mapping[str, Any], key: str, path: str, errors: Errors, required: bool = True) -> str | None:
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


def _choice(
    raw: Mapping[str, Any], key: str, path: str, errors: Errors, choices: Iterable[str], required: bool = True
) -> str | None:
    value = _string(raw, key, path, errors, required)
    options = list(choices)
    if value is not None and value not in options:
        errors.add(f"{path}.{key}", f"{value!r} is not one of {', '.join(options)}")
        return None
    return value


def _vars(raw: Any, path: str, errors: Errors) -> dict[str, str]:
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


def _unknown(raw: Mapping[str, Any], allowed: Iterable[str], path: str, errors: Errors) -> None:
    allowed = list(allowed)
    for key in raw:
        if key not in allowed:
            errors.add(f"{path}.{key}", f"unknown field (allowed: {', '.join(allowed)})")


def parse_entry(key: str, raw: Any, errors: Errors) -> Entry | None:
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
        if arch in ONLY_BOOT and boot != ONLY_BOOT[arch]:
            errors.add(f"{apath}.boot", f"{arch} images boot with {ONLY_BOOT[arch]}")
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
        key=key,
        os=os_name,
        version=version,
        user=user,
        url=url,
        checksum_url=ck_url,
        checksum_format=ck_fmt,
        hash=ck_hash,
        format=fmt,
        arches=ordered,
        checksum_key=ck_key,
        mirror=mirror.rstrip("/") if mirror else None,
        vars=variables,
        access=access,
        notes=notes,
    )
    _check_templates(entry, path, errors)
    return entry if len(errors.items) == before else None


def _placeholders(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise KeyError(str(exc)) from None


def _check_templates(entry: Entry, path: str, errors: Errors) -> None:
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
                    errors.add(
                        f"{path}.{what}",
                        f"unknown placeholder {{{name}}} for {arch} (known: {', '.join(sorted(allowed))})",
                    )
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
