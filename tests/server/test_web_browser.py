"""The web view in headless Chromium (Debian's `chromium` + `chromium-driver`), through Selenium."""

import shutil

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="headless Chromium is absent: install Debian's chromium and chromium-driver packages to run this test")


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_page_loads_and_a_prompt_shows_its_routing(live, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _, url = live
    root = url.removesuffix("/v1")
    browser.get(f"{root}/?key=secret")
    wait = WebDriverWait(browser, 30)
    # the library table fills from /v1/loramux/library
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#library tr.row")) == 3)
    names = [row.find_element(By.TAG_NAME, "td").text for row in browser.find_elements(By.CSS_SELECTOR, "#library tr.row")]
    assert names == ["a", "b", "c"]
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#router option")]
    assert "arrow" in options
    browser.find_element(By.ID, "prompt").send_keys("one two three")
    Select(browser.find_element(By.ID, "router")).select_by_visible_text("arrow")
    browser.find_element(By.ID, "go").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#routing .bar")))
    shown = browser.find_element(By.ID, "routing").text
    assert any(name in shown for name in ("a", "b", "c")), shown
    shot = tmp_path / "web-view.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
