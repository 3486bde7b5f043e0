"""The qemu command line built for a VM (pure)."""

import itertools
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_ttenv.backend.engines import qemu
from pytest_ttenv.backend.engines.qemu import QemuConfig, build_argv, deferred_incoming, load_state
from pytest_ttenv.core.model import Resources


def cfg(arch: str = "x86_64", accel: str = "tcg", seed: bool = True) -> QemuConfig:
    d = Path("/run/env/vm")
    return QemuConfig(
        name="T/vm",
        arch=arch,
        accel=accel,
        resources=Resources(cpu=3, mem_mib=768),
        disk=d / "overlay.qcow2",
        seed=d / "seed.iso" if seed else None,
        kernel=Path("/img/vmlinuz"),
        initrd=Path("/img/initrd.img"),
        cmdline="root=/dev/vda console=ttyS0",
        port=23456,
        console=d / "console.log",
        qmp=d / "qmp.sock",
        pidfile=d / "qemu.pid",
    )


def pairs(argv: list[str]) -> list[tuple[str, str]]:
    return list(zip(argv[1::2], argv[2::2], strict=False))


def test_x86_tcg_argv() -> None:
    argv = build_argv(cfg())
    assert argv[0] == "qemu-system-x86_64"
    joined = " ".join(argv)
    assert "-accel tcg,thread=multi,tb-size=64" in joined
    assert "-cpu max" in joined and "-machine q35" in joined
    assert "-smp 3" in joined and "-m 768" in joined
    assert "hostfwd=tcp:127.0.0.1:23456-:22" in joined  # forward bound to loopback only
    assert "file=/run/env/vm/overlay.qcow2,format=qcow2" in joined
    assert "file=/run/env/vm/seed.iso,format=raw,readonly=on" in joined
    assert "-qmp unix:/run/env/vm/qmp.sock,server=on,wait=off" in joined
    assert "path=/run/env/vm/console.log" in joined
    assert ("-kernel", "/img/vmlinuz") in itertools.pairwise(argv)
    assert ("-initrd", "/img/initrd.img") in itertools.pairwise(argv)
    assert ("-append", "root=/dev/vda console=ttyS0") in itertools.pairwise(argv)
    assert "-nodefaults" in argv


def test_kvm_uses_host_cpu() -> None:
    joined = " ".join(build_argv(cfg(accel="kvm")))
    assert "-accel kvm" in joined and "-cpu host" in joined and "tcg" not in joined


def test_aarch64_tcg() -> None:
    argv = build_argv(cfg(arch="aarch64"))
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-aarch64"
    assert "-machine virt" in joined and "-cpu max,pauth-impdef=on" in joined


def test_no_seed_no_seed_drive() -> None:
    assert "seed.iso" not in " ".join(build_argv(cfg(seed=False)))


def test_tcg_without_cx16_when_asked() -> None:
    from dataclasses import replace

    joined = " ".join(build_argv(replace(cfg(), tcg_cx16=False)))
    assert "-cpu max,-cx16" in joined
    assert "-cpu host" in " ".join(build_argv(replace(cfg(accel="kvm"), tcg_cx16=False)))


def test_firmware_boot_without_kernel() -> None:
    from dataclasses import replace

    bios = build_argv(replace(cfg(), kernel=None, initrd=None))
    assert "-kernel" not in bios and "pflash" not in " ".join(bios)
    uefi = " ".join(build_argv(replace(cfg(arch="aarch64"), kernel=None, initrd=None, uefi_vars=Path("/v/vars.fd"))))
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd" in uefi
    assert "if=pflash,format=raw,unit=1,file=/v/vars.fd" in uefi


def test_firmware_boot_starts_from_the_root_disk_and_nic_has_the_seeds_mac() -> None:
    from dataclasses import replace

    from pytest_ttenv.backend.engines.base import GUEST_MAC

    direct, bios = build_argv(cfg()), build_argv(replace(cfg(), kernel=None, initrd=None))
    assert "virtio-blk-pci,drive=root" in direct  # the kernel is given: no boot order needed
    assert "virtio-blk-pci,drive=root,bootindex=0" in bios  # SeaBIOS/OVMF must not try the seed disk
    assert not any("drive=seed" in a and "bootindex" in a for a in bios)
    for argv in (direct, bios):
        assert f"virtio-net-pci,netdev=net0,mac={GUEST_MAC},romfile=" in argv  # no iPXE option ROM


def test_riscv64_tcg_direct_boot_through_opensbi() -> None:
    argv = build_argv(cfg(arch="riscv64"))
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-riscv64"
    assert "-machine virt" in joined and "-cpu rv64" in joined and "-accel tcg,thread=multi,tb-size=64" in joined
    assert "-bios" not in argv  # qemu's default firmware for virt (OpenSBI) hands over to -kernel
    assert ("-kernel", "/img/vmlinuz") in itertools.pairwise(argv)
    assert "pvpanic-pci" in argv and "virtio-blk-pci,drive=root" in argv


