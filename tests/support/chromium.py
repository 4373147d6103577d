"""Headless Chromium, offline, for the tests that open an explorer's saved page (selenium with the Debian
packages chromium and chromium-driver; nothing is fetched: Selenium gets the driver's path, and every host name
fails to resolve). Set SE_OFFLINE=true in the test (monkeypatch) so Selenium Manager stays idle."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HAVE_CHROMIUM = CHROMIUM.exists() and CHROMEDRIVER.exists()
READY = ".ll-root[data-ready='1']"  # set by the explorer's page once it has drawn


@contextmanager
def saved_page_in_chromium(page: Path, profile: Path) -> Iterator:
    """A driver showing `page` once its explorer is drawn (within 30 s); the browser quits on leaving."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--window-size=1600,1200",
                 f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.get(page.as_uri())
        deadline = time.monotonic() + 30
        while not driver.find_elements(By.CSS_SELECTOR, READY):
            assert time.monotonic() < deadline, "the saved page did not render in 30 s"
            time.sleep(0.1)
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> list[dict]:
    """The page's SEVERE console entries, but for the missing favicon of a file:// page."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
