"""Runners for the CI templates: GitHub Actions jobs (``run:`` steps in bash, the few actions emulated)
and GitLab jobs (before_script + script in one shell), run here for real with a runner's variables;
and the project their test jobs run (the example suite and a suite with every outcome)."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
GITHUB = REPO / "ci-templates" / "github"
GITLAB = REPO / "ci-templates" / "gitlab"
WORKFLOW = GITHUB / "ttenv-matrix.yml"
TEMPLATE = GITLAB / "ttenv.gitlab-ci.yml"
EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")

SMALL_JUNIT = """<testsuites><testsuite name="pytest">
<testcase classname="tests.test_a" name="test_ok[debian-12-x86_64]" time="1"/>
<testcase classname="tests.test_a" name="test_bad[debian-12-x86_64]" time="1">
<failure message="boom">trace</failure></testcase>
</testsuite></testsuites>"""


# a suite with every outcome (pass, fail, error, skip, xfail, tt_env, host-only), for the test jobs
OUTCOMES_SUITE = """
import pytest

@pytest.fixture
def broken(tt_vm):
    raise RuntimeError(f"fixture broke on {tt_vm.name}")

def test_passes(tt_vm):
    assert tt_vm.run("true").ok

def test_fails(tt_vm):
    assert tt_vm.run("echo hi").stdout == "bye", f"expected failure on {tt_vm.name}"

def test_errors(broken):
    pass

@pytest.mark.skip(reason="skipped by marker")
def test_skipped_by_marker(tt_vm):
    pass

def test_skips_itself(tt_vm):
    pytest.skip(f"skipped on {tt_vm.name}")

@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfails(tt_vm):
    assert tt_vm.run("false").ok

@pytest.mark.parametrize("n", [1, 2])
def test_param(tt_vm, n):
    assert n in (1, 2)

@pytest.mark.tt_os("debian11")
def test_only_on_11(tt_vm):
    pass

def test_all_vms(tt_env):
    assert all(r.ok for r in tt_env.run("true").values())

def test_on_the_host():
    pass
"""


def make_project(where: Path) -> Path:
    """A project for the test jobs: the example suite and ``suite/test_outcomes.py`` (OUTCOMES_SUITE)."""
    shutil.copytree(REPO / "examples", where / "examples")
    (where / "suite").mkdir()
    (where / "suite" / "test_outcomes.py").write_text(OUTCOMES_SUITE)
    return where


def load_yaml(path: Path) -> dict[Any, Any]:
    """A YAML file's top-level mapping; not only strings are keys (YAML 1.1 reads ``on`` as true)."""
    data: dict[Any, Any] = yaml.safe_load(path.read_text())
    return data


def base_env(extra: dict[str, str]) -> dict[str, str]:
    """What a runner's shell has: PATH with this interpreter first (its python, pip, ttenv), HOME."""
    return {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": os.environ["HOME"],
        "LANG": "C.UTF-8",
        "CI": "true",
        **extra,
    }


# -- GitHub Actions, the part the workflow uses --------------------------------------------------------
@dataclass
class Step:
    name: str
    status: str  # success, failure, skipped
    output: str = ""


@dataclass
class Job:
    workspace: Path
    steps: list[Step] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    cache_keys: list[str] = field(default_factory=list)

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)


