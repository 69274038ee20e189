"""The plugin in the real Airflow UI, in Debian's headless Chromium (Selenium), on the embedded stack.

Starts the stack as `make run` does (scripts/run_embedded.py, through
tests/support/embedded_stack.py: private AIRFLOW_HOME, free 127.0.0.1 ports, the demo
API), waits for the first `network_request_periodic` run, whose tight demo API makes some
`fetch` tasks wait (deferred to the triggerer), then, as a person would:

1. logs in (simple auth manager, the generated admin password);
2. opens the DAG, then the logs of a `fetch` task that waited;
3. opens its Details, follows the "API endpoint" extra link;
4. opens Browse → "Rate limits" and reads the plugin's page inside the UI.

A screenshot of each step goes to test-artifacts/browser/ (git-ignored). With
``NETWORK_REQUESTS_SCREENSHOT=docs/rate-limits-page.png`` (a path, relative to the repository)
the last one, the Rate limits page with its gate and a wait on the timeline, is also saved
there: that is how the README's screenshot is made.
Needs `apt-get install -y chromium chromium-driver` and the Python package selenium.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.browser, pytest.mark.stack]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
#: Where to save the Rate limits page for the docs, if set (relative to the repository).
SCREENSHOT_ENV = "NETWORK_REQUESTS_SCREENSHOT"
DAG_ID = "network_request_periodic"
CONN_ID = "network_request_api"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)
START_TIMEOUT = 240
#: From a healthy API server to a deferred fetch task of the first run succeeding: the DAG is
#: parsed, the run created, six tasks launched, three of them wait ~5 s each for the demo
#: API's tokens. A busy 2-core machine took more than 120 s (CI of 2026-12-02).
RUN_TIMEOUT = 300
UI_TIMEOUT = 30

if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
    pytest.skip(
        "Debian's chromium is not installed (/usr/bin/chromium, /usr/bin/chromedriver): "
        "apt-get update && apt-get install -y chromium chromium-driver",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (requirements-dev.txt)")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.support.embedded_stack import EmbeddedStack  # noqa: E402


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[EmbeddedStack]:
    with EmbeddedStack(tmp_path / "airflow-home") as stack:
        yield stack


@pytest.fixture
def browser(tmp_path: Path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    # Debian's driver, given explicitly: Selenium Manager would try to download one.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(UI_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def shoot(driver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def wait(driver, condition, timeout: float = UI_TIMEOUT):
    return WebDriverWait(driver, timeout).until(condition)


def body_text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def fetch_states(stack: EmbeddedStack) -> str:
    """The latest periodic run's fetch tasks (state, try), for a failure message."""
    runs = stack.get_or_none(f"/api/v2/dags/{DAG_ID}/dagRuns?order_by=-run_after&limit=1")
    if not runs or not runs["dag_runs"]:
        return "no run yet"
    run = runs["dag_runs"][0]
    tis = stack.get_or_none(f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run['dag_run_id'])}/taskInstances")
    shown = [(ti.get("map_index"), ti.get("state"), ti.get("try_number")) for ti in (tis or {}).get("task_instances", [])]
    return f"run {run['dag_run_id']} ({run.get('state')}): {sorted(shown, key=str)}"


