"""The dashboard's templates and static assets, without a server or a browser: every page renders
with a context of the contract's shape (docs: .notes of issue 20, tests/vm for the browser side),
hostile text renders escaped, the pages hold every DOM hook the browser tests use, and nothing in
them needs a CSP exception (no inline script or style, no event-handler attribute) or the network
(no external URL); the script never turns text into HTML."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jinja2
import pytest

SERVER = Path(__file__).resolve().parents[2] / "pytest_ttenv" / "server"
TEMPLATES = SERVER / "templates"
STATIC = SERVER / "static"
PAGES = ("login", "host", "envs", "env", "vm", "events", "error")
EVIL = "<script>alert(1)</script>"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


# -- a small DOM: enough to find elements by tag, id, class and attribute ------------------------
class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node] = []
        self.text = ""

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def walk(self) -> list[Node]:
        out = [self]
        for child in self.children:
            out += child.walk()
        return out

    def find(self, selector: str) -> list[Node]:
        """Simple selectors only: tag, #id, .class, [attr] and [attr="value"], no combinators."""
        m = re.fullmatch(r"([a-z0-9]*)((?:[#.][\w-]+|\[[\w-]+(?:=\"[^\"]*\")?\])*)", selector)
        assert m, selector
        tag, rest = m.group(1), m.group(2)
        ids = re.findall(r"#([\w-]+)", rest)
        classes = re.findall(r"\.([\w-]+)", rest)
        attrs = re.findall(r"\[([\w-]+)(?:=\"([^\"]*)\")?\]", rest)

        def ok(n: Node) -> bool:
            return (
                (not tag or n.tag == tag)
                and all(n.attrs.get("id") == i for i in ids)
                and set(classes) <= n.classes
                and all(a in n.attrs and (not v or n.attrs[a] == v) for a, v in attrs)
            )

        return [n for n in self.walk()[1:] if ok(n)]

    def one(self, *path: str) -> Node:
        """The single element reached by each selector in turn, inside the previous one."""
        node = self
        for selector in path:
            found = node.find(selector)
            assert len(found) == 1, f"{selector}: {len(found)} found"
            node = found[0]
        return node

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#document", {}, None)
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs), self.cur)
        if len(dict(attrs)) != len(attrs):
            self.errors.append(f"<{tag}> repeats an attribute")
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if self.cur.tag != tag:
            self.errors.append(f"</{tag}> closes <{self.cur.tag}>")
            return
        assert self.cur.parent is not None
        self.cur = self.cur.parent

    def handle_data(self, data: str) -> None:
        self.cur.text += data


def parse(html: str) -> Node:
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    assert builder.errors == [], builder.errors
    assert builder.cur is builder.root, f"<{builder.cur.tag}> left open"
    ids = [str(n.attrs["id"]) for n in builder.root.walk() if "id" in n.attrs]
    assert len(ids) == len(set(ids)), f"duplicate ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    return builder.root


# -- sample contexts of the contract's shape -------------------------------------------------------
def vm_json(name: str, **over: Any) -> dict[str, Any]:
    vm = {
        "name": name,
        "os": "debian",
        "version": "12",
        "arch": "x86_64",
        "state": "running",
        "boot": "warm",
        "engine": "qemu",
        "host": "local",
        "address": "10.0.2.15",
        "port": 2201,
        "accel": "kvm",
        "cpu": 2,
        "mem_mib": 1024,
        "error": None,
    }
    return vm | over


def env_json(name: str, owner: str = "alice", expires: float | None = 4102444800.0) -> dict[str, Any]:
    return {
        "id": f"id-{name}",
        "name": name,
        "owner": owner,
        "state": "ready",
        "created": 1700000000.0,
        "expires": expires,
        "vms": [vm_json("web"), vm_json("db", state="booting", boot="cold")],
        "captures": [{"name": "web-1.ttcap", "size": 123456}],
    }


