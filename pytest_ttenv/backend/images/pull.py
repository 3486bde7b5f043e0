"""Pull vendor cloud images from the catalog: download, resume, verify, convert, install.

- The download streams into ``<store>/.partial/<name>.part`` (a dot-dir: never listed) with a
  small ``<name>.json`` beside it (URL, ETag/Last-Modified, size). A cut connection or a stall
  leaves both; the next pull of that name resumes with an HTTP ``Range`` request (``If-Range``
  guards against the file having changed on the server).
- The vendor's checksum file is fetched first; the downloaded file must match it, else it is
  deleted and the pull refused (a mismatch after a *resumed* download restarts once from zero).
- Compressed images are decompressed (sparse) and non-qcow2 disks converted with ``qemu-img``
  in ``<store>/.pull-<name>-<pid>/``; ``ImageStore.install`` writes ``image.json`` and renames
  the directory into place, so a failed or interrupted pull never shows in the store.

Every network call has a timeout (connect, and each read); every failure is one TTError line
saying which URL, what happened and what to do.
"""

from __future__ import annotations

import bz2
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import requests

from pytest_ttenv import __version__
from pytest_ttenv.backend.images.catalog import HASHES, Catalog, CatalogImage, load_catalog
from pytest_ttenv.backend.images.importer import check_qcow2, convert_to_qcow2, require_qemu_img
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.errors import NotFound, TTError, from_os_error

Progress = Callable[[str], None]
ByteProgress = Callable[[int, int | None], None]  # (bytes so far, total or None)

DEFAULT_TIMEOUT = 30.0
CHUNK = 1 << 20
MIB = 1 << 20
MAX_CHECKSUM_FILE = 8 * MIB
LINE_EVERY = 10.0  # seconds between progress lines when no byte callback is given


def pullable_names(arches: Sequence[str] = (), catalog: Catalog | None = None) -> list[str]:
    """Canonical names of the images the catalog can pull for ``arches`` (all arches if empty)."""
    return (catalog or load_catalog()).available(arches)


def ensure_available(
    store: ImageStore,
    names: Sequence[str],
    progress: Progress = print,
    *,
    catalog: Catalog | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    on_bytes: ByteProgress | None = None,
) -> list[ImageInfo]:
    """The named images, pulling those missing from the store that the catalog has (first use).

    A missing name the catalog does not have raises NotFound; callers that prefer building
    (Debian with ``--tt-image-source=build``) handle those names before calling this.
    """
    cat = catalog or load_catalog()
    have = set(store.names())
    missing = [n for n in dict.fromkeys(names) if n not in have]
    unknown = [n for n in missing if n not in cat]
    if unknown:
        raise NotFound(f"image(s) {', '.join(unknown)} not in {store.root} and not in the {cat.where}",
                       "ttenv image list --available shows what can be pulled")  # fmt: skip
    for name in missing:
        img = cat.image(name)
        with _guard(store, img, progress):
            if name in store.names():  # another process pulled it while we waited for the lock
                continue
            progress(f"image {name} not in {store.root}: pulling it (first use)")
            _pull_locked(store, img, cat, progress, timeout, on_bytes)
    return [store.get(n) for n in names]


def pull(
    store: ImageStore,
    name: str,
    progress: Progress = print,
    *,
    catalog: Catalog | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    arch: str | None = None,
    on_bytes: ByteProgress | None = None,
) -> ImageInfo:
    """Pull ``name`` (entry ``ubuntu-24.04`` + ``arch``, or ``ubuntu-24.04-aarch64``) into ``store``.

    Replaces an image of that name. ``progress`` gets human-readable lines; ``on_bytes`` (if
    given) gets ``(done, total)`` after every chunk instead of periodic progress lines.
    """
    cat = catalog or load_catalog()
    img = cat.image(name, arch)
    with _guard(store, img, progress):
        return _pull_locked(store, img, cat, progress, timeout, on_bytes)


