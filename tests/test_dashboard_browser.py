"""The dashboard in a real browser: Debian's chromium, headless, driven by Selenium.

One ``moat serve`` for the module; sandboxes are started and used with the unmodified E2B
SDK against it, and what the pages show is checked in the browser; what happened is checked
from outside too (the SDK says whether a sandbox still runs). Screenshots of every page go
to ``$MOAT_SCREENSHOTS`` when it is set.
"""

from __future__ import annotations

import os
import secrets
import shlex
from collections.abc import Iterator

import pytest
from tests.conftest import require, require_tier
from tests.dashboard_support import (
    browser_login,
    browser_missing,
    chromium,
    csrf_of,
    http_login,
    shoot,
    wait_for,
)
from tests.server_support import Server, new_key, serving, tenant_name

pytestmark = [pytest.mark.container, pytest.mark.slow]

#: Printed by the sandbox, built there from two halves (so the code sent holds no token).
TOKEN_HEAD, TOKEN_TAIL = "ghp_", secrets.token_hex(18)
TOKEN = TOKEN_HEAD + TOKEN_TAIL
CODE = f"""
import urllib.request
print({TOKEN_HEAD!r} + {TOKEN_TAIL!r})
try:
    urllib.request.urlopen("http://denied.example.com/", timeout=10)
except Exception as exc:
    print("the network said:", exc)
"""


@pytest.fixture(scope="module")
def admin() -> str:
    return tenant_name("ops")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, admin: str) -> Iterator[Server]:
    require_tier("container")
    require(browser_missing(), "chromium with chromium-driver and selenium")
    saved = os.environ.get("MOAT_ADMIN_TENANTS")
    os.environ["MOAT_ADMIN_TENANTS"] = admin
    try:
        with serving(tmp_path_factory.mktemp("dash") / "server.log") as srv:
            yield srv
    finally:
        if saved is None:
            os.environ.pop("MOAT_ADMIN_TENANTS", None)
        else:
            os.environ["MOAT_ADMIN_TENANTS"] = saved


def test_a_bad_key_is_refused(server: Server) -> None:
    from selenium.webdriver.common.by import By

    with chromium() as driver:
        browser_login(driver, server.url, "e2b_" + "0" * 40)
        error = driver.find_element(By.ID, "error")
        assert "not valid" in error.text
        assert driver.current_url.endswith("/ui/login")
        assert driver.get_cookie("moat_session") is None
        shoot(driver, "01-login-refused")
        driver.get(server.url + "/ui/")  # no session: back to the login page
        assert driver.current_url.endswith("/ui/login")


def test_watch_a_sandbox_then_kill_it(server: Server) -> None:
    from e2b_code_interpreter import Sandbox
    from selenium.webdriver.common.by import By

    tenant = tenant_name("acme")
    key = new_key(tenant)
    with chromium() as driver:
        driver.get(server.url + "/ui/login")
        shoot(driver, "00-login")
        browser_login(driver, server.url, key)
        assert driver.current_url.endswith("/ui/")
        cookie = driver.get_cookie("moat_session")
        assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert key not in cookie["value"]
        driver.execute_script("document.body.dataset.marker = 'no reload'")
        sbx = Sandbox.create(api_key=key)
        try:
            # It appears while it runs, pushed by server-sent events (the page never reloads).
            row = f'tr[data-id="{sbx.sandbox_id}"]'
            wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, row), timeout=30)
            assert driver.execute_script("return document.body.dataset.marker") == "no reload"
            cells = wait_for(lambda: driver.find_element(By.CSS_SELECTOR, row).text)
            assert "container" in cells and "running" in cells
            execution = sbx.run_code(CODE)
            assert "[REDACTED:github_token]" in execution.logs.stdout[0]  # the SDK's view
            wait_for(lambda: "%" in driver.find_element(By.CSS_SELECTOR, row).text, timeout=15)
            shoot(driver, "02-sandboxes")

            driver.find_element(By.LINK_TEXT, sbx.sandbox_id).click()
            assert driver.current_url.endswith(f"/ui/sandboxes/{sbx.sandbox_id}")
            page = driver.page_source
            egress = driver.find_element(By.ID, "egress").text
            assert "denied.example.com" in egress and "denied" in egress
            assert "not_allowed" in egress  # the gateway's reason
            assert "[REDACTED:github_token]" in page
            assert "github_token" in driver.find_element(By.ID, "findings").text
            assert TOKEN not in page and TOKEN_TAIL not in page.replace(repr(TOKEN_TAIL), "")
            assert "running" in driver.find_element(By.ID, "state").text
            shoot(driver, "03-sandbox")

            driver.find_element(By.ID, "kill").click()
            driver.switch_to.alert.accept()  # "Kill sandbox …?"
            wait_for(lambda: "ended" in driver.find_element(By.ID, "state").text)
            life = driver.find_element(By.ID, "lifecycle").text
            assert "kill" in life and tenant in life and "killed from the dashboard" in life
            assert not driver.find_elements(By.ID, "kill")
            shoot(driver, "04-sandbox-killed")
            # From outside: the SDK says it is gone.
            assert not sbx.is_running()
            listed = Sandbox.list(api_key=key).next_items()
            assert sbx.sandbox_id not in [s.sandbox_id for s in listed]

            driver.get(server.url + "/ui/")
            wait_for(lambda: "live:" in driver.find_element(By.ID, "live").text)
            assert not driver.find_elements(By.CSS_SELECTOR, row)

            driver.get(server.url + "/ui/audit?denied=1")
            trail = driver.find_element(By.ID, "trail").text
            assert "denied.example.com" in trail
            assert not driver.find_elements(By.CSS_SELECTOR, "#trail .decision.allow")
            shoot(driver, "05-audit-denied")
            driver.get(server.url + f"/ui/audit?sandbox={sbx.sandbox_id}")
            trail = driver.find_element(By.ID, "trail").text
            assert "kill" in trail and "created" in trail and "github_token" in trail
            assert TOKEN not in driver.page_source
            shoot(driver, "06-audit-sandbox")
        finally:
            sbx.kill()


