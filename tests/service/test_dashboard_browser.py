"""The dashboard in a real headless browser (Debian's chromium + chromedriver, driven
by selenium) against the real API, PostgreSQL, Redis and a Celery worker.

One flow, as a user would go: sign in with a team key, see the job list, open a
running pretrain job and watch its plot gain points, cancel it and see the state turn
cancelled, compare it with a second job, look at a diagnosis, get a field error from
the submit form. Screenshots of each page go to LDREG_SCREENSHOT_DIR (the committed
ones in docs/screenshots/ are linked from the README).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ServiceProcess
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from ldreg import registry

ROOT = Path(__file__).resolve().parents[2]
# Screenshots land in a temporary folder unless LDREG_SCREENSHOT_DIR names one; to
# refresh the committed ones: LDREG_SCREENSHOT_DIR=docs/screenshots pytest <this file>.
SCREENSHOTS = Path(
    os.environ.get("LDREG_SCREENSHOT_DIR") or tempfile.mkdtemp(prefix="ldreg-screens-")
)
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Small enough for a CPU: a few seconds per epoch on digits at 8x8 pixels.
SMALL = {
    "method": "simclr",
    "backbone": "resnet18",
    "width": 8,
    "dataset": {"name": "digits", "image_size": 8},
    "epochs": 6,
    "batch_size": 64,
    "ldreg": {"alpha": 0.01, "k": 16, "warmup_epochs": 1},
    "eval": {"lid_k": [32, 512], "max_samples": 600, "knn_k": [20]},
}

# The job we follow and cancel: long enough (an epoch takes a second or two) that it is
# still training when the Cancel button is pressed, however slow the machine. With six
# epochs it could finish first, and a job that finished before the cancellation took
# effect rightly stays succeeded.
FOLLOWED = {**SMALL, "epochs": 40}


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        # Debian's packages only; never a downloaded browser build.
        subprocess.run(["bash", str(ROOT / "scripts" / "ensure-browser.sh")], check=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--window-size=1366,900",  # a laptop
    ):
        options.add_argument(flag)
    # An explicit driver path: selenium never tries to fetch one.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition: Callable, timeout: float, what: str):
    return WebDriverWait(
        driver, timeout, poll_frequency=0.25, ignored_exceptions=[StaleElementReferenceException]
    ).until(lambda d: condition(d), message=f"timed out waiting for {what}")


# Read through JavaScript in one call: the page re-renders its rows every poll, so an
# element found by one WebDriver call may be gone by the next.
def listed_ids(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#job-rows tr[data-job-id]')]"
        ".map(r => r.dataset.jobId)"
    )


def row_texts(driver) -> dict[str, str]:
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#job-rows tr[data-job-id]')]"
        ".map(r => [r.dataset.jobId, r.innerText]))"
    )


def row_state(driver, job_id: str) -> str | None:
    return driver.execute_script(
        "const r = document.querySelector(`tr[data-job-id='${arguments[0]}']`);"
        "return r ? r.dataset.state : null",
        job_id,
    )


def list_refreshes(driver) -> int:
    return int(driver.find_element(By.ID, "job-rows").get_attribute("data-refreshes") or 0)


def page_state(driver) -> str | None:
    return driver.execute_script(
        "const b = document.querySelector(\"dd[data-field='state'] [data-state]\");"
        "return b ? b.dataset.state : null"
    )


def points(driver, chart_id: str) -> int:
    return driver.execute_script(
        "const f = document.getElementById(arguments[0]);"
        "return f ? Number(f.dataset.points || 0) : 0",
        chart_id,
    )


def screenshot(driver, name: str, full_page: bool = True) -> None:
    """A PNG of the page at laptop width (the whole page's height when asked)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    if full_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1366, min(max(900, height + 20), 4000))
        time.sleep(0.4)  # charts resize to the new viewport
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    driver.set_window_size(1366, 900)


def test_dashboard_signs_in_follows_a_live_job_cancels_and_compares(
    browser: webdriver.Chrome,
    api_server: str,
    team_key: str,
    pg_url: str,
    tmp_path: Path,
    start_worker: Callable[..., ServiceProcess],
) -> None:
    api = httpx.Client(
        base_url=api_server, headers={"Authorization": f"Bearer {team_key}"}, timeout=30
    )
    # A diagnosis (quick: done before the first pretrain epoch ends), then the LDReg
    # run we follow live, then its baseline without LDReg for the comparison.
    rng = np.random.default_rng(0)
    emb = tmp_path / "embeddings.npy"
    np.save(emb, (rng.standard_normal((600, 6)) @ rng.standard_normal((6, 48))).astype("f4"))
    with open(emb, "rb") as f:
        upload = api.post("/v1/uploads", files={"file": ("embeddings.npy", f)}).json()
    diag_spec = {"source": {"upload_id": upload["id"]}, "k": [16, 64]}
    diag = api.post(
        "/v1/jobs", json={"kind": "diagnose", "name": "embeddings.npy", "spec": diag_spec}
    ).json()
    ldreg = api.post(
        "/v1/jobs", json={"kind": "pretrain", "name": "simclr+ldreg", "spec": FOLLOWED}
    ).json()
    base = api.post(
        "/v1/jobs",
        json={"kind": "pretrain", "name": "simclr baseline", "spec": {**SMALL, "ldreg": None}},
    ).json()
    start_worker()
    d = browser

    # Sign in: a wrong key is refused next to the field; the right one is kept in
    # sessionStorage only.
    d.get(f"{api_server}/")
    key_input = wait(d, lambda d: d.find_element(By.ID, "api-key"), 10, "the sign-in form")
    screenshot(d, "sign-in", full_page=False)
    key_input.send_keys("ldr_wrong")
    d.find_element(By.ID, "sign-in").click()
    wait(d, lambda d: "not accepted" in d.find_element(By.ID, "signin-error").text, 10, "refusal")
    key_input.clear()
    key_input.send_keys(team_key)
    d.find_element(By.ID, "sign-in").click()
    wait(d, lambda d: ldreg["id"] in listed_ids(d), 15, "the job list")
    storage = d.execute_script(
        "return [sessionStorage.getItem('ldreg.apiKey'), localStorage.length, document.cookie]"
    )
    assert storage == [team_key, 0, ""]

    # The list shows all three jobs, newest first, with kind, method and LDReg switch.
    assert listed_ids(d) == [base["id"], ldreg["id"], diag["id"]]
    texts = row_texts(d)
    assert "simclr" in texts[ldreg["id"]] and "on (α=0.01)" in texts[ldreg["id"]]
    assert "off" in texts[base["id"]] and "diagnose" in texts[diag["id"]]

    # The LDReg job starts running; the list updates itself (no reload).
    wait(d, lambda d: row_state(d, ldreg["id"]) == "running", 120, "the LDReg job to run")
    wait(d, lambda d: row_state(d, diag["id"]) == "succeeded", 30, "the diagnosis")
    # The state filter narrows the list.
    Select(d.find_element(By.ID, "filter-state")).select_by_value("running")
    wait(d, lambda d: listed_ids(d) == [ldreg["id"]], 10, "the filtered list")
    Select(d.find_element(By.ID, "filter-state")).select_by_value("")
    wait(d, lambda d: len(listed_ids(d)) == 3, 10, "the unfiltered list")

    # Open the running job: its loss plot gains points while we watch.
    d.find_element(By.CSS_SELECTOR, f"tr[data-job-id='{ldreg['id']}'] a").click()
    wait(d, lambda d: points(d, "chart-loss") >= 1, 150, "the first epoch's points")
    first = points(d, "chart-loss")
    # The page polls every 2 s; the Cancel button must be the same element across polls
    # (a replaced button loses a click that lands while a poll re-renders the page).
    cancel_button = d.find_element(By.ID, "cancel-job")
    wait(d, lambda d: points(d, "chart-loss") > first, 150, "the plot to update")
    # The loss terms come every step; the evaluations once an epoch has ended.
    wait(
        d,
        lambda d: points(d, "chart-lid") >= 2 and points(d, "chart-rank") >= 1,
        150,
        "the first evaluation",
    )
    progress = d.find_element(By.CSS_SELECTOR, "dd[data-field='progress'] progress")
    assert int(progress.get_attribute("value")) >= 1 and progress.get_attribute("max") == "40"
    screenshot(d, "job-running")

    # Cancel: it asks first; then the state turns cancelled in the page, the timeline
    # shows why.
    cancel_button.click()
    wait(d, lambda d: d.find_element(By.ID, "cancel-confirm").is_displayed(), 5, "the question")
    assert page_state(d) == "running"  # nothing happened yet
    d.find_element(By.ID, "confirm-cancel").click()
    wait(d, lambda d: "Cancellation requested" in d.find_element(By.ID, "notice").text, 10, "ack")
    wait(d, lambda d: page_state(d) == "cancelled", 60, "the job to be cancelled")
    wait(d, lambda d: "→ cancelled" in d.find_element(By.ID, "events").text, 10, "the event")
    assert d.find_element(By.ID, "retry-job").is_enabled()
    assert not d.find_element(By.ID, "cancel-job").is_enabled()
    assert api.get(f"/v1/jobs/{ldreg['id']}").json()["state"] == "cancelled"

    # Compare the two pretrain jobs from the list; the baseline's curve appears once
    # the worker has moved on to it.
    d.get(f"{api_server}/#/jobs")
    wait(d, lambda d: len(listed_ids(d)) == 3, 10, "the job list")
    # The rows' checkboxes, too, outlive the list's polls.
    boxes = [
        d.find_element(By.CSS_SELECTOR, f"tr[data-job-id='{job['id']}'] input[type=checkbox]")
        for job in (ldreg, base)
    ]
    polls = list_refreshes(d)
    wait(d, lambda d: list_refreshes(d) >= polls + 2, 10, "two polls of the list")
    for box in boxes:
        box.click()
    d.find_element(By.ID, "compare-selected").click()
    wait(d, lambda d: d.find_elements(By.ID, "compare-table"), 20, "the comparison")
    header = d.find_element(By.CSS_SELECTOR, "#compare-table thead").text
    assert "simclr+ldreg" in header and "simclr baseline" in header
    # One plot per metric, one curve per job: the cancelled run's epochs are there.
    wait(d, lambda d: points(d, "chart-cmp-loss") >= 2, 10, "the LDReg run's loss curve")
    cancelled_points = points(d, "chart-cmp-loss")
    # Two epochs of the baseline, so its curve is a line next to the LDReg run's.
    wait(d, lambda d: points(d, "chart-cmp-loss") >= cancelled_points + 2, 180, "the baseline")
    screenshot(d, "compare")
    api.post(f"/v1/jobs/{base['id']}/cancel")

    # The diagnosis: LID table, collapse fraction and the histogram from its artifact.
    d.get(f"{api_server}/#/jobs/{diag['id']}")
    wait(d, lambda d: points(d, "chart-histogram") > 0, 20, "the LID histogram")
    table = d.find_element(By.ID, "diagnosis-table").text
    assert "LID k=16" in table and "collapsed k=64" in table and "%" in table
    screenshot(d, "diagnosis")

    # Submit form: the server's field error appears next to that field.
    d.get(f"{api_server}/#/submit")
    epochs = wait(d, lambda d: d.find_element(By.ID, "f-spec-epochs"), 10, "the submit form")
    # The choices come from the API's schema, so from the registry, not from the page.
    wait(
        d,
        lambda d: (
            [
                o.get_attribute("value")
                for o in Select(d.find_element(By.ID, "f-spec-method")).options
            ]
            == list(registry.METHODS)
        ),
        10,
        "the method choices from the API",
    )
    backbones = Select(d.find_element(By.ID, "f-spec-backbone")).options
    assert [o.get_attribute("value") for o in backbones] == list(registry.BACKBONES)
    epochs.clear()
    epochs.send_keys("0")
    d.find_element(By.ID, "submit-job").click()
    wait(d, lambda d: d.find_element(By.ID, "f-spec-epochs-error").text, 10, "the field error")
    assert "greater than or equal to 1" in d.find_element(By.ID, "f-spec-epochs-error").text
    assert epochs.get_attribute("aria-invalid") == "true"
    screenshot(d, "submit-validation", full_page=False)

    d.get(f"{api_server}/#/jobs")
    wait(d, lambda d: len(listed_ids(d)) == 3, 10, "the job list")
    screenshot(d, "jobs", full_page=False)
    api.close()


def chart_x(driver, chart_id: str) -> dict:
    """The x axis a chart shows: its setting, title and range (Chart.js's own scale)."""
    return driver.execute_script(
        "const f = document.getElementById(arguments[0]);"
        "const c = Chart.getChart(f.querySelector('canvas'));"
        "return {axis: f.dataset.x, title: c.options.scales.x.title.text,"
        " max: c.scales.x.max, points: Number(f.dataset.points)}",
        chart_id,
    )


def set_editor(driver, text: str) -> None:
    """Replace the spec editor's text as a paste would (one input event)."""
    driver.execute_script(
        "const e = document.getElementById('resubmit-spec'); e.focus(); e.value = arguments[0];"
        "e.dispatchEvent(new Event('input', {bubbles: true}))",
        text,
    )


def test_resubmit_with_changes_then_follow_its_curves_and_log_and_compare_the_specs(
    browser: webdriver.Chrome,
    api_server: str,
    team_key: str,
    start_worker: Callable[..., ServiceProcess],
) -> None:
    api = httpx.Client(
        base_url=api_server, headers={"Authorization": f"Bearer {team_key}"}, timeout=30
    )
    original = api.post(
        "/v1/jobs", json={"kind": "pretrain", "name": "short run", "spec": {**SMALL, "epochs": 2}}
    ).json()
    d = browser
    d.get(f"{api_server}/")
    d.execute_script("sessionStorage.clear()")
    d.refresh()
    # The sign-in page has no navigation bar (nothing to navigate to without a key).
    wait(d, lambda d: d.find_element(By.ID, "api-key"), 10, "the sign-in form")
    assert not d.find_element(By.ID, "nav").is_displayed()
    d.find_element(By.ID, "api-key").send_keys(team_key)
    d.find_element(By.ID, "sign-in").click()
    wait(d, lambda d: original["id"] in listed_ids(d), 15, "the job list")
    assert d.find_element(By.ID, "nav").is_displayed()

    # The job waits in the queue (no worker yet): empty charts say so, the log has not
    # started, and Retry says why it cannot be pressed.
    d.get(f"{api_server}/#/jobs/{original['id']}")
    wait(d, lambda d: page_state(d) == "queued", 10, "the queued job's page")
    empty = d.find_element(By.CSS_SELECTOR, "#chart-loss .chart-empty")
    assert empty.is_displayed() and empty.text == "no data yet"
    assert d.find_element(By.ID, "job-log-empty").is_displayed()
    retry = d.find_element(By.ID, "retry-job")
    assert not retry.is_enabled()
    assert "this one is queued" in d.find_element(By.ID, "retry-reason").text
    assert "queued" in retry.get_attribute("title")

    start_worker()
    wait(d, lambda d: page_state(d) == "succeeded", 180, "the short run to succeed")
    wait(d, lambda d: "nothing to retry" in d.find_element(By.ID, "retry-reason").text, 10, "why")
    assert not d.find_element(By.ID, "retry-job").is_enabled()

    # Resubmit with changes: the spec in an editor, checked by the server while typing.
    d.find_element(By.ID, "resubmit-job").click()
    editor = wait(d, lambda d: d.find_element(By.ID, "resubmit-spec"), 10, "the editor")
    wait(d, lambda d: '"epochs": 2' in editor.get_attribute("value"), 10, "the job's spec")
    wait(d, lambda d: "Valid" in d.find_element(By.ID, "resubmit-status").text, 10, "a check")
    spec_text = editor.get_attribute("value")
    name = d.find_element(By.ID, "resubmit-name")
    assert name.get_attribute("value") == "short run (changed)"
    name.clear()
    name.send_keys("long run")
    set_editor(d, spec_text.replace('"epochs": 2', '"epochs": 0'))
    error = wait(
        d,
        lambda d: d.find_element(By.CSS_SELECTOR, "#resubmit-errors li[data-field='spec.epochs']"),
        10,
        "the field error",
    )
    assert "greater than or equal to 1" in error.text and "line " in error.text
    assert editor.get_attribute("aria-invalid") == "true"
    assert not d.find_element(By.ID, "resubmit-submit").is_enabled()
    # Not JSON at all: said so, before the server is asked.
    set_editor(d, spec_text.replace('"epochs": 2', '"epochs": '))
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "li[data-field='json']"), 10, "JSON error")
    set_editor(d, spec_text.replace('"epochs": 2', '"epochs": 40'))
    wait(d, lambda d: "Valid" in d.find_element(By.ID, "resubmit-status").text, 10, "valid again")
    assert editor.get_attribute("aria-invalid") is None
    assert "epochs: 2 → 40" in d.find_element(By.ID, "resubmit-diff").text
    # The dry runs created nothing.
    assert [j["id"] for j in api.get("/v1/jobs").json()["jobs"]] == [original["id"]]
    d.find_element(By.ID, "resubmit-submit").click()
    wait(d, lambda d: "resubmit" not in d.current_url, 10, "the new job's page")
    new_id = d.current_url.rsplit("/", 1)[1]
    assert new_id != original["id"] and "Submitted job" in d.find_element(By.ID, "notice").text
    new = api.get(f"/v1/jobs/{new_id}").json()
    assert new["name"] == "long run" and new["spec"]["epochs"] == 40

    # Per-step curves: more points than epochs (one per step), on the axis chosen.
    wait(d, lambda d: page_state(d) == "running", 60, "the new job to run")
    wait(d, lambda d: chart_x(d, "chart-loss")["points"] > 3 * 4, 120, "per-step points")
    by_step = chart_x(d, "chart-loss")
    assert by_step["axis"] == "step" and by_step["title"] == "step"
    Select(d.find_element(By.ID, "chart-x")).select_by_value("epoch")
    wait(d, lambda d: chart_x(d, "chart-loss")["axis"] == "epoch", 5, "the epoch axis")
    by_epoch = chart_x(d, "chart-loss")
    assert by_epoch["title"] == "epoch" and by_epoch["points"] > 0
    assert by_epoch["max"] < by_step["max"]  # epochs, not steps
    Select(d.find_element(By.ID, "chart-x")).select_by_value("time")
    wait(d, lambda d: chart_x(d, "chart-loss")["title"] == "training time (s)", 5, "time axis")
    d.find_element(By.ID, "chart-log").click()  # log scale
    wait(
        d,
        lambda d: (
            d.execute_script(
                "return Chart.getChart(document.querySelector('#chart-loss canvas'))"
                ".options.scales.y.type"
            )
            == "logarithmic"
        ),
        5,
        "the log scale",
    )
    d.find_element(By.ID, "chart-log").click()
    Select(d.find_element(By.ID, "chart-x")).select_by_value("step")

    # The live log: the claim, then a line per epoch, as they are written.
    log = d.find_element(By.ID, "job-log")
    wait(d, lambda d: "claimed" in log.text, 30, "the log's first lines")
    wait(d, lambda d: "epoch 2/40 done" in log.text, 120, "an epoch's line")
    lines = int(log.get_attribute("data-lines"))
    wait(d, lambda d: int(log.get_attribute("data-lines")) > lines, 60, "more lines")
    assert "live" in d.find_element(By.ID, "log-status").text
    d.execute_script("document.getElementById('log').scrollIntoView({block: 'end'})")
    screenshot(d, "job-log", full_page=False)

    # Compare with the original while it runs: only the spec fields that differ, and
    # the running job's values marked as the latest, not final.
    d.get(f"{api_server}/#/compare?jobs={original['id']},{new_id}")
    diff = wait(d, lambda d: d.find_element(By.ID, "compare-spec-diff"), 20, "the spec diff")
    rows = d.execute_script(
        "return [...document.querySelectorAll('#compare-spec-diff tbody tr')]"
        ".map(r => [r.dataset.field, ...[...r.querySelectorAll('td')].map(c => c.innerText)])"
    )
    assert rows == [["epochs", "2", "40"]], rows
    assert "short run" in diff.text and "long run" in diff.text
    table = d.find_element(By.ID, "compare-table").text
    assert "latest (running)" in table and "final" in table
    d.execute_script("document.getElementById('compare-summary').scrollIntoView()")
    screenshot(d, "compare-spec-diff", full_page=False)

    # Back on the job: cancel it (after the question); the log ends with why.
    d.get(f"{api_server}/#/jobs/{new_id}")
    wait(d, lambda d: page_state(d) == "running", 10, "the running job's page")
    d.find_element(By.ID, "cancel-job").click()
    d.find_element(By.ID, "keep-running").click()  # changed our mind: nothing happens
    assert not d.find_element(By.ID, "cancel-confirm").is_displayed()
    d.find_element(By.ID, "cancel-job").click()
    d.find_element(By.ID, "confirm-cancel").click()
    wait(d, lambda d: page_state(d) == "cancelled", 60, "the job to be cancelled")
    log = d.find_element(By.ID, "job-log")
    wait(d, lambda d: "training stopped" in log.text, 20, "the log's last line")
    wait(d, lambda d: "complete" in d.find_element(By.ID, "log-status").text, 10, "complete")
    api.close()


