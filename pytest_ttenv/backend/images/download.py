"""HTTP for pulls: one ``requests`` session per pull, a download that resumes (``Range`` with
``If-Range``) from ``<name>.part`` and its ``<name>.json`` state, the vendor's checksum file
(``fetch_checksum``), and every failure as one TTError line: which URL, what happened, what to do.
Every call has a timeout (connect, and each read).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import requests

from pytest_ttenv import __version__
from pytest_ttenv.backend.images.catalog_entry import CatalogImage
from pytest_ttenv.backend.images.checksums import CHUNK, find_checksum
from pytest_ttenv.errors import TTError

Progress = Callable[[str], None]
ByteProgress = Callable[[int, int | None], None]  # (bytes so far, total or None)

DEFAULT_TIMEOUT = 30.0
MIB = 1 << 20
MAX_CHECKSUM_FILE = 8 * MIB
LINE_EVERY = 10.0  # seconds between progress lines when no byte callback is given


def new_session() -> requests.Session:
    """A session that asks for the bytes as stored (byte ranges and sizes of the file itself)."""
    session = requests.Session()
    # identity: byte ranges and Content-Length must describe the file itself, not a gzip of it
    session.headers.update({"User-Agent": f"ttenv/{__version__}", "Accept-Encoding": "identity"})
    return session


def mib(n: int | None) -> str:
    """``n`` bytes in MiB with one decimal, for messages (``?`` if unknown)."""
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


def network_error(url: str, doing: str, exc: BaseException, timeout: float) -> TTError:
    """One line for a failed request that got no HTTP answer: refused, DNS, timeout, TLS, reset."""
    text = " ".join(str(e) for e in _chain(exc))
    host = re.sub(r"^[a-z]+://([^/]+).*$", r"\1", url)
    if _is_timeout(exc):
        return TTError(
            f"cannot {doing} {url}: no answer from {host} within {timeout:g} s",
            "the server or the network stalled; rerun to resume, or raise --timeout",
        )
    if isinstance(exc, requests.exceptions.SSLError):
        return TTError(
            f"cannot {doing} {url}: TLS failed with {host}",
            "check the host's clock and CA certificates, or use an http(s) mirror via TTENV_CATALOG",
        )
    if "refused" in text.lower():
        return TTError(
            f"cannot {doing} {url}: connection refused by {host}",
            "is the server up? check the URL, proxy settings, or point the catalog elsewhere (TTENV_CATALOG)",
        )
    if re.search(r"resolve|name or service not known|nodename nor servname|temporary failure in name", text, re.I):
        return TTError(
            f"cannot {doing} {url}: cannot resolve {host.split(':')[0]}",
            "no network or DNS here? air-gapped hosts can point the catalog at a local mirror (TTENV_CATALOG)",
        )
    if "reset" in text.lower() or "aborted" in text.lower():
        return TTError(f"cannot {doing} {url}: the connection was reset by {host}", "rerun to try again")
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return TTError(f"cannot {doing} {url}: {detail}", "check the URL and the network, then rerun")


def _http_error(url: str, doing: str, resp: requests.Response) -> TTError:
    code = resp.status_code
    what = f"cannot {doing} {url}: HTTP {code} {resp.reason or ''}".rstrip()
    if code in (404, 410):
        return TTError(
            what, "the vendor moved or removed it: update the catalog entry, or point it at a mirror with TTENV_CATALOG"
        )
    if code in (401, 403):
        return TTError(what, "the server refuses access; check the URL or use a mirror (TTENV_CATALOG)")
    if code == 429 or code >= 500:
        return TTError(what, "the server is overloaded or failing; retry later, or use a mirror (TTENV_CATALOG)")
    return TTError(what, "check the URL in the catalog (ttenv image list --available)")


def _get(session: requests.Session, url: str, doing: str, timeout: float, **kw: Any) -> requests.Response:
    try:
        return session.get(url, stream=True, timeout=(timeout, timeout), **kw)
    except requests.RequestException as exc:
        raise network_error(url, doing, exc, timeout) from None


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
                    raise TTError(
                        f"{img.checksum_url} is larger than {MAX_CHECKSUM_FILE // MIB} MiB: not a checksum file",
                        "check the checksum URL in the catalog",
                    )
        except requests.RequestException as exc:
            raise network_error(img.checksum_url, doing, exc, timeout) from None
    try:
        return find_checksum(body.decode("utf-8", "replace"), img.checksum_format, img.hash, img.file, img.checksum_key)
    except ValueError as exc:
        raise TTError(
            f"{img.checksum_url}: {exc}", "the vendor changed its layout; update the catalog entry (TTENV_CATALOG)"
        ) from None


# -- download with resume -----------------------------------------------------------------------
def discard(*paths: Path) -> None:
    """Delete the files that exist of ``paths``."""
    for p in paths:
        p.unlink(missing_ok=True)


def _resume_state(part: Path, meta: Path, url: str) -> tuple[int, str | None, int | None]:
    """Bytes already downloaded for ``url``, the validator for If-Range and the expected total
    ((0, None, None): start over)."""
    try:
        state = json.loads(meta.read_text())
        have = part.stat().st_size
    except (OSError, ValueError):
        discard(part, meta)
        return 0, None, None
    if not isinstance(state, dict) or state.get("url") != url or have == 0:
        discard(part, meta)
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


def download(
    session: requests.Session,
    url: str,
    part: Path,
    meta: Path,
    timeout: float,
    progress: Progress,
    on_bytes: ByteProgress | None,
) -> int:
    """Fetch ``url`` into ``part``, resuming what is there; returns the offset it resumed from."""
    doing = "download"
    for _ in range(2):  # a second round only after the server rejected our resume point
        have, validator, known_total = _resume_state(part, meta, url)
        if have and have == known_total:
            progress(f"already downloaded ({mib(have)} MiB)")
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
                    progress(f"already downloaded ({mib(have)} MiB)")
                    return have
                discard(part, meta)  # the server's file is now smaller: start over
                continue
            if have and resp.status_code == 206:
                first, _ = _content_range(resp.headers.get("Content-Range"))
                if first != have:
                    discard(part, meta)
                    continue
                progress(f"resuming at {mib(have)} MiB")
            elif resp.status_code == 200:
                have = 0  # no resume: the server ignored Range, or the file changed (If-Range)
            else:
                raise _http_error(url, doing, resp)
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else None
            state = {
                "url": url,
                "etag": resp.headers.get("ETag"),
                "last_modified": resp.headers.get("Last-Modified"),
                "total": total,
            }
            meta.write_text(json.dumps(state))
            with open(part, "ab" if have else "wb") as f:
                done = _stream(resp, f, have, total, url, timeout, progress, on_bytes)
            if total is not None and done < total:
                raise TTError(
                    f"download of {url} cut after {mib(done)} of {mib(total)} MiB: the server closed the connection",
                    f"rerun to resume from {mib(done)} MiB",
                )
            return have
    raise TTError(f"cannot resume the download of {url}: the server rejects byte ranges", "rerun to start over")


def _stream(
    resp: requests.Response,
    f: IO[bytes],
    have: int,
    total: int | None,
    url: str,
    timeout: float,
    progress: Progress,
    on_bytes: ByteProgress | None,
) -> int:
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
                progress(f"  {mib(done)} of {mib(total)} MiB{pct}, {rate:.1f} MiB/s")
    except requests.RequestException as exc:
        f.flush()
        if _is_timeout(exc):
            raise TTError(
                f"download of {url} stalled after {mib(done)} of {mib(total)} MiB: nothing received for {timeout:g} s",
                f"rerun to resume from {mib(done)} MiB, or raise --timeout",
            ) from None
        raise TTError(
            f"download of {url} cut after {mib(done)} of {mib(total)} MiB: the connection broke",
            f"rerun to resume from {mib(done)} MiB",
        ) from None
    if not on_bytes:
        progress(f"downloaded {mib(done - have)} MiB in {time.monotonic() - started:.1f} s")
    return done
