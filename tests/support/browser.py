"""A real headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by Selenium.

Nothing is downloaded: the driver and the browser are given by path, so Selenium Manager never
runs. Each browser gets a fresh profile directory and the flags that keep it off the network.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars")


def missing() -> str | None:
    """Why no browser can start here (None when it can)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} is missing: run scripts/setup (it installs Debian's chromium and chromium-driver)"
    return None


class Browser:
    def __init__(self, *, width: int = 1280, height: int = 900) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        why = missing()
        if why:
            raise RuntimeError(why)
        self.profile = Path(tempfile.mkdtemp(prefix="edgefleet-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.add_argument(f"--window-size={width},{height}")
        try:
            self.driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
        except Exception:
            shutil.rmtree(self.profile, ignore_errors=True)
            raise
        self.driver.set_page_load_timeout(30)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------------------------

    def get(self, url: str) -> None:
        self.driver.get(url)

    def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def retry(self, action: Callable[[], Any], attempts: int = 50) -> Any:
        """Run ``action`` on an element again when a live update swapped the element meanwhile
        (stale, or detached and so not interactable)."""
        from selenium.common.exceptions import ElementNotInteractableException, StaleElementReferenceException

        for _ in range(attempts - 1):
            try:
                return action()
            except (StaleElementReferenceException, ElementNotInteractableException):
                time.sleep(0.05)
        return action()

    def text(self, selector: str) -> str:
        return str(self.retry(lambda: self.css(selector).text))

    def attr(self, selector: str, name: str) -> str | None:
        return self.retry(lambda: self.css(selector).get_attribute(name))  # type: ignore[no-any-return]

    def type(self, selector: str, text: str) -> None:
        """Type into a field (once it has focus or a changed value the page leaves its region alone)."""
        self.retry(lambda: self.css(selector).send_keys(text))

    def wait(self, condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
        """Poll ``condition`` (exceptions count as not yet) until it is truthy."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = condition()
                if value:
                    return value
            except Exception as exc:  # the element is being swapped by a live update
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"{what} not met within {timeout}s (last error: {last!r}); page: "
                           f"{self.driver.current_url}\n{self.driver.find_element('tag name', 'body').text[:2000]}")

    def submit(self, selector: str, timeout: float = 30.0) -> None:
        """Click a form's button and wait until the browser has loaded the page it leads to."""
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.wait import WebDriverWait

        old = self.css("html")
        self.retry(lambda: self.css(selector).click())
        WebDriverWait(self.driver, timeout).until(expected_conditions.staleness_of(old))
        WebDriverWait(self.driver, timeout).until(
            lambda d: d.execute_script("return document.readyState") == "complete")

    def login(self, base: str, token: str) -> None:
        self.get(f"{base}/ui/login")
        self.css("#token").send_keys(token)
        self.submit("#login")
        assert "/ui/login" not in self.driver.current_url, self.css("body").text

    def screenshot(self, path: Path, *, full_height: bool = True, max_height: int = 2400) -> None:
        if full_height:
            height = int(self.driver.execute_script("return document.documentElement.scrollHeight"))
            width = int(self.driver.execute_script("return window.outerWidth"))
            self.driver.set_window_size(width, min(max(height + 20, 400), max_height))
        self.driver.save_screenshot(str(path))
