"""Vendor checksum files: GNU and BSD sum lists, sidecars and JSON, read into the digest of one
file (``find_checksum``), and the digests of a downloaded file (``hash_file``). Pure.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pytest_ttenv.backend.images.catalog_entry import HASHES

CHUNK = 1 << 20  # bytes per read of a downloaded or disk file

_GNU_LINE = re.compile(r"^([0-9a-fA-F]{64}|[0-9a-fA-F]{128})\s+\*?(\S.*?)\s*$")
_BSD_LINE = re.compile(r"^(SHA-?256|SHA-?512)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*$", re.IGNORECASE)


def parse_checksums(text: str) -> list[tuple[str, str, str]]:
    """``(algorithm, file name, hex)`` for every GNU (``<hex>  <file>``) or BSD (``SHA256 (<file>)
    = <hex>``) line; comments, PGP armour and other lines are skipped."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if m := _BSD_LINE.match(line):
            alg = m.group(1).lower().replace("-", "")
            found.append((alg, Path(m.group(2)).name, m.group(3).lower()))
        elif m := _GNU_LINE.match(line):
            alg = "sha256" if len(m.group(1)) == 64 else "sha512"
            found.append((alg, Path(m.group(2)).name, m.group(1).lower()))
    return found


def find_checksum(text: str, fmt: str, alg: str, file: str, key: str | None = None) -> str:
    """The ``alg`` digest of ``file`` in a checksum file of format ``fmt``; ValueError if absent.

    ``sums``/``bsd``: a list file, looked up by file name (either line style is accepted in
    either). ``sidecar``: the hash of one file - a bare digest, or one line naming any file.
    ``json``: the string at the JSON pointer ``key`` (``sha256:`` prefix allowed).
    """
    want = HASHES[alg]
    if fmt == "json":
        try:
            value: Any = json.loads(text)
        except ValueError:
            raise ValueError("is not valid JSON") from None
        for part in (key or "/").split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise ValueError(f"has nothing at {key}")
        digest = str(value).strip().lower().removeprefix(f"{alg}:")
        if not re.fullmatch(rf"[0-9a-f]{{{want}}}", digest):
            raise ValueError(f"holds {str(value)[:80]!r} at {key}, not a {alg} digest")
        return digest
    if fmt == "sidecar":
        bare = text.strip().split()
        if len(bare) == 1 and re.fullmatch(rf"[0-9a-fA-F]{{{want}}}", bare[0]):
            return bare[0].lower()
    entries = [(f, h) for a, f, h in parse_checksums(text) if a == alg and len(h) == want]
    named = {h for f, h in entries if f == file}
    if len(named) == 1:
        return named.pop()
    if len(named) > 1:
        raise ValueError(f"lists {file} with different {alg} digests")
    if fmt == "sidecar" and len({h for _, h in entries}) == 1:
        return entries[0][1]  # a sidecar names the dated file behind a "latest" link
    raise ValueError(f"has no {alg} entry for {file}")


def hash_file(path: Path, algs: set[str]) -> dict[str, str]:
    """The hex digests of the file at ``path``, one per algorithm of ``algs``, in one read."""
    hashers = {a: hashlib.new(a) for a in algs}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}
