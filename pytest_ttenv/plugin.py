"""pytest hooks of pytest-ttenv: options, matrix parametrization, ENV lifecycle, xdist hand-off,
failure sections, JUnit properties, the matrix summary. Logic lives in the modules it calls."""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Generator
from typing import Any

import pytest

from pytest_ttenv import hookspecs
from pytest_ttenv.backend import Backend, get_backend, register_backend
from pytest_ttenv.backend.build import ensure_images
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.backend.pull import ensure_available, pullable_names
from pytest_ttenv.config import SETTINGS, TTConfig, raw_values, resolve
from pytest_ttenv.errors import TTError
from pytest_ttenv.fixtures import tt_env, tt_vm, tt_vm_fresh
from pytest_ttenv.fixtures.handles import register_testinfra
from pytest_ttenv.matrix import MatrixVm, buildable, missing_images, select, session_vms
from pytest_ttenv.report import outcome_of, summary_lines, test_key, vm_properties, write_matrix
from pytest_ttenv.session import EnvSession
from pytest_ttenv.state import STATE, PluginState

__all__ = ["tt_env", "tt_vm", "tt_vm_fresh"]
VM_FIXTURES = ("tt_vm", "tt_vm_fresh")


class _OutcomeRecorder:
    """Registered per session: pytest_runtest_logreport gets no config, so it lives on an object
    holding this session's state (under xdist the controller sees the workers' reports)."""

    def __init__(self, state: PluginState) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        vms = [str(v) for k, v in report.user_properties if k == "tt_vm"]
        outcome = outcome_of(report)
        if not vms or outcome is None:
            return
        for vm in vms:
            key = (test_key(report.nodeid, vm), vm)
            if self.state.outcomes.get(key) in (None, "passed"):
                self.state.outcomes[key] = outcome


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ttenv", "pytest-ttenv: run tests on VMs across an OS x arch matrix")
    for s in SETTINGS:
        group.addoption(s.flag, dest=s.dest, default=None, metavar=s.metavar,
                        help=f"{s.help} (ini {s.dest}, env {s.env}; default {s.default or 'unset'})")  # fmt: skip
        parser.addini(s.dest, s.help, default=None)


def _progress(config: pytest.Config) -> Any:
    """A line printer for progress and warnings: the terminal reporter once it exists (our
    ``pytest_configure`` runs before pytest's own registers it), stdout before that, where the
    reporter writes too (stderr stays for the one line of an error)."""

    def say(line: str) -> None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"ttenv: {line.strip()}")
        else:
            print(f"ttenv: {line.strip()}", file=sys.stdout, flush=True)

    return say


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "tt_os(*prefixes): run this test only on VMs matching these OS prefixes")
    config.addinivalue_line("markers", "tt_arch(*arches): run this test only on VMs of these arches")
    try:
        cfg = resolve(raw_values(config.getoption, config.getini))
    except TTError as exc:
        raise pytest.UsageError(f"ttenv: {exc}") from None
    state = PluginState(cfg)
    config.stash[STATE] = state
    config.pluginmanager.register(_OutcomeRecorder(state), "ttenv-outcomes")
    register_testinfra()  # testinfra.get_host("ttenv://<vm>"), if pytest-testinfra is installed
    if not cfg.os:
        return
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # an xdist worker: the controller created the ENV
        if "ttenv" in workerinput:
            state.session = EnvSession.attach(cfg, workerinput["ttenv"])
            state.vms = [MatrixVm.from_image(vm.name) for vm in state.session.env.vms]
        return
    if cfg.dist == "vm" and getattr(config.option, "dist", "no") != "no":
        config.option.dist = "loadgroup"
    if config.option.collectonly or config.option.help:
        return
    config.hook.pytest_ttenv_register_backends(register=register_backend)
    _install_guards(config)  # before the first VM starts: a SIGTERM during boot cleans up too
    try:
        say = _progress(config)
        backend = get_backend(cfg.backend, image_dir=cfg.image_dir, token=cfg.token, progress=say,
                              engine=cfg.engine, libvirt_uris=cfg.libvirt_uri)  # fmt: skip
        state.vms = _matrix(config, cfg, backend)
        state.session = EnvSession.create(cfg, state.vms, backend, warn=say)
    except TTError as exc:
        raise pytest.UsageError(f"ttenv: {exc}") from None


def _matrix(config: pytest.Config, cfg: TTConfig, backend: Backend) -> list[MatrixVm]:
    """The session's VMs from the backend's images; on the local backend, Debian images asked
    for but missing are built first (progress shown)."""
    if isinstance(backend, LocalBackend):
        _obtain_missing(config, cfg, backend)
    vms = session_vms(cfg.os, cfg.arch, [image.name for image in backend.images()])
    changed = config.hook.pytest_ttenv_modify_matrix(config=config, vms=vms)
    return list(changed) if changed is not None else vms