class Actions:
    """Runs jobs of the reusable workflow on this host. ``artifacts`` is shared by the jobs of a run."""

    def __init__(self, root: Path, inputs: dict[str, str], env: dict[str, str], secrets: dict[str, str] | None = None):
        self.wf = load_yaml(WORKFLOW)
        call = (self.wf.get("on") or self.wf[True])["workflow_call"]  # YAML 1.1 reads `on` as true
        self.inputs = {k: str(v.get("default", "")) for k, v in call["inputs"].items()} | inputs
        self.secrets = secrets or {}
        self.root, self.env = root, env
        self.artifacts = root / "artifacts"
        self.artifacts.mkdir(parents=True, exist_ok=True)
        assert self.wf["defaults"]["run"]["shell"] == "bash"

    def value(self, expr: str, ctx: dict[str, Any]) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", expr):
            raise AssertionError(f"expression the harness does not evaluate: {expr}")
        node: Any = ctx
        for part in expr.split("."):
            node = node.get(part, "") if isinstance(node, dict) else ""
        return str(node)

    def sub(self, text: str, ctx: dict[str, Any]) -> str:
        return EXPR.sub(lambda m: self.value(m.group(1), ctx), text)

    def condition(self, cond: str | None, ctx: dict[str, Any], failed: bool) -> bool:
        if cond is None:
            return not failed
        m = EXPR.fullmatch(cond.strip())
        expr = m.group(1) if m else cond.strip()
        if expr in ("!cancelled()", "always()"):
            return True
        if expr == "failure()":  # an earlier step of the job failed
            return failed
        cmp = re.fullmatch(r"([\w.-]+)\s*(==|!=)\s*'([^']*)'", expr)
        if cmp is None:
            raise AssertionError(f"condition the harness does not evaluate: {cond}")
        return not failed and (self.value(cmp.group(1), ctx) == cmp.group(3)) == (cmp.group(2) == "==")

    def run(self, name: str, matrix: dict[str, str] | None = None, project: Path | None = None) -> Job:
        spec = self.wf["jobs"][name]
        slug = "-".join([name, *(matrix or {}).values()])
        job = Job(self.root / slug / "workspace")
        job.workspace.mkdir(parents=True)
        temp = self.root / slug / "temp"
        temp.mkdir()
        ctx: dict[str, Any] = {
            "inputs": self.inputs,
            "secrets": self.secrets,
            "matrix": matrix or {},
            "runner": {"os": "Linux", "arch": "X64", "temp": str(temp)},
            "github": {"workspace": str(job.workspace)},
            "steps": {},
        }
        env = base_env(self.env) | {
            "GITHUB_ACTIONS": "true",
            "GITHUB_WORKSPACE": str(job.workspace),
            "RUNNER_TEMP": str(temp),
            "RUNNER_OS": "Linux",
        }
        env |= {k: self.sub(str(v), ctx) for k, v in spec.get("env", {}).items()}
        ctx["env"] = env
        failed = False
        for i, step in enumerate(spec["steps"]):
            label = self.sub(step.get("name") or step.get("uses") or f"step {i}", ctx)
            if not self.condition(step.get("if"), ctx, failed):
                job.steps.append(Step(label, "skipped"))
                continue
            step_env = env | {k: self.sub(str(v), ctx) for k, v in step.get("env", {}).items()}
            if "uses" in step:
                ok, out = self.action(step, ctx, job, project)
            else:
                ok, out = self.shell(step, ctx, job, step_env, temp / f"step{i}")
            job.steps.append(Step(label, "success" if ok else "failure", out))
            failed = failed or not ok
        job.outputs = {k: self.sub(str(v), ctx) for k, v in spec.get("outputs", {}).items()}
        return job

    def shell(
        self, step: dict[str, Any], ctx: dict[str, Any], job: Job, env: dict[str, str], d: Path
    ) -> tuple[bool, str]:
        d.mkdir()
        files = {n: d / n.lower() for n in ("GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY", "GITHUB_ENV")}
        for f in files.values():
            f.touch()
        script = d / "script.sh"
        script.write_text(self.sub(step["run"], ctx))
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            cwd=job.workspace,
            env=env | {k: str(v) for k, v in files.items()},
            capture_output=True,
            text=True,
            timeout=1200,
        )
        outputs: dict[str, str] = {}
        for line in files["GITHUB_OUTPUT"].read_text().splitlines():
            key, sep, val = line.partition("=")
            assert sep, f"GITHUB_OUTPUT line the runner would reject: {line!r}"
            outputs[key] = val
        if step.get("id"):
            ctx["steps"][step["id"]] = {"outputs": outputs}
        job.summary += files["GITHUB_STEP_SUMMARY"].read_text()
        return proc.returncode == 0, proc.stdout + proc.stderr

    def action(self, step: dict[str, Any], ctx: dict[str, Any], job: Job, project: Path | None) -> tuple[bool, str]:
        uses = step["uses"]
        args = {k: self.sub(str(v), ctx) for k, v in step.get("with", {}).items()}
        assert not any("${{" in v for v in args.values()), args
        if uses == "actions/checkout@v4":
            if project is not None:
                shutil.copytree(project, job.workspace, dirs_exist_ok=True)
            return True, ""
        if uses == "actions/setup-python@v5":
            return bool(args.get("python-version")), ""  # this interpreter stands in
        if uses == "actions/cache@v4":
            job.cache_keys.append(args["key"])
            return bool(args["path"]), ""
        if uses == "actions/upload-artifact@v4":
            src, dest = job.workspace / args["path"], self.artifacts / args["name"]
            if dest.exists():
                return False, f"an artifact named {args['name']} exists already (upload-artifact v4 refuses)"
            if not src.exists():
                return args.get("if-no-files-found", "warn") != "error", f"no files at {args['path']}"
            shutil.copytree(src, dest)
            return True, ""
        if uses == "actions/download-artifact@v4":
            dest = job.workspace / args["path"]
            for art in sorted(self.artifacts.iterdir()):
                if fnmatch.fnmatch(art.name, args["pattern"]):
                    merge = args.get("merge-multiple", "").lower() == "true"
                    shutil.copytree(art, dest if merge else dest / art.name, dirs_exist_ok=True)
            return True, ""
        raise AssertionError(f"action the harness does not emulate: {uses}")


