"""Plugin settings and collection without VMs: precedence, validation, skips, ids, usage errors."""

from __future__ import annotations

import pytest

from pytest_ttenv.config import SETTINGS, raw_values, resolve
from pytest_ttenv.errors import UsageError

pytest_plugins = ["pytester"]


def values(cli: dict[str, str] | None = None, env: dict[str, str] | None = None, ini: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    cli, ini = cli or {}, ini or {}
    return raw_values(lambda d: cli.get(d), lambda d: ini.get(d), env or {})


def test_every_setting_has_flag_ini_and_env() -> None:
    names = {s.name for s in SETTINGS}
    assert {"os", "arch", "backend", "token", "engine", "accel", "cpu", "mem", "disk", "boot_timeout", "keep",
            "image_dir", "dist", "matrix_report"} <= names  # fmt: skip
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
    assert errors == ["ERROR: ttenv: OS prefix 'nosuchos' matches no image; available: none (build one: "
                      "ttenv image build debian-12)"]  # fmt: skip
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
    result = pytester.runpytest("-p", "no:cacheprovider", "--tt-os=fedora", "--tt-arch=x86_64")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ERROR: ttenv: ") and "127.0.0.1:9" in errors[0], errors
