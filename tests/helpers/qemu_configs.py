"""qemu configurations for unit tests of qemu's command line (nothing runs them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_ttenv.backend.engines import qemu, warm
from pytest_ttenv.core.model import ImageInfo, Resources


def warm_config(image: ImageInfo, rundir: Path, res: Resources, **given: Any) -> qemu.QemuConfig:
    """``warm.qemu_config`` of a VM of ``image`` under TCG with ``res`` and its run dir ``rundir``;
    what is not ``given`` is a placeholder: every other path ``rundir/x``, name ``e/vm``, port
    2222, an empty kernel command line, VM generation ID ``0``."""
    x = rundir / "x"
    values: dict[str, Any] = {
        "name": "e/vm",
        "disk": x,
        "seed": x,
        "port": 2222,
        "qmp": x,
        "identity": x,
        "cmdline": "",
        "vmgenid": "0",
    }
    return warm.qemu_config(image, "tcg", res, rundir=rundir, **(values | given))
