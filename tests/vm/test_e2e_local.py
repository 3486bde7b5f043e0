"""End to end on the local backend: real images, real qemu, real sshd, real asyncssh.

One ENV of two VMs (Debian 12 and 11) driven through the ``ttenv`` CLI in separate
processes, then deleted; afterwards no qemu process, overlay, seed, key, row or port is left.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvSpec, ImageInfo, Resources, VmSpec
from pytest_ttenv.core.paths import runtime_dir
from pytest_ttenv.errors import BootError

from helpers.leftovers import port_free, qemu_pids_under

pytestmark = pytest.mark.vm


def ttenv(state: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TTENV_STATE_DIR=str(state))
    res = subprocess.run(
        [sys.executable, "-m", "pytest_ttenv.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    print(f"$ ttenv {' '.join(args)} -> {res.returncode}\n{res.stdout}{res.stderr}")
    return res


def test_env_cycle_two_vms_through_cli(tmp_path: Path, images: Callable[..., list[ImageInfo]]) -> None:
    imgs = images("debian-12", "debian-11")
    state = tmp_path / "state"
    try:
        _env_cycle(state, imgs)
    finally:  # a failed assertion must not leave VMs running
        for env in LocalBackend(state_root=state).list_envs():
            LocalBackend(state_root=state).delete_env(env.id)


def _env_cycle(state: Path, imgs: list[ImageInfo]) -> None:
    add = ttenv(state, "env", "add", "E2E", "--os-prefix=debian12,debian11", "--arch", imgs[0].arch, "--mem", "384")
    assert add.returncode == 0, add.stderr
    assert add.stdout.count(": ready - ssh up after") == 2

    listing = ttenv(state, "env", "list")  # a second process sees the ENV in the store
    assert "E2E" in listing.stdout and "running" in listing.stdout
    show = ttenv(state, "env", "show", "E2E")
    assert show.stdout.count("running") >= 2 and "login: ssh -i" in show.stdout

    backend = LocalBackend(state_root=state)
    env = backend.show_env("E2E")
    assert sorted(vm.name for vm in env.vms) == sorted(i.name for i in imgs)
    rundir = Path(env.rundir)
    for vm in env.vms:
        overlay = rundir / vm.name / "overlay.qcow2"
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", str(overlay)], capture_output=True, text=True, check=True
            ).stdout
        )
        image = next(i for i in imgs if i.name == vm.image)
        backing = info["backing-filename"]
        if vm.boot == "warm":  # the CLI's default: a clone of the image's template disk, itself a clone
            out = subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", backing], capture_output=True, text=True, check=True
            ).stdout
            backing = json.loads(out)["backing-filename"]
        assert backing == str(image.file(image.disk))  # a linked clone, never a copy
        assert info["actual-size"] < 0.05 * image.file(image.disk).stat().st_size
        assert vm.resources.mem_mib == 384 and vm.state == "running" and vm.host_key.startswith("ssh-ed25519 ")
    key = state / "keys" / env.id
    assert key.stat().st_mode & 0o777 == 0o600

    run = ttenv(state, "env", "run", "E2E", "--cmd", "cat /etc/debian_version; hostname; id -un")
    assert run.returncode == 0, run.stdout
    assert "== debian-12-" in run.stdout and "== debian-11-" in run.stdout
    assert "\n12." in run.stdout and "\n11." in run.stdout
    for vm in env.vms:  # the seed set each VM's hostname
        assert f"\n{vm.name}\n" in run.stdout
    failing = ttenv(state, "env", "run", "E2E", "--cmd", "echo oops >&2; exit 3")
    assert failing.returncode == 1 and failing.stdout.count("exit 3") == 2 and "stderr: oops" in failing.stdout

    pids = [vm.pid for vm in env.vms]
    assert all(qemu_pids_under(rundir / vm.name) for vm in env.vms)
    delete = ttenv(state, "env", "del", "E2E")
    assert delete.returncode == 0, delete.stderr

    assert qemu_pids_under(rundir) == [], "a qemu process survived env del"
    assert not any(Path(f"/proc/{pid}").exists() and qemu_pids_under(rundir) for pid in pids)
    assert not rundir.exists()
    assert not key.exists()
    with sqlite3.connect(state / "state.sqlite") as db:
        assert db.execute("SELECT count(*) FROM envs").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM vms").fetchone() == (0,)
    assert all(port_free(vm.port) for vm in env.vms)
    assert ttenv(state, "env", "list").stdout.strip() == "no ENVs"


def test_qemu_dying_during_boot_is_reported_and_cleaned(tmp_path: Path, images: Callable[..., list[ImageInfo]]) -> None:
    (image,) = images("debian-12")
    backend = LocalBackend(state_root=tmp_path / "state")
    spec = EnvSpec("DIES", (VmSpec("vm1", image.name, Resources(1, 256)),), KeyPair.generate("c").public, accel="tcg")
    env = backend.create_env(spec)
    vm = env.vms[0]
    os.kill(vm.pid, 9)
    with pytest.raises(BootError, match="VM vm1 died during boot"):
        backend.wait_vm("DIES", "vm1", timeout=60)
    assert backend.show_env("DIES").vms[0].state == "failed"
    backend.delete_env("DIES")
    assert not Path(env.rundir).exists() and backend.list_envs() == []
    assert qemu_pids_under(Path(env.rundir)) == []


def test_boot_timeout_reports_console_and_stops_vm(tmp_path: Path, images: Callable[..., list[ImageInfo]]) -> None:
    (image,) = images("debian-12")
    backend = LocalBackend(state_root=tmp_path / "state")
    spec = EnvSpec("SLOW", (VmSpec("vm1", image.name, Resources(1, 256)),), KeyPair.generate("c").public, accel="tcg")
    env = backend.create_env(spec)
    with pytest.raises(BootError, match=r"did not answer SSH within 2 s \(tcg\)") as err:
        backend.wait_vm("SLOW", "vm1", timeout=2)
    assert qemu_pids_under(Path(env.rundir)) == []  # the VM is gone, its console kept for the report
    assert isinstance(err.value.console_tail, str)
    backend.delete_env("SLOW")
    assert not Path(env.rundir).exists()


def test_gc_kills_vms_whose_state_was_deleted(tmp_path: Path, images: Callable[..., list[ImageInfo]]) -> None:
    (image,) = images("debian-12")
    state = tmp_path / "state"
    backend = LocalBackend(state_root=state)
    spec = EnvSpec("STRAY", (VmSpec("vm1", image.name, Resources(1, 256)),), KeyPair.generate("c").public, accel="tcg")
    env = backend.create_env(spec)
    assert qemu_pids_under(Path(env.rundir))
    shutil.rmtree(state)  # e.g. pytest pruned the temp dir of a crashed run
    # gc reaps only qemu of its own uid whose run dir lies under its own state dir (issue 16):
    # a later gc on that state dir kills the stray; another state dir's gc leaves it alone
    LocalBackend(state_root=tmp_path / "other").gc()
    assert qemu_pids_under(Path(env.rundir))
    LocalBackend(state_root=state).gc()
    assert qemu_pids_under(Path(env.rundir)) == []
    assert not (runtime_dir() / env.id).exists()
