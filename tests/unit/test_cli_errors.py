"""Bad input to ``ttenv``: one clear line, the right exit code, no traceback, nothing created."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def ttenv(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TTENV_STATE_DIR=str(tmp_path / "state"), TTENV_IMAGE_DIR=str(tmp_path / "images"))
    return subprocess.run(
        [sys.executable, "-m", "pytest_ttenv.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["env", "add", "T", "--os-prefix=fedora"], 2, "OS prefix 'fedora' matches no image"),
        (["env", "add", "bad name", "--os-prefix=deb"], 2, "bad ENV name 'bad name'"),
        (["env", "add", "T", "--os-prefix=deb", "--arch=sparc"], 2, "unknown arch 'sparc'"),
        (["env", "add", "T", "--os-prefix=,"], 2, "--os-prefix is empty"),
        (["env", "add", "T", "--os-prefix=deb", "--mem=lots"], 2, "bad --mem size 'lots' (use MiB, or a number"),
        (["env", "add", "X", "--os-prefix", "deb", "--ttl", "0"], 2, "--ttl='0' must be positive (use seconds"),
        (["env", "add", "X", "--os-prefix", "deb", "--ttl", "5x"], 2, "--ttl='5x' is not a duration (use seconds"),
        (["env", "add", "X", "--os-prefix", "deb", "--disk", "0"], 2, "--disk size must be positive, got '0'"),
        (["env", "run", "X", "--cmd", "true", "--timeout", "-1"], 2, "--timeout='-1' must be positive"),
        (["serve", "--max-lease", "0"], 2, "--max-lease='0' must be positive"),
        (["serve", "--mem-total", "32X"], 2, "bad --mem-total size '32X'"),
        (["env", "show", "nope"], 2, "no ENV named 'nope'"),
        (["env", "del", "nope"], 2, "no ENV named 'nope'"),
        (["env", "run", "nope", "--cmd", "true"], 2, "no ENV named 'nope'"),
        (["env", "renew", "nope", "--ttl", "1h"], 2, "no ENV named 'nope'"),
        (["image", "build", "ubuntu-22.04"], 2, "cannot build 'ubuntu-22.04'"),
        (["image", "build", "debian-12", "--arch", "mips"], 2, "unknown arch 'mips'"),
        (["image", "rm", "debian-99-x86_64"], 2, "image debian-99-x86_64 is not in"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    res = ttenv(tmp_path, *args)
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ttenv: error: ") and message in lines[0], res.stderr
    envs = tmp_path / "state" / "envs"
    assert not envs.exists() or not any(envs.iterdir())


def test_list_on_empty_host(tmp_path: Path) -> None:
    assert ttenv(tmp_path, "env", "list").stdout.strip() == "no ENVs"
    assert "ttenv image build debian-12" in ttenv(tmp_path, "image", "list").stdout


def test_unwritable_state_dir_is_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("a file where a directory should be")
    env = dict(os.environ, TTENV_STATE_DIR=str(state), TTENV_IMAGE_DIR=str(tmp_path / "images"))
    res = subprocess.run(
        [sys.executable, "-m", "pytest_ttenv.cli", "env", "list"], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("ttenv: error: cannot open the state store in ") and len(res.stderr.splitlines()) == 1


def test_unwritable_image_store_is_one_line(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.write_text("not a directory")
    env = dict(os.environ, TTENV_STATE_DIR=str(tmp_path / "state"), TTENV_IMAGE_DIR=str(images))
    res = subprocess.run(
        [sys.executable, "-m", "pytest_ttenv.cli", "image", "build", "debian-12"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("ttenv: error: cannot build image debian-12-") and len(res.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("24h", 86400), ("1.5d", 129600)]
)
def test_renew_durations(text: str, seconds: float) -> None:
    from pytest_ttenv.cli import build_parser

    assert build_parser().parse_args(["env", "renew", "X", "--ttl", text]).ttl == seconds


def test_bad_renew_duration_names_the_option(tmp_path: Path) -> None:
    res = ttenv(tmp_path, "env", "renew", "X", "--ttl", "soon")
    assert res.returncode == 2 and res.stderr == (
        "ttenv: error: --ttl='soon' is not a duration (use seconds, or a number with a unit: 90, 90s, 30m, 2h, 1d, "
        "1.5h)\n"
    )