@contextmanager
def _guard(store: ImageStore, img: CatalogImage, progress: Progress) -> Iterator[None]:
    """File errors as one line, and one pull per image name at a time (flock in .partial/)."""
    try:
        partial = store.root / ".partial"
        partial.mkdir(parents=True, exist_ok=True)
        with open(partial / f"{img.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                progress(f"waiting for another pull of {img.name} to finish")
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield
    except OSError as exc:
        if isinstance(exc, requests.RequestException):  # requests' errors are OSErrors too
            raise _network_error(img.url, "download", exc, DEFAULT_TIMEOUT) from None
        raise from_os_error(exc, f"pull image {img.name} into {store.root}") from None


def _pull_locked(store: ImageStore, img: CatalogImage, cat: Catalog, progress: Progress, timeout: float,
                 on_bytes: ByteProgress | None) -> ImageInfo:  # fmt: skip
    require_qemu_img()
    store.remove_stale_builds()
    part = store.root / ".partial" / f"{img.name}.part"
    meta = part.with_suffix(".json")
    started = time.monotonic()
    session = _session()
    with session:
        progress(f"pulling {img.name} from {img.url}")
        expected = fetch_checksum(session, img, timeout)
        for attempt in (1, 2):
            resumed_from = _download(session, img.url, part, meta, timeout, progress, on_bytes)
            progress(f"verifying the {img.hash} checksum from {img.checksum_url}")
            digests = _hash_file(part, {img.hash, "sha256"})
            if digests[img.hash] == expected:
                break
            _discard(part, meta)
            if resumed_from and attempt == 1:
                progress("checksum mismatch after resuming: the server's file changed; downloading it again")
                continue
            raise TTError(
                f"checksum mismatch for {img.url}: expected {img.hash} {expected}, got {digests[img.hash]}",
                "the download was deleted; rerun to fetch it again - if it persists, the mirror or the catalog "
                "entry is stale",
            )
    work = store.root / f".pull-{img.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    out = work / "image"
    out.mkdir(parents=True)
    try:
        try:
            disk_mib = _to_qcow2(part, img, work, out / "disk.qcow2", progress)
        except TTError:
            _discard(part, meta)  # verified but unusable: downloading it again will not help
            raise
        info = ImageInfo(
            name=img.name, os=img.os, version=img.version, arch=img.arch, disk="disk.qcow2", disk_mib=disk_mib,
            user=img.user, boot=img.boot, access=img.access, kernel=None, initrd=None, cmdline="", source="pull",
            created=time.time(),
            details={"url": img.url, "checksum_url": img.checksum_url, "sha256": digests["sha256"],
                     img.hash: digests[img.hash], "format": img.format, "catalog": cat.version},
        )  # fmt: skip
        store.install(out, info)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _discard(part, meta)
    progress(f"pulled {img.name} in {time.monotonic() - started:.0f} s ({disk_mib} MiB virtual) "
             f"-> {store.root / img.name}")  # fmt: skip
    return store.get(img.name)


# -- HTTP ---------------------------------------------------------------------------------------
def _session() -> requests.Session:
    session = requests.Session()
    # identity: byte ranges and Content-Length must describe the file itself, not a gzip of it
    session.headers.update({"User-Agent": f"ttenv/{__version__}", "Accept-Encoding": "identity"})
    return session


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / MIB:.1f}"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (args, causes, urllib3 reasons), breadth first, bounded."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 20:
        cur = todo.pop(0)
        if any(cur is s for s in seen):
            continue
        seen.append(cur)
        todo.extend(a for a in cur.args if isinstance(a, BaseException))
        for nxt in (getattr(cur, "reason", None), cur.__cause__, cur.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return seen


def _is_timeout(exc: BaseException) -> bool:
    import urllib3.exceptions

    for e in _chain(exc):
        if isinstance(e, urllib3.exceptions.NewConnectionError):  # a ConnectTimeoutError subclass, but not one
            continue
        if isinstance(e, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
            return True
    return False


def _network_error(url: str, doing: str, exc: BaseException, timeout: float) -> TTError:
    """One line for a failed request that got no HTTP answer: refused, DNS, timeout, TLS, reset."""
    text = " ".join(str(e) for e in _chain(exc))
    host = re.sub(r"^[a-z]+://([^/]+).*$", r"\1", url)
    if _is_timeout(exc):
        return TTError(f"cannot {doing} {url}: no answer from {host} within {timeout:g} s",
                       "the server or the network stalled; rerun to resume, or raise --timeout")  # fmt: skip
    if isinstance(exc, requests.exceptions.SSLError):
        return TTError(
            f"cannot {doing} {url}: TLS failed with {host}",
            "check the host's clock and CA certificates, or use an http(s) mirror via TTENV_CATALOG",
        )
    if "refused" in text.lower():
        return TTError(f"cannot {doing} {url}: connection refused by {host}",
                       "is the server up? check the URL, proxy settings, or point the catalog elsewhere "
                       "(TTENV_CATALOG)")  # fmt: skip
    if re.search(r"resolve|name or service not known|nodename nor servname|temporary failure in name", text, re.I):
        return TTError(f"cannot {doing} {url}: cannot resolve {host.split(':')[0]}",
                       "no network or DNS here? air-gapped hosts can point the catalog at a local mirror "
                       "(TTENV_CATALOG)")  # fmt: skip
    if "reset" in text.lower() or "aborted" in text.lower():
        return TTError(f"cannot {doing} {url}: the connection was reset by {host}", "rerun to try again")
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return TTError(f"cannot {doing} {url}: {detail}", "check the URL and the network, then rerun")


def _http_error(url: str, doing: str, resp: requests.Response) -> TTError:
    code = resp.status_code
    what = f"cannot {doing} {url}: HTTP {code} {resp.reason or ''}".rstrip()
    if code in (404, 410):
        return TTError(what, "the vendor moved or removed it: update the catalog entry, or point it at a mirror "
                             "with TTENV_CATALOG")  # fmt: skip
    if code in (401, 403):
        return TTError(what, "the server refuses access; check the URL or use a mirror (TTENV_CATALOG)")
    if code == 429 or code >= 500:
        return TTError(what, "the server is overloaded or failing; retry later, or use a mirror (TTENV_CATALOG)")
    return TTError(what, "check the URL in the catalog (ttenv image list --available)")


def _get(session: requests.Session, url: str, doing: str, timeout: float, **kw: Any) -> requests.Response:
    try:
        return session.get(url, stream=True, timeout=(timeout, timeout), **kw)
    except requests.RequestException as exc:
        raise _network_error(url, doing, exc, timeout) from None


def fetch_checksum(session: requests.Session, img: CatalogImage, timeout: float = DEFAULT_TIMEOUT) -> str:
    """The vendor's published digest (lower-case hex) of ``img.file``."""
    doing = "fetch the checksum file"
    resp = _get(session, img.checksum_url, doing, timeout)
    with resp:
        if resp.status_code != 200:
            raise _http_error(img.checksum_url, doing, resp)
        body = b""
        try:
            for chunk in resp.iter_content(64 * 1024):
                body += chunk
                if len(body) > MAX_CHECKSUM_FILE:
                    raise TTError(f"{img.checksum_url} is larger than {MAX_CHECKSUM_FILE // MIB} MiB: not a checksum "
                                  "file", "check the checksum URL in the catalog")  # fmt: skip
        except requests.RequestException as exc:
            raise _network_error(img.checksum_url, doing, exc, timeout) from None
    try:
        return find_checksum(body.decode("utf-8", "replace"), img.checksum_format, img.hash, img.file,
                             img.checksum_key)  # fmt: skip
    except ValueError as exc:
        raise TTError(
            f"{img.checksum_url}: {exc}", "the vendor changed its layout; update the catalog entry (TTENV_CATALOG)"
        ) from None


# -- checksum files -----------------------------------------------------------------------------
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


def _hash_file(path: Path, algs: set[str]) -> dict[str, str]:
    hashers = {a: hashlib.new(a) for a in algs}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


# -- download with resume -----------------------------------------------------------------------
def _discard(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _resume_state(part: Path, meta: Path, url: str) -> tuple[int, str | None, int | None]:
    """Bytes already downloaded for ``url``, the validator for If-Range and the expected total
    ((0, None, None): start over)."""
    try:
        state = json.loads(meta.read_text())
        have = part.stat().st_size
    except (OSError, ValueError):
        _discard(part, meta)
        return 0, None, None
    if not isinstance(state, dict) or state.get("url") != url or have == 0:
        _discard(part, meta)
        return 0, None, None
    etag = state.get("etag")
    strong = etag if isinstance(etag, str) and not etag.startswith("W/") else None
    total = state.get("total")
    return have, strong or state.get("last_modified"), total if isinstance(total, int) else None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of a Content-Range header, None where absent or ``*``."""
    m = re.match(r"^\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*$", value or "")
    if not m:
        return None, None
    return (int(m.group(1)) if m.group(1) else None), (int(m.group(2)) if m.group(2) != "*" else None)


def _download(session: requests.Session, url: str, part: Path, meta: Path, timeout: float, progress: Progress,
              on_bytes: ByteProgress | None) -> int:  # fmt: skip
    """Fetch ``url`` into ``part``, resuming what is there; returns the offset it resumed from."""
    doing = "download"
    for _ in range(2):  # a second round only after the server rejected our resume point
        have, validator, known_total = _resume_state(part, meta, url)
        if have and have == known_total:
            progress(f"already downloaded ({_mib(have)} MiB)")
            return have
        headers = {}
        if have:
            headers["Range"] = f"bytes={have}-"
            if validator:
                headers["If-Range"] = validator
        resp = _get(session, url, doing, timeout, headers=headers)
        with resp:
            if have and resp.status_code == 416:
                _, total = _content_range(resp.headers.get("Content-Range"))
                if total == have:
                    progress(f"already downloaded ({_mib(have)} MiB)")
                    return have
                _discard(part, meta)  # the server's file is now smaller: start over
                continue
            if have and resp.status_code == 206:
                first, _ = _content_range(resp.headers.get("Content-Range"))
                if first != have:
                    _discard(part, meta)
                    continue
                progress(f"resuming at {_mib(have)} MiB")
            elif resp.status_code == 200:
                have = 0  # no resume: the server ignored Range, or the file changed (If-Range)
            else:
                raise _http_error(url, doing, resp)
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else None
            state = {"url": url, "etag": resp.headers.get("ETag"), "last_modified": resp.headers.get("Last-Modified"),
                     "total": total}  # fmt: skip
            meta.write_text(json.dumps(state))
            with open(part, "ab" if have else "wb") as f:
                done = _stream(resp, f, have, total, url, timeout, progress, on_bytes)
            if total is not None and done < total:
                raise TTError(f"download of {url} cut after {_mib(done)} of {_mib(total)} MiB: the server closed "
                              "the connection", f"rerun to resume from {_mib(done)} MiB")  # fmt: skip
            return have
    raise TTError(f"cannot resume the download of {url}: the server rejects byte ranges", "rerun to start over")


def _stream(resp: requests.Response, f: IO[bytes], have: int, total: int | None, url: str, timeout: float,
            progress: Progress, on_bytes: ByteProgress | None) -> int:  # fmt: skip
    done = have
    started = last = time.monotonic()
    if on_bytes:
        on_bytes(done, total)
    try:
        for chunk in resp.iter_content(CHUNK):
            f.write(chunk)
            done += len(chunk)
            if on_bytes:
                on_bytes(done, total)
            elif time.monotonic() - last >= LINE_EVERY:
                last = time.monotonic()
                pct = f" ({100 * done / total:.0f}%)" if total else ""
                rate = (done - have) / MIB / max(last - started, 1e-6)
                progress(f"  {_mib(done)} of {_mib(total)} MiB{pct}, {rate:.1f} MiB/s")
    except requests.RequestException as exc:
        f.flush()
        if _is_timeout(exc):
            raise TTError(
                f"download of {url} stalled after {_mib(done)} of {_mib(total)} MiB: nothing received for "
                f"{timeout:g} s",
                f"rerun to resume from {_mib(done)} MiB, or raise --timeout",
            ) from None
        raise TTError(f"download of {url} cut after {_mib(done)} of {_mib(total)} MiB: the connection broke",
                      f"rerun to resume from {_mib(done)} MiB") from None  # fmt: skip
    if not on_bytes:
        progress(f"downloaded {_mib(done - have)} MiB in {time.monotonic() - started:.1f} s")
    return done


# -- to a qcow2 ---------------------------------------------------------------------------------
def _open_compressed(path: Path, compression: str) -> io.BufferedIOBase:
    if compression == "xz":
        return lzma.open(path, "rb")
    if compression == "gz":
        return gzip.open(path, "rb")
    return bz2.open(path, "rb")


def _decompress(src: Path, compression: str, dest: Path, progress: Progress) -> None:
    """Decompress ``src`` into ``dest``, leaving holes where the data is all zeros."""
    progress(f"decompressing ({compression})")
    size = 0
    try:
        with _open_compressed(src, compression) as fin, open(dest, "wb") as fout:
            while chunk := fin.read(CHUNK):
                if chunk.count(0) == len(chunk):
                    fout.seek(len(chunk), os.SEEK_CUR)
                else:
                    fout.write(chunk)
                size += len(chunk)
            fout.truncate(size)
    except (lzma.LZMAError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise TTError(f"the downloaded file is not valid {compression} data: {exc}",
                      "the catalog's format for this image is wrong") from None  # fmt: skip
    except OSError as exc:
        if exc.errno is None:  # bz2/zlib stream errors carry no errno; disk errors do
            raise TTError(f"the downloaded file is not valid {compression} data: {exc}",
                          "the catalog's format for this image is wrong") from None  # fmt: skip
        raise


def _to_qcow2(part: Path, img: CatalogImage, work: Path, dest: Path, progress: Progress) -> int:
    """Turn the verified download into the standalone qcow2 ``dest``; returns its virtual MiB."""
    src = part
    if img.compression:
        src = work / f"disk.{img.disk_format}"
        _decompress(part, img.compression, src, progress)
    if img.disk_format == "qcow2":
        os.replace(src, dest)  # same file system: the store
    else:
        progress(f"converting {img.disk_format} to qcow2")
        convert_to_qcow2(src, img.disk_format, dest)
        if src != part:
            src.unlink()
    return check_qcow2(dest, f"the image pulled from {img.url}")
