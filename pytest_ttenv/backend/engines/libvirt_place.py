"""The libvirt engine's hosts and where new VMs go (pure).

Hosts: ``qemu:///system`` (this machine) or remote ones through libvirt's own remote protocol
(``qemu+ssh://root@hostB/system``, ``qemu+tcp://hostB/system``); no protocol of ours. A host may
carry overrides after ``#``: ``qemu+ssh://root@hostB/system#cpu=16&mem=64G&addr=10.0.0.7`` (its
capacity instead of libvirt's figures, and the address clients reach its VMs at instead of the
URI's host name). New VMs go to the reachable host with the most free memory (capacity minus what
this backend's live VMs there hold, bounded by libvirt's free memory unless ``mem`` is given;
vCPUs may be overcommitted and only break ties), so an ENV may span hosts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from pytest_ttenv.backend.engines.base import host_label
from pytest_ttenv.core.model import VmInfo, VmSpec
from pytest_ttenv.core.naming import parse_mib
from pytest_ttenv.errors import QuotaError, UsageError

DEFAULT_URI = "qemu:///system"
_URI_HINT = "e.g. qemu:///system, qemu+ssh://root@hostB/system, qemu+tcp://hostB/system#cpu=8&mem=16G"


@dataclass(frozen=True)
class Host:
    """A libvirt host: its URI and optional overrides (capacity, the address of its VMs)."""

    uri: str
    cpu: int | None = None
    mem_mib: int | None = None
    addr: str | None = None

    @property
    def remote(self) -> bool:
        """Whether the URI names a host (images are then uploaded to it, ports forwarded on all
        its addresses); ``qemu:///system`` and ``qemu+unix://`` are this machine."""
        return bool(urlsplit(self.uri).hostname)

    @property
    def label(self) -> str:
        return host_label(self.uri) or "this machine"


def parse_host(text: str) -> Host:
    """``URI[#cpu=N&mem=SIZE&addr=ADDRESS]`` -> Host; UsageError saying what is accepted."""
    uri, _, overrides = text.strip().partition("#")
    parts = urlsplit(uri)
    if not parts.scheme.startswith("qemu") or parts.path not in ("/system", "/session"):
        raise UsageError(f"--libvirt-uri {text!r} is not a libvirt qemu URI", _URI_HINT)
    values: dict[str, str] = {}
    for item in filter(None, overrides.split("&")):
        key, sep, value = item.partition("=")
        if key not in ("cpu", "mem", "addr") or not sep or not value:
            raise UsageError(f"--libvirt-uri {text!r}: bad override {item!r}", "use #cpu=N&mem=MiB|4G&addr=ADDRESS")
        values[key] = value
    cpu = None
    if "cpu" in values:
        if not values["cpu"].isdigit() or int(values["cpu"]) < 1:
            raise UsageError(f"--libvirt-uri {text!r}: cpu must be a positive number")
        cpu = int(values["cpu"])
    mem = parse_mib(values["mem"], f"--libvirt-uri {text!r} mem") if "mem" in values else None
    return Host(uri, cpu, mem, values.get("addr"))


def parse_hosts(texts: Sequence[str]) -> list[Host]:
    """The hosts of ``--libvirt-uri`` values (default: this machine's ``qemu:///system``)."""
    hosts = [parse_host(t) for t in texts] or [Host(DEFAULT_URI)]
    uris = [h.uri for h in hosts]
    dup = sorted({u for u in uris if uris.count(u) > 1})
    if dup:
        raise UsageError(f"--libvirt-uri given twice: {', '.join(dup)}")
    return hosts


@dataclass(frozen=True)
class Capacity:
    """What a host offers: vCPUs and memory (MiB), and what libvirt says is free now (None when
    the host's memory was overridden: the override alone counts)."""

    uri: str
    cpu: int
    mem_mib: int
    free_now_mib: int | None = None


def place(vms: Sequence[VmSpec], hosts: Sequence[Capacity], held: Sequence[VmInfo]) -> list[str]:
    """The host URI for each VM, in order: the host with the most free memory that fits it
    (ties: most free vCPUs, then the order of ``hosts``). ``held``: live VMs already placed.
    QuotaError naming what each host has free when a VM fits none."""
    mem = {h.uri: h.mem_mib - sum(v.resources.mem_mib for v in held if v.host == h.uri) for h in hosts}
    cpu = {h.uri: h.cpu - sum(v.resources.cpu for v in held if v.host == h.uri) for h in hosts}
    now = {h.uri: h.free_now_mib for h in hosts}
    order = {h.uri: i for i, h in enumerate(hosts)}

    def free(uri: str) -> int:
        live = now[uri]
        return mem[uri] if live is None else min(mem[uri], live)

    chosen = []
    for vm in vms:
        fits = [h.uri for h in hosts if free(h.uri) >= vm.resources.mem_mib]
        if not fits:
            room = "; ".join(f"{host_label(h.uri) or h.uri}: {max(0, free(h.uri))} MiB" for h in hosts)
            raise QuotaError(
                f"no libvirt host has {vm.resources.mem_mib} MiB free for VM {vm.name} (free: {room})",
                hint="delete ENVs, add hosts (--libvirt-uri) or ask for less memory",
            )
        best = max(fits, key=lambda u: (free(u), cpu[u], -order[u]))
        chosen.append(best)
        mem[best] -= vm.resources.mem_mib
        cpu[best] -= vm.resources.cpu
        if now[best] is not None:
            now[best] = (now[best] or 0) - vm.resources.mem_mib
    return chosen
