"""Helpers of the dashboard tests: Debian's chromium under Selenium, and logins over httpx."""

from __future__ import annotations

import base64
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: The flags the browser runs with: headless, no network of its own, a fresh profile.
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-dev-shm-usage", "--window-size=1360,1100",
]  # fmt: skip


def browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless chromium driven by chromedriver, with a profile of its own."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="moat-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    # Both paths given: Selenium Manager never looks for (or downloads) a driver.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(what: Callable[[], Any], timeout: float = 30, step: float = 0.25) -> Any:
    """Poll ``what()`` until it is truthy; its last value, or AssertionError on timeout.
    An element the page replaced while it was read (server-sent events redraw rows) is a
    "not yet", read again at the next poll."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = what()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def shoot(driver: Any, name: str) -> None:
    """A screenshot of the whole page into ``$MOAT_SCREENSHOTS`` (when set)."""
    folder = os.environ.get("MOAT_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    size = {"width": 1360, "height": min(int(height), 6000), "deviceScaleFactor": 1,
            "mobile": False}  # fmt: skip
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", size)
    try:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    (Path(folder) / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))


def browser_login(driver: Any, url: str, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url + "/ui/login")
    driver.find_element(By.ID, "api_key").send_keys(key)
    form = driver.find_element(By.TAG_NAME, "form")
    driver.find_element(By.ID, "login").click()
    wait_for(lambda: not _attached(form))  # the next page has replaced the form
    wait_for(lambda: driver.execute_script("return document.readyState") == "complete")


def _attached(element: Any) -> bool:
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return False
    except WebDriverException as exc:
        # Chromium's words for the same thing while the next page replaces the document
        # (seen in CI): the node is gone from it
        if "does not belong to the document" in str(exc):
            return False
        raise
    return True


@contextmanager
def http_login(url: str, key: str) -> Iterator[httpx.Client]:
    """An httpx client logged in to the dashboard as a browser would be (cookies kept)."""
    with httpx.Client(base_url=url, follow_redirects=False, timeout=30) as client:
        form = client.get("/ui/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
        assert nonce is not None, form.text
        r = client.post("/ui/login", data={"nonce": nonce.group(1), "api_key": key},
                        headers={"origin": url})  # fmt: skip
        assert r.status_code == 303 and r.headers["location"] == "/ui/", r.text
        yield client


def csrf_of(html: str) -> str:
    token = re.search(r'name="csrf" value="([^"]+)"', html)
    assert token is not None, html
    return token.group(1)
