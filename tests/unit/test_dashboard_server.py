"""The dashboard's server side without VMs: sessions and their cookie, CSRF, who sees which ENV,
the security headers, the SSE streams (ENVs, a console followed through rotation, events) and the
event log. The app is the real one (``create_app``) under uvicorn in a thread on 127.0.0.1, with
a real Service on a temporary state dir; its ENVs are rows put into the backend's store with
stopped VMs (no engine is asked about them), and a console is a file the test writes where qemu
would. The pages render the package's templates (or minimal stand-ins while those do not exist).

In a real browser with real VMs: tests/vm/test_dashboard.py.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn

from pytest_ttenv.backend.engines.console import cap_log
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, Resources, VmInfo, VmSpec
from pytest_ttenv.server import dashboard
from pytest_ttenv.server.app import create_app
from pytest_ttenv.server.auth import TokenStore
from pytest_ttenv.server.dashboard_streams import LINE_MAX, READ_MAX, LogFollower, TailDiff
from pytest_ttenv.server.events import EventLog
from pytest_ttenv.server.quota import Amounts
from pytest_ttenv.server.service import ServerConfig, Service
from pytest_ttenv.server.sessions import Sessions, TokenCheck

from helpers.server import free_port

PAGES = ("login", "host", "envs", "env", "vm", "events", "error")


def stand_in_templates(root: Path) -> Path:
    """Minimal templates (only while the package's own are not there): each shows its context."""
    root.mkdir(exist_ok=True)
    for name in PAGES:
        (root / f"{name}.html").write_text(
            "<!doctype html><title>{{ page }}</title><main><h1>{{ page }}</h1>"
            "{% if error %}<p>{{ error }}</p>{% endif %}"
            "{% for e in envs or [] %}<tr class=env data-env='{{ e.name }}'></tr>{% endfor %}"
            "{% if env %}<p id=env>{{ env.name }}</p>{% endif %}{% if login %}<code>{{ login }}</code>{% endif %}"
            "<form id=logout><input name=csrf value='{{ csrf }}'></form></main>"
        )
    return root


@dataclass
class Dash:
    url: str
    service: Service
    tokens: dict[str, str]

    def login(self, owner: str) -> requests.Session:
        s = requests.Session()
        r = s.post(f"{self.url}/login", data={"token": self.tokens[owner]}, allow_redirects=False, timeout=10)
        assert r.status_code == 303, r.text
        return s

    def csrf(self, s: requests.Session) -> str:
        page = s.get(f"{self.url}/envs", timeout=10).text
        found = re.search(r'name="?csrf"? value="?([A-Za-z0-9_-]+)', page)
        assert found, page
        return found.group(1)


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dash]:
    tmp = tmp_path_factory.mktemp("dash")
    (tmp / "images").mkdir()
    cfg = ServerConfig(state_dir=tmp / "state", image_dir=tmp / "images", totals=Amounts(1000, 10**6, 10**7))
    service = Service(cfg)
    tokens = {name: service.tokens.add(name) for name in ("alice", "bob")}
    tokens["root"] = service.tokens.add("root", admin=True)
    real = (dashboard.TEMPLATES / "login.html").exists()
    templates = None if real else stand_in_templates(tmp / "templates")
    server: Any = None
    app = create_app(service, stopping=lambda: bool(server and server.should_exit), templates=templates)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield Dash(f"http://127.0.0.1:{port}", service, tokens)
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def put_env(service: Service, owner: str, name: str, vms: tuple[str, ...] = ("a", "b")) -> EnvInfo:
    """An ENV of ``owner`` in the store, its VMs stopped (no engine is asked about them)."""
    env_id = secrets.token_hex(6)
    rundir = service.cfg.state_dir / "envs" / env_id
    rundir.mkdir(parents=True)
    now = time.time()
    env = EnvInfo(env_id, f"{owner}:{name}", owner, now, now + 600, "running", rundir=str(rundir))
    service.backend.store.add_env(env, None, None)
    for i, vm in enumerate(vms):
        info = VmInfo(vm, "debian-12-x86_64", "debian", "12", "x86_64", state="stopped", boot="cold", accel="tcg")
        service.backend.store.reserve_port(env_id, info, iter([40000 + i + int(env_id[:3], 16)]))
        (rundir / vm).mkdir()
    return env


