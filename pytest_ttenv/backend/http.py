"""HttpBackend: the Backend contract against a ``ttenv serve`` host server (docs/server.md).

Every call has a timeout; connection failures are retried (with backoff) for every call, since
the request never reached the server, and read failures for GETs only. Error bodies become the
exceptions the local backend raises, with the server's line: 400/422/413 and a 409 name conflict
UsageError, 401 UsageError, 404 NotFound, 409 quota QuotaError, 424 BootError/VmDied with the
console tail, 5xx and an unreachable server TTError naming the URL. A 429 (this owner has too
many requests or long polls in flight) or 503 (the server is busy for a moment) is asked again
after its ``Retry-After`` (at most BUSY_WAIT seconds in all), then a TTError. The client's private key
never leaves this process: create sends the public key only; ``owner_pid``/``die_with_owner``
are not sent (the server's ENVs live by their lease).
"""

from __future__ import annotations

import dataclasses
import os
import re
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from pytest_ttenv.core.capture_manifest import CaptureInfo, CaptureSkipped, TestRecord
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, Resources, VmInfo
from pytest_ttenv.core.naming import match_prefixes
from pytest_ttenv.errors import BootError, NotFound, QuotaError, TTError, UsageError, VmDied

TIMEOUT = 30.0  # seconds for a connection or an answer (the long poll adds its own 30 s)
LONG_POLL = 30.0  # the server answers a wait within this, then the client asks again
BUSY_WAIT = 120.0  # seconds a call keeps asking again after 429/503 answers (Retry-After each time)
_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$")  # the server's path names


def _fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def vm_of(data: dict[str, Any]) -> VmInfo:
    """A VmInfo from the server's JSON (fields the client does not know are ignored)."""
    data = _fields(VmInfo, data)
    data["resources"] = Resources(**_fields(Resources, data.get("resources", {})))
    return VmInfo(**data)


def env_of(data: dict[str, Any]) -> EnvInfo:
    """An EnvInfo from the server's JSON (fields the client does not know are ignored)."""
    data = _fields(EnvInfo, data)
    data["vms"] = [vm_of(v) for v in data.get("vms", [])]
    return EnvInfo(**data)


