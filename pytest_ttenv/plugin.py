"""pytest hooks of pytest-ttenv: options, matrix parametrization, ENV lifecycle, xdist hand-off,
failure sections, JUnit properties, the matrix summary. Logic lives in the modules it calls.

Loaded in every pytest run of an environment that has the package installed, so it costs nothing
where no test needs a VM: the matrix (the test ids) comes from reading the image store and the
catalog at configure time; images are obtained and the ENV is created only after collection,
when a selected test needs a VM. The command channel (asyncssh), the backends and the image
builder and puller are imported then, not here.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_ttenv import hookspecs
from pytest_ttenv.backend import register_backend, uses_local_images
from pytest_ttenv.config import SETTINGS, TTConfig, open_backend, raw_values, resolve
from pytest_ttenv.errors import TTError
from pytest_ttenv.fixtures import tt_env, tt_vm, tt_vm_fresh
from pytest_ttenv.fixtures.capture import CaptureHook
from pytest_ttenv.fixtures.hosts import register_testinfra
from pytest_ttenv.matrix import MatrixVm, select, session_vms
from pytest_ttenv.report import outcome_of, summary_lines, test_key, vm_properties, write_matrix
from pytest_ttenv.state import STATE, Handoff, PluginState

if TYPE_CHECKING:
    from pytest_ttenv.backend.images.store import ImageStore

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
        group.addoption(
            s.flag,
            dest=s.dest,
            default=None,
            metavar=s.metavar,
            help=f"{s.help} (ini {s.dest}, env {s.env}; default {s.default or 'unset'})",
        )
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
    if cfg.capture != "none":
        config.pluginmanager.register(CaptureHook(config, state), "ttenv-capture")
    if not cfg.os or config.option.help:
        return
    register_testinfra()  # testinfra.get_host("ttenv://<vm>"), if pytest-testinfra is installed
    config.hook.pytest_ttenv_register_backends(register=register_backend)  # workers too: they attach
    workerinput = getattr(config, "workerinput", None)
    for note in cfg.notes if workerinput is None else ():  # a token in argv or the ini file: said once
        _progress(config)(note)
    if workerinput is not None:  # an xdist worker: the controller's matrix; its ENV comes later
        if "ttenv" in workerinput:
            state.vms = [MatrixVm.from_image(name) for name in workerinput["ttenv"]["matrix"]]
            state.handoff = Handoff(Path(workerinput["ttenv"]["handoff"]))
            state.planned = True
            config.pluginmanager.register(_WorkerCollection(state, workerinput["workerid"]), "ttenv-worker")
        return
    if cfg.dist == "vm" and getattr(config.option, "dist", "no") != "no":
        config.option.dist = "loadgroup"
    try:
        state.vms = _matrix(config, state)
    except TTError as exc:
        raise pytest.UsageError(f"ttenv: {exc}") from None
    state.planned = True
    state.handoff = Handoff.new()  # used only under xdist, and created only if a worker needs a VM


def _matrix(config: pytest.Config, state: PluginState) -> list[MatrixVm]:
    """The session's VMs (the ids of the VM tests), with no image obtained and no VM started.

    A backend that boots from this host's image store (``uses_local_images``): the store's
    images plus those a prefix asks for that the store lacks and that would be pulled or built
    after collection (``acquire.plan``: it reads only the store and the catalog). Any other
    backend: its images (one request); the backend is kept for the ENV."""
    cfg = state.cfg
    if uses_local_images(cfg.backend):
        from pytest_ttenv.backend.images.acquire import plan

        names = plan(_image_store(cfg), cfg.os, _arches(cfg))
    else:
        state.backend = open_backend(cfg, _progress(config))
        names = [image.name for image in state.backend.images()]
    vms = session_vms(cfg.os, cfg.arch, names)
    changed = config.hook.pytest_ttenv_modify_matrix(config=config, vms=vms)
    return list(changed) if changed is not None else vms


def _image_store(cfg: TTConfig) -> ImageStore:
    """This host's image store (``--tt-image-dir``), which a local backend boots from."""
    from pytest_ttenv.backend.images.store import ImageStore
    from pytest_ttenv.core.paths import image_dir

    return ImageStore(image_dir(cfg.image_dir))


def _arches(cfg: TTConfig) -> list[str]:
    return list(cfg.arch) or [os.uname().machine]


def _needed(state: PluginState, items: Sequence[pytest.Item]) -> list[MatrixVm]:
    """The VMs of the matrix that the selected tests use (a test marked skip uses none)."""
    names: set[str] = set()
    for item in items:
        if item.get_closest_marker("skip") is not None:
            continue
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("_tt_vm_name") if callspec else None
        if name:
            names.add(name)
        if "tt_env" in getattr(item, "fixturenames", ()):
            os_f = [a for m in item.iter_markers("tt_os") for a in m.args]
            arch_f = [a for m in item.iter_markers("tt_arch") for a in m.args]
            try:
                names.update(vm.name for vm in select(state.vms, os_f, arch_f))
            except TTError:
                continue  # the fixture fails that test with the same error
    return [vm for vm in state.vms if vm.name in names]


def pytest_collection_finish(session: pytest.Session) -> None:
    """The only process (no xdist): create the ENV if a selected test needs a VM. Runs after
    every ``pytest_collection_modifyitems`` (-k, -m and plugins' deselection)."""
    config = session.config
    state = config.stash[STATE]
    if not state.planned or config.option.collectonly or hasattr(config, "workerinput"):
        return
    state.snapshots = any("tt_vm_fresh" in getattr(i, "fixturenames", ()) for i in session.items)
    vms = _needed(state, session.items)
    if vms:
        _start_env(config, vms)


