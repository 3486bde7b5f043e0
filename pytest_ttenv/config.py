"""The plugin's settings: each one a ``--tt-*`` option, a ``tt_*`` ini key and a ``TTENV_*``
environment variable, resolved with the usual precedence: command line > environment > ini >
built-in default. Bad values raise UsageError with one line saying what is accepted and where
the value came from (``--tt-lease``, ``TTENV_LEASE`` or ``ini tt_lease``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pytest_ttenv.backend import Backend, get_backend
from pytest_ttenv.core.naming import ARCHES, canonical_arch, parse_mib, parse_seconds, split_prefixes
from pytest_ttenv.errors import UsageError


@dataclass(frozen=True)
class Setting:
    """One setting; ``name`` gives ``--tt-<name>``, ini ``tt_<name>`` and ``TTENV_<NAME>``."""

    name: str
    help: str
    default: str = ""
    choices: tuple[str, ...] = ()
    metavar: str = "VALUE"

    @property
    def flag(self) -> str:
        return "--tt-" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return "tt_" + self.name

    @property
    def env(self) -> str:
        return "TTENV_" + self.name.upper()


SETTINGS = (
    Setting(
        "os",
        "OS prefixes of the VMs to test on, comma-separated (TTStack rule): debian12,deb,cent",
        "",
        metavar="PREFIXES",
    ),
    Setting(
        "arch",
        f"restrict the matrix to these arches, comma-separated: {', '.join(ARCHES)} (default: all the prefixes match)",
        "",
        metavar="ARCHES",
    ),
    Setting("backend", "where ENVs live: local, or a ttenv server URL http(s)://host:port", "local", metavar="URL"),
    Setting(
        "token",
        "bearer token for a ttenv server backend: set TTENV_TOKEN (deprecated as --tt-token, seen in "
        "the process list, and as ini tt_token, committed with the file)",
        "",
        metavar="TOKEN",
    ),
    Setting("token_file", "file whose first line is the bearer token (keep it mode 0600)", "", metavar="FILE"),
    Setting(
        "ca_cert",
        "CA certificates (PEM) to verify an https server with, e.g. its self-signed certificate "
        "(default: the system's)",
        "",
        metavar="FILE",
    ),
    Setting(
        "lease",
        "how long a server keeps the session's ENV after its last renewal (renewed every quarter "
        "of it while pytest runs; a killed session's VMs are reaped after it): seconds, or 90s, 30m, 2h, 1d; "
        "at least 2 s",
        "180",
        metavar="DURATION",
    ),
    Setting(
        "engine",
        "how VMs run (local backend): qemu processes, or libvirt domains on --tt-libvirt-uri hosts",
        "qemu",
        ("qemu", "libvirt"),
    ),
    Setting(
        "libvirt_uri",
        "with --tt-engine=libvirt: the hosts, libvirt URIs separated by commas or spaces, each "
        "optionally URI#cpu=N&mem=SIZE&addr=ADDRESS (default qemu:///system)",
        "",
        metavar="URIS",
    ),
    Setting("accel", "accelerator: auto probes KVM and falls back to TCG", "auto", ("auto", "kvm", "tcg")),
    Setting("cpu", "vCPUs per VM", "2", metavar="N"),
    Setting("mem", "memory per VM: MiB, or 512M, 2G, 2GiB, 1T", "512", metavar="SIZE"),
    Setting("disk", "overlay disk size per VM, as --tt-mem (default: the image's)", "", metavar="SIZE"),
    Setting(
        "boot",
        "how VMs start: warm (from a saved post-boot state of their image, made once) or cold",
        "warm",
        ("warm", "cold"),
    ),
    Setting(
        "boot_timeout",
        "how long to wait for a VM's SSH: seconds, or 90s, 30m, 2h, 1d (default: scaled by accelerator and arch)",
        "",
        metavar="DURATION",
    ),
    Setting(
        "keep",
        "keep VMs after the session: never, failed (VMs with failed tests), always",
        "never",
        ("never", "failed", "always"),
    ),
    Setting("image_dir", "image store (default: ~/.cache/ttenv/images)", "", metavar="DIR"),
    Setting(
        "image_source",
        "how missing images are obtained: pull (vendor cloud images; Debian is built if "
        "pulling fails) or build (Debian built locally)",
        "pull",
        ("pull", "build"),
    ),
    Setting(
        "dist",
        "under xdist: shared (any worker uses any VM) or vm (each VM's tests on one worker)",
        "shared",
        ("shared", "vm"),
    ),
    Setting("matrix_report", "write the tests x VMs matrix to this file (.json, .md or .txt)", "", metavar="PATH"),
    Setting(
        "capture",
        "save each VM a test used, running, into a .ttcap file (ttenv replay FILE): when the test "
        "fails (failed), after every VM test (all), or never (none)",
        "none",
        ("failed", "all", "none"),
    ),
    Setting("capture_dir", "where captures go (default: ttenv-captures/ under pytest's rootdir)", "", metavar="DIR"),
    Setting(
        "capture_max",
        "cap on the total size of the .ttcap files in the capture dir, earlier runs' included: a "
        "capture that would pass it is skipped; MiB, or 500M, 2G",
        "2G",
        metavar="SIZE",
    ),
    Setting(
        "capture_image",
        "put the VM's image into the capture: auto (when it cannot be had by name elsewhere, e.g. "
        "built here), always, never",
        "auto",
        ("auto", "always", "never"),
    ),
)


@dataclass(frozen=True)
class TTConfig:
    """The resolved settings of one pytest session."""

    os: tuple[str, ...]
    arch: tuple[str, ...]
    backend: str
    token: str
    ca_cert: str | None
    lease: float
    engine: str
    libvirt_uri: tuple[str, ...]
    accel: str
    cpu: int
    mem_mib: int
    disk_mib: int
    boot: str
    boot_timeout: float | None
    keep: str
    image_dir: str | None
    image_source: str
    dist: str
    matrix_report: str | None
    capture: str = "none"  # failed | all | none
    capture_dir: str | None = None  # None: ttenv-captures/ under pytest's rootdir
    capture_max_bytes: int = 2 << 30
    capture_image: str = "auto"  # auto | always | never
    notes: tuple[str, ...] = ()  # warnings to show once (a deprecated token source, a token file others can read)


def open_backend(cfg: TTConfig, progress: Callable[[str], None] | None = None) -> Backend:
    """The backend ``--tt-backend`` names, made with the session's settings (image dir, token,
    CA certificates, engine and libvirt hosts)."""
    return get_backend(
        cfg.backend,
        image_dir=cfg.image_dir,
        token=cfg.token,
        progress=progress,
        engine=cfg.engine,
        libvirt_uris=cfg.libvirt_uri,
        ca_cert=cfg.ca_cert,
    )


class RawValues(dict[str, str]):
    """Setting name -> winning raw string, and in ``sources`` where each came from: its flag
    (``--tt-lease``, also for a default), environment variable (``TTENV_LEASE``) or ini key
    (``ini tt_lease``), for error messages."""

    def __init__(self, values: Mapping[str, str] | None = None, sources: Mapping[str, str] | None = None) -> None:
        super().__init__(values or {})
        self.sources = dict(sources or {})


def raw_values(getoption: Any, getini: Any, environ: Mapping[str, str] | None = None) -> RawValues:
    """Each setting's winning raw string: CLI > environment > ini > default (a dict, whose
    ``sources`` say where each value came from)."""
    environ = os.environ if environ is None else environ
    values = RawValues()
    for s in SETTINGS:
        cli = getoption(s.dest)
        if cli not in (None, ""):
            values[s.name], values.sources[s.name] = str(cli), s.flag
        elif environ.get(s.env, "") != "":
            values[s.name], values.sources[s.name] = environ[s.env], s.env
        elif getini(s.dest) not in (None, ""):
            values[s.name], values.sources[s.name] = str(getini(s.dest)), f"ini {s.dest}"
        else:
            values[s.name], values.sources[s.name] = s.default, s.flag
    return values


def read_token_file(path: str, where: str) -> tuple[str, str | None]:
    """The token in file ``path`` (its first line, stripped) and a warning if the group or others
    may read the file (None otherwise); UsageError naming ``where`` if it cannot be read or is empty."""
    path = os.path.expanduser(path)
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
            mode = os.fstat(f.fileno()).st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"{where} {path!r}: cannot read it: {reason}") from None
    if not token:
        raise UsageError(f"{where} {path!r}: its first line is empty", "put the token on the file's first line")
    if mode & 0o044:
        return token, f"{where} {path} can be read by others (mode {mode & 0o777:04o}); chmod 600 it"
    return token, None


def _token(values: Mapping[str, str], where: Mapping[str, str]) -> tuple[str, list[str]]:
    """The bearer token: ``token`` or the first line of ``token_file``, whichever comes from the
    stronger source (command line > environment > ini; the token itself at the same level), and
    warnings: a token on the command line or in the ini file, a token file others can read. A
    token file is read only for a server backend."""

    def rank(name: str) -> int:
        if not values[name]:
            return 0
        return 3 if where[name].startswith("--") else 2 if where[name].startswith("TTENV_") else 1

    if values["token_file"] and rank("token_file") > rank("token") and values["backend"] not in ("", "local"):
        token, warning = read_token_file(values["token_file"], where["token_file"])
        return token, [f"warning: {warning}"] if warning else []
    if rank("token") == 3:
        return values["token"], [
            f"warning: {where['token']} puts the token in the process list; use TTENV_TOKEN or --tt-token-file"
        ]
    if rank("token") == 1:
        return values["token"], [
            f"warning: {where['token']} puts the token in a file that gets committed; use TTENV_TOKEN or tt_token_file"
        ]
    return values["token"], []


def resolve(values: Mapping[str, str], sources: Mapping[str, str] | None = None) -> TTConfig:
    """Validate raw values into a TTConfig (UsageError naming the setting on bad input, by where
    it came from: ``sources``, else ``values.sources`` of a RawValues, else its flag); a setting
    missing from ``values`` has its default."""
    if sources is None:
        sources = getattr(values, "sources", {})
    where = {s.name: s.flag for s in SETTINGS} | dict(sources or {})
    values = {s.name: s.default for s in SETTINGS} | dict(values)
    for s in SETTINGS:
        if s.choices and values[s.name] not in s.choices:
            raise UsageError(f"{s.flag}={values[s.name]!r} is not valid", f"use one of {', '.join(s.choices)}")
    try:
        cpu = int(values["cpu"])
    except ValueError:
        raise UsageError(f"{where['cpu']}={values['cpu']!r} is not a number") from None
    timeout = parse_seconds(values["boot_timeout"], where["boot_timeout"]) if values["boot_timeout"] else None
    lease = parse_seconds(values["lease"], where["lease"])
    if lease < 2:
        raise UsageError(f"{where['lease']}={values['lease']!r} is too short", "give at least 2 seconds (default 180)")
    if values["libvirt_uri"] and values["engine"] != "libvirt":
        raise UsageError("--tt-libvirt-uri needs --tt-engine=libvirt")
    token, notes = _token(values, where)
    return TTConfig(
        os=tuple(split_prefixes([values["os"]])),
        arch=tuple(canonical_arch(a) for a in split_prefixes([values["arch"]])),
        backend=values["backend"],
        token=token,
        ca_cert=os.path.expanduser(values["ca_cert"]) if values["ca_cert"] else None,
        lease=lease,
        engine=values["engine"],
        libvirt_uri=tuple(u for u in re.split(r"[\s,]+", values["libvirt_uri"]) if u),
        accel=values["accel"],
        cpu=cpu,
        mem_mib=parse_mib(values["mem"], where["mem"]),
        disk_mib=parse_mib(values["disk"], where["disk"]) if values["disk"] else 0,
        boot=values["boot"],
        boot_timeout=timeout,
        keep=values["keep"],
        image_dir=values["image_dir"] or None,
        image_source=values["image_source"],
        dist=values["dist"],
        matrix_report=values["matrix_report"] or None,
        capture=values["capture"],
        capture_dir=os.path.expanduser(values["capture_dir"]) if values["capture_dir"] else None,
        capture_max_bytes=parse_mib(values["capture_max"], where["capture_max"]) << 20,
        capture_image=values["capture_image"],
        notes=tuple(notes),
    )
