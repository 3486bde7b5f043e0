"""Opening one SSH connection to an `SshTarget`, strictly: its host key only (no file under ~/.ssh
read or written, no ssh-agent, no agent forwarding, no TOFU), public-key login only, algorithms
cheap for an emulated guest first, keepalives. Failures are one-line SshErrors naming the VM."""

from __future__ import annotations

import asyncio
import os
import threading

from pytest_ttenv.quiet import asyncssh
from pytest_ttenv.ssh.errors import HostKeyMismatch, SshError, Unreachable
from pytest_ttenv.ssh.results import SshTarget

KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_COUNT_MAX = 8  # a silent peer is declared dead after ~2 minutes
_KEX_ALGS = (
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group14-sha256",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group14-sha1",
)
_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)

_options_cache: dict[tuple[str, str, int, str], asyncssh.SSHClientConnectionOptions] = {}
_options_lock = threading.Lock()


def _err(target: SshTarget, cls: type[SshError], message: str) -> SshError:
    return cls(f"{target.name}: {message}", vm=target.name)


def options(target: SshTarget) -> asyncssh.SSHClientConnectionOptions:
    """asyncssh options for *target* (cached: fan-out targets usually share key and host key)."""
    try:
        mtime = os.stat(target.client_key).st_mtime_ns
    except OSError:
        mtime = 0
    key = (target.user, str(target.client_key), mtime, target.host_key.strip())
    with _options_lock:
        opts = _options_cache.get(key)
        if opts is not None:
            return opts
        try:
            client_key = asyncssh.read_private_key(target.client_key)
        except (OSError, asyncssh.KeyImportError, ValueError) as e:
            raise _err(target, SshError, f"cannot read client key {target.client_key}: {e}") from None
        try:
            host_key = asyncssh.import_public_key(target.host_key.strip())
        except (asyncssh.KeyImportError, ValueError) as e:
            raise _err(target, SshError, f"bad host key {target.host_key!r}: {e}") from None
        opts = asyncssh.SSHClientConnectionOptions(
            username=target.user,
            client_keys=[client_key],
            known_hosts=([host_key], [], []),
            config=None,
            agent_path=None,
            agent_forwarding=False,
            x509_trusted_certs=None,
            x509_trusted_cert_paths=None,
            gss_host=None,
            gss_kex=False,
            gss_auth=False,
            kbdint_auth=False,
            password_auth=False,
            host_based_auth=False,
            preferred_auth="publickey",
            kex_algs=list(_KEX_ALGS),
            encryption_algs=list(_CIPHERS),
            compression_algs=None,
            keepalive_interval=KEEPALIVE_INTERVAL,
            keepalive_count_max=KEEPALIVE_COUNT_MAX,
        )
        _options_cache[key] = opts
        return opts


class _Client(asyncssh.SSHClient):
    """Records the host key a server presented when it was not the expected one."""

    def __init__(self) -> None:
        self.presented: asyncssh.SSHKey | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.presented = key
        return False


async def open_connection(t: SshTarget, timeout: float) -> asyncssh.SSHClientConnection:
    """A logged-in SSH connection to *t* within *timeout* seconds; HostKeyMismatch, Unreachable or
    SshError (unusable keys) otherwise."""
    where = f"{t.user}@{t.host}:{t.port}"
    client = _Client()
    try:
        opts = options(t)
        return await asyncio.wait_for(
            asyncssh.connect(t.host, t.port, options=opts, client_factory=lambda: client), timeout
        )
    except asyncssh.HostKeyNotVerifiable:
        got = client.presented
        shown = f"{got.get_algorithm()} {got.get_fingerprint()}" if got is not None else "another key"
        expected = asyncssh.import_public_key(t.host_key.strip())
        raise _err(
            t,
            HostKeyMismatch,
            f"host key mismatch at {t.host}:{t.port}: expected {expected.get_algorithm()} "
            f"{expected.get_fingerprint()}, server presented {shown} (wrong VM on this port?)",
        ) from None
    except asyncssh.KeyExchangeFailed as e:
        cls = HostKeyMismatch if "host key" in str(e).lower() else Unreachable
        raise _err(t, cls, f"SSH key exchange with {t.host}:{t.port} failed: {e}") from None
    except asyncssh.PermissionDenied:
        raise _err(t, Unreachable, f"login refused at {where} (public key {t.client_key} not accepted)") from None
    except asyncio.TimeoutError:
        raise _err(t, Unreachable, f"no SSH session with {where} within {timeout:g} s (TCP, banner or login)") from None
    except ConnectionRefusedError:
        raise _err(t, Unreachable, f"connection refused at {t.host}:{t.port}") from None
    except (OSError, asyncssh.Error) as e:
        raise _err(t, Unreachable, f"cannot open SSH to {where}: {type(e).__name__}: {e or 'closed'}") from None
