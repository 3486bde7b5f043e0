"""The manifest of a capture (``.ttcap``, see ``capture_format``): what was captured and every
member with its size and sha256, as dataclasses, and the checks that turn untrusted bytes into one.

The format is ``capture.schema.json`` beside this module (JSON Schema draft 2020-12, shipped in the
package like the report's). ``parse`` holds a manifest to it with ``jsonschema`` and then to what a
schema cannot say (unique names, no name both a file and a directory, the roles a replay needs,
the total size under the reader's cap). Every refusal is one ``CaptureError`` line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_ttenv.errors import TTError

FORMAT = "pytest-ttenv-capture"
VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("capture.schema.json")
ROLES = ("state", "overlay", "uefi-vars", "console", "report", "image", "other")
_ONE_EACH = ("state", "overlay")  # a replay needs exactly one of each
_AT_MOST_ONE = ("uefi-vars", "console", "report")
_DAMAGED = "the file is damaged or not a ttenv capture: copy it again from where it was made"


class CaptureError(TTError):
    """A capture file that cannot be used: unreadable, damaged, tampered with, too large, or of a
    newer format. ``str()`` is one line (what is wrong, what to do); nothing was left behind."""

    exit_code = 2


class CaptureSkipped(TTError):
    """A capture was not kept: it would have passed the size cap (``--tt-capture-max``), or the VM
    cannot be captured (its engine, its state). ``str()`` says which in one line; no file is left."""


@dataclass(frozen=True)
class CaptureInfo:
    """A capture made: the file, its size in bytes, the seconds it took (``paused``: of them, the
    VM was paused), and whether the image is inside it."""

    path: str
    vm: str
    size: int
    seconds: float
    paused: float
    bundled: bool


@dataclass(frozen=True)
class TestRecord:
    """The test the capture was made for: its pytest node id, the phase and its outcome."""

    __test__ = False  # not a pytest test class

    nodeid: str
    when: str = "call"
    outcome: str = "failed"


@dataclass(frozen=True)
class ImageRef:
    """The image under the overlay: its name, the sha256 of its disk file (a replay finds it by
    that digest) and whether its files are members (role ``image``, named ``image/<file>``)."""

    name: str
    sha256: str
    bundled: bool = False


@dataclass(frozen=True)
class VmRecord:
    """What a replay needs to start the same machine: qemu's machine type, version, accelerator
    and CPU model, the VM's vCPUs and memory, how it had started, and its image."""

    name: str
    arch: str
    machine: str
    qemu_version: str
    accelerator: str
    cpu_model: str
    cpus: int
    mem_mib: int
    boot: str
    machine_id: str
    ram_named: bool
    vmgenid: bool
    image: ImageRef