# -- GitLab CI, the part the template uses ----------------------------------------------------------------
def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """GitLab's `extends`/`include` merge: hashes deep-merged, everything else replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class GitLabJob:
    project: Path
    rc: int
    output: str
    artifacts: Path
    junit: list[Path]
    cache_key: str


class GitLab:
    def __init__(self, root: Path, variables: dict[str, str], env: dict[str, str]):
        self.config = load_yaml(TEMPLATE)
        self.root, self.variables, self.env = root, variables, env

    def job(self, name: str) -> dict[str, Any]:
        spec = self.config[name]
        parents = spec.get("extends", [])
        resolved: dict[str, Any] = {}
        for parent in [parents] if isinstance(parents, str) else parents:
            resolved = merge(resolved, self.job(parent))
        return merge(resolved, {k: v for k, v in spec.items() if k != "extends"})

    def run(
        self, name: str, variables: dict[str, str], project: Path | None = None, needs: Sequence[GitLabJob] = ()
    ) -> GitLabJob:
        spec = self.job(name)
        work = self.root / name / "project"
        work.mkdir(parents=True)
        if project is not None:
            shutil.copytree(project, work, dirs_exist_ok=True)
        for dep in needs:  # artifacts of the jobs it needs, restored into the project dir
            shutil.copytree(dep.artifacts, work, dirs_exist_ok=True)
        ci = {
            "CI_PROJECT_DIR": str(work),
            "CI_JOB_NAME": name,
            "CI_NODE_INDEX": "1",
            "CI_NODE_TOTAL": "1",
            "GITLAB_CI": "true",
        }
        values = ci | {k: str(v) for k, v in self.config.get("variables", {}).items()}
        values |= {k: str(v) for k, v in spec.get("variables", {}).items()}
        values |= variables | self.variables  # matrix and CI/CD settings win over the file
        expand = re.compile(r"\$(\w+)|\$\{(\w+)\}")
        values = {k: expand.sub(lambda m: values.get(m.group(1) or m.group(2), ""), v) for k, v in values.items()}
        lines = [*spec.get("before_script", []), *spec["script"]]
        script = work.parent / "script.sh"
        script.write_text("set -eo pipefail\n" + "\n".join(lines) + "\n")
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", str(script)],
            cwd=work,
            env=base_env(self.env) | values,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        arts = spec["artifacts"]
        kept = work.parent / "artifacts"
        kept.mkdir()
        when = {"always": True, "on_failure": proc.returncode != 0}.get(arts.get("when", ""), proc.returncode == 0)
        if when:
            for p in arts["paths"]:
                if (work / p).exists():
                    shutil.copytree(work / p, kept / p)
        junit = [Path(p) for p in sorted(map(str, work.glob(arts.get("reports", {}).get("junit", "-"))))]
        key = expand.sub(lambda m: values.get(m.group(1) or m.group(2), ""), str(spec.get("cache", {}).get("key", "")))
        return GitLabJob(work, proc.returncode, proc.stdout + proc.stderr, kept, junit, key)
