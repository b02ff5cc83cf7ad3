"""The HTML report opened in a real headless Chromium: no console errors, the table and every image visible.

Needs the distribution's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and ``selenium``
(the ``browser`` extra). Under CI a missing browser fails the test; elsewhere it is skipped. The screenshot
is kept in ``tests/artifacts/`` (ignored by git).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fuselab.experiments.runner import execute_plan, prepare
from fuselab.experiments.spec import parse_spec
from fuselab.experiments.store import Store
from fuselab.report.experiment import build_report

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must install chromium and chromium-driver (.ci/run does)")
    pytest.skip(reason)


def _browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install '.[browser]')")
    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser") if shutil.which(b)), None)
    driver_path = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if Path(p).is_file()), None)
    if binary is None or driver_path is None:
        _unavailable("chromium or chromedriver is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument("--window-size=1280,2400")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver_path))


@pytest.fixture(scope="module")
def html_report(tmp_path_factory):
    spec = parse_spec({
        "name": "browser",
        "base": {"data": {"name": "mfeat", "views": ["fou", "zer"]}, "model": {"name": "mlp-streams", "hidden": 16},
                 "train": {"epochs": 2, "batch_size": 128}},
        "grid": {"fusion.name": ["concat", "sum", "late"]},
        "seeds": [0, 1],
    })
    root = tmp_path_factory.mktemp("browser") / "store"
    store = Store(root)
    execute_plan(prepare(spec, store), store, jobs=1)
    return build_report(root, "browser", pdf=False, flops=True).files["html"]


def test_html_report_renders_in_headless_chromium(html_report):
    from selenium.webdriver.common.by import By

    driver = _browser()
    try:
        driver.get(html_report.resolve().as_uri())
        assert driver.title == "Comparison report: browser"
        table = driver.find_element(By.ID, "results")
        assert table.is_displayed() and table.size["height"] > 50
        rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
        assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == ["concat", "sum", "late"]
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == 3  # accuracy vs parameters, vs FLOPs, training curves
        for image in images:
            loaded = driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)
            assert loaded and image.is_displayed() and image.size["width"] > 200, image.get_attribute("alt")
        figure = driver.find_element(By.CSS_SELECTOR, "#network svg")
        assert figure.is_displayed() and figure.size["width"] > 200
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "html_report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        driver.quit()