def test_a_sweeps_page_follows_it_to_its_forest_plots_curves_and_children(
    browser: webdriver.Chrome, api_server: str, team_key: str, pg_url: str
) -> None:
    # A sweep whose 8 children finish with chosen results (the worker's own data-layer
    # calls, test_sweeps_service.play_children): α = 0.1 improves kNN accuracy well
    # beyond the control's noise floor; α = 1 lost a seed to a NaN loss.
    from test_sweeps_service import VERDICT_SWEEP, chosen_outcome, play_children

    api = httpx.Client(
        base_url=api_server, headers={"Authorization": f"Bearer {team_key}"}, timeout=30
    )
    sweep = api.post(
        "/v1/jobs", json={"kind": "sweep", "name": "alpha sweep", "spec": VERDICT_SWEEP}
    ).json()
    d = browser
    d.get(f"{api_server}/")
    d.execute_script("sessionStorage.setItem('ldreg.apiKey', arguments[0])", team_key)

    # The job list shows the sweep with its children count, and the children.
    d.get(f"{api_server}/#/jobs")
    d.refresh()  # the page reads the key when it loads
    wait(d, lambda d: sweep["id"] in listed_ids(d), 15, "the job list")
    assert "sweep · 8 children" in row_texts(d)[sweep["id"]]
    assert len(listed_ids(d)) == 9

    # Queued: the report so far is empty, the children wait.
    d.get(f"{api_server}/#/jobs/{sweep['id']}")
    wait(d, lambda d: page_state(d) == "queued", 15, "the queued sweep's page")
    status = wait(d, lambda d: d.find_element(By.ID, "report-status"), 10, "the report")
    wait(d, lambda d: status.get_attribute("data-complete") == "false", 10, "the report so far")
    assert "Incomplete" in status.text and points(d, "chart-forest-knn_acc") == 0
    # Its children finish while the page is open: it follows them to the verdict.
    play_children(pg_url, sweep["id"], chosen_outcome)
    wait(d, lambda d: page_state(d) == "succeeded", 15, "the sweep to succeed")
    # A forest plot per metric: a point per arm against the baseline (control and both
    # α), drawn on the canvas, with the verdicts in words underneath.
    wait(d, lambda d: points(d, "chart-forest-knn_acc") == 3, 15, "the forest plot")
    assert points(d, "chart-forest-linear_probe_acc") == 3
    painted = d.execute_script(
        "const c = document.querySelector('#chart-forest-knn_acc canvas');"
        "const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < px.length; i += 4) if (px[i]) n++; return n"
    )
    assert painted > 1000, painted
    verdicts = d.find_element(By.ID, "verdicts-knn_acc").text
    assert "ldreg.alpha=0.1: improves" in verdicts and "beyond the noise floor" in verdicts
    assert "control: no effect detectable at 2 seeds" in verdicts
    assert "ldreg.alpha=1: not enough paired seeds" in verdicts
    assert "Noise floor (control − baseline)" in d.find_element(By.ID, "verdicts").text
    assert d.find_element(By.ID, "report-status").get_attribute("data-complete") == "true"
    failed = d.find_element(By.ID, "failed-children").text
    assert "ldreg.alpha=1" in failed and "loss_not_finite" in failed
    # Each child's curves, coloured by arm; the children table links each child.
    wait(d, lambda d: points(d, "chart-sweep-knn_acc") == 8 * 3, 15, "the children's curves")
    rows = d.execute_script(
        "return [...document.querySelectorAll('#sweep-children-rows tr[data-job-id]')]"
        ".map(r => [r.cells[0].innerText, r.cells[1].innerText, r.dataset.state])"
    )
    assert [r[:2] for r in rows] == [
        [arm, str(seed)]
        for arm in ("baseline", "control", "ldreg.alpha=0.1", "ldreg.alpha=1")
        for seed in (0, 1)
    ]
    assert [r[2] for r in rows].count("failed") == 1
    # Finished with a failed child: Retry runs it again.
    assert d.find_element(By.ID, "retry-job").is_enabled()
    screenshot(d, "sweep")

    # A child's page links back to its sweep.
    d.find_element(By.CSS_SELECTOR, "#sweep-children-rows tr[data-job-id] a").click()
    link = wait(d, lambda d: d.find_element(By.ID, "parent-sweep"), 15, "the child's page")
    assert link.text == "baseline, seed 0"
    link.click()
    wait(d, lambda d: points(d, "chart-forest-knn_acc") == 3, 15, "back on the sweep")
    api.close()
