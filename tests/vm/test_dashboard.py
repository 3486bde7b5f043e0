"""The dashboard of ``ttenv serve`` in a real headless browser (Debian's chromium through selenium and
chromium-driver) against a real server with real VMs: one ENV ``D`` of 2 VMs (debian12 + debian11,
warm boot) serves the whole module, and the tests run in order: log in; ``D`` made through the CLI
shows up without a reload; a VM's console streams lines written inside the guest, as text; another
owner does not see ``D``, an admin does; host and events pages; phone width; renew; delete from the
page (the row goes live, no qemu is left); logout ends the session. Every page is checked for its
security headers and for CSP violations in chromium's log, and screenshotted (TTENV_DOCS_SHOTS=DIR
also saves the ENV list and VM pages there as dashboard-envs.png / dashboard-vm.png for the docs).

The routes and DOM hooks are the dashboard's contract (docs/server.md, "The dashboard").
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from pytest_ttenv.core.model import ImageInfo

from conftest import HOST_ARCH
from helpers.server import Server, image_dir_with, qemu_of, start_server, ttenv

CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.vm,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMEDRIVER.exists(), reason="no /usr/bin/chromedriver (apt-get install chromium-driver)"),
]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
ENV = "D"
VM12, VM11 = f"debian-12-{HOST_ARCH}", f"debian-11-{HOST_ARCH}"
COOKIE = "ttenv_session"
LIVE = 2.0  # seconds within which a change shows without a reload


# -- the server, the ENV, the browsers ------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(images: Callable[..., list[ImageInfo]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server holding debian-12 and debian-11, with tokens alice, bob and root (admin) from the CLI."""
    tmp = tmp_path_factory.mktemp("dashboard")
    server = start_server(
        tmp,
        image_dir_with(tmp / "images", images("debian-12", "debian-11")),
        owners=(),
        options=["--cpu-total", "8", "--mem-total", "4096", "--disk-total", "100000"],
    )
    try:
        for owner, extra in (("alice", ()), ("bob", ()), ("root", ("--admin",))):
            res = ttenv("token", "add", owner, *extra, "--state-dir", str(server.state))
            assert res.returncode == 0, res.stderr
            server.tokens[owner] = res.stdout.strip()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dashboard-shots")


def new_driver() -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--window-size=1280,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=opts)


@pytest.fixture(scope="module")
def alice(srv: Server) -> Iterator[webdriver.Chrome]:
    """alice's browser, logged in through the form."""
    driver = new_driver()
    try:
        login(driver, srv, srv.tokens["alice"])
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def other(srv: Server) -> Iterator[webdriver.Chrome]:
    """A second browser, not logged in (the login page, then bob, then the admin)."""
    driver = new_driver()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def client_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client-state")


@pytest.fixture(scope="module")
def created(srv: Server, alice: webdriver.Chrome, client_state: Path, shots: Path) -> dict[str, Any]:
    """``D`` made with ``ttenv env add --backend`` while alice's browser shows /envs: how long after the
    CLI returned its row showed (None: not within LIVE s), and whether the page was reloaded meanwhile."""
    go(alice, srv, "/envs")
    alice.execute_script("window.ttenvMark = 1;")
    res = ttenv(
        "env",
        "add",
        ENV,
        "--os-prefix",
        "debian12,debian11",
        "--arch",
        HOST_ARCH,
        "--ttl",
        "30m",
        "--boot-timeout",
        "900",
        "--backend",
        srv.url,
        state=client_state,
        token=srv.tokens["alice"],
    )
    assert res.returncode == 0, res.stderr
    returned = time.monotonic()
    seen_after = None
    try:
        wait(alice, lambda d: d.find_elements(By.CSS_SELECTOR, f'tr.env[data-env="{ENV}"]'), LIVE)
        seen_after = time.monotonic() - returned
    except TimeoutException:
        print(f"row of {ENV} not seen within {LIVE} s")
    reloaded = alice.execute_script("return window.ttenvMark;") != 1
    if seen_after is not None:
        # the states follow the stream too: wait for both VMs running before the screenshot
        try:
            wait(alice, lambda d: row_state(d) not in ("", "booting"), 10)
        except TimeoutException:
            print(f"{ENV} still booting on /envs")
        shot(alice, shots, "envs", docs="dashboard-envs.png")
    return {"seen_after": seen_after, "reloaded": reloaded}