class HttpBackend:
    """ENVs on the server at ``url`` (``http(s)://host:port``), as the owner of ``token``
    (default: ``$TTENV_TOKEN``); an https server's certificate is verified against ``ca_cert``
    (a PEM file; default ``$TTENV_CA_CERT``, else the system's CAs), never skipped."""

    name = "http"

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = TIMEOUT,
        retries: int = 5,
        progress: Callable[[str], None] | None = None,
        ca_cert: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        if not re.match(r"^https?://[^/\s]+$", self.url):
            raise UsageError(f"bad server URL {url!r}", "use http(s)://host:port")
        self.token = token or os.environ.get("TTENV_TOKEN", "")
        self.ca_cert = os.path.expanduser(ca_cert or os.environ.get("TTENV_CA_CERT") or "") or None
        if self.ca_cert:
            try:
                ssl.create_default_context(cafile=self.ca_cert)
            except (OSError, ssl.SSLError) as exc:
                reason = "no PEM certificate in it" if isinstance(exc, ssl.SSLError) else exc.strerror or str(exc)
                raise UsageError(
                    f"CA certificate file {self.ca_cert!r}: {reason}",
                    "give a PEM file: --ca-cert / --tt-ca-cert / TTENV_CA_CERT",
                ) from None
        self.timeout = timeout
        self.progress = progress or (lambda line: None)
        self.session = requests.Session()
        self.session.verify = self.ca_cert or True  # and per request: $REQUESTS_CA_BUNDLE would beat the session's
        retry = Retry(
            total=retries,
            connect=retries,
            read=2,
            status=0,
            other=0,
            backoff_factor=0.2,
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
        )
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=32)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if self.token:
            self.session.headers["Authorization"] = f"Bearer {self.token}"
        self.session.headers["User-Agent"] = "pytest-ttenv HttpBackend"

    def close(self) -> None:
        self.session.close()

    # -- transport ------------------------------------------------------------------------------
    def _call(
        self,
        method: str,
        path: str,
        body: object = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One API call; the decoded JSON answer (None for 204), or the matching exception. A 429 or
        503 is asked again after its Retry-After while BUSY_WAIT lasts."""
        give_up = time.monotonic() + BUSY_WAIT
        while True:
            res = self._send(method, path, body, params, timeout)
            if res.status_code not in (429, 503):
                break
            pause = _retry_after(res.headers.get("Retry-After"))
            if time.monotonic() + pause > give_up:
                break
            res.close()
            time.sleep(pause)
        if res.status_code == 204:
            return None
        try:
            data = res.json()
        except ValueError:
            data = None
        if res.ok and data is not None:
            return data
        raise self._error(res.status_code, data if isinstance(data, dict) else {}, res.text)

    def _send(
        self, method: str, path: str, body: object, params: dict[str, Any] | None, timeout: float | None
    ) -> requests.Response:
        url = f"{self.url}/v1{path}"
        try:
            res = self.session.request(
                method, url, json=body, params=params, timeout=timeout or self.timeout, verify=self.session.verify
            )
        except requests.exceptions.RetryError as exc:
            raise TTError(f"ttenv server {self.url}: {exc}") from None
        except requests.exceptions.SSLError as exc:
            hint = (
                "a self-signed or private CA's certificate: give it with --ca-cert / --tt-ca-cert / TTENV_CA_CERT"
                if "CERTIFICATE_VERIFY_FAILED" in str(exc)
                else "the server may not serve https: use http://, or start it with --tls-cert"
            )
            raise TTError(f"TLS with the ttenv server at {self.url} failed: {_tls_reason(exc)}", hint) from None
        except requests.exceptions.ConnectionError as exc:
            raise TTError(
                f"cannot reach the ttenv server at {self.url}: {_reason(exc)}",
                "check the URL and that `ttenv serve` runs there",
            ) from None
        except requests.exceptions.Timeout:
            raise TTError(
                f"the ttenv server at {self.url} did not answer {method} {path} within {timeout or self.timeout:.0f} s"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise TTError(f"ttenv server {self.url}: {exc}") from None
        return res

    def _error(self, status: int, body: dict[str, Any], text: str) -> TTError:
        kind = str(body.get("error", ""))
        message = str(body.get("message") or text.strip()[:200] or f"HTTP {status}")
        hint = body.get("hint") or None
        console = body.get("console") or ""
        if status == 401:
            what = "no token given for" if not self.token else "token rejected by"
            return UsageError(
                f"{what} the ttenv server at {self.url}", "check TTENV_TOKEN / --tt-token-file (ttenv: --token-file)"
            )
        if status == 404:
            return NotFound(message, hint)
        if status == 409 and kind == "quota":
            free = body.get("free") or {}
            return QuotaError(message, {k: int(v) for k, v in free.items()}, hint)
        if status == 424:
            return (VmDied if kind == "died" else BootError)(message, console, hint)
        if status in (429, 503):
            return TTError(
                f"ttenv server {self.url} is busy (HTTP {status}): {message}",
                hint or "retry later, or wait for fewer VMs at once",
            )
        if 400 <= status < 500:
            return UsageError(message, hint)
        return TTError(f"ttenv server {self.url} failed (HTTP {status}): {message}", hint)

    @staticmethod
    def _seg(ref: str) -> str:
        """A name as a path segment; one the server could not hold is NotFound right here."""
        if len(ref) > 63 or not _NAME_RE.match(ref):
            raise NotFound(f"no ENV or VM named {ref!r}", "see: ttenv env list")
        return quote(ref, safe="")

    # -- images -----------------------------------------------------------------------------------
    def images(self) -> list[ImageInfo]:
        return [ImageInfo.from_dict(d) for d in self._call("GET", "/images")]

    def resolve(self, prefixes: Sequence[str], arches: Sequence[str] = ()) -> list[str]:
        """Image names on the server matching the OS prefixes (and arches) - the local rule."""
        return match_prefixes(prefixes, [i.name for i in self.images()], arches)

    # -- ENVs ---------------------------------------------------------------------------------------
    def create_env(self, spec: EnvSpec) -> EnvInfo:
        """Create the ENV on the server; returns at once while its VMs boot. A replay (a VM with
        ``restore``) is made on a machine with qemu, not through a server (UsageError)."""
        if any(vm.restore for vm in spec.vms):
            raise UsageError(
                "a capture is replayed on a machine with qemu, not through a server",
                "run ttenv replay FILE without --backend (copy the file there first)",
            )
        body: dict[str, Any] = {
            "name": spec.name,
            "vms": [
                {"name": vm.name, "image": vm.image, "resources": dataclasses.asdict(vm.resources)} for vm in spec.vms
            ],
            "client_pubkey": spec.client_pubkey,
            "accel": spec.accel,
            "boot": spec.boot,
        }
        if spec.ttl:
            body["ttl"] = spec.ttl
        return env_of(self._call("POST", "/envs", body))

    def wait_vm(self, env_ref: str, vm_name: str, timeout: float | None = None) -> VmInfo:
        """Long-poll the server until the VM is ``running``; BootError (console tail) if it fails,
        dies, or is not up by ``timeout`` (the server stops it then). None: the server's boot timeout."""
        path = f"/envs/{self._seg(env_ref)}/vms/{self._seg(vm_name)}/wait"
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            params = None if deadline is None else {"timeout": round(max(0.05, deadline - time.monotonic()), 3)}
            vm = vm_of(self._call("POST", path, params=params, timeout=LONG_POLL + self.timeout))
            if vm.state != "booting":
                return vm

    def show_env(self, ref: str) -> EnvInfo:
        return env_of(self._call("GET", f"/envs/{self._seg(ref)}"))

    def list_envs(self) -> list[EnvInfo]:
        """This token owner's ENVs."""
        return [env_of(d) for d in self._call("GET", "/envs")]

    def delete_env(self, ref: str) -> EnvInfo:
        return env_of(self._call("DELETE", f"/envs/{self._seg(ref)}"))

    def renew(self, ref: str, ttl: float) -> EnvInfo:
        """Lease of ``ttl`` seconds from now (the server caps it at its --max-lease)."""
        return env_of(self._call("POST", f"/envs/{self._seg(ref)}/renew", {"ttl": ttl}))

    def keep(self, ref: str, ttl: float) -> EnvInfo:
        return env_of(self._call("POST", f"/envs/{self._seg(ref)}/keep", {"ttl": ttl}))

    def snapshot(self, env_ref: str, vm_name: str, name: str) -> None:
        """Save the VM's memory and disk as ``name`` (can take a while: no client timeout of 30 s)."""
        path = f"/envs/{self._seg(env_ref)}/vms/{self._seg(vm_name)}/snapshots"
        self._call("POST", path, {"name": name}, timeout=max(self.timeout, 150.0))

    def revert(self, env_ref: str, vm_name: str, name: str) -> None:
        path = f"/envs/{self._seg(env_ref)}/vms/{self._seg(vm_name)}/snapshots/{self._seg(name)}/revert"
        self._call("POST", path, timeout=max(self.timeout, 150.0))

    def console(self, env_ref: str, vm_name: str, tail: int = 50) -> str:
        """The last ``tail`` lines (1-2000) of the VM's serial console."""
        path = f"/envs/{self._seg(env_ref)}/vms/{self._seg(vm_name)}/console"
        return str(self._call("GET", path, params={"tail": max(1, min(int(tail), 2000))})["text"])

    def capture(
        self,
        env_ref: str,
        vm_name: str,
        dest: Path,
        test: TestRecord,
        *,
        image: str = "auto",
        max_bytes: int | None = None,
        report: str = "",
    ) -> CaptureInfo:
        """Captures are made where the VM runs: not through a server (CaptureSkipped)."""
        raise CaptureSkipped(f"VM {vm_name} runs behind a server ({self.url}): captures are made on the local backend")

    def status(self) -> dict[str, Any]:
        """The server's ``/v1/status``: version, engine, public address, totals/used/free, counts."""
        return dict(self._call("GET", "/status"))


def _retry_after(value: str | None) -> float:
    """Seconds to wait from a Retry-After header (seconds only; 1 when absent or a date), 0.1 to 30."""
    try:
        return min(30.0, max(0.1, float(value or 1)))
    except ValueError:
        return 1.0


def _tls_reason(exc: requests.exceptions.SSLError) -> str:
    """The TLS failure in a few words: ``certificate verify failed: self-signed certificate``."""
    text = str(exc)
    found = re.search(r"\[SSL(?:: [A-Z_]+)?\] ([^(\]']+)", text)
    return found.group(1).strip() if found else text.split(": ", 1)[-1][:200]


def _reason(exc: requests.exceptions.ConnectionError) -> str:
    text = str(exc)
    if "Remote end closed connection without response" in text:
        return "it closed the connection without an answer (an https server? then use https://)"
    for marker in (
        "Connection refused",
        "Name or service not known",
        "No route to host",
        "timed out",
        "Temporary failure in name resolution",
        "Connection reset",
    ):
        if marker in text:
            return marker.lower()
    return text.split(": ", 1)[-1][:200]