def context(page: str, evil: bool = False) -> dict[str, Any]:
    name = EVIL if evil else "ci"
    envs = [env_json(name), env_json("other", owner="bob", expires=None)]
    amounts = {"cpu": 16, "mem_mib": 32768, "disk_mib": 200000}
    base: dict[str, Any] = {"me": {"owner": "alice", "admin": True}, "csrf": "c5rf-t0ken", "page": page}
    pages: dict[str, dict[str, Any]] = {
        "login": {"me": None, "error": EVIL if evil else "bad token"},
        "host": {
            "status": {
                "version": "0.20",
                "engine": "qemu",
                "public_addr": "10.0.0.5",
                "scope": "server",
                "totals": amounts,
                "used": {"cpu": 4, "mem_mib": 4096, "disk_mib": 9000},
                "free": {"cpu": 12, "mem_mib": 28672, "disk_mib": 191000},
                "limits": {"cpu": None, "mem_mib": 8192, "vms": None},
                "envs": 2,
                "vms": 4,
                "vms_running": 3,
                "owners": 2,
            },
            "owners": [{"owner": name, "cpu": 4, "mem_mib": 4096, "disk_mib": 9000, "vms": 4, "envs": 2}],
            "images": [{"name": "debian-12-x86_64", "arch": "x86_64", "source": "build", "templates": 1}],
        },
        "envs": {"envs": envs},
        "env": {"env": envs[0]},
        "vm": {
            "env": envs[0],
            "vm": envs[0]["vms"][0],
            "login": f"ssh -p 2201 root@10.0.2.15 # {name}",
            "host_key": f"ssh-ed25519 AAAA {name}",
        },
        "events": {
            "events": [
                {"id": 2, "time": 1700000100.0, "kind": "ready", "env": name, "owner": "alice", "detail": name},
                {"id": 1, "time": 1700000000.0, "kind": "created", "env": "ci", "owner": "alice", "detail": ""},
            ]
        },
        "error": {"error": EVIL if evil else "bad csrf token"},
    }
    return base | pages[page]