class _WorkerCollection:
    """xdist worker: write which VMs its selected tests need for the controller, before xdist
    reports the collection (so ``tryfirst``); the controller creates the ENV when it hears of it."""

    def __init__(self, state: PluginState, worker: str) -> None:
        self.state, self.worker = state, worker

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        state = self.state
        state.snapshots = any("tt_vm_fresh" in getattr(i, "fixturenames", ()) for i in session.items)
        vms = _needed(state, session.items)
        if vms and state.handoff is not None:
            state.handoff.write_needs(self.worker, [vm.name for vm in vms])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: Sequence[str]) -> None:
    """xdist controller: the first worker that finished collecting says which VMs its selected
    tests need (all workers collect the same); create that ENV and hand it over. No test is
    scheduled before this returns: xdist schedules once every worker's collection is in."""
    state = node.config.stash[STATE]
    handoff = state.handoff
    if not state.planned or handoff is None or state.handed_off:
        return
    state.handed_off = True
    wanted = set(handoff.needs(node.workerinput["workerid"]))
    vms = [vm for vm in state.vms if vm.name in wanted]
    if not vms:
        return
    try:
        _start_env(node.config, vms)
    except pytest.UsageError as exc:
        handoff.fail(str(exc))
        raise
    assert state.session is not None
    handoff.publish(state.session.to_workerinput())


def _start_env(config: pytest.Config, vms: list[MatrixVm]) -> None:
    """Obtain the images of ``vms`` that this host's store lacks (for a backend that boots from
    it), then create the ENV (VMs start booting); errors are one line. The leak guards go in
    first: a SIGTERM during a build or boot cleans up too."""
    from pytest_ttenv.session import EnvSession

    state = config.stash[STATE]
    if state.session is not None:
        return
    cfg = state.cfg
    _install_guards(config)
    try:
        say = _progress(config)
        backend = state.backend if state.backend is not None else open_backend(cfg, say)
        if uses_local_images(cfg.backend):
            from pytest_ttenv.backend.images.acquire import obtain

            obtain(_image_store(cfg), [vm.name for vm in vms], cfg.image_source, progress=say)
        state.session = EnvSession.create(cfg, [vm.name for vm in vms], backend, warn=say)
        state.session.snapshots = state.snapshots
    except TTError as exc:
        raise pytest.UsageError(f"ttenv: {exc}") from None


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
    """xdist controller: give each worker the matrix (so all parametrize alike) and the hand-off
    dir where it says what it needs and later finds the ENV."""
    state = node.config.stash[STATE]
    if state.planned and state.handoff is not None:
        node.workerinput["ttenv"] = {"matrix": [vm.name for vm in state.vms], "handoff": str(state.handoff.path)}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not any(f in metafunc.fixturenames for f in VM_FIXTURES):
        return
    state = metafunc.config.stash[STATE]
    if not state.planned:
        metafunc.parametrize(
            "_tt_vm_name", [pytest.param(None, marks=pytest.mark.skip(reason=state.skip_reason))], ids=["no-vm"]
        )
        return
    os_f = [a for m in metafunc.definition.iter_markers("tt_os") for a in m.args]
    arch_f = [a for m in metafunc.definition.iter_markers("tt_arch") for a in m.args]
    try:
        chosen = select(state.vms, os_f, arch_f)
    except TTError as exc:
        raise pytest.UsageError(f"ttenv: {metafunc.definition.nodeid}: {exc}") from None
    if not chosen:
        reason = f"tt_os{tuple(os_f)}/tt_arch{tuple(arch_f)} leave no VM of this session's matrix"
        metafunc.parametrize("_tt_vm_name", [pytest.param(None, marks=pytest.mark.skip(reason=reason))], ids=["no-vm"])
        return
    metafunc.parametrize("_tt_vm_name", [vm.name for vm in chosen], ids=[vm.name for vm in chosen])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = config.stash[STATE]
    if not state.planned:
        return
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
    report.sections.extend(state.session.failure_sections(name))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(STATE, None)
    if state is None or not state.planned:
        return
    if state.cfg.matrix_report and not hasattr(session.config, "workerinput"):
        write_matrix(state.cfg.matrix_report, state.outcomes, [vm.name for vm in state.vms])
    _teardown(session.config, exitstatus)


def _teardown(config: pytest.Config, exitstatus: int | None) -> None:
    """Delete (or keep) the ENV, if there is one, and the xdist hand-off dir; put the signal
    handlers back. Runs at session finish, and at exit after a session that did not get there."""
    state = config.stash.get(STATE, None)
    if state is None:
        return
    if state.handoff is not None and not hasattr(config, "workerinput"):
        state.handoff.remove()
    session, state.session = state.session, None
    line = ""
    if session is not None:
        keep: list[str] = []
        if state.cfg.keep == "always":
            keep = list(session.vms)
        elif state.cfg.keep == "failed":
            keep = sorted({vm for (_, vm), o in state.outcomes.items() if o in ("failed", "error")})
        line = session.teardown(keep)
    for sig, handler in state.restore_signals.items():
        signal.signal(sig, handler)
    state.restore_signals.clear()
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