# -- helpers ----------------------------------------------------------------------------------------
def wait(
    driver: webdriver.Chrome, cond: Callable[[webdriver.Chrome], Any], timeout: float = 10.0, what: str = ""
) -> Any:
    """``cond``'s first true value within ``timeout`` s; elements the live page replaced meanwhile
    (stale) or has not made yet count as not yet."""
    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(cond, what)


def text(driver: webdriver.Chrome, css: str) -> str:
    """The rendered text of the first ``css`` element, read at once ("" if none): rows the streams
    re-render never go stale under it."""
    got = driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)
    return str(got).strip()


def attr(driver: webdriver.Chrome, css: str, name: str) -> str | None:
    got = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;", css, name
    )
    return None if got is None else str(got)


def click(driver: webdriver.Chrome, css: str) -> None:
    """Click the ``css`` element (found again if the page re-rendered it)."""

    def clicked(d: webdriver.Chrome) -> bool:
        d.find_element(By.CSS_SELECTOR, css).click()
        return True

    wait(driver, clicked, what=f"click {css}")


def row_state(driver: webdriver.Chrome) -> str:
    return text(driver, f'tr.env[data-env="{ENV}"] td.state')


def cookie_of(driver: webdriver.Chrome) -> str:
    got = driver.get_cookie(COOKIE)
    assert got, f"no {COOKIE} cookie in the browser"
    return str(got["value"])


def http(srv: Server, method: str, path: str, cookie: str | None, **kw: Any) -> requests.Response:
    cookies = {COOKIE: cookie} if cookie else {}
    return requests.request(method, srv.url + path, cookies=cookies, allow_redirects=False, timeout=30, **kw)


def csrf_of(driver: webdriver.Chrome) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, "form#logout input[name=csrf]").get_attribute("value"))


def check_page(driver: webdriver.Chrome, srv: Server, path: str) -> None:
    """The page's security headers (fetched again with the browser's cookie) and no CSP violation or
    script error in chromium's log."""
    got = driver.get_cookie(COOKIE)
    res = http(srv, "GET", path, str(got["value"]) if got else None)
    assert res.headers.get("Content-Security-Policy") == CSP, (path, res.headers)
    assert res.headers.get("X-Content-Type-Options") == "nosniff", path
    assert res.headers.get("Referrer-Policy") == "no-referrer", path
    log: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    bad = [e for e in log if e.get("source") == "security" or "Content Security Policy" in e["message"]]
    bad += [e for e in log if e["level"] == "SEVERE" and e.get("source") == "javascript"]  # a script error
    assert not bad, f"{path}: {bad}"


def go(driver: webdriver.Chrome, srv: Server, path: str) -> None:
    driver.get(srv.url + path)
    wait(driver, lambda d: d.find_elements(By.TAG_NAME, "h1"))
    check_page(driver, srv, path)


def login(driver: webdriver.Chrome, srv: Server, token: str, keyboard: bool = False) -> None:
    """Through the form: type the token, click (or press Enter); lands on the host page."""
    driver.get(srv.url + "/login")
    field = wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "form#login input#token"))
    field.send_keys(token)
    if keyboard:
        field.send_keys(Keys.ENTER)
    else:
        click(driver, "button#login-submit")
    wait(driver, lambda d: d.current_url == srv.url + "/" and d.find_elements(By.TAG_NAME, "h1"))
    assert token not in driver.current_url and token not in driver.page_source
    check_page(driver, srv, "/")