def test_another_tenant_sees_nothing_of_it(server: Server, admin: str) -> None:
    from e2b_code_interpreter import Sandbox
    from selenium.webdriver.common.by import By

    tenant_a = tenant_name("a")
    key_a, key_b = new_key(tenant_a), new_key(tenant_name("b"))
    sbx = Sandbox.create(api_key=key_a)
    try:
        sbx.run_code("print('hello from A')")
        with chromium() as driver:
            browser_login(driver, server.url, key_b)
            wait_for(lambda: "live:" in driver.find_element(By.ID, "live").text)
            assert sbx.sandbox_id not in driver.page_source
            # By URL: the very page an unknown id gets.
            driver.get(server.url + f"/ui/sandboxes/{sbx.sandbox_id}")
            theirs = driver.find_element(By.ID, "message").text
            unknown_id = "sbx-" + "0" * 16
            driver.get(server.url + f"/ui/sandboxes/{unknown_id}")
            unknown = driver.find_element(By.ID, "message").text
            assert theirs.replace(sbx.sandbox_id, "ID") == unknown.replace(unknown_id, "ID")
            assert "hello from A" not in driver.page_source
            shoot(driver, "07-other-tenant-not-found")
            driver.get(server.url + f"/ui/audit?sandbox={sbx.sandbox_id}")
            assert sbx.sandbox_id not in driver.find_element(By.TAG_NAME, "main").text
            driver.get(server.url + "/ui/tenants")  # not an admin: no such page
            assert driver.find_element(By.ID, "message").text == "no such page"
        # Acting by URL, with B's own valid session and token: refused like an unknown id.
        with http_login(server.url, key_b) as b:
            token = csrf_of(b.get("/ui/").text)
            r = b.post(f"/ui/sandboxes/{sbx.sandbox_id}/kill", data={"csrf": token},
                       headers={"origin": server.url})  # fmt: skip
            assert r.status_code == 404
        assert sbx.is_running()

        # The admin sees it, and every tenant's keys by id only.
        with chromium() as driver:
            browser_login(driver, server.url, new_key(admin))
            row = f'tr[data-id="{sbx.sandbox_id}"]'
            wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, row))
            shoot(driver, "08-admin-sandboxes")
            driver.get(server.url + "/ui/tenants")
            shoot(driver, "09-admin-tenants")
            assert tenant_a in driver.find_element(By.ID, "tenants").text
            driver.find_element(By.LINK_TEXT, tenant_a).click()
            assert "key-" in driver.find_element(By.ID, "keys").text
            assert key_a not in driver.page_source and key_a[4:] not in driver.page_source
            shoot(driver, "10-admin-tenant")
    finally:
        sbx.kill()


#: Markup a sandbox (or a caller) may put in what the pages show: it must stay text.
MARKUP = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>"


def test_markup_from_a_sandbox_stays_text(server: Server) -> None:
    from e2b_code_interpreter import Sandbox
    from selenium.webdriver.common.by import By

    key = new_key(tenant_name("xss"))
    sbx = Sandbox.create(api_key=key, metadata={"note": MARKUP})
    try:
        sbx.run_code(f"print({MARKUP!r})")
        sbx.commands.run(f"echo {shlex.quote(MARKUP)} >&2")
        with chromium() as driver:
            browser_login(driver, server.url, key)
            driver.get(server.url + f"/ui/sandboxes/{sbx.sandbox_id}")
            main = driver.find_element(By.TAG_NAME, "main").text
            assert "note=" + MARKUP in main  # metadata, shown as text
            outputs = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "pre.out")]
            assert any(MARKUP in t and "STDOUT" in t for t in outputs), outputs
            assert any(MARKUP in t and "STDERR" in t for t in outputs), outputs
            assert driver.title.startswith("Sandbox ") and "pwned" not in driver.title
            assert not driver.find_elements(By.CSS_SELECTOR, "main img, main script")
            shoot(driver, "11-markup-as-text")
    finally:
        sbx.kill()