@dataclass(frozen=True)
class Member:
    """One member after ``manifest.json``: its name (relative, ``/``-separated), role, size in
    bytes and sha256 (hex)."""

    name: str
    role: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A whole manifest; ``members`` in the order they follow it in the file."""

    test: TestRecord
    vm: VmRecord
    members: tuple[Member, ...]
    created: str
    producer: str

    def member(self, role: str) -> Member | None:
        """The first member of ``role``, or None."""
        return next((m for m in self.members if m.role == role), None)

    @property
    def total_size(self) -> int:
        return sum(m.size for m in self.members)

    def to_dict(self) -> dict[str, Any]:
        vm = self.vm
        return {
            "format": FORMAT,
            "version": VERSION,
            "created": self.created,
            "producer": self.producer,
            "test": {"nodeid": self.test.nodeid, "when": self.test.when, "outcome": self.test.outcome},
            "vm": {
                "name": vm.name,
                "arch": vm.arch,
                "machine": vm.machine,
                "qemu_version": vm.qemu_version,
                "accelerator": vm.accelerator,
                "cpu_model": vm.cpu_model,
                "cpus": vm.cpus,
                "mem_mib": vm.mem_mib,
                "boot": vm.boot,
                "machine_id": vm.machine_id,
                "ram_named": vm.ram_named,
                "vmgenid": vm.vmgenid,
                "image": {"name": vm.image.name, "sha256": vm.image.sha256, "bundled": vm.image.bundled},
            },
            "members": [{"name": m.name, "role": m.role, "size": m.size, "sha256": m.sha256} for m in self.members],
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, ensure_ascii=True) + "\n").encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """From a mapping already held to the schema (``parse`` does both)."""
        test, vm = data["test"], data["vm"]
        image = vm["image"]
        return cls(
            test=TestRecord(test["nodeid"], test.get("when", "call"), test.get("outcome", "failed")),
            vm=VmRecord(
                **{k: vm[k] for k in vm if k != "image"},
                image=ImageRef(image["name"], image["sha256"], image["bundled"]),
            ),
            members=tuple(Member(m["name"], m["role"], m["size"], m["sha256"]) for m in data["members"]),
            created=data["created"],
            producer=data["producer"],
        )


def schema() -> dict[str, Any]:
    """The JSON Schema every manifest follows."""
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return loaded


def parse(raw: bytes, where: str, max_total: int) -> Manifest:
    """The manifest in ``raw`` (the bytes of ``manifest.json`` of the capture ``where``), checked:
    JSON without duplicate keys, this format and a version this code reads, the schema, then
    ``check``. CaptureError (one line) otherwise."""
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CaptureError(f"capture {where}: manifest.json is not valid JSON ({_short(str(exc))})", _DAMAGED) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CaptureError(f"capture {where}: manifest.json is not a ttenv capture manifest", _DAMAGED)
    version = data.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise CaptureError(
            f"capture {where} is of format version {version}; this pytest-ttenv reads version {VERSION}",
            "upgrade pytest-ttenv (pip install -U pytest-ttenv) to replay it",
        )
    _validate(data, where)
    manifest = Manifest.from_dict(data)
    check(manifest, where, max_total)
    return manifest


def check(manifest: Manifest, where: str, max_total: int) -> None:
    """What the schema cannot say: names unique, none both a file and a directory above another,
    one ``state`` and one ``overlay``, at most one of the other single roles, image members exactly
    when the image is bundled (under ``image/``), and a total size of at most ``max_total`` bytes."""
    names = [m.name for m in manifest.members]
    seen: set[str] = set()
    for name in names:
        if name in seen or name == "manifest.json":
            raise CaptureError(f"capture {where}: the manifest lists member {name} twice", _DAMAGED)
        seen.add(name)
    dirs = {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}
    for name in names:
        if name in dirs:
            raise CaptureError(f"capture {where}: member {name} is both a file and a directory", _DAMAGED)
    for role in (*_ONE_EACH, *_AT_MOST_ONE):
        count = sum(m.role == role for m in manifest.members)
        if count > 1 or (count == 0 and role in _ONE_EACH):
            raise CaptureError(f"capture {where}: the manifest has {count} member(s) of role {role}, not 1", _DAMAGED)
    images = [m for m in manifest.members if m.role == "image"]
    if bool(images) != manifest.vm.image.bundled or any(not m.name.startswith("image/") for m in images):
        raise CaptureError(
            f"capture {where}: the image members do not match the manifest's image "
            f"(bundled: {manifest.vm.image.bundled}, members: {', '.join(m.name for m in images) or 'none'})",
            _DAMAGED,
        )
    if manifest.total_size > max_total:
        raise CaptureError(
            f"capture {where}: its members hold {_mib(manifest.total_size)}, over the cap of {_mib(max_total)}",
            "raise the cap if you trust the file and have the space",
        )


def _validate(data: dict[str, Any], where: str) -> None:
    import jsonschema  # imported only when a capture is read

    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))  # type: ignore[no-untyped-call]
    if error is not None:
        at = "/".join(str(p) for p in error.absolute_path) or "(top)"
        raise CaptureError(f"capture {where}: manifest.json at {at}: {_short(error.message)}", _DAMAGED)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _short(text: str, limit: int = 160) -> str:
    """``text`` on one line of printable characters, cut to ``limit`` (it may quote the file)."""
    flat = "".join(c if c.isprintable() else "?" for c in text)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