def test_waiting_task_extra_link_and_rate_limit_page_in_the_browser(stack: EmbeddedStack, browser):
    started = time.monotonic()
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    base = stack.base_url
    stack.wait_for("the API server to be healthy", lambda: stack.healthy(components=False), START_TIMEOUT, interval=1)
    password = stack.password()

    # The first periodic run: find a fetch task that the wait history says was deferred,
    # and wait for it to succeed.
    found: dict[str, object] = {}

    def deferred_task_succeeded() -> bool:
        variable = stack.variable(f"network_requests.waits.{CONN_ID}")
        runs = stack.get_or_none(f"/api/v2/dags/{DAG_ID}/dagRuns?order_by=-run_after&limit=1")
        if not variable or not runs or not runs["dag_runs"]:
            return False
        waits = [w for w in json.loads(variable) if w["mode"] == "defer"]
        run_id = runs["dag_runs"][0]["dag_run_id"]
        for wait_entry in waits:
            label = wait_entry["task"]  # network_request_periodic.fetch[3]
            if not label.startswith(f"{DAG_ID}.fetch["):
                continue
            map_index = int(label.rsplit("[", 1)[1].rstrip("]"))
            ti = stack.get_or_none(f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id)}/taskInstances/fetch/{map_index}")
            if ti and ti["state"] == "success":
                found.update(run_id=run_id, map_index=map_index, url=wait_entry["url"], ti=ti)
                return True
        return False

    try:
        stack.wait_for("a deferred fetch task of the first periodic run to succeed", deferred_task_succeeded,
                       RUN_TIMEOUT)
    except Exception as error:
        raise AssertionError(f"{error}\n\nthe fetch tasks of the latest run: {fetch_states(stack)}") from None
    run_id, map_index, expected_url = found["run_id"], found["map_index"], found["url"]
    assert found["ti"]["try_number"] == 1, "a rate-limit wait must not spend a try"
    task_path = f"/dags/{DAG_ID}/runs/{urllib.parse.quote(str(run_id))}/tasks/fetch/mapped/{map_index}"

    # 1. Log in like a person: the UI sends us to the simple auth manager's login page.
    browser.get(base + "/")
    wait(browser, EC.presence_of_element_located((By.NAME, "username")))
    assert "/auth/login" in browser.current_url
    shoot(browser, "01-login")
    browser.find_element(By.NAME, "username").send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys(password)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(browser, lambda d: "/auth/login" not in d.current_url and d.get_cookie("_token"))
    wait(browser, EC.presence_of_element_located((By.XPATH, "//button[normalize-space()='Browse']")))
    shoot(browser, "02-home")

    # 2. The DAG, then the logs of the task that waited, deferred.
    browser.get(f"{base}/dags/{DAG_ID}")
    wait(browser, EC.presence_of_element_located((By.XPATH, f"//*[contains(text(), '{DAG_ID}')]")))
    shoot(browser, "03-dag")
    browser.get(base + task_path)
    wait(browser, lambda d: "without spending a try" in body_text(d))
    logs = body_text(browser)
    assert "deferred" in logs
    shoot(browser, "04-task-logs-deferred")

    # 3. Details → Extra Links → "API endpoint": the request URL, no credentials.
    browser.get(base + task_path + "/details")
    link = wait(browser, EC.element_to_be_clickable((By.XPATH, "//a[normalize-space()='API endpoint']")))
    href = link.get_attribute("href")
    assert href == expected_url
    assert href.startswith(f"http://127.0.0.1:{stack.demo_port}/api/") and "@" not in href
    shoot(browser, "05-task-details-extra-link")
    ui_window = browser.current_window_handle
    link.click()
    wait(browser, lambda d: len(d.window_handles) == 2)
    browser.switch_to.window(next(h for h in browser.window_handles if h != ui_window))
    wait(browser, lambda d: d.current_url == href)
    wait(browser, lambda d: body_text(d).strip().startswith(("{", "[")))  # the demo API's JSON (data or a 429)
    shoot(browser, "06-api-endpoint")
    browser.close()
    browser.switch_to.window(ui_window)

    # 4. Browse → Rate limits: the plugin's page, embedded in the UI.
    browser.find_element(By.XPATH, "//button[normalize-space()='Browse']").click()
    entry = wait(browser, EC.element_to_be_clickable((By.XPATH, "//a[normalize-space()='Rate limits']")))
    shoot(browser, "07-browse-menu")
    entry.click()
    wait(browser, lambda d: d.current_url.endswith("/plugin/rate-limits"))
    frame = wait(browser, EC.presence_of_element_located((By.TAG_NAME, "iframe")))
    browser.switch_to.frame(frame)
    section = wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, f"section[data-conn='{CONN_ID}']")))
    assert section.find_elements(By.CSS_SELECTOR, "svg.timeline rect.bar"), "no wait on the timeline"
    assert f"{DAG_ID}.fetch[{map_index}]" in section.text
    assert "Gate state" in section.text and "Pacing interval" in section.text
    browser.switch_to.default_content()
    shoot(browser, "08-rate-limits-page")
    if os.environ.get(SCREENSHOT_ENV):
        for_docs = REPO_ROOT / os.environ[SCREENSHOT_ENV]
        for_docs.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(for_docs)), f"could not save {for_docs}"

    print(f"browser test: {time.monotonic() - started:.0f} s")
