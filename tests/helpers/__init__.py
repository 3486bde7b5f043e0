"""Shared test helpers (an sshd, a ttenv server, libvirt hosts, leftover scans); no tests here."""
