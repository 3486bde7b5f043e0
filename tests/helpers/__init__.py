"""Shared test helpers, no tests here: an sshd, a ttenv server, libvirt hosts, a client of VMs (its
key, SSH to them), leftover scans, the CI template runners, the docs' commands, the guest programs
as modules, qemu configurations of warm VMs, and the folder rule (layout: tests/unit needs no VM,
tests/vm holds the tests marked vm or slow)."""
