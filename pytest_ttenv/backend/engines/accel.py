"""Which accelerator really works here: KVM only if a probe guest really boots under it.

``/dev/kvm`` existing proves nothing (nested or PVM-based KVM may fail to run a stock
kernel), so the probe boots an image's own kernel and initramfs with ``ttenv.probe`` on
the command line: the initramfs prints ``TTENV-PROBE-OK`` and powers off. The verdict is
cached per host (kernel, CPU model) and qemu version. A guest arch this host's KVM cannot run
(``qemu_arch.kvm_runs``: its own arch, or i386 on x86_64) is always TCG.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pytest_ttenv.backend.engines.qemu import version
from pytest_ttenv.backend.engines.qemu_arch import QEMU_ARCH, kvm_runs
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.core.naming import host_arch
from pytest_ttenv.core.paths import cache_dir, write_json_atomic
from pytest_ttenv.errors import UsageError

PROBE_TIMEOUT = 15.0  # a real KVM boots a kernel to its initramfs in 1-2 s
PROBE_MARKER = b"TTENV-PROBE-OK"
# Seconds to reach SSH for one VM booting alone; scaled by arch emulation and host load.
BASE_BOOT_TIMEOUT = {"kvm": 90.0, "tcg": 180.0}


@dataclass(frozen=True)
class Accel:
    """The accelerator chosen for an arch, and why (shown to the user once)."""

    name: str  # kvm | tcg
    reason: str


# Images reached through cloud-init boot through firmware, a generic initramfs and cloud-init's
# first two stages (Python, under emulation) before sshd starts: measured 3-4x our tuned images
# under TCG (debiancloud-12 vs debian-12, same host load), so they get 3x the time.
ACCESS_FACTOR = {"ttenv": 1.0, "cloud-init": 3.0}


def boot_timeout(accel: str, arch: str, concurrent: int = 1, access: str = "ttenv") -> float:
    """Boot-to-SSH timeout: base per accelerator, x the arch's measured ``tcg_boot_factor`` for an
    emulated guest of another arch than the host's, x3 for an image reached through cloud-init,
    x(concurrent VMs / host cores) when more VMs boot at once than there are cores."""
    host = host_arch()
    native = arch == host or (accel == "kvm" and kvm_runs(arch, host))
    factor = 1.0 if native else QEMU_ARCH[arch].tcg_boot_factor
    load = max(1.0, concurrent / (os.cpu_count() or 1))
    base = BASE_BOOT_TIMEOUT.get(accel, BASE_BOOT_TIMEOUT["tcg"])
    return base * factor * ACCESS_FACTOR.get(access, ACCESS_FACTOR["cloud-init"]) * load


def _host_key(arch: str) -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{platform.node()}|{platform.release()}|{cpu}|{version(arch)}|{arch}"


def _cache_file() -> Path:
    return cache_dir() / "accel.json"


def _cached(key: str) -> Accel | None:
    try:
        data = json.loads(_cache_file().read_text())[key]
        return Accel(data["name"], data["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remember(key: str, verdict: Accel) -> None:
    path = _cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[key] = {"name": verdict.name, "reason": verdict.reason, "when": time.time()}
    write_json_atomic(path, data)


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened read-write, else why not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror}"
    os.close(fd)
    return None


def probe_kvm(image: ImageInfo, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot ``image``'s kernel + initramfs under KVM; (True, detail) if the probe marker appears."""
    if image.kernel is None or image.initrd is None:
        return False, f"image {image.name} has no kernel to probe with"
    with tempfile.TemporaryDirectory(prefix="ttenv-probe-") as tmp:
        console = Path(tmp) / "console.log"
        spec = QEMU_ARCH[image.arch]
        argv = [
            spec.binary,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-machine",
            spec.machine_for("kvm"),
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "256",
            "-kernel",
            str(image.file(image.kernel)),
            "-initrd",
            str(image.file(image.initrd)),
            "-append",
            f"{image.cmdline} ttenv.probe",
            "-no-reboot",
            "-chardev",
            f"file,id=c,path={console}",
            "-serial",
            "chardev:c",
        ]
        started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except FileNotFoundError:
            return False, f"{argv[0]} not found"
        try:
            while time.monotonic() - started < timeout:
                if console.exists() and PROBE_MARKER in console.read_bytes():
                    return True, f"probe guest booted in {time.monotonic() - started:.1f} s"
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                    return False, f"probe guest exited: {err.splitlines()[-1] if err else proc.returncode}"
                time.sleep(0.1)
            return False, f"probe guest did not boot within {timeout:.0f} s (nested or PVM-based KVM?)"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def choose(requested: str, image: ImageInfo, probe_with: ImageInfo | None = None) -> Accel:
    """The accelerator for VMs of ``image``: ``requested`` is auto, kvm or tcg.

    ``kvm`` that cannot work is a UsageError; ``auto`` probes (cached) and falls back to TCG.
    The probe needs a kernel and initramfs: an image booted by its own boot loader is probed
    with ``probe_with`` (an image of the same arch that has them); without one there is no
    verdict to cache, and the VM runs under TCG.
    """
    if requested not in ("auto", "kvm", "tcg"):
        raise UsageError(f"unknown accelerator {requested!r}", "use auto, kvm or tcg")
    if requested == "tcg":
        return Accel("tcg", "requested")
    host = host_arch()
    if not kvm_runs(image.arch, host):
        if requested == "kvm":
            raise UsageError(f"kvm cannot run {image.arch} guests on a {host} host", "use --accel tcg")
        return Accel("tcg", f"{image.arch} guest on a {host} host is emulated")
    problem = kvm_usable()
    if problem:
        if requested == "kvm":
            raise UsageError(f"kvm requested but {problem}", "use --accel tcg, or fix /dev/kvm permissions")
        return Accel("tcg", f"KVM unusable ({problem}); VMs run under TCG emulation, several times slower")
    key = _host_key(image.arch)
    verdict = _cached(key)
    probe = image if image.kernel and image.initrd else probe_with
    if verdict is None and probe is None:
        if requested == "kvm":  # asked for explicitly: trust /dev/kvm
            return Accel("kvm", "requested (not probed: no image with a kernel to probe with)")
        return Accel(
            "tcg",
            f"KVM not probed (no {image.arch} image with a kernel and initramfs to probe with); "
            "VMs run under TCG emulation",
        )
    if verdict is None:
        assert probe is not None
        ok, detail = probe_kvm(probe)
        verdict = (
            Accel("kvm", detail)
            if ok
            else Accel("tcg", f"KVM probe failed ({detail}); VMs run under TCG emulation, several times slower")
        )
        _remember(key, verdict)
    if requested == "kvm" and verdict.name != "kvm":
        raise UsageError(f"kvm requested but {verdict.reason}", "use --accel tcg or auto")
    return verdict


def cached_verdict(arch: str | None = None) -> Accel | None:
    """The cached verdict for this host and ``arch`` (default: the host's), if any."""
    return _cached(_host_key(arch or host_arch()))
