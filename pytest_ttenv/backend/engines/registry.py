"""The engines one backend uses, by name: the one new VMs get, and the one each recorded VM runs
on, whatever the backend was configured with. Each engine is made once, when first needed (the
libvirt engine needs libvirt-python: a qemu-only backend never loads it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from pytest_ttenv.backend.engines.base import Engine
from pytest_ttenv.backend.engines.qemu_engine import QemuEngine
from pytest_ttenv.core.model import VmInfo
from pytest_ttenv.errors import UsageError

ENGINES = ("qemu", "libvirt")


class Engines:
    """The engines of one backend. ``default``: the engine of new VMs (made now, so a bad
    ``libvirt_uris`` or a missing libvirt-python is reported at once); ``state``: the backend's
    state dir; ``bind_addr``/``probe_addr``: where SSH ports are forwarded and reached from here."""

    def __init__(
        self,
        default: str,
        state: Path,
        *,
        bind_addr: str = "127.0.0.1",
        probe_addr: str = "127.0.0.1",
        progress: Callable[[str], None] | None = None,
        libvirt_uris: Sequence[str] = (),
    ) -> None:
        if default not in ENGINES:
            raise UsageError(f"unknown engine {default!r}", f"use one of {', '.join(ENGINES)}")
        self.state = state
        self.bind_addr, self.probe_addr = bind_addr, probe_addr
        self.progress = progress or (lambda line: None)
        self.libvirt_uris = tuple(libvirt_uris)
        self._made: dict[str, Engine] = {"qemu": QemuEngine(bind_addr, probe_addr, self.progress)}
        if self.libvirt_uris and default != "libvirt":
            raise UsageError("--libvirt-uri needs --engine libvirt")
        self.new = self.get(default)

    def get(self, name: str) -> Engine:
        """The engine ``name`` (one of ``ENGINES``)."""
        if name not in self._made:
            if name != "libvirt":
                raise UsageError(f"unknown engine {name!r}", f"use one of {', '.join(ENGINES)}")
            from pytest_ttenv.backend.engines.libvirt import LibvirtEngine

            self._made[name] = LibvirtEngine(
                self.libvirt_uris,
                self.state,
                bind_addr=self.bind_addr,
                probe_addr=self.probe_addr,
                progress=self.progress,
            )
        return self._made[name]

    def of(self, vm: VmInfo) -> Engine:
        """The engine that runs ``vm`` (recorded with it; qemu for a record that names none known)."""
        return self.get(vm.engine if vm.engine in ENGINES else "qemu")

    def sweeping(self) -> list[Engine]:
        """The engines gc sweeps: those made, and the libvirt engine while hosts hold leftovers of
        this state dir (they were unreachable when their VMs were deleted)."""
        from pytest_ttenv.backend.engines.libvirt import PENDING_FILE

        if "libvirt" not in self._made and (self.state / PENDING_FILE).exists():
            self.get("libvirt")
        return list(self._made.values())
