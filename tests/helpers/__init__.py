"""Shared test helpers, no tests here: an sshd, a ttenv server, libvirt hosts, leftover scans, the
CI template runners, the docs' commands, the guest programs as modules, and the folder rule
(layout: tests/unit needs no VM, tests/vm holds the tests marked vm or slow)."""