@pytest.mark.parametrize(
    ("arch", "binary", "machine", "cpu", "panic"),
    [
        (
            "ppc64le",
            "qemu-system-ppc64",
            "pseries,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off",
            "power9",
            "pvpanic-pci",
        ),
        ("armhf", "qemu-system-arm", "virt,highmem=off", "max", "pvpanic-pci"),
        ("i386", "qemu-system-i386", "q35", "max", "pvpanic"),
    ],
)
def test_pci_arches_get_their_machine_and_cpu(arch: str, binary: str, machine: str, cpu: str, panic: str) -> None:
    argv = build_argv(cfg(arch=arch))
    assert argv[0] == binary
    assert ("-machine", machine) in itertools.pairwise(argv) and ("-cpu", cpu) in itertools.pairwise(argv)
    assert panic in argv and "virtio-blk-pci,drive=root" in argv and "virtio-rng-pci" in argv


def test_s390x_devices_sit_on_channel_io_and_there_is_no_panic_device() -> None:
    argv = build_argv(replace(cfg(arch="s390x"), identity=Path("/run/env/vm/identity.sock")))
    assert argv[0] == "qemu-system-s390x" and ("-machine", "s390-ccw-virtio") in itertools.pairwise(argv)
    devices = [b for a, b in itertools.pairwise(argv) if a == "-device"]
    assert not [d for d in devices if "-pci" in d or d.startswith("pvpanic")]
    from pytest_ttenv.backend.engines.base import GUEST_MAC

    assert "virtio-blk-ccw,drive=root" in devices and "virtio-blk-ccw,drive=seed" in devices
    assert f"virtio-net-ccw,netdev=net0,mac={GUEST_MAC}" in devices  # a ccw NIC has no option ROM to drop
    assert "virtio-rng-ccw" in devices and "virtio-serial-ccw,id=vser" in devices


def test_i386_runs_under_kvm_with_the_host_cpu_and_gets_a_generation_id() -> None:
    argv = build_argv(replace(cfg(arch="i386", accel="kvm"), vmgenid="6ba7b810-9dad-11d1-80b4-00c04fd430c8"))
    assert argv[0] == "qemu-system-i386" and ("-cpu", "host") in itertools.pairwise(argv)
    assert "vmgenid,id=vmgenid0,guid=6ba7b810-9dad-11d1-80b4-00c04fd430c8" in argv


def test_a_template_writes_its_ram_to_a_shared_file_and_a_clone_maps_it_privately() -> None:
    for arch, machine in (("x86_64", "q35"), ("aarch64", "virt"), ("riscv64", "virt")):
        ram = Path("/img/warm/k/ram")
        template = build_argv(replace(cfg(arch), ram_file=ram, ram_share=True))
        assert ("-machine", f"{machine},memory-backend=ttenv.ram") in itertools.pairwise(template)
        backend = "memory-backend-file,id=ttenv.ram,size=768M,mem-path=/img/warm/k/ram"
        assert ("-object", f"{backend},share=on") in itertools.pairwise(template)
        assert "-incoming" not in template
        clone = replace(cfg(arch), ram_file=ram, incoming="exec:cat state")
        argv = build_argv(clone)
        assert ("-object", f"{backend},share=off") in itertools.pairwise(argv)
        # the state is loaded by load_state once x-ignore-shared is set, not at once
        assert ("-incoming", "defer") in itertools.pairwise(argv) and deferred_incoming(clone)
    plain = replace(cfg(), incoming="exec:cat state")  # a template whose state holds its RAM
    argv = build_argv(plain)
    assert ("-incoming", "exec:cat state") in itertools.pairwise(argv) and not deferred_incoming(plain)
    assert not any(a.startswith("memory-backend") for a in argv) and ("-machine", "q35") in itertools.pairwise(argv)
    load_state(plain)  # nothing to do: qemu loads it itself (no monitor is asked)


def test_qemu_shares_ram_from_version_5(monkeypatch: pytest.MonkeyPatch) -> None:
    for line, why in (
        ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)", ""),
        ("QEMU emulator version 5.0.0", ""),
        ("QEMU emulator version 4.2.1", "qemu-system-x86_64 4.x cannot map a template's memory (needs qemu >= 5.0)"),
        ("", "the version of qemu-system-x86_64 is unknown"),
    ):
        monkeypatch.setattr(qemu, "version", lambda arch, line=line: line)
        assert qemu.shares_ram("x86_64") == why
