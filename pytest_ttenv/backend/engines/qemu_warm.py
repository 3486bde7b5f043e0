"""The qemu engine's warm starts (``warm`` says what they are): which VMs start warm and why the
others boot cold, their templates (found and verified, or made in the background while the VMs
wait), the identity a warm VM is sent once it runs, and a template dropped when qemu cannot load
its state.

A warm VM's run dir holds its identity until it is sent (``warm_vm``) and ``template`` (the
path of the template it started from).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

from pytest_ttenv.backend.engines import qemu, warm
from pytest_ttenv.backend.engines.base import Boot, Start
from pytest_ttenv.backend.engines.deferred import StartLater
from pytest_ttenv.backend.engines.identity import AGENT_TIMEOUT, refresh
from pytest_ttenv.backend.engines.templates import META, Template, TemplateStore, remove_dir
from pytest_ttenv.backend.engines.warm_vm import PendingIdentity
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, VmInfo, VmSpec
from pytest_ttenv.core.paths import write_private
from pytest_ttenv.errors import TTError


class WarmStarts(PendingIdentity):
    """Warm starts for one QemuEngine; ``later`` starts the VMs that waited for their template."""

    def __init__(self, progress: Callable[[str], None]) -> None:
        self.progress = progress
        self.later = StartLater()
        self._said: set[str] = set()

    # -- deciding ----------------------------------------------------------------------------------
    def plan(self, spec: EnvSpec, vm: VmSpec, image: ImageInfo, accel: str, owner: str) -> Boot:
        """Warm, keyed by its template, if asked for and the image allows it; else cold, saying why."""
        if spec.boot != "warm":
            return Boot("cold", "cold requested")
        why = warm.ineligible(image, vm.resources, firmware=True, cloud_init=True)
        if not why:
            qemu.require(image.arch)  # said now, not by a background template maker
            if qemu.uses_uefi(image):
                qemu.require_uefi(image.arch)
            try:
                inputs = warm.template_inputs(image, accel, vm.resources, owner)
            except (OSError, TTError) as exc:
                return Boot("cold", f"{image.name}'s warm template cannot be keyed: {exc}")
            key = warm.template_key(inputs)
            if not inputs["shared_ram"]:
                why_not = warm.ram_sharing(image.arch)
                self._say_once(f"warm VMs of {image.arch} restore their own copy of their template's RAM ({why_not})")
            return Boot("warm", f"from the warm template {key} of {image.name}", key, inputs)
        return Boot("cold", why)

    def _say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            self.progress(message)

    # -- templates ---------------------------------------------------------------------------------
    def find(self, image: ImageInfo, key: str) -> Template | None:
        """The complete, verified template ``key`` of ``image``, marked used; or None (none yet).
        A template that fails its checks is removed, saying so."""
        return TemplateStore(image).usable(key, self.progress)

    def make(self, job: Start) -> Template:
        """The template ``job`` waits for: made now, or found once another process that holds its
        lock has made it. TTError if that fails."""
        store, key = TemplateStore(job.image), job.boot.key
        with store.lock(key, warm.template_budget(job.boot_timeout)):
            template = self.find(job.image, key)
            if template is None:
                template = warm.make_template(
                    store, key, job.boot.inputs, job.vm.resources, 2 * job.boot_timeout, self.progress
                )
        return template

    def drop_bad(self, vmdir: Path, qemu_log: str) -> bool:
        """If a warm VM's qemu could not load its template's state, remove the template (the next
        ENV makes a new one) and return True."""
        if "load of migration failed" not in qemu_log:
            return False  # died for another reason (killed, out of memory): the template is not suspect
        try:
            template = Path((vmdir / "template").read_text())
        except OSError:
            return False
        if template.parent.name != "warm" or not (template / META).exists():
            return False
        remove_dir(template)
        return True

    def reap(self, images: Sequence[ImageInfo]) -> None:
        """Templates of images that changed, or that nobody used lately, deleted."""
        for image in images:
            try:
                TemplateStore(image).reap()
            except (OSError, TTError):
                continue

    # -- one warm VM -------------------------------------------------------------------------------
    @staticmethod
    def clone(job: Start, template: Template, overlay: Path) -> None:
        """The VM's overlay, a linked clone of the template's disk; its console log says where it
        started from."""
        qemu.create_overlay(template.disk, overlay)
        write_private(job.vmdir / "template", str(template.path))
        made = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(template.meta.get("created", 0)))
        write_private(
            job.vmdir / "console.log",
            f"ttenv: warm start from the saved state of {job.image.name} (template {template.key}, made {made}; "
            "its boot log is the template's console.log)\n",  # no host path: a server's clients read this
        )

    def ready(self, env: EnvInfo, vm: VmInfo) -> bool:
        """True once the VM runs its saved state and has taken its identity (its sshd was
        listening when the state was saved). TTError if the identity is not taken."""
        if qemu.run_state(qemu.qmp_path(env.id, vm.name)) != "running":
            return False
        sock = qemu.identity_path(env.id, vm.name)
        self.send_identity(Path(env.rundir) / vm.name, vm.name, lambda: nullcontext(sock))
        return True

    @staticmethod
    def refresh(env: EnvInfo, vm: VmInfo) -> None:
        """After a revert: the VM's clock set to now and its RNG reseeded."""
        refresh(qemu.identity_path(env.id, vm.name), AGENT_TIMEOUT, f"VM {vm.name}")
