"""The plugin's settings: each one a ``--tt-*`` option, a ``tt_*`` ini key and a ``TTENV_*``
environment variable, resolved with the usual precedence: command line > environment > ini >
built-in default. Bad values raise UsageError with one line saying what is accepted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from pytest_ttenv.backend.naming import canonical_arch, parse_mib, split_prefixes
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
    Setting("os", "OS prefixes of the VMs to test on, comma-separated (TTStack rule): debian12,deb,cent", "",
            metavar="PREFIXES"),
    Setting("arch", "restrict the matrix to these arches: x86_64,aarch64 (default: all the prefixes match)", "",
            metavar="ARCHES"),
    Setting("backend", "where ENVs live: local, or a ttenv server URL http(s)://host:port", "local", metavar="URL"),
    Setting("token", "bearer token for a ttenv server backend", "", metavar="TOKEN"),
    Setting("lease", "seconds a server keeps the session's ENV after its last renewal (renewed every quarter "
            "of it while pytest runs; a killed session's VMs are reaped after it)", "180", metavar="SECONDS"),
    Setting("engine", "how VMs run (local backend): qemu processes, or libvirt domains on --tt-libvirt-uri hosts",
            "qemu", ("qemu", "libvirt")),
    Setting("libvirt_uri", "with --tt-engine=libvirt: the hosts, libvirt URIs separated by commas or spaces, each "
            "optionally URI#cpu=N&mem=SIZE&addr=ADDRESS (default qemu:///system)", "", metavar="URIS"),
    Setting("accel", "accelerator: auto probes KVM and falls back to TCG", "auto", ("auto", "kvm", "tcg")),
    Setting("cpu", "vCPUs per VM", "2", metavar="N"),
    Setting("mem", "memory per VM (MiB, or 1G)", "512", metavar="SIZE"),
    Setting("disk", "overlay disk size per VM (default: the image's)", "", metavar="SIZE"),
    Setting("boot", "how VMs start: warm (from a saved post-boot state of their image, made once) or cold",
            "warm", ("warm", "cold")),
    Setting("boot_timeout", "seconds to wait for a VM's SSH (default: scaled by accelerator and arch)", "",
            metavar="SECONDS"),
    Setting("keep", "keep VMs after the session: never, failed (VMs with failed tests), always", "never",
            ("never", "failed", "always")),
    Setting("image_dir", "image store (default: ~/.cache/ttenv/images)", "", metavar="DIR"),
    Setting("image_source", "how missing images are obtained: pull (vendor cloud images; Debian is built if "
            "pulling fails) or build (Debian built locally)", "pull", ("pull", "build")),
    Setting("dist", "under xdist: shared (any worker uses any VM) or vm (each VM's tests on one worker)", "shared",
            ("shared", "vm")),
    Setting("matrix_report", "write the tests x VMs matrix to this file (.json, .md or .txt)", "", metavar="PATH"),
)  # fmt: skip


@dataclass(frozen=True)
class TTConfig:
    """The resolved settings of one pytest session."""

    os: tuple[str, ...]
    arch: tuple[str, ...]
    backend: str
    token: str
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


def raw_values(getoption: Any, getini: Any, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Each setting's winning raw string: CLI > environment > ini > default."""
    environ = dict(os.environ) if environ is None else environ
    values = {}
    for s in SETTINGS:
        cli = getoption(s.dest)
        if cli not in (None, ""):
            values[s.name] = str(cli)
        elif environ.get(s.env, "") != "":
            values[s.name] = environ[s.env]
        elif getini(s.dest) not in (None, ""):
            values[s.name] = str(getini(s.dest))
        else:
            values[s.name] = s.default
    return values


def resolve(values: dict[str, str]) -> TTConfig:
    """Validate raw values into a TTConfig (UsageError naming the setting on bad input); a
    setting missing from ``values`` has its default."""
    values = {s.name: s.default for s in SETTINGS} | values
    for s in SETTINGS:
        if s.choices and values[s.name] not in s.choices:
            raise UsageError(f"{s.flag}={values[s.name]!r} is not valid", f"use one of {', '.join(s.choices)}")
    try:
        cpu = int(values["cpu"])
    except ValueError:
        raise UsageError(f"--tt-cpu={values['cpu']!r} is not a number") from None
    timeout = None
    if values["boot_timeout"]:
        try:
            timeout = float(values["boot_timeout"])
        except ValueError:
            raise UsageError(f"--tt-boot-timeout={values['boot_timeout']!r} is not a number of seconds") from None
        if timeout <= 0:
            raise UsageError("--tt-boot-timeout must be positive")
    try:
        lease = float(values["lease"])
    except ValueError:
        raise UsageError(f"--tt-lease={values['lease']!r} is not a number of seconds") from None
    if lease < 2:
        raise UsageError(f"--tt-lease={values['lease']} is too short", "give at least 2 seconds (default 180)")
    if values["libvirt_uri"] and values["engine"] != "libvirt":
        raise UsageError("--tt-libvirt-uri needs --tt-engine=libvirt")
    return TTConfig(
        os=tuple(split_prefixes([values["os"]])),
        arch=tuple(canonical_arch(a) for a in split_prefixes([values["arch"]])),
        backend=values["backend"],
        token=values["token"],
        lease=lease,
        engine=values["engine"],
        libvirt_uri=tuple(u for u in re.split(r"[\s,]+", values["libvirt_uri"]) if u),
        accel=values["accel"],
        cpu=cpu,
        mem_mib=parse_mib(values["mem"], "--tt-mem"),
        disk_mib=parse_mib(values["disk"], "--tt-disk") if values["disk"] else 0,
        boot=values["boot"],
        boot_timeout=timeout,
        keep=values["keep"],
        image_dir=values["image_dir"] or None,
        image_source=values["image_source"],
        dist=values["dist"],
        matrix_report=values["matrix_report"] or None,
    )
