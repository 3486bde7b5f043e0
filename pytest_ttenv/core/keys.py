"""SSH key pairs as text: generated for a VM's host key or an ENV's login key, written 0600."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pytest_ttenv.quiet import asyncssh


@dataclass(frozen=True)
class KeyPair:
    """An OpenSSH key pair as text: ``private`` (PEM-like OpenSSH format) and ``public`` (one line)."""

    private: str
    public: str

    @classmethod
    def generate(cls, comment: str) -> KeyPair:
        key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
        return cls(
            private=key.export_private_key().decode(),
            public=key.export_public_key().decode().strip(),
        )

    def write_private(self, path: Path) -> None:
        """Write the private key with mode 0600 from the start (never briefly world-readable)."""
        path.unlink(missing_ok=True)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(self.private)
