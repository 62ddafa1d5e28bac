"""Opening trace pages in a real headless Chromium (Selenium + the system's chromium and chromedriver):
the page tests and `dllm-cache trace screenshot` (the README's picture)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dllm_cache.errors import DllmCacheError


class BrowserUnavailable(DllmCacheError):
    """No headless browser on this machine (the reason says what is missing)."""


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or BrowserUnavailable naming what to install."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        raise BrowserUnavailable("selenium is not installed (pip install selenium)") from None
    browser = next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if p is None)
        raise BrowserUnavailable(f"{missing} not found (Debian: apt-get install chromium chromium-driver)")
    return browser, driver


@contextmanager
def headless_chromium(width: int = 1400, height: int = 900) -> Iterator[Any]:
    """A Selenium WebDriver on headless Chromium that records the browser console."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(page: Path, out: Path, step: int | None = None, width: int = 1400, height: int = 900) -> None:
    """A PNG of `page` (at slider position `step`, default: the last step) as headless Chromium draws it."""
    if not page.is_file():
        raise DllmCacheError(f"no such page: {page}")
    with headless_chromium(width, height) as driver:
        driver.get(page.resolve().as_uri())
        if step is not None:
            last = int(driver.execute_script("return Number(document.getElementById('slider').max)"))
            if not 1 <= step <= last:
                raise DllmCacheError(f"--step {step} is out of range: the page has steps 1 to {last}")
            driver.execute_script(
                "const s = document.getElementById('slider');"
                "s.value = arguments[0]; s.dispatchEvent(new Event('input'));",
                step,
            )
        full = driver.execute_script("return document.documentElement.scrollHeight")
        # the whole page in one picture (the viewport is a little smaller than the window)
        driver.set_window_size(width, max(height, int(full) + 80))
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
