"""A real headless Chromium (Debian's ``chromium`` and ``chromium-driver``)
driven by Selenium, and axe-core from npm (``npm ci`` in this directory).

Selenium is pointed at /usr/bin/chromedriver and /usr/bin/chromium, so it
never downloads a browser or a driver. Each test gets a fresh profile
(``--user-data-dir`` in tmp_path) and Chromium's background traffic
(updates, sync, QUIC probes) is switched off; the only pages it opens are
the ones the test serves on 127.0.0.1.

Without the browser or axe-core these tests skip, naming what to install;
``KYNARA_BROWSER_TESTS=required`` (set by ``.ci/run``) makes that a failure.
Screenshot paths are listed at the end of the run (a temp dir, or
``KYNARA_SCREENSHOTS``).
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
from collections.abc import Iterator

import pytest

CHROMIUM = pathlib.Path("/usr/bin/chromium")
CHROMEDRIVER = pathlib.Path("/usr/bin/chromedriver")
AXE = pathlib.Path(__file__).parent / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
# The widths the page must work at: a laptop and a current phone.
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}
# How long to wait for a page to load after a click (a wait, not a check).
PAGE_WAIT_SECONDS = 20

_SCREENSHOTS: list[str] = []


def _missing() -> str:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        return (
            "needs Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver)"
        )
    if not AXE.exists():
        return "needs axe-core: run `npm ci` in tests/browser"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium: scripts/setup --test"
    return ""


@pytest.fixture(scope="session")
def browser_tools() -> None:
    why = _missing()
    if why:
        if os.environ.get("KYNARA_BROWSER_TESTS") == "required":
            pytest.fail(f"browser tests required but {why}")
        pytest.skip(why)


@pytest.fixture(params=sorted(SIZES), ids=sorted(SIZES))
def chromium(request, browser_tools, tmp_path) -> Iterator:
    """A headless Chromium at the parametrized window size."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    width, height = SIZES[request.param]
    options.add_argument(f"--window-size={width},{height}")
    service = Service(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(service=service, options=options)
    driver.size_name = request.param
    try:
        driver.set_window_size(width, height)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory) -> pathlib.Path:
    """``KYNARA_SCREENSHOTS`` (a directory, for CI artifacts) or a temp dir;
    pytest keeps only its last few temp dirs."""
    chosen = os.environ.get("KYNARA_SCREENSHOTS")
    if chosen:
        path = pathlib.Path(chosen)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("review-page-screenshots")


@pytest.fixture
def screenshot(chromium, screenshot_dir, request):
    """Save the current page as <test>-<size>-<name>.png; return the path."""

    def take(name: str) -> pathlib.Path:
        test = request.node.originalname
        path = screenshot_dir / f"{test}-{chromium.size_name}-{name}.png"
        # The whole page, not only the window: the review form is at the end.
        size = chromium.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        # Captured beyond the viewport, the page is laid out without its
        # scrollbar, at the window's full width: clip to that, not to the
        # content width measured beside the scrollbar.
        width = max(size["width"], chromium.execute_script("return innerWidth"))
        clip = {"x": 0, "y": 0, "scale": 1}
        clip |= {"width": width, "height": size["height"]}
        shot = chromium.execute_cdp_cmd(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": clip},
        )
        path.write_bytes(base64.b64decode(shot["data"]))
        _SCREENSHOTS.append(str(path))
        return path

    return take


@pytest.fixture
def axe(chromium):
    """Run axe-core on the current page; return its violations."""
    source = AXE.read_text()

    def check() -> list[dict]:
        chromium.execute_script(source)
        result = chromium.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "axe.run(document, {resultTypes: ['violations']})"
            ".then(r => done(JSON.stringify(r.violations)))"
            ".catch(e => done(JSON.stringify({error: String(e)})));"
        )
        violations = json.loads(result)
        assert isinstance(violations, list), f"axe failed: {violations}"
        return violations

    return check


def pytest_terminal_summary(terminalreporter) -> None:
    if _SCREENSHOTS:
        terminalreporter.section("review page screenshots")
        for path in _SCREENSHOTS:
            terminalreporter.write_line(path)
