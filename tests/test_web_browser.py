"""The registry's pages in a real headless Chromium (selenium, Debian's chromium and chromium-driver): each page
opens, search finds, a lineage link leads to the parent, the compare view shows the diff, the plotted points are
the registry's values, HTML in a description never runs; a screenshot of each page goes to docs/screenshots/."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from webregistry import make_registry

from hub.client import Hub, Query
from hub.web import create_app

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
# Without the network-related switches Chromium waits on a network this machine does not have.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900"]



@pytest.fixture(scope="module", autouse=True)
def chromium_installed() -> None:
    """CI installs Chromium (.ci/run) and must run these tests; a developer machine without it skips them."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        message = "needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Hub:
    return make_registry(tmp_path_factory.mktemp("browser"))


@pytest.fixture(scope="module")
def server(hub: Hub) -> Iterator[str]:
    """The pages served by uvicorn on a free local port, in a thread."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app_server = uvicorn.Server(uvicorn.Config(create_app(hub), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=app_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not app_server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the web server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    app_server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    profile = tempfile.mkdtemp(prefix="hub-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver, name: str) -> None:
    """The whole page as docs/screenshots/NAME.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(height + 40, 600), 3000))
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    driver.set_window_size(1280, 900)


def navigated(driver, old_page, path: str) -> None:
    """Wait until a click or Enter on OLD_PAGE has loaded a page whose URL contains PATH.

    Selenium returns from click() and send_keys() before the browser has followed the link or submitted the form;
    reading elements at once reads the old page (a CI run failed that way).
    """
    WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.TAG_NAME, "html") != old_page and path in d.current_url
        and d.execute_script("return document.readyState") == "complete")


def test_every_page_in_a_real_browser(browser, server: str, hub: Hub) -> None:
    driver = browser
    driver.get(server + "/")
    assert driver.find_element(By.ID, "count-versions").text.startswith("5")
    screenshot(driver, "home")

    # Search from the box in the header: the adapter named so comes first.
    box = driver.find_element(By.ID, "q")
    page = driver.find_element(By.TAG_NAME, "html")
    box.send_keys("math-lora", Keys.ENTER)
    navigated(driver, page, "/search?")
    links = driver.find_elements(By.CSS_SELECTOR, "table.versions a.version-link")
    assert [link.text for link in links][:2] == ["math-lora@2", "math-lora@1"]
    screenshot(driver, "search")

    # The adapter line: each plotted point is the registry's value for that version.
    driver.get(server + "/adapters/math-lora")
    plotted = {(svg.get_attribute("data-metric"), svg.get_attribute("data-dataset"),
                int(point.get_attribute("data-version")), float(point.get_attribute("data-value")))
               for svg in driver.find_elements(By.CSS_SELECTOR, "svg.chart")
               for point in svg.find_elements(By.CSS_SELECTOR, "circle.point")}
    recorded = {(m.key, m.dataset or "", v.number, m.value)
                for v in hub.list(Query(name="math-lora", include_yanked=True)) for m in v.metrics}
    assert plotted == recorded and len(plotted) == 4
    screenshot(driver, "adapter")

    # A version made by a merge: follow a lineage link to its parent.
    driver.get(server + "/adapters/blend/1")
    assert "blend@1" in driver.title
    screenshot(driver, "version")
    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, "ul.lineage-list a.version-link").click()
    navigated(driver, page, "/adapters/math-lora/1")
    assert driver.current_url.endswith("/adapters/math-lora/1")
    assert driver.find_element(By.CSS_SELECTOR, "svg.lineage a.node.child").get_attribute("data-ref") == "blend@1"

    # The base: exact and structural matches told apart.
    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, "dd a.base-link").click()
    navigated(driver, page, "/bases/")
    badges = {badge.text for badge in driver.find_elements(By.CSS_SELECTOR, "table.versions .badge.exact, "
                                                                                   "table.versions .badge.structural")}
    assert badges == {"exact", "structural"}
    screenshot(driver, "base")

    # Compare a version with the merge it went into.
    driver.get(server + "/compare")
    driver.find_element(By.NAME, "a").send_keys("math-lora@1")
    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.NAME, "b").send_keys("blend@1", Keys.ENTER)
    navigated(driver, page, "b=")
    rows = driver.find_elements(By.CSS_SELECTOR, "#modules tbody tr")
    expected = hub.diff("math-lora@1", "blend@1").weights.modules
    assert [row.get_attribute("data-module") for row in rows] == [m.module for m in expected]
    assert float(rows[0].get_attribute("data-norm-diff")) == pytest.approx(expected[0].norm_diff)
    screenshot(driver, "compare")


def test_html_in_a_description_is_shown_not_run(browser, server: str) -> None:
    browser.get(server + "/adapters/style-ia3/1")
    assert browser.execute_script("return window.__pwned === undefined")
    assert "<script>window.__pwned = 1</script>" in browser.find_element(By.CLASS_NAME, "description").text


def test_missing_pages_are_pages(browser, server: str) -> None:
    browser.get(server + "/adapters/nope")
    assert "no adapter named 'nope'" in browser.find_element(By.ID, "error-message").text
    browser.get(server + "/search?q=" + "x" * 700)
    assert "at most 500" in browser.find_element(By.ID, "error-message").text
