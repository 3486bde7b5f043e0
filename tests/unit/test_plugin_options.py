"""Plugin settings and collection without VMs: precedence, validation, skips, ids, usage errors."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from pytest_ttenv import backend as registry
from pytest_ttenv.backend import (
    ENTRY_POINT_GROUP,
    backend_factory,
    builtin,
    get_backend,
    register_backend,
    uses_local_images,
)
from pytest_ttenv.config import SETTINGS, RawValues, raw_values, resolve
from pytest_ttenv.errors import UsageError

pytest_plugins = ["pytester"]


def values(
    cli: dict[str, str] | None = None, env: dict[str, str] | None = None, ini: dict[str, str] | None = None
) -> RawValues:
    cli, ini = cli or {}, ini or {}
    return raw_values(lambda d: cli.get(d), lambda d: ini.get(d), env or {})


def test_every_setting_has_flag_ini_and_env() -> None:
    names = {s.name for s in SETTINGS}
    assert {
        "os",
        "arch",
        "backend",
        "token",
        "engine",
        "accel",
        "cpu",
        "mem",
        "disk",
        "boot_timeout",
        "keep",
        "image_dir",
        "dist",
        "matrix_report",
    } <= names
    keep = next(s for s in SETTINGS if s.name == "boot_timeout")
    assert (keep.flag, keep.dest, keep.env) == ("--tt-boot-timeout", "tt_boot_timeout", "TTENV_BOOT_TIMEOUT")


def test_precedence_cli_over_env_over_ini_over_default() -> None:
    assert values()["os"] == "" and values()["keep"] == "never"
    assert values(ini={"tt_os": "debian11"})["os"] == "debian11"
    assert values(env={"TTENV_OS": "debian12"}, ini={"tt_os": "debian11"})["os"] == "debian12"
    assert values(cli={"tt_os": "cent"}, env={"TTENV_OS": "debian12"}, ini={"tt_os": "x"})["os"] == "cent"


def test_resolve_parses_and_validates() -> None:
    cfg = resolve(values(cli={"tt_os": "debian12, deb", "tt_arch": "amd64", "tt_mem": "1G", "tt_boot_timeout": "90"}))
    assert cfg.os == ("debian12", "deb") and cfg.arch == ("x86_64",) and cfg.mem_mib == 1024
    assert cfg.boot_timeout == 90.0 and cfg.keep == "never" and cfg.dist == "shared"
    for bad, message in [
        ({"tt_keep": "sometimes"}, "--tt-keep='sometimes' is not valid"),
        ({"tt_accel": "hvf"}, "--tt-accel='hvf' is not valid"),
        ({"tt_cpu": "two"}, "--tt-cpu='two' is not a number"),
        ({"tt_arch": "sparc"}, "unknown arch 'sparc'"),
        ({"tt_boot_timeout": "-1"}, "must be positive"),
    ]:
        with pytest.raises(UsageError, match=message):
            resolve(values(cli=bad))


VM_TESTS = """
import pytest

def test_plain():
    pass

def test_on_vm(tt_vm):
    pass

def test_on_all(tt_env):
    pass
"""


def test_without_tt_os_vm_tests_skip_with_reason(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(VM_TESTS)
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*give --tt-os (e.g. --tt-os=debian12)*"])
    assert "test_on_vm[no-vm]" in "\n".join(pytester.runpytest("--collect-only", "-q").outlines)


def test_ini_and_env_values_reach_validation(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(VM_TESTS)
    pytester.makeini("[pytest]\ntt_keep = sometimes\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: ttenv: --tt-keep='sometimes' is not valid (use one of never, failed, always)"])
    monkeypatch.setenv("TTENV_KEEP", "forever")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.stderr.fnmatch_lines(["*--tt-keep='forever' is not valid*"])
    assert pytester.runpytest("-p", "no:cacheprovider", "--tt-keep=never").ret == 0


def test_prefix_matching_nothing_is_usage_error_listing_images(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TTENV_IMAGE_DIR", str(pytester.path / "images"))
    monkeypatch.setenv("TTENV_STATE_DIR", str(pytester.path / "state"))
    pytester.makepyfile(VM_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "--tt-os=nosuchos")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.strip()]
    assert errors == [
        "ERROR: ttenv: OS prefix 'nosuchos' matches no image; available: none (build one: ttenv image build debian-12)"
    ]
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_unreachable_backend_is_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(VM_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "--tt-os=debian12", "--tt-backend=http://127.0.0.1:9")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert [ln for ln in result.stderr.lines if ln.strip()] == [
        "ERROR: ttenv: cannot reach the ttenv server at http://127.0.0.1:9: connection refused "
        "(check the URL and that `ttenv serve` runs there)"
    ]


def test_backend_registered_by_a_conftest_hook(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
from pytest_ttenv.errors import TTError

def make(spec, **kw):
    raise TTError(f"fake backend asked for {spec}")

def pytest_ttenv_register_backends(register):
    register("fake", make)
""")
    pytester.makepyfile(VM_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "--tt-os=debian12", "--tt-backend=fake://x")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: ttenv: fake backend asked for fake://x"])


