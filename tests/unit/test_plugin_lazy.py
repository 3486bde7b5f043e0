"""An installed plugin costs nothing where it is not used (issue 15 item 7): loading it imports
no command channel, backend, builder or puller; no image is pulled or built and no VM started
unless a collected, selected test needs one. The ids of VM tests are still the VM names.

No VM boots here. Each run has a tripwire host: no qemu, no mmdebstrap (an empty PATH), a catalog
whose Debian mirror refuses connections, an empty state dir. A run that tried to pull, build or
boot would fail (or leave files behind) instead of passing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.core.paths import write_json_atomic
from pytest_ttenv.session import reap_session_dirs
from pytest_ttenv.state import Handoff

from conftest import HOST_ARCH
from helpers.leftovers import leftovers, qemu_pids_under

pytest_plugins = ["pytester"]

# What loading the plugin must not import: the command channel, libvirt, the backends, the
# image builder and puller, the session (which imports the channel). Planning the matrix may load
# the image store, the catalog and the builder's recipe, and the backend registry its entry points.
HEAVY = (
    "asyncssh",
    "libvirt",
    "pytest_ttenv.ssh",
    "pytest_ttenv.session",
    "pytest_ttenv.fixtures.handles",
    "pytest_ttenv.backend.local",
    "pytest_ttenv.backend.images.build",  # and build_cloud
    "pytest_ttenv.backend.images.initramfs",
    "pytest_ttenv.backend.images.pull",
    "pytest_ttenv.backend.images.download",
    "pytest_ttenv.backend.http",
    "pytest_ttenv.backend.engines.qemu",
    "pytest_ttenv.backend.engines.warm",
    "pytest_ttenv.backend.engines.base",
)

TESTS = """
import pytest

def test_plain():
    pass

def test_on_vm(tt_vm):
    pass

@pytest.mark.tt_os("debian12")
def test_fresh(tt_vm_fresh):
    pass

def test_on_all(tt_env):
    pass
"""

# every process of the run (xdist workers too) records the modules it ended with
RECORD_MODULES = """
import json, os, sys

def pytest_unconfigure(config):
    with open(os.path.join({out!r}, f"modules-{{os.getpid()}}.json"), "w") as f:
        json.dump(sorted(sys.modules), f)
"""


class Host:
    """The tripwire host of one test: where images and state would go, what got loaded."""

    def __init__(self, root: Path) -> None:
        self.images = root / "images"
        self.state = root / "state"
        self.modules = root / "modules"
        self.modules.mkdir()

    def add_image(self, name: str) -> None:
        """A store entry as the store lists it (metadata only: nothing here may boot it)."""
        os_name, version, arch = name.rsplit("-", 2)
        (self.images / name).mkdir(parents=True)
        write_json_atomic(self.images / name / "image.json", ImageInfo(name, os_name, version, arch).to_dict())

    def store(self) -> list[str]:
        return sorted(str(p.relative_to(self.images)) for p in self.images.rglob("*")) if self.images.exists() else []

    def heavy_modules(self) -> list[str]:
        files = list(self.modules.glob("modules-*.json"))
        assert files, "the test project's conftest recorded no modules"
        loaded = {m for f in files for m in json.loads(f.read_text())}
        assert "pytest_ttenv.plugin" in loaded, "the plugin was not loaded"
        return sorted(m for m in loaded if m.startswith(HEAVY))

    def assert_untouched(self, store_before: list[str]) -> None:
        """Nothing pulled or built, no state written, no qemu started."""
        assert self.store() == store_before
        assert not self.state.exists(), sorted(str(p) for p in self.state.rglob("*"))
        assert qemu_pids_under(self.state) == []


@pytest.fixture
def host(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Host:
    h = Host(tmp_path)
    monkeypatch.setenv("TTENV_IMAGE_DIR", str(h.images))
    monkeypatch.setenv("TTENV_STATE_DIR", str(h.state))
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        '{"schema": 1, "version": "t", "extends": "builtin", "mirrors": {"debian": "http://127.0.0.1:9"}}'
    )
    monkeypatch.setenv("TTENV_CATALOG", str(catalog))
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no qemu-img, qemu-system-*, mmdebstrap
    for var in ("TTENV_OS", "TTENV_ARCH", "TTENV_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    pytester.makeconftest(RECORD_MODULES.format(out=str(h.modules)))
    pytester.makepyfile(test_x=TESTS)
    return h


def test_plain_test_with_tt_os_in_ini_pulls_builds_boots_nothing(pytester: pytest.Pytester, host: Host) -> None:
    """(a) A project with ``tt_os`` in its ini, an empty image store: a plain test passes, the
    store stays empty, no state is written, asyncssh is never imported."""
    pytester.makeini("[pytest]\ntt_os = debian12\n")
    result = pytester.runpytest_subprocess("test_x.py::test_plain", "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)
    host.assert_untouched([])
    assert host.heavy_modules() == []


def test_collect_only_shows_vm_ids_and_creates_nothing(pytester: pytest.Pytester, host: Host) -> None:
    """(b) --collect-only gives the real ids: the store's images, and those that a run would pull
    or build for a prefix the store does not have (predicted from the catalog, not fetched)."""
    host.add_image(f"debian-12-{HOST_ARCH}")
    before = host.store()
    args = ["--collect-only", "-q", "-p", "no:cacheprovider", "--tt-os=debian12,debian11", f"--tt-arch={HOST_ARCH}"]
    result = pytester.runpytest_subprocess(*args, timeout=120)
    assert result.ret == 0, result.stderr.str()
    ids = [line for line in result.outlines if line.startswith("test_x.py::")]
    assert ids == [
        "test_x.py::test_plain",
        f"test_x.py::test_on_vm[debian-12-{HOST_ARCH}]",  # in the order of the prefixes
        f"test_x.py::test_on_vm[debian-11-{HOST_ARCH}]",
        f"test_x.py::test_fresh[debian-12-{HOST_ARCH}]",
        "test_x.py::test_on_all",
    ]
    assert "no-vm" not in result.stdout.str()
    host.assert_untouched(before)
    assert host.heavy_modules() == []


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["single", "xdist"])
def test_deselected_vm_tests_boot_nothing(pytester: pytest.Pytester, host: Host, xdist: list[str]) -> None:
    """(c) -k leaves only the plain test: with the image in the store, still no VM starts (nor,
    under xdist, does the hand-off dir appear)."""
    host.add_image(f"debian-12-{HOST_ARCH}")
    before = host.store()
    result = pytester.runpytest_subprocess(
        "-k", "plain", "-p", "no:cacheprovider", "--tt-os=debian12", f"--tt-arch={HOST_ARCH}", *xdist, timeout=120
    )
    result.assert_outcomes(passed=1)
    host.assert_untouched(before)
    assert host.heavy_modules() == []


def test_filterwarnings_error_with_tt_os(pytester: pytest.Pytester, host: Host) -> None:
    """(d) A project that turns warnings into errors, with tt_os set: its non-VM test passes."""
    pytester.makeini("[pytest]\ntt_os = debian12\nfilterwarnings =\n    error\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "not on_ and not fresh", timeout=120)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1)
    host.assert_untouched([])


# A backend that serves two images and records the ENV it is asked for, then refuses it.
FAKE_BACKEND = """
import json, os
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.errors import TTError