def _obtain_missing(config: pytest.Config, cfg: TTConfig, backend: LocalBackend) -> None:
    """Pull (or build, for Debian) the images the prefixes ask for that the store lacks."""
    say = _progress(config)
    arches = list(cfg.arch) or [os.uname().machine]
    store = backend.image_store
    can_build = set(buildable(arches))
    missing = missing_images(cfg.os, store.names(), arches, [*buildable(arches), *pullable_names(arches)])
    for name in missing:
        if cfg.image_source == "build" and name in can_build:
            ensure_images(store, [name], progress=say)
            continue
        try:
            ensure_available(store, [name], progress=say)
        except TTError as exc:
            if name not in can_build:
                raise
            say(f"pulling {name} failed ({exc}); building it instead")
            ensure_images(store, [name], progress=say)


def _install_guards(config: pytest.Config) -> None:
    """The first SIGINT/SIGTERM interrupts the session (pytest then tears the ENV down); later
    ones only say that cleanup is under way, so a second Ctrl-C cannot cut it short. (A SIGKILL
    still takes the VMs along: qemu dies with its parent.) atexit deletes a leftover ENV."""

    def again(signum: int, frame: object) -> None:
        os.write(2, b"ttenv: cleaning up the VMs, this takes a few seconds\n")

    def first(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, again)
        signal.signal(signal.SIGTERM, again)
        raise KeyboardInterrupt(f"signal {signum}")

    state = config.stash[STATE]
    for sig, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
        if signal.getsignal(sig) in (default, None):
            state.restore_signals[sig] = signal.signal(sig, first)
    atexit.register(_teardown, config, None)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: hand the ENV to each worker."""
    state = node.config.stash[STATE]
    if state.session is not None:
        node.workerinput["ttenv"] = state.session.to_workerinput()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not any(f in metafunc.fixturenames for f in VM_FIXTURES):
        return
    state = metafunc.config.stash[STATE]
    if state.session is None:
        metafunc.parametrize("_tt_vm_name", [pytest.param(None, marks=pytest.mark.skip(reason=state.skip_reason))],
                             ids=["no-vm"])  # fmt: skip
        return
    os_f = [a for m in metafunc.definition.iter_markers("tt_os") for a in m.args]
    arch_f = [a for m in metafunc.definition.iter_markers("tt_arch") for a in m.args]
    try:
        chosen = select(state.vms, os_f, arch_f)
    except TTError as exc:
        raise pytest.UsageError(f"ttenv: {metafunc.definition.nodeid}: {exc}") from None
    if not chosen:
        reason = f"tt_os{tuple(os_f)}/tt_arch{tuple(arch_f)} leave no VM of this session's matrix"
        metafunc.parametrize("_tt_vm_name", [pytest.param(None, marks=pytest.mark.skip(reason=reason))],
                             ids=["no-vm"])  # fmt: skip
        return
    metafunc.parametrize("_tt_vm_name", [vm.name for vm in chosen], ids=[vm.name for vm in chosen])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = config.stash[STATE]
    if state.session is None:
        return
    state.session.snapshots = any("tt_vm_fresh" in getattr(i, "fixturenames", ()) for i in items)
    for item in items:
        name = getattr(item, "callspec", None) and item.callspec.params.get("_tt_vm_name")  # type: ignore[attr-defined]
        if not name:
            continue
        # JUnit properties from the start: a test skipped before its fixtures run carries them too
        item.user_properties.extend(p for p in vm_properties(name) if p not in item.user_properties)
        if state.cfg.dist == "vm":
            item.add_marker(pytest.mark.xdist_group(name=name))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    state = item.config.stash[STATE]
    callspec = getattr(item, "callspec", None)
    name = callspec.params.get("_tt_vm_name") if callspec else None
    if not report.failed or state.session is None or not name:
        return
    vm = state.session.vms.get(name)
    if vm is None:
        return
    if vm.last_command:
        report.sections.append((f"ttenv last command on {name}", vm.last_command))
    console = vm.console or state.session.console(name, 50)
    report.sections.append((f"ttenv console of {name} (last 50 lines)", console or "(empty)"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(STATE, None)
    if state is None or state.session is None:
        return
    if state.cfg.matrix_report and state.session.controller:
        write_matrix(state.cfg.matrix_report, state.outcomes, [vm.name for vm in state.vms])
    _teardown(session.config, exitstatus)


def _teardown(config: pytest.Config, exitstatus: int | None) -> None:
    state = config.stash.get(STATE, None)
    if state is None or state.session is None:
        return
    session, state.session = state.session, None
    keep: list[str] = []
    if state.cfg.keep == "always":
        keep = list(session.vms)
    elif state.cfg.keep == "failed":
        keep = sorted({vm for (_, vm), o in state.outcomes.items() if o in ("failed", "error")})
    line = session.teardown(keep)
    for sig, handler in state.restore_signals.items():
        signal.signal(sig, handler)
    if line:
        state.notes.append(line)
        if exitstatus is None:  # atexit: the terminal reporter is gone
            print(line)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is None or getattr(config, "workerinput", None) is not None:
        return
    if state.outcomes:
        terminalreporter.section("ttenv matrix")
        for line in summary_lines(state.outcomes, [vm.name for vm in state.vms]):
            terminalreporter.write_line(line)
    for note in state.notes:
        terminalreporter.write_line(note)