def test_unknown_backend_lists_known_ones(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(VM_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "--tt-os=debian12", "--tt-backend=nonsense")
    result.stderr.fnmatch_lines(["ERROR: ttenv: unknown backend 'nonsense' (use one of local*"])


def test_pull_that_cannot_reach_the_vendor_is_one_line(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fedora`` is in the catalog but not in the store: the pull is tried and fails in one line."""
    monkeypatch.setenv("TTENV_IMAGE_DIR", str(pytester.path / "images"))
    monkeypatch.setenv("TTENV_STATE_DIR", str(pytester.path / "state"))
    catalog = pytester.path / "catalog.yaml"
    catalog.write_text(
        '{"schema": 1, "version": "t", "extends": "builtin", "mirrors": {"fedora": "http://127.0.0.1:9"}}'
    )
    monkeypatch.setenv("TTENV_CATALOG", str(catalog))
    pytester.makepyfile(VM_TESTS)
    # a process of its own: an in-process run after another that loaded the catalog would re-import
    # PyYAML, whose C extension does not survive pytester's removal of the modules a run imported
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--tt-os=fedora", "--tt-arch=x86_64")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ERROR: ttenv: ") and "127.0.0.1:9" in errors[0], errors


# -- the backend registry ------------------------------------------------------------------------
@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """No scheme registered or loaded yet (this process's registry is left as it was)."""
    monkeypatch.setattr(registry, "_REGISTERED", {})


def test_builtin_backends_are_entry_points(fresh_registry: None, tmp_path: Path) -> None:
    """``local``, ``http`` and ``https`` are found through the installed package's entry points."""
    from pytest_ttenv.backend.http import HttpBackend

    declared = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert declared["local"] == "pytest_ttenv.backend.builtin:LOCAL"
    assert (declared["http"], declared["https"]) == (
        "pytest_ttenv.backend.builtin:HTTP",
        "pytest_ttenv.backend.builtin:HTTPS",
    )
    assert backend_factory("") is backend_factory("local") is builtin.LOCAL
    assert backend_factory("https://h:1") is builtin.HTTPS and backend_factory("nonsense") is None
    assert uses_local_images("local") and not uses_local_images("http://h:1") and not uses_local_images("nonsense")
    local = get_backend("local", image_dir=tmp_path / "images", state_dir=tmp_path / "state")
    assert local.name == "local"
    server = get_backend("https://127.0.0.1:9", token="t0ken")
    assert isinstance(server, HttpBackend) and (server.url, server.token) == ("https://127.0.0.1:9", "t0ken")


def test_a_registered_backend_beats_the_entry_point(fresh_registry: None) -> None:
    """A plugin's factory for a scheme replaces the built-in one and gets every setting."""
    made: list[tuple[str, dict[str, Any]]] = []
    sentinel: Any = object()

    def factory(spec: str, **options: Any) -> Any:
        made.append((spec, options))
        return sentinel

    register_backend("local", factory)
    assert get_backend("local", engine="libvirt", token="x") is sentinel
    assert made == [
        (
            "local",
            {
                "image_dir": None,
                "state_dir": None,
                "progress": None,
                "token": "x",
                "engine": "libvirt",
                "libvirt_uris": (),
                "ca_cert": None,
            },
        )
    ]
    assert not uses_local_images("local")  # it did not say it boots from this host's store


def test_a_factory_gets_only_the_keywords_it_names(fresh_registry: None, tmp_path: Path) -> None:
    """A factory written for ``(spec, image_dir=, state_dir=, progress=)`` keeps working."""
    made: list[tuple[str, Any, Any, Any]] = []
    sentinel: Any = object()

    def factory(spec: str, image_dir: Any = None, state_dir: Any = None, progress: Any = None) -> Any:
        made.append((spec, image_dir, state_dir, progress))
        return sentinel

    register_backend("old", factory)  # type: ignore[arg-type]
    assert get_backend("old://x", image_dir=tmp_path, engine="libvirt", token="t") is sentinel
    assert made == [("old://x", tmp_path, None, None)]


def test_unknown_backend_lists_the_registry(fresh_registry: None, monkeypatch: pytest.MonkeyPatch) -> None:
    register_backend("fake", lambda spec, **options: None)  # type: ignore[arg-type]  # never called
    with pytest.raises(UsageError) as err:
        get_backend("nonsense")
    assert str(err.value) == (
        "unknown backend 'nonsense' (use one of local, fake://..., http://host:port, https://host:port)"
    )
    monkeypatch.setattr(registry, "_REGISTERED", {})
    monkeypatch.setattr(registry, "entry_points", lambda **kw: [])  # an install without its metadata
    with pytest.raises(UsageError, match=r"entry points are missing \(reinstall pytest-ttenv"):
        get_backend("local")