@pytest.fixture(scope="module")
def jinja() -> jinja2.Environment:
    """As the server loads them: from the package's templates directory, autoescape on for .html."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
    )


def render(jinja: jinja2.Environment, page: str, evil: bool = False) -> str:
    return jinja.get_template(f"{page}.html").render(context(page, evil))


# -- tests -----------------------------------------------------------------------------------------
def test_every_template_is_rendered_here() -> None:
    names = {p.stem for p in TEMPLATES.glob("*.html")}
    assert names == set(PAGES) | {"base", "_macros"}


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_whole(jinja: jinja2.Environment, page: str) -> None:
    """Well-formed, one h1 and one main, the one script and the one stylesheet, the frame around it."""
    dom = parse(render(jinja, page))
    assert len(dom.find("h1")) == 1 and len(dom.find("main")) == 1
    assert [s.attrs for s in dom.find("script")] == [{"src": "/static/dashboard.js", "defer": None}]
    assert [link.attrs["href"] for link in dom.find('link[rel="stylesheet"]')] == ["/static/dashboard.css"]
    dom.one('meta[name="viewport"]')
    if page == "login":
        assert dom.find("form#logout") == [] and dom.one("nav").find("a") == []
    else:
        nav = dom.one("nav")
        for hook in ("a#nav-host", "a#nav-envs", "a#nav-events", "form#logout", "button#logout-submit"):
            nav.one(hook)
        logout = nav.one("form#logout")
        assert logout.attrs["method"] == "post" and logout.attrs["action"] == "/logout"
        assert logout.one('input[name="csrf"]').attrs["value"] == "c5rf-t0ken"


@pytest.mark.parametrize("page", PAGES)
def test_hostile_text_renders_escaped(jinja: jinja2.Environment, page: str) -> None:
    """A <script> in an ENV name, an error line or a login line stays text; none reaches the DOM."""
    html = render(jinja, page, evil=True)
    dom = parse(html)
    assert len(dom.find("script")) == 1
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert EVIL in dom.all_text()


def test_login_page(jinja: jinja2.Environment) -> None:
    dom = parse(render(jinja, "login"))
    form = dom.one("form#login")
    assert form.attrs["method"] == "post" and form.attrs["action"] == "/login"
    token = form.one("input#token")
    assert token.attrs["type"] == "password" and token.attrs["name"] == "token"
    assert token.attrs["autocomplete"] == "off"
    form.one("button#login-submit")
    assert dom.one("#login-error").all_text() == "bad token"


def test_host_page(jinja: jinja2.Environment) -> None:
    dom = parse(render(jinja, "host"))
    for resource, used, total in (("cpu", "4", "16"), ("mem", "4096", "32768"), ("disk", "9000", "200000")):
        bar = dom.one(f'div.bar[data-resource="{resource}"]')
        assert (bar.attrs["data-used"], bar.attrs["data-total"]) == (used, total)
        bar.one("span.fill")
    assert "your cap 8192" in dom.all_text()
    assert dom.one("table#owners").find('tr.owner-row[data-owner="ci"]')
    assert "debian-12-x86_64" in dom.one("table#images").all_text()


def test_envs_page(jinja: jinja2.Environment) -> None:
    dom = parse(render(jinja, "envs"))
    table = dom.one("table#envs")
    assert table.attrs["data-stream"] == "/ui/stream/envs"
    row = table.one('tr.env[data-env="ci"]')
    assert row.one("td.owner").all_text() == "alice" and row.one("td.state").all_text() == "ready"
    assert row.one("span.countdown").attrs["data-expires"] == "4102444800.0"
    assert row.one("a.env-link").attrs["href"] == "/envs/ci"
    never = table.one('tr.env[data-env="other"]').one("span.countdown")
    assert never.attrs["data-expires"] == "" and never.all_text() == "never"
    assert len(table.find("tr.env")) == 2


def test_env_page(jinja: jinja2.Environment) -> None:
    dom = parse(render(jinja, "env"))
    web, db = dom.one('tr.vm[data-vm="web"]'), dom.one('tr.vm[data-vm="db"]')
    assert (db.one("td.state").all_text(), db.one("td.boot").all_text()) == ("booting", "cold")
    assert web.one("a.vm-link").attrs["href"] == "/envs/ci/vms/web"
    assert "120.6 KiB" in dom.one("table#captures").all_text()
    renew = dom.one("form#renew")
    assert renew.attrs["action"] == "/envs/ci/renew" and renew.attrs["method"] == "post"
    assert renew.one("input#ttl").attrs["name"] == "ttl"
    renew.one("button#renew-submit")
    delete = dom.one("form#delete")
    assert delete.attrs["action"] == "/envs/ci/delete" and delete.attrs["method"] == "post"
    delete.one("button#delete-submit")
    confirm = delete.one("button#delete-confirm")
    assert (confirm.attrs["name"], confirm.attrs["value"], confirm.attrs["type"]) == ("confirm", "yes", "submit")
    assert "hidden" in confirm.attrs and "name" not in delete.one("button#delete-submit").attrs
    for form in (renew, delete):
        assert form.one('input[name="csrf"]').attrs["value"] == "c5rf-t0ken"


def test_vm_page(jinja: jinja2.Environment) -> None:
    dom = parse(render(jinja, "vm", evil=True))
    console = dom.one("pre#console")
    assert console.children == [] and console.text == ""
    stream = "/ui/stream/envs/%3Cscript%3Ealert%281%29%3C/script%3E/vms/web/console"
    assert console.attrs["data-stream"] == stream
    assert dom.one("code#login-line").all_text() == f"ssh -p 2201 root@10.0.2.15 # {EVIL}"


def test_events_page(jinja: jinja2.Environment) -> None:
    dom = parse(render(jinja, "events"))
    table = dom.one("table#events")
    assert table.attrs["data-stream"] == "/ui/stream/events"
    assert [r.attrs["data-kind"] for r in table.find("tr.event")] == ["ready", "created"]


# -- static checks over the files ------------------------------------------------------------------
ASSETS = sorted(TEMPLATES.glob("*.html")) + sorted(STATIC.glob("*"))


def test_assets_exist() -> None:
    assert {p.name for p in STATIC.iterdir()} == {"dashboard.js", "dashboard.css"}


@pytest.mark.parametrize("path", ASSETS, ids=lambda p: p.name)
def test_no_external_url(path: Path) -> None:
    """Air-gapped hosts: no CDN, no web font, no absolute URL of any scheme."""
    text = path.read_text()
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I)
    assert "@import" not in text and "@font-face" not in text and "url(" not in text


@pytest.mark.parametrize("path", sorted(TEMPLATES.glob("*.html")), ids=lambda p: p.name)
def test_template_needs_no_csp_exception(path: Path) -> None:
    """No inline script or style element, no style= or on*= attribute, no javascript: URL, no |safe."""
    text = path.read_text()
    scripts = re.findall(r"<script\b[^>]*>", text, re.I)
    assert all(re.search(r"\bsrc=\"/static/", s) for s in scripts), scripts
    assert not re.search(r"<script\b[^>]*>(?!</script>)", text, re.I), "inline script"
    assert not re.search(r"<style\b", text, re.I)
    assert not re.search(r"\sstyle\s*=", text, re.I)
    assert not re.search(r"\son[a-z]+\s*=", text, re.I)
    assert "javascript:" not in text.lower()
    assert not re.search(r"\|\s*safe\b|\bmarkup\b|autoescape\s+false", text, re.I)


def test_script_never_parses_text_as_html() -> None:
    js = (STATIC / "dashboard.js").read_text()
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        'setAttribute("style"',
        "createContextualFragment",
        "DOMParser",
    ):
        assert sink not in js, sink
    assert not re.search(r"setTimeout\(\s*[\"'`]|setInterval\(\s*[\"'`]", js)
    assert "createTextNode" in js and "textContent" in js


def test_script_builds_the_hooks_it_replaces() -> None:
    """The rows the stream rebuilds keep the hooks of the server-rendered ones."""
    js = (STATIC / "dashboard.js").read_text()
    for hook in (
        '"env"',
        '"env-link"',
        '"owner"',
        '"state"',
        '"countdown"',
        "dataset.expires",
        "dataset.env",
        '"event"',
        "dataset.kind",
        '"delete-confirm"',
        "EventSource",
        '"/envs/"',
    ):
        assert hook in js, hook
    for event in ('"envs"', '"line"', '"event"'):  # the contract's SSE event names
        assert re.search(rf"[{{,]\s*{event[1:-1]}:|addEventListener\({event}", js), event