def visible(driver: webdriver.Chrome, css: str) -> WebElement:
    """The ``css`` element, displayed and of some size (within 5 s)."""

    def shown(d: webdriver.Chrome) -> WebElement | bool:
        el = d.find_element(By.CSS_SELECTOR, css)
        return el if el.is_displayed() and el.size["width"] > 0 and el.size["height"] > 0 else False

    return wait(driver, shown, 5, f"{css} not displayed (or of no size)")  # type: ignore[no-any-return]


def shot(driver: webdriver.Chrome, into: Path, name: str, docs: str | None = None) -> Path:
    """A screenshot of the page into ``into``; with TTENV_DOCS_SHOTS also as ``docs`` there."""
    for css in ("h1", "main", "nav"):
        visible(driver, css)
    path = into / f"{name}.png"
    assert driver.save_screenshot(str(path)) and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    target = os.environ.get("TTENV_DOCS_SHOTS")
    if docs and target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / docs)
    return path


def first_event(srv: Server, path: str, cookie: str) -> tuple[str, Any]:
    """The first Server-Sent Event of a stream: (event name, parsed data)."""
    with http(srv, "GET", path, cookie, stream=True) as res:
        assert res.status_code == 200, (path, res.status_code, res.text[:200])
        assert res.headers["Content-Type"].startswith("text/event-stream")
        assert "no-store" in res.headers.get("Cache-Control", "")
        name, data = "message", []
        for line in res.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and data:
                return name, json.loads("\n".join(data))
    raise AssertionError(f"{path}: the stream ended before an event")


def console_text(driver: webdriver.Chrome) -> str:
    return str(driver.execute_script("return document.querySelector('pre#console').textContent;"))


def to_console(srv: Server, client_state: Path, text: str) -> None:
    """Write ``text`` to the serial console of VM12 of ENV through ``ttenv env run`` (as alice)."""
    res = ttenv(
        "env",
        "run",
        ENV,
        VM12,
        "--cmd",
        f"echo '{text}' > /dev/ttyS0",
        "--backend",
        srv.url,
        state=client_state,
        token=srv.tokens["alice"],
    )
    assert res.returncode == 0, res.stderr


# -- the tests, in order ----------------------------------------------------------------------------
def test_login_page_and_cookie(srv: Server, other: webdriver.Chrome, shots: Path) -> None:
    other.get(srv.url + "/")
    wait(other, lambda d: d.current_url == srv.url + "/login")
    token = visible(other, "form#login input#token")
    assert token.get_attribute("type") == "password" and token.get_attribute("autocomplete") == "off"
    visible(other, "button#login-submit")
    check_page(other, srv, "/login")
    for css in ("h1", "main"):
        visible(other, css)
    assert other.save_screenshot(str(shots / "login.png"))
    # a wrong token: 401, the login page again with one line, the token never echoed
    res = http(srv, "POST", "/login", None, data={"token": "wrong-token-xyz"})
    assert res.status_code == 401 and 'id="login"' in res.text and "wrong-token-xyz" not in res.text
    assert COOKIE not in res.cookies
    # a good one: 303 to / with the session cookie
    res = http(srv, "POST", "/login", None, data={"token": srv.tokens["bob"]})
    assert res.status_code == 303 and res.headers["Location"] in ("/", srv.url + "/")
    cookie = res.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=") and srv.tokens["bob"] not in cookie
    attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attrs, cookie
    # the streams without a session: 401
    assert http(srv, "GET", "/ui/stream/envs", None).status_code == 401


def test_login_through_the_form(srv: Server, alice: webdriver.Chrome) -> None:
    got = alice.get_cookie(COOKIE)
    assert got and got["httpOnly"] and got.get("sameSite") == "Strict"
    assert srv.tokens["alice"] not in str(got["value"])
    assert "alice" in alice.find_element(By.TAG_NAME, "nav").text
    for link in ("a#nav-host", "a#nav-envs", "a#nav-events", "form#logout button#logout-submit"):
        visible(alice, link)