class Sse:
    """Reads an SSE response: ``take(n)`` gives the next ``n`` (event, data), skipping comments
    (one line iterator for the response: a new one would close its connection)."""

    def __init__(self, r: requests.Response) -> None:
        self.lines = r.iter_lines(chunk_size=1, decode_unicode=True)

    def take(self, count: int, timeout: float = 5.0) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        event = ""
        deadline = time.monotonic() + timeout
        for raw in self.lines:
            assert time.monotonic() < deadline, out
            if raw.startswith("event: "):
                event = raw[7:]
            elif raw.startswith("data: "):
                out.append((event, json.loads(raw[6:])))
                if len(out) >= count:
                    break
        return out


# -- login, sessions, CSRF ---------------------------------------------------------------------------
def test_login_sets_a_strict_httponly_cookie_and_a_bad_token_is_401(dash: Dash) -> None:
    r = requests.get(f"{dash.url}/login", timeout=10)
    assert r.status_code == 200 and "<h1" in r.text
    bad = "x" * 43
    r = requests.post(f"{dash.url}/login", data={"token": bad}, allow_redirects=False, timeout=10)
    assert r.status_code == 401 and "token rejected by the server" in r.text and bad not in r.text
    assert "set-cookie" not in r.headers
    token = dash.tokens["alice"]
    r = requests.post(f"{dash.url}/login", data={"token": token}, allow_redirects=False, timeout=10)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("ttenv_session=") and len(cookie.split(";")[0]) > 40
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "samesite=strict", "path=/"} <= flags and "secure" not in flags  # Secure under TLS only
    assert token not in r.headers["location"] and token not in cookie
    page = requests.get(f"{dash.url}/", cookies=r.cookies, timeout=10)
    assert page.status_code == 200 and token not in page.text and "alice" in page.text
    other = requests.post(
        f"{dash.url}/login", data={"token": token}, headers={"Origin": "http://evil.example"}, timeout=10
    )
    assert other.status_code == 403 and "set-cookie" not in other.headers


def test_pages_need_a_session_and_streams_answer_401(dash: Dash) -> None:
    for path in ("/", "/envs", "/envs/x", "/envs/x/vms/y", "/events"):
        r = requests.get(f"{dash.url}{path}", allow_redirects=False, timeout=10)
        assert r.status_code == 303 and r.headers["location"] == "/login", path
        r = requests.get(f"{dash.url}{path}", cookies={"ttenv_session": "forged"}, allow_redirects=False, timeout=10)
        assert r.status_code == 303, path
    for path in ("/ui/stream/envs", "/ui/stream/events", "/ui/stream/envs/x/vms/y/console"):
        r = requests.get(f"{dash.url}{path}", timeout=10)
        assert r.status_code == 401 and r.json()["error"] == "auth", path
    for path in ("/logout", "/envs/x/renew", "/envs/x/delete"):
        r = requests.post(f"{dash.url}{path}", data={"csrf": "x"}, allow_redirects=False, timeout=10)
        assert r.status_code == 303 and r.headers["location"] == "/login", path


def test_forms_need_the_csrf_token(dash: Dash) -> None:
    env = put_env(dash.service, "alice", "csrf1")
    s = dash.login("alice")
    for data in ({"ttl": "2h"}, {"ttl": "2h", "csrf": ""}, {"ttl": "2h", "csrf": "x" * 43}):
        r = s.post(f"{dash.url}/envs/csrf1/renew", data=data, allow_redirects=False, timeout=10)
        assert r.status_code == 403 and "CSRF" in r.text
    r = s.post(f"{dash.url}/envs/csrf1/delete", data={"confirm": "yes"}, allow_redirects=False, timeout=10)
    assert r.status_code == 403
    assert dash.service.backend.store.get_env(env.id).expires == env.expires  # nothing done
    csrf = dash.csrf(s)
    r = s.post(f"{dash.url}/envs/csrf1/renew", data={"ttl": "2h", "csrf": csrf}, allow_redirects=False, timeout=10)
    assert r.status_code == 303 and r.headers["location"] == "/envs"
    expires = dash.service.backend.store.get_env(env.id).expires
    assert expires is not None and abs(expires - time.time() - 7200) < 60
    r = s.post(f"{dash.url}/envs/csrf1/renew", data={"ttl": "soon", "csrf": csrf}, allow_redirects=False, timeout=10)
    assert r.status_code == 400
    r = s.post(f"{dash.url}/envs/csrf1/delete", data={"csrf": csrf}, allow_redirects=False, timeout=10)
    assert r.status_code == 400  # no confirm=yes
    renewed = [e for e in dash.service.events.visible("alice", False) if e.env == "csrf1"]
    assert [e.kind for e in renewed] == ["renewed"] and "by alice" in renewed[0].detail