class Fake:
    name = "fake"

    def images(self):
        return [ImageInfo(f"debian-{v}-x86_64", "debian", v, "x86_64") for v in ("11", "12")]

    def list_envs(self):
        return []

    def create_env(self, spec):
        with open(os.path.join(OUT, "created.json"), "w") as f:
            json.dump([vm.image for vm in spec.vms], f)
        raise TTError("fake backend: no VMs here")

def pytest_ttenv_register_backends(register):
    register("fake", lambda spec, **kw: Fake())
"""


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["single", "xdist"])
@pytest.mark.parametrize(
    ("select", "created"),
    [
        ("on_vm and debian-11", ["debian-11-x86_64"]),
        ("fresh", ["debian-12-x86_64"]),  # marked tt_os("debian12")
        ("on_all", ["debian-11-x86_64", "debian-12-x86_64"]),
        ("plain", None),
    ],
)
def test_env_holds_the_vms_of_the_selected_tests(
    pytester: pytest.Pytester, host: Host, tmp_path: Path, xdist: list[str], select: str, created: list[str] | None
) -> None:
    """The ENV is asked for after deselection, with only the VMs that the selected tests use; a
    backend's refusal is one line (exit 4), under xdist too, and nothing is left behind."""
    fake = FAKE_BACKEND.replace("OUT", repr(str(tmp_path)))
    pytester.makeconftest(RECORD_MODULES.format(out=str(host.modules)) + fake)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--tt-os=debian", "--tt-backend=fake://x", "-k", select, *xdist, timeout=120
    )
    record = tmp_path / "created.json"
    if created is None:
        result.assert_outcomes(passed=1)
        assert not record.exists()
        assert not host.state.exists()
        return
    assert json.loads(record.read_text()) == created
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert [line for line in result.stderr.lines if line.strip()] == ["ERROR: ttenv: fake backend: no VMs here"]
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert leftovers(host.state) == []


def test_plugin_import_is_light(tmp_path: Path) -> None:
    """``import pytest_ttenv.plugin`` in a fresh interpreter loads nothing of HEAVY."""
    code = f"import sys, pytest_ttenv.plugin; print([m for m in sys.modules if m.startswith({HEAVY!r})])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    out = run.stdout
    assert out.strip() == "[]"


def test_reap_spares_the_handoff_dir_of_a_running_controller(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Another session's ENV creation reaps dead session dirs, not a live xdist hand-off."""
    monkeypatch.setenv("TTENV_STATE_DIR", str(tmp_path))
    live = Handoff.new()
    live.write_needs("gw0", ["debian-12-x86_64"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = live.path.with_name(f"xdist-{gone.pid}-abcdef")
    dead.mkdir()

    class NoEnvs:
        def list_envs(self) -> list[object]:
            return []

    assert reap_session_dirs(NoEnvs()) == 1  # type: ignore[arg-type]
    assert live.path.is_dir() and not dead.exists()
    assert live.needs("gw0") == ["debian-12-x86_64"] and live.needs("gw1") == []
    live.remove()
    assert not live.path.exists()
    assert os.listdir(tmp_path / "sessions") == []