def test_env_made_through_the_cli_appears_without_reload(created: dict[str, Any], alice: webdriver.Chrome) -> None:
    assert created["seen_after"] is not None, f"row of {ENV} not on /envs within {LIVE} s of the CLI returning"
    assert not created["reloaded"], "/envs reloaded itself instead of updating"
    row = f'tr.env[data-env="{ENV}"]'
    assert text(alice, f"{row} td.owner") == "alice"
    assert attr(alice, f"{row} span.countdown", "data-expires")
    assert str(attr(alice, f"{row} a.env-link", "href")).endswith(f"/envs/{ENV}")


def test_env_page_shows_its_vms(srv: Server, alice: webdriver.Chrome, created: dict[str, Any], shots: Path) -> None:
    go(alice, srv, "/envs")
    click(alice, f'tr.env[data-env="{ENV}"] a.env-link')
    wait(alice, lambda d: d.current_url == f"{srv.url}/envs/{ENV}")
    check_page(alice, srv, f"/envs/{ENV}")
    for vm in (VM12, VM11):
        row = f'tr.vm[data-vm="{vm}"]'
        visible(alice, row)
        assert text(alice, f"{row} td.state") == "running"
        assert text(alice, f"{row} td.boot") == "warm"
        assert str(attr(alice, f"{row} a.vm-link", "href")).endswith(f"/envs/{ENV}/vms/{vm}")
    for css in ("form#renew input#ttl", "button#renew-submit", "form#delete button#delete-submit"):
        visible(alice, css)
    shot(alice, shots, "env")


def test_console_streams_guest_lines_as_text(
    srv: Server, alice: webdriver.Chrome, created: dict[str, Any], client_state: Path, shots: Path
) -> None:
    go(alice, srv, f"/envs/{ENV}")
    click(alice, f'tr.vm[data-vm="{VM12}"] a.vm-link')
    wait(alice, lambda d: d.find_elements(By.CSS_SELECTOR, "pre#console"))
    check_page(alice, srv, f"/envs/{ENV}/vms/{VM12}")
    vm = srv.backend("alice").show_env(ENV).vm(VM12)
    line = visible(alice, "code#login-line").text
    assert line.startswith("ssh ") and f"-p {vm.port}" in line and vm.address in line, line
    time.sleep(1)  # the stream connects (lines written before it would still come, as the tail)
    hello = f"hello from the guest at {time.strftime('%H:%M:%S')}"
    to_console(srv, client_state, hello)
    returned = time.monotonic()
    wait(alice, lambda d: hello in console_text(d), LIVE)
    print(f"console line shown {time.monotonic() - returned:.2f} s after the CLI returned")
    script = "<script>alert(1)</script>"
    to_console(srv, client_state, script)
    wait(alice, lambda d: script in console_text(d), LIVE)
    assert alice.find_elements(By.CSS_SELECTOR, "pre#console script") == []
    assert "&lt;script&gt;" in str(alice.execute_script("return document.querySelector('pre#console').innerHTML;"))
    with pytest.raises(NoAlertPresentException):
        alice.switch_to.alert  # noqa: B018 - the property raises when no alert is open
    check_page(alice, srv, f"/envs/{ENV}/vms/{VM12}")
    shot(alice, shots, "vm", docs="dashboard-vm.png")


