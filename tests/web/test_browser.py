"""The review app in a real browser: Debian's chromium driven through chromedriver (selenium).

It logs in through the form, opens the worklist, opens a study, shows the heatmap with `h`,
gives a verdict with `a` and finds it in the ledger, steps with `j`/`k`, and saves screenshots
of the worklist, the study page and the stats page (to BONEWATCH_SCREENSHOT_DIR too, when set:
docs/images/ holds the README's). Without chromium and chromium-driver the tests skip, saying
so, except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from bonewatch.db.reviews import NewReview, record_review, study_reviews
from bonewatch.db.worklist import WorklistFilter, bundle_versions, query_worklist, study_detail
from bonewatch.web import create_app
from tests.web.conftest import REVIEWER

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=1440,900",
    "--hide-scrollbars",
)


def _missing(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true, so this is an error, not a skip)", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def browser() -> Iterator[object]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        _missing(
            "the browser tests need Debian's chromium and chromium-driver packages "
            f"({CHROMIUM}, {CHROMEDRIVER}): apt-get install -y chromium chromium-driver"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("the browser tests need the selenium package (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server(web_config, web_engine) -> Iterator[str]:
    """The app served by uvicorn on a free loopback port, in a thread."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        create_app(web_config, engine=web_engine),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
    )
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


def _wait(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("the page did not get there in time")


def _save(driver, name: str, tmp_path: Path) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), name
    wanted = os.environ.get("BONEWATCH_SCREENSHOT_DIR")
    if wanted:
        Path(wanted).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(wanted) / name)
        (Path(wanted) / name).chmod(0o644)
    return path


def _showcase(engine) -> tuple[int, str]:
    """The worklist position and UID of a study with several images and a heatmap."""
    b = bundle_versions(engine)[0]
    page = query_worklist(engine, WorklistFilter(bundle_name=b.name, bundle_version=b.version))
    for position, row in enumerate(page.rows):
        detail = study_detail(engine, row.study_uid)
        heatmaps = [i for i in detail.images if i.prediction and i.prediction.has_heatmap]
        if heatmaps and len(detail.images) >= 2:
            return position, row.study_uid
    return 0, page.rows[0].study_uid


def test_review_in_a_real_browser(browser, server, web_engine, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(f"{server}/studies")
    _wait(lambda: "/login" in driver.current_url)
    driver.find_element(By.NAME, "username").send_keys(REVIEWER[0])
    driver.find_element(By.NAME, "password").send_keys(REVIEWER[1])
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    _wait(lambda: driver.current_url.endswith("/studies"))
    rows = driver.find_elements(By.CSS_SELECTOR, "table.worklist tbody tr[data-href]")
    assert len(rows) >= 10

    position, uid = _showcase(web_engine)
    link = driver.find_elements(By.CSS_SELECTOR, "td.uid a")[position]
    assert link.get_attribute("title") == uid
    link.click()
    _wait(lambda: "/studies/" + quote(uid, safe="/") in driver.current_url)
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "body.page-study img.base"))
    _wait(lambda: all(img.get_property("complete") and img.get_property("naturalWidth") > 0
                      for img in driver.find_elements(By.CSS_SELECTOR, "img.base")))  # fmt: skip
    overlay = driver.find_element(By.CSS_SELECTOR, "img.overlay")
    keys = ActionChains(driver)
    if "heatmaps-on" in driver.find_element(By.TAG_NAME, "body").get_attribute("class"):
        keys.send_keys("h").perform()  # start from "off", whatever the last session left
    assert not overlay.is_displayed()
    ActionChains(driver).send_keys("h").perform()
    _wait(overlay.is_displayed)
    assert driver.find_element(By.ID, "toggle-heatmap").get_attribute("aria-pressed") == "true"
    _wait(lambda: overlay.get_property("complete") and overlay.get_property("naturalWidth") > 0)
    _save(driver, "study.png", tmp_path)

    study_url = driver.current_url
    ActionChains(driver).send_keys("a").perform()  # agree: saved, and on to the next study
    _wait(lambda: driver.current_url != study_url and "saved=" in driver.current_url)
    saved = study_reviews(web_engine, uid)
    detail = study_detail(web_engine, uid)
    assert [(r.verdict, r.reviewer, r.label) for r in saved] == [
        ("agree", REVIEWER[0], detail.result.label)
    ]
    assert "Verdict saved" in driver.find_element(By.CSS_SELECTOR, ".flash").text
    assert f"pos={position + 1}" in driver.current_url
    ActionChains(driver).send_keys("k").perform()  # back to the reviewed study
    _wait(lambda: f"pos={position}" in driver.current_url and "saved=" not in driver.current_url)
    assert "agree" in driver.find_element(By.CSS_SELECTOR, "ol.reviews").text
    ActionChains(driver).send_keys("j").perform()
    _wait(lambda: f"pos={position + 1}" in driver.current_url)

    # the stats page, once more studies have verdicts
    b = bundle_versions(web_engine)[0]
    page = query_worklist(web_engine, WorklistFilter(bundle_name=b.name, bundle_version=b.version))
    for i, row in enumerate(page.rows):
        if row.study_uid != uid and i % 3 != 1:
            record_review(
                web_engine,
                NewReview(study_uid=row.study_uid, reviewer="alice",
                          verdict="disagree" if i % 4 == 3 else "agree",
                          bundle_name=b.name, bundle_version=b.version),
            )  # fmt: skip
    driver.get(f"{server}/studies?sort=uncertain")
    assert "disagree" in driver.find_element(By.CSS_SELECTOR, "table.worklist").text
    _save(driver, "worklist.png", tmp_path)
    driver.get(f"{server}/stats")
    roc = driver.find_element(By.CSS_SELECTOR, "figure.roc img")
    _wait(lambda: roc.get_property("complete") and roc.get_property("naturalWidth") > 0)
    assert "overall" in driver.find_element(By.CSS_SELECTOR, "table.stats").text
    _save(driver, "stats.png", tmp_path)

    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors  # no script error, no Content-Security-Policy violation
