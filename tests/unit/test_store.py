"""The sqlite store: ENVs, VMs, unique ports, several connections (real sqlite)."""

from pathlib import Path

import pytest

from pytest_ttenv.backend.store import Store
from pytest_ttenv.core.model import EnvInfo, Resources, VmInfo
from pytest_ttenv.errors import NotFound, UsageError


def env(id_: str, name: str) -> EnvInfo:
    return EnvInfo(id=id_, name=name, owner="me", created=1.0, expires=None, state="booting", rundir=f"/r/{id_}")


def vm(name: str) -> VmInfo:
    return VmInfo(
        name=name, image="debian-12-x86_64", os="debian", version="12", arch="x86_64", resources=Resources(1, 256)
    )


def test_env_round_trip_seen_by_second_store(tmp_path: Path) -> None:
    a = Store(tmp_path / "s.sqlite")
    a.add_env(env("e1", "TEST"), owner_pid=123, owner_start=456)
    port = a.reserve_port("e1", vm("debian-12-x86_64"), iter([20000]))
    b = Store(tmp_path / "s.sqlite")
    got = b.get_env("TEST")
    assert got.id == "e1" and got.vms[0].name == "debian-12-x86_64" and got.vms[0].resources.mem_mib == 256
    assert port == 20000
    assert b.get_env("e1").name == "TEST"
    assert b.owner_of("e1") == (123, 456)


def test_duplicate_env_name_is_usage_error(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.sqlite")
    s.add_env(env("e1", "TEST"), None, None)
    with pytest.raises(UsageError, match="exists already"):
        s.add_env(env("e2", "TEST"), None, None)


def test_ports_are_unique_across_envs(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.sqlite")
    s.add_env(env("e1", "A"), None, None)
    s.add_env(env("e2", "B"), None, None)
    assert s.reserve_port("e1", vm("v"), iter([20001])) == 20001
    assert s.reserve_port("e2", vm("v"), iter([20001, 20002])) == 20002
    with pytest.raises(UsageError, match="no free host port"):
        s.reserve_port("e2", vm("w"), iter([20001, 20002]))


def test_update_and_delete_cascade(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.sqlite")
    s.add_env(env("e1", "A"), None, None)
    v = vm("v")
    v.port = s.reserve_port("e1", v, iter([20003]))
    v.state = "running"
    s.update_vm("e1", v)
    s.set_env_state("e1", "running")
    s.set_expires("e1", 99.0)
    got = s.get_env("A")
    assert got.state == "running" and got.vms[0].state == "running" and got.expires == 99.0
    s.delete_env("e1")
    assert s.list_envs() == []
    s.add_env(env("e3", "C"), None, None)
    assert s.reserve_port("e3", vm("v"), iter([20003])) == 20003  # the port was released with its ENV


def test_missing_env(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no ENV named 'nope'"):
        Store(tmp_path / "s.sqlite").get_env("nope")


def test_reserving_again_moves_the_vm_to_another_port(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.sqlite")
    s.add_env(env("e1", "A"), None, None)
    s.add_env(env("e2", "B"), None, None)
    s.reserve_port("e2", vm("w"), iter([20010]))
    v = vm("v")
    assert s.reserve_port("e1", v, iter([20009])) == 20009
    assert s.reserve_port("e1", v, iter([20010, 20011])) == 20011  # 20010 is B's; 20009 is released
    assert [x.port for x in s.get_env("A").vms] == [20011]
    assert s.reserve_port("e2", vm("x"), iter([20009])) == 20009