def test_logout_ends_the_session(dash: Dash) -> None:
    s = dash.login("bob")
    old = s.cookies.get("ttenv_session")
    r = s.post(f"{dash.url}/logout", data={}, allow_redirects=False, timeout=10)
    assert r.status_code == 403
    r = s.post(f"{dash.url}/logout", data={"csrf": dash.csrf(s)}, allow_redirects=False, timeout=10)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert "ttenv_session=" in r.headers["set-cookie"] and "max-age=0" in r.headers["set-cookie"].lower()
    r = requests.get(f"{dash.url}/envs", cookies={"ttenv_session": old or ""}, allow_redirects=False, timeout=10)
    assert r.status_code == 303 and r.headers["location"] == "/login"


def test_sessions_expire_when_idle_drop_the_oldest_and_end_with_their_token(tmp_path: Path) -> None:
    import anyio

    tokens = TokenStore(tmp_path)
    token, other = tokens.add("carol"), tokens.add("dave")
    now = [0.0]
    sessions = Sessions(TokenCheck(tokens), idle=100, limit=2, clock=lambda: now[0])

    async def run() -> None:
        a = await sessions.login(token)
        assert await sessions.get(a.id) is a and a.owner == "carol" and not a.admin
        now[0] = 99
        assert await sessions.get(a.id) is a  # touched at 99
        now[0] = 150
        assert await sessions.get(a.id, touch=False) is a
        now[0] = 250
        assert await sessions.get(a.id) is None  # idle over 100 s
        b, c, d = [await sessions.login(t) for t in (token, other, token)]
        assert len(sessions) == 2 and await sessions.get(b.id) is None and await sessions.get(c.id) is c
        assert a.csrf_ok(a.csrf) and not a.csrf_ok(None) and not a.csrf_ok(a.csrf + "x")
        tokens.remove("carol")
        assert await sessions.get(d.id) is None and await sessions.get(c.id) is c

    anyio.run(run)


# -- who sees what ------------------------------------------------------------------------------------
def test_an_owner_sees_theirs_another_gets_404_an_admin_sees_all(dash: Dash) -> None:
    mine = put_env(dash.service, "alice", "seen1")
    theirs = put_env(dash.service, "bob", "seen2")
    alice, bob, root = dash.login("alice"), dash.login("bob"), dash.login("root")
    page = alice.get(f"{dash.url}/envs", timeout=10).text
    assert "seen1" in page and "seen2" not in page
    for ref in ("seen2", theirs.id):
        for path in (f"/envs/{ref}", f"/envs/{ref}/vms/a"):
            r = alice.get(f"{dash.url}{path}", timeout=10)
            assert r.status_code == 404 and "bob" not in r.text, path  # as if it did not exist
    r = bob.post(
        f"{dash.url}/envs/{mine.id}/delete", data={"csrf": dash.csrf(bob), "confirm": "yes"}, allow_redirects=False
    )
    assert r.status_code == 404 and dash.service.backend.store.get_env(mine.id).owner == "alice"
    r = alice.get(f"{dash.url}/envs/seen1/vms/a", timeout=10)
    assert r.status_code == 200 and "ssh -p " in r.text
    assert alice.get(f"{dash.url}/envs/seen1/vms/zz", timeout=10).status_code == 404
    page = root.get(f"{dash.url}/envs", timeout=10).text
    assert "seen1" in page and "seen2" in page
    for ref in ("seen2", theirs.id):
        assert root.get(f"{dash.url}/envs/{ref}", timeout=10).status_code == 200
    host = root.get(f"{dash.url}/", timeout=10)
    assert host.status_code == 200 and "bob" in host.text
    owners = {o["owner"]: o for o in dash.service.owners(dash.service.tokens.grant_of("root"))}
    assert set(owners) >= {"alice", "bob", "root"} and owners["root"]["envs"] == 0  # every token's owner
    assert isinstance(owners["bob"]["vms"], int) and owners["bob"]["vms"] >= 2
    assert [o["owner"] for o in dash.service.owners(dash.service.tokens.grant_of("alice"))] == ["alice"]


