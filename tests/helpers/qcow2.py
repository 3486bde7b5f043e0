"""A qcow2 image's header, for unit tests of what reads it without qemu-img."""

from __future__ import annotations


def qcow2_header(backing: str = "") -> bytes:
    """The start of a qcow2 v3 image (all ``qemu.backing_file`` reads), naming ``backing`` if given."""
    name = backing.encode()
    offset = 72 if name else 0
    header = b"QFI\xfb" + (3).to_bytes(4, "big") + offset.to_bytes(8, "big") + len(name).to_bytes(4, "big")
    return header.ljust(72, b"\0") + name
