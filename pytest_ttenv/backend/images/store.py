"""The image store: one directory per image holding its files and ``image.json``.

Images dropped into the store with a metadata file are seen at the next call: nothing is
cached in memory. Directories starting with ``.`` (builds in progress) are never listed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.core.paths import write_json_atomic
from pytest_ttenv.errors import NotFound

META = "image.json"


class ImageStore:
    """Images under ``root`` (see paths.image_dir)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def all(self) -> list[ImageInfo]:
        """Every complete image, sorted by name; unreadable metadata is skipped."""
        if not self.root.is_dir():
            return []
        found = []
        for meta in sorted(self.root.glob(f"*/{META}")):
            if meta.parent.name.startswith("."):
                continue
            try:
                found.append(ImageInfo.from_dict(json.loads(meta.read_text()), path=meta.parent))
            except (OSError, ValueError, TypeError):
                continue
        return found

    def names(self) -> list[str]:
        return [i.name for i in self.all()]

    def get(self, name: str) -> ImageInfo:
        """The image called ``name``, or NotFound saying what exists and how to build."""
        meta = self.root / name / META
        try:
            return ImageInfo.from_dict(json.loads(meta.read_text()), path=meta.parent)
        except FileNotFoundError:
            have = ", ".join(self.names()) or "none"
            raise NotFound(
                f"image {name} is not in {self.root} (have: {have})",
                f"build it: ttenv image build {name.rsplit('-', 1)[0]} --arch {name.rsplit('-', 1)[-1]}",
            ) from None

    def install(self, src: Path, info: ImageInfo) -> None:
        """Move a finished image directory into place; metadata is written before the rename."""
        write_json_atomic(src / META, info.to_dict())
        dest = self.root / info.name
        old = self.root / f".old-{info.name}-{os.getpid()}"
        if dest.exists():
            os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)

    def remove(self, name: str) -> None:
        self.get(name)
        shutil.rmtree(self.root / name)

    def remove_stale_builds(self) -> list[Path]:
        """Delete work dirs (``.build-*``, ``.old-*``, ``.pull-*``, ``.import-*``) whose process is gone."""
        removed = []
        for d in self.root.glob(".*-*"):
            m = re.match(r"^\.(?:build|old|pull|import)-.*-(\d+)$", d.name)
            if m and d.is_dir() and not Path(f"/proc/{m.group(1)}").exists():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        return removed