def test_security_headers_and_the_api_never_takes_the_cookie(dash: Dash) -> None:
    s = dash.login("alice")
    for path in ("/login", "/", "/envs", "/nothing-here", "/static/dashboard.css"):
        r = s.get(f"{dash.url}{path}", timeout=10)
        assert r.headers["content-security-policy"] == dashboard.CSP, path
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
    assert "script-src 'self';" in dashboard.CSP and "unsafe-inline" not in dashboard.CSP
    for path in ("/v1/envs", "/v1/status"):
        r = s.get(f"{dash.url}{path}", timeout=10)
        assert r.status_code == 401 and r.json()["error"] == "auth", path
    auth = {"Authorization": f"Bearer {dash.tokens['alice']}"}
    assert requests.get(f"{dash.url}/v1/envs", headers=auth, timeout=10).status_code == 200
    assert requests.get(f"{dash.url}/v1/openapi.json", timeout=10).status_code == 200
    assert requests.get(f"{dash.url}/v1/docs", headers=auth, timeout=10).status_code == 404  # no Swagger page


# -- streams ------------------------------------------------------------------------------------------
ENV_KEYS = {"id", "name", "owner", "state", "created", "expires", "vms", "captures"}
VM_KEYS = {"name", "os", "version", "arch", "state", "boot", "engine", "host", "address", "port", "accel"}
VM_KEYS |= {"cpu", "mem_mib", "error"}


