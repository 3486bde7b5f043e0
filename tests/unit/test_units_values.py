"""One convention per kind of value: every duration option takes ``parse_seconds``'s forms and every
size option ``parse_mib``'s; a bad value is one line naming where it came from (flag, environment
variable or ini key) and listing what is accepted. No VMs."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_ttenv.cli import build_parser
from pytest_ttenv.config import SETTINGS, RawValues, raw_values, resolve
from pytest_ttenv.core.naming import DURATION_FORMS, SIZE_FORMS, parse_mib, parse_seconds
from pytest_ttenv.errors import UsageError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("2.5", 2.5),
        ("90s", 90),
        ("90S", 90),
        (" 30m ", 1800),
        ("30 m", 1800),
        ("2h", 7200),
        ("1.5h", 5400),
        ("1d", 86400),
        ("1.5d", 129600),
        ("+5", 5),
        (7, 7.0),
        (0.5, 0.5),
    ],
)
def test_every_duration_form(text: str | float, seconds: float) -> None:
    assert parse_seconds(text, "--ttl") == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "--ttl='0' must be positive"),
        ("0s", "--ttl='0s' must be positive"),
        ("0.0h", "must be positive"),
        ("-5", "--ttl='-5' must be positive"),
        ("-1m", "must be positive"),
        (0, "--ttl=0 must be positive"),
        (-1.0, "must be positive"),
        (float("inf"), "must be positive"),
        (float("nan"), "must be positive"),
        ("", "--ttl='' is not a duration"),
        ("abc", "--ttl='abc' is not a duration"),
        ("5x", "is not a duration"),
        ("1h30m", "is not a duration"),
        ("1e3", "is not a duration"),
        ("inf", "is not a duration"),
        ("m", "is not a duration"),
        ("1.", "is not a duration"),
    ],
)
def test_bad_durations_are_one_line_listing_the_forms(text: str | float, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_seconds(text, "--ttl")
    line = str(info.value)
    assert message in line and f"(use {DURATION_FORMS})" in line and "\n" not in line, line


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("512", 512),
        ("512M", 512),
        ("512m", 512),
        ("512MB", 512),
        ("512MiB", 512),
        ("2G", 2048),
        ("2 GiB", 2048),
        ("1t", 1048576),
        ("2048K", 2),
        (" 64 ", 64),
        (300, 300),
    ],
)
def test_every_size_form(text: str | int, mib: int) -> None:
    assert parse_mib(text, "--mem") == mib


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "--mem size must be positive, got '0'"),
        ("0G", "must be positive"),
        ("512K", "must be positive"),
        (0, "must be positive"),
        (-1, "must be positive"),
        ("-1", "bad --mem size '-1'"),
        ("lots", "bad --mem size"),
        ("2X", "bad --mem size '2X'"),
        ("1.5G", "bad --mem size"),
        ("", "bad --mem size"),
    ],
)
def test_bad_sizes_are_one_line_listing_the_forms(text: str | int, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_mib(text, "--mem")
    line = str(info.value)
    assert message in line and f"(use {SIZE_FORMS})" in line and "\n" not in line, line


# -- the plugin's settings: where a bad value came from -----------------------------------------------
def raw(
    cli: dict[str, str] | None = None, env: dict[str, str] | None = None, ini: dict[str, str] | None = None
) -> RawValues:
    cli, ini = cli or {}, ini or {}
    return raw_values(lambda d: cli.get(d), lambda d: ini.get(d), env or {})


def test_raw_values_record_each_winners_source() -> None:
    values = raw(cli={"tt_lease": "1h"}, env={"TTENV_MEM": "1G", "TTENV_LEASE": "5m"}, ini={"tt_disk": "10G"})
    assert isinstance(values, dict) and values["lease"] == "1h" and values["mem"] == "1G" and values["disk"] == "10G"
    assert values.sources["lease"] == "--tt-lease"
    assert values.sources["mem"] == "TTENV_MEM"
    assert values.sources["disk"] == "ini tt_disk"
    assert values.sources["boot_timeout"] == "--tt-boot-timeout"  # the default: named by its flag
    assert set(values.sources) == {s.name for s in SETTINGS}


def test_durations_and_sizes_of_the_plugin_take_every_form() -> None:
    cfg = resolve(raw(env={"TTENV_LEASE": "2h", "TTENV_BOOT_TIMEOUT": "5m"}, ini={"tt_mem": "2GiB", "tt_disk": "1T"}))
    assert (cfg.lease, cfg.boot_timeout, cfg.mem_mib, cfg.disk_mib) == (7200, 300, 2048, 1048576)
    cfg = resolve(raw(cli={"tt_lease": "90", "tt_boot_timeout": "1.5", "tt_mem": "768"}))
    assert (cfg.lease, cfg.boot_timeout, cfg.mem_mib, cfg.disk_mib) == (90, 1.5, 768, 0)
    assert resolve(raw()).lease == 180 and resolve(raw()).boot_timeout is None


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"env": {"TTENV_LEASE": "abc"}}, "TTENV_LEASE='abc' is not a duration (use seconds"),
        ({"ini": {"tt_lease": "abc"}}, "ini tt_lease='abc' is not a duration (use seconds"),
        ({"cli": {"tt_lease": "abc"}, "env": {"TTENV_LEASE": "1h"}}, "--tt-lease='abc' is not a duration"),
        ({"env": {"TTENV_LEASE": "0"}}, "TTENV_LEASE='0' must be positive"),
        ({"ini": {"tt_lease": "-60"}}, "ini tt_lease='-60' must be positive"),
        ({"env": {"TTENV_LEASE": "1"}}, "TTENV_LEASE='1' is too short (give at least 2 seconds (default 180))"),
        ({"cli": {"tt_lease": "1.9s"}}, "--tt-lease='1.9s' is too short"),
        ({"env": {"TTENV_BOOT_TIMEOUT": "soon"}}, "TTENV_BOOT_TIMEOUT='soon' is not a duration"),
        ({"ini": {"tt_boot_timeout": "0"}}, "ini tt_boot_timeout='0' must be positive"),
        ({"cli": {"tt_boot_timeout": "-1"}}, "--tt-boot-timeout='-1' must be positive"),
        ({"env": {"TTENV_MEM": "lots"}}, "bad TTENV_MEM size 'lots' (use MiB"),
        ({"ini": {"tt_mem": "0"}}, "ini tt_mem size must be positive, got '0'"),
        ({"ini": {"tt_disk": "2X"}}, "bad ini tt_disk size '2X'"),
        ({"cli": {"tt_disk": "0G"}}, "--tt-disk size must be positive"),
        ({"env": {"TTENV_CPU": "two"}}, "TTENV_CPU='two' is not a number"),
    ],
)
def test_a_bad_value_names_where_it_came_from(given: dict[str, dict[str, str]], message: str) -> None:
    with pytest.raises(UsageError) as info:
        resolve(raw(**given))
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_resolve_of_a_plain_dict_names_the_flag_or_the_given_sources() -> None:
    defaults = {s.name: s.default for s in SETTINGS}
    with pytest.raises(UsageError, match=r"^--tt-lease='abc' is not a duration"):
        resolve(defaults | {"lease": "abc"})
    with pytest.raises(UsageError, match=r"^TTENV_LEASE='abc' is not a duration"):
        resolve({"lease": "abc"}, {"lease": "TTENV_LEASE"})
    assert resolve({"lease": "3m"}).lease == 180


# -- the CLI: every duration and size option parses the same forms ------------------------------------
DURATIONS = [
    (["env", "add", "T", "--os-prefix=deb"], "--ttl", "ttl"),
    (["env", "add", "T", "--os-prefix=deb"], "--boot-timeout", "boot_timeout"),
    (["env", "renew", "T"], "--ttl", "ttl"),
    (["env", "run", "T"], "--timeout", "timeout"),
    (["env", "run", "T"], "--boot-timeout", "boot_timeout"),
    (["image", "pull", "ubuntu-24.04"], "--timeout", "timeout"),
    (["serve"], "--default-lease", "default_lease"),
    (["serve"], "--max-lease", "max_lease"),
]
SIZES = [
    (["env", "add", "T", "--os-prefix=deb"], "--mem", "mem"),
    (["env", "add", "T", "--os-prefix=deb"], "--disk", "disk"),
    (["image", "build", "debian-12"], "--disk", "disk"),
    (["serve"], "--mem-total", "mem_total"),
    (["serve"], "--disk-total", "disk_total"),
]


@pytest.mark.parametrize(("args", "flag", "dest"), DURATIONS)
def test_cli_duration_options(args: list[str], flag: str, dest: str) -> None:
    for text, seconds in (("45", 45), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400)):
        ns = build_parser().parse_args([*args, flag, text])
        assert getattr(ns, dest) == seconds, (flag, text)


@pytest.mark.parametrize(("args", "flag", "dest"), SIZES)
def test_cli_size_options(args: list[str], flag: str, dest: str) -> None:
    for text, mib in (("300", 300), ("512M", 512), ("2G", 2048), ("2GiB", 2048), ("1T", 1048576)):
        ns = build_parser().parse_args([*args, flag, text])
        assert getattr(ns, dest) == mib, (flag, text)


@pytest.mark.parametrize(
    ("args", "flag", "bad", "message"),
    [(a, f, "0", "must be positive") for a, f, _ in DURATIONS + SIZES]
    + [(a, f, "5x", "is not a duration") for a, f, _ in DURATIONS]
    + [(a, f, "5x", f"bad {f} size '5x'") for a, f, _ in SIZES],
)
def test_cli_bad_value_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], flag: str, bad: str, message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*args, flag, bad])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ttenv: error: ") and flag in err and message in err, err


def test_cli_defaults_are_parsed_like_given_values() -> None:
    ns = build_parser().parse_args(["image", "build", "debian-12"])
    assert ns.disk == 3072
    ns = build_parser().parse_args(["env", "add", "T", "--os-prefix=deb"])
    assert (ns.mem, ns.disk, ns.ttl, ns.boot_timeout) == (512, None, None, None)
    ns = build_parser().parse_args(["serve"])
    assert (ns.default_lease, ns.max_lease, ns.mem_total, ns.disk_total) == (600, 7 * 86400, None, None)


def test_serve_parses_the_same_forms() -> None:
    """``serve()`` itself (the API behind the CLI) takes strings too, and rejects 0 before binding anything."""
    pytest.importorskip("uvicorn")
    from pytest_ttenv.server.serve import serve

    cases: list[tuple[dict[str, Any], str]] = [
        ({"default_lease": "0"}, "--default-lease='0' must be positive"),
        ({"max_lease": "later"}, "--max-lease='later' is not a duration"),
        ({"max_lease": 0.0}, "--max-lease=0.0 must be positive"),
        ({"mem_total": "lots"}, "bad --mem-total size 'lots'"),
        ({"disk_total": 0}, "--disk-total size must be positive"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message.replace("(", r"\(")):
            serve("127.0.0.1:1", **kwargs)