def test_another_owner_does_not_see_it_an_admin_does(
    srv: Server, other: webdriver.Chrome, created: dict[str, Any], shots: Path
) -> None:
    login(other, srv, srv.tokens["bob"], keyboard=True)
    go(other, srv, "/envs")
    visible(other, "table#envs")
    assert other.find_elements(By.CSS_SELECTOR, f'tr.env[data-env="{ENV}"]') == []
    bob, csrf = cookie_of(other), csrf_of(other)
    for path in (f"/envs/{ENV}", f"/envs/{ENV}/vms/{VM12}", f"/ui/stream/envs/{ENV}/vms/{VM12}/console"):
        assert http(srv, "GET", path, bob).status_code == 404, path
    for path, form in ((f"/envs/{ENV}/renew", {"ttl": "2h"}), (f"/envs/{ENV}/delete", {"confirm": "yes"})):
        assert http(srv, "POST", path, bob, data={"csrf": csrf, **form}).status_code == 404, path
    name, envs = first_event(srv, "/ui/stream/envs", bob)
    assert name == "envs" and envs == []
    assert [e.name for e in srv.backend("alice").list_envs()] == [ENV]
    click(other, "form#logout button#logout-submit")
    wait(other, lambda d: d.current_url == srv.url + "/login")
    login(other, srv, srv.tokens["root"])
    go(other, srv, "/envs")
    visible(other, f'tr.env[data-env="{ENV}"]')
    assert text(other, f'tr.env[data-env="{ENV}"] td.owner') == "alice"
    click(other, f'tr.env[data-env="{ENV}"] a.env-link')
    wait(other, lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.vm")) == 2)
    go(other, srv, "/")
    assert "alice" in visible(other, "table#owners").text


def test_host_and_events_pages(srv: Server, alice: webdriver.Chrome, created: dict[str, Any], shots: Path) -> None:
    click(alice, "a#nav-host")
    wait(alice, lambda d: d.current_url == srv.url + "/")
    check_page(alice, srv, "/")
    used = {"cpu": 4, "mem": 1024}  # 2 VMs of 2 vCPUs and 512 MiB, the only ENV
    for resource in ("cpu", "mem", "disk"):
        bar = visible(alice, f'div.bar[data-resource="{resource}"]')
        total = float(str(bar.get_attribute("data-total")))
        have = float(str(bar.get_attribute("data-used")))
        assert 0 < have <= total, (resource, have, total)
        if resource in used:
            assert have == used[resource], (resource, have)
    assert "alice" in visible(alice, "table#owners").text
    images = visible(alice, "table#images").text
    assert VM12 in images and VM11 in images
    shot(alice, shots, "host")
    click(alice, "a#nav-events")
    wait(alice, lambda d: d.find_elements(By.CSS_SELECTOR, "table#events"))
    check_page(alice, srv, "/events")
    made = alice.find_elements(By.CSS_SELECTOR, 'tr.event[data-kind="created"]')
    assert any(ENV in e.text for e in made), [e.text for e in made]
    shot(alice, shots, "events")


def test_pages_fit_a_phone_width(srv: Server, alice: webdriver.Chrome, created: dict[str, Any], shots: Path) -> None:
    alice.set_window_size(375, 800)
    try:
        for name, path in (
            ("host", "/"),
            ("envs", "/envs"),
            ("env", f"/envs/{ENV}"),
            ("vm", f"/envs/{ENV}/vms/{VM12}"),
            ("events", "/events"),
        ):
            go(alice, srv, path)
            width, inner = alice.execute_script("return [document.documentElement.scrollWidth, window.innerWidth];")
            assert width <= inner, f"{path}: scrolls sideways at 375 px ({width} > {inner})"
            shot(alice, shots, f"{name}-375")
    finally:
        alice.set_window_size(1280, 900)


def test_renew_from_the_page_updates_the_countdown(
    srv: Server, alice: webdriver.Chrome, created: dict[str, Any]
) -> None:
    go(alice, srv, "/envs")
    countdown = f'tr.env[data-env="{ENV}"] span.countdown'
    before = float(str(attr(alice, countdown, "data-expires")))
    ticking = text(alice, countdown)
    wait(alice, lambda d: text(d, countdown) not in ("", ticking), 2.5, "the countdown does not tick")
    cookie = cookie_of(alice)
    for form in ({"ttl": "2h"}, {"ttl": "2h", "csrf": "forged"}):  # no csrf, a wrong one: 403, nothing renewed
        assert http(srv, "POST", f"/envs/{ENV}/renew", cookie, data=form).status_code == 403
    assert srv.backend("alice").show_env(ENV).expires == pytest.approx(before, abs=1)
    go(alice, srv, f"/envs/{ENV}")
    ttl = alice.find_element(By.CSS_SELECTOR, "form#renew input#ttl")
    ttl.clear()
    ttl.send_keys("2h")
    click(alice, "button#renew-submit")
    wait(alice, lambda d: d.current_url == srv.url + "/envs")
    expires = srv.backend("alice").show_env(ENV).expires
    assert expires is not None and expires >= time.time() + 7000
    wait(alice, lambda d: attr(d, countdown, "data-expires"), what="no countdown on /envs")
    assert float(str(attr(alice, countdown, "data-expires"))) == pytest.approx(expires, abs=1)
    assert text(alice, countdown) not in ("", ticking)


def test_delete_from_the_page_removes_the_row_live_and_the_vms(
    srv: Server, alice: webdriver.Chrome, created: dict[str, Any]
) -> None:
    cookie = cookie_of(alice)
    assert http(srv, "POST", f"/envs/{ENV}/delete", cookie, data={"confirm": "yes"}).status_code == 403
    assert [e.name for e in srv.backend("alice").list_envs()] == [ENV]
    first = alice.current_window_handle
    alice.switch_to.new_window("tab")  # a second tab watches the list
    go(alice, srv, "/envs")
    alice.execute_script("window.ttenvMark = 1;")
    watcher = alice.current_window_handle
    alice.switch_to.window(first)
    go(alice, srv, f"/envs/{ENV}")
    click(alice, "form#delete button#delete-submit")
    confirm = wait(alice, lambda d: d.find_element(By.CSS_SELECTOR, "button#delete-confirm"), 2)
    assert confirm.is_displayed() and confirm.get_attribute("tabindex") in (None, "", "0")
    assert [e.name for e in srv.backend("alice").list_envs()] == [ENV], "deleted before the confirmation"
    confirm.send_keys(Keys.ENTER)  # the keyboard confirms
    wait(alice, lambda d: d.current_url == srv.url + "/envs", 60)
    assert alice.find_elements(By.CSS_SELECTOR, f'tr.env[data-env="{ENV}"]') == []
    alice.switch_to.window(watcher)
    wait(alice, lambda d: not d.find_elements(By.CSS_SELECTOR, f'tr.env[data-env="{ENV}"]'), LIVE)
    assert alice.execute_script("return window.ttenvMark;") == 1, "the list reloaded instead of updating"
    alice.close()
    alice.switch_to.window(first)
    assert srv.backend("alice").list_envs() == []
    deadline = time.monotonic() + 30
    while qemu_of(srv.state):
        assert time.monotonic() < deadline, f"qemu still running under {srv.state}"
        time.sleep(0.2)
    go(alice, srv, "/events")
    gone = alice.find_elements(By.CSS_SELECTOR, 'tr.event[data-kind="deleted"]')
    assert any(ENV in e.text for e in gone), [e.text for e in gone]


def test_logout_ends_the_session(srv: Server, alice: webdriver.Chrome) -> None:
    old = cookie_of(alice)
    go(alice, srv, "/")
    click(alice, "form#logout button#logout-submit")
    wait(alice, lambda d: d.current_url == srv.url + "/login")
    alice.get(srv.url + "/")
    wait(alice, lambda d: d.current_url == srv.url + "/login")
    assert alice.get_cookie(COOKIE) is None or alice.get_cookie(COOKIE)["value"] != old  # type: ignore[index]
    res = http(srv, "GET", "/", old)
    assert res.status_code in (303, 401) and (res.status_code == 401 or res.headers["Location"].endswith("/login"))
    assert http(srv, "GET", "/envs", old).status_code in (303, 401)
    assert http(srv, "GET", "/ui/stream/envs", old).status_code == 401