def test_the_env_stream_sends_the_list_and_its_changes(dash: Dash) -> None:
    s = dash.login("bob")
    before = {e.name for e in dash.service.list("bob")}
    with s.get(f"{dash.url}/ui/stream/envs", stream=True, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-store"
        sse = Sse(r)
        [(kind, envs)] = sse.take(1)
        assert kind == "envs" and {e["name"] for e in envs} == before
        env = put_env(dash.service, "bob", "live1")
        captures = dash.service.cfg.state_dir / "captures" / env.id
        captures.mkdir(parents=True)
        (captures / "test_x-a.ttcap").write_bytes(b"x" * 1234)
        (captures / "notes.txt").write_text("not a capture")
        start = time.monotonic()
        [(kind, envs)] = sse.take(1)
        assert kind == "envs" and time.monotonic() - start < 2
        [shown] = [e for e in envs if e["name"] == "live1"]
        assert set(shown) == ENV_KEYS and shown["owner"] == "bob" and shown["id"] == env.id
        assert [set(vm) for vm in shown["vms"]] == [VM_KEYS, VM_KEYS]
        assert shown["captures"] == [{"name": "test_x-a.ttcap", "size": 1234}]


def test_the_console_stream_sends_lines_as_json_text(dash: Dash) -> None:
    env = put_env(dash.service, "alice", "cons1", vms=("a",))
    log = Path(env.rundir) / "a" / "console.log"
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(300)) + b"\x1b[31mred\x1b[0m\r\n")
    s = dash.login("alice")
    url = f"{dash.url}/ui/stream/envs/cons1/vms/a/console"
    assert dash.login("bob").get(url, timeout=10).status_code == 404
    with s.get(url, stream=True, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        sse = Sse(r)
        first = sse.take(200)
        assert {kind for kind, _ in first} == {"line"}
        assert [d["text"] for _, d in first][-2:] == ["line 299", "red"] and first[0][1]["text"] == "line 101"
        with open(log, "ab") as f:
            f.write(b"<script>alert(1)</script>\n" + b"y" * 5000 + b"\n")
        start = time.monotonic()
        [(_, script), (_, long)] = sse.take(2)
        assert script == {"text": "<script>alert(1)</script>"} and time.monotonic() - start < 1.5
        assert long["text"] == "y" * LINE_MAX


def test_the_event_log_and_its_stream(dash: Dash, monkeypatch: pytest.MonkeyPatch) -> None:
    service = dash.service
    image = ImageInfo(name="img", os="debian", version="12", arch="x86_64", disk="d.qcow2", disk_mib=100)
    monkeypatch.setattr(service.backend.image_store, "get", lambda name: image)
    made: list[EnvInfo] = []

    def create_env(spec: EnvSpec) -> EnvInfo:
        made.append(put_env(service, spec.owner, spec.name, tuple(vm.name for vm in spec.vms)))
        return service.find(spec.owner, spec.name)

    monkeypatch.setattr(service.backend, "create_env", create_env)
    s = dash.login("alice")
    with s.get(f"{dash.url}/ui/stream/events", stream=True, timeout=10) as r:
        sse = Sse(r)
        shown = sse.take(len(service.events.visible("alice", False, last=100))) if service.events.latest() else []
        assert all(kind == "event" and d["owner"] == "alice" for kind, d in shown)
        spec = EnvSpec("ev1", (VmSpec("a", "img", Resources(1, 128)),), "ssh-ed25519 AAAA", ttl=60)
        service.create("bob", EnvSpec("ev2", spec.vms, spec.client_pubkey, ttl=60))  # not alice's to see
        service.create("alice", spec)
        [(kind, event)] = sse.take(1)
        assert kind == "event" and event["kind"] == "created" and event["env"] == "ev1" and event["owner"] == "alice"
        assert (
            set(event) == {"id", "time", "kind", "env", "owner", "detail"} and "a (debian-12-x86_64)" in event["detail"]
        )
        csrf = dash.csrf(s)
        r2 = s.post(f"{dash.url}/envs/ev1/delete", data={"csrf": csrf, "confirm": "yes"}, allow_redirects=False)
        assert r2.status_code == 303 and r2.headers["location"] == "/envs"
        [(_, event)] = sse.take(1)
        assert event["kind"] == "deleted" and event["env"] == "ev1" and event["detail"] == "by alice"
    assert "ev1" not in {e.name for e in service.list("alice")} and not Path(made[1].rundir).exists()
    page = s.get(f"{dash.url}/events", timeout=10).text
    assert "ev1" in page and "ev2" not in page
    root = dash.login("root")
    r3 = root.post(f"{dash.url}/envs/{made[0].id}/delete", data={"csrf": dash.csrf(root), "confirm": "yes"})
    assert r3.status_code == 200 and "ev2" not in {e.name for e in service.list("bob")}
    kinds = [(e.kind, e.env, e.detail) for e in service.events.visible("root", True) if e.env == "ev2"]
    assert kinds[0][0] == "created" and kinds[-1] == ("deleted", "ev2", "by root")


def test_streams_per_session_are_bounded(dash: Dash) -> None:
    s = dash.login("bob")
    opened = [s.get(f"{dash.url}/ui/stream/events", stream=True, timeout=10) for _ in range(8)]
    try:
        time.sleep(0.3)  # each counts once its stream runs
        r = s.get(f"{dash.url}/ui/stream/envs", timeout=10)
        assert r.status_code == 429 and r.headers["retry-after"]
        assert dash.login("bob").get(f"{dash.url}/envs", timeout=10).status_code == 200  # another session is not
    finally:
        for r in opened:
            r.close()


# -- the pieces -------------------------------------------------------------------------------------
def test_the_log_follower_follows_a_capped_log_skips_ahead_and_flushes_a_prompt(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    now = [0.0]
    follower = LogFollower(log, clock=lambda: now[0])
    assert follower.start() == [] and follower.poll() == []
    log.write_bytes(b"boot\nlogin: ")
    assert follower.poll() == ["boot"]
    now[0] = 2.0
    assert follower.poll() == ["login: "]  # a prompt without newline, once it sat a second
    with open(log, "ab") as f:
        f.write(b"root\n" + b"z" * (2 * 2**20) + b"\n")
    assert cap_log(log, limit=2**20, keep=1024)  # truncated in place, as the engine rotates it
    with open(log, "ab") as f:
        f.write(b"after\n")
    assert follower.poll() == ["after"]
    with open(log, "ab") as f:
        f.write(b"\n".join(b"%06d" % i for i in range(100000)) + b"\n")
    lines = follower.poll()
    assert lines[0].startswith("[ttenv: ") and "skipped" in lines[0] and lines[-1] == "099999"
    assert sum(len(line) + 1 for line in lines[1:]) <= READ_MAX
    os.unlink(log)
    log.write_text("new file\n")
    assert follower.poll() == ["new file"]


def test_tail_diff_sends_only_new_lines() -> None:
    text = ["a\nb\nc"]
    diff = TailDiff(lambda n: text[0])
    assert diff.start() == ["a", "b", "c"] and diff.poll() == []
    text[0] = "b\nc\nd\ne"
    assert diff.poll() == ["d", "e"]


def test_the_event_log_is_bounded_and_wakes_waiters() -> None:
    import anyio

    log = EventLog(size=3)
    for i in range(5):
        log.record("created", f"e{i}", "alice" if i % 2 else "bob")
    assert [e.env for e in log.visible("x", True)] == ["e2", "e3", "e4"] and log.latest() == 5
    assert [e.env for e in log.visible("alice", False)] == ["e3"]
    with pytest.raises(ValueError):
        log.record("exploded", "e", "o")

    async def run() -> None:
        assert not await log.wait(5, 0.05)
        threading.Timer(0.1, lambda: log.record("ready", "e5", "bob")).start()
        start = time.monotonic()
        assert await log.wait(5, 5) and time.monotonic() - start < 2

    anyio.run(run)
    assert not log._waiters
