"""The service pages the platform prints, opened in a real headless Chromium against the real servers.

`make run` prints the Prefect and MLflow UI addresses, `flywheel annotate` the annotation page's; each
page must load in a browser, reach its own server, and show live content: the flow run we just made,
the model version we just registered, the item waiting for the annotator who logs in. A
screenshot of each page is kept under `test-artifacts/service-pages/` (look at it when a test fails).

The browser is Debian's chromium driven by Playwright (browsers cannot be downloaded here).
"""

from __future__ import annotations

import time

import pytest
from mlflow import MlflowClient

from infra import services as infra_services
from registry import models
from tests.conftest import screenshot, tiny_pretrained_checkpoints
from ui import store as st

PAGE_TIMEOUT_MS = 60_000  # single-page apps on a busy 2-core machine: first paint can take seconds
MODEL_NAME = "service-pages-lm"


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(PAGE_TIMEOUT_MS)
    yield tab
    context.close()


def test_prefect_ui_reaches_its_server_and_lists_our_flow_run(services, page):
    from prefect import flow

    run_name = f"browser-check-{time.time_ns()}"

    @flow(name="service-pages-check", flow_run_name=run_name, persist_result=False)
    def service_pages_check() -> int:
        return 1

    assert service_pages_check() == 1  # a real run, recorded by the session's Prefect server

    page.goto(f"{services['prefect_ui']}/runs")
    try:
        page.get_by_text(run_name).first.wait_for()
    finally:
        shot = screenshot(page, "service-pages/prefect-runs")
    body = page.inner_text("body")
    assert "Can't connect to Server API" not in body, f"the UI cannot reach its API; see {shot}"
    assert run_name in body

    # The run's own page, from the list: the UI reads the run (state and all) through the same API.
    page.get_by_text(run_name).first.click()
    page.wait_for_url("**/runs/flow-run/**")
    page.get_by_text("Completed").first.wait_for()
    page.wait_for_load_state("networkidle")
    screenshot(page, "service-pages/prefect-flow-run")
    assert "Can't connect to Server API" not in page.inner_text("body")


@pytest.fixture(scope="module")
def registered_version(services, tmp_path_factory) -> str:
    (checkpoint,) = tiny_pretrained_checkpoints(tmp_path_factory.mktemp("service-pages-ckpt"), seeds=(1,), steps=2)
    client = MlflowClient(services["mlflow"], services["mlflow"])
    run = client.create_run(client.create_experiment(f"service-pages-{time.time_ns()}"))
    version = models.register_checkpoint(client, MODEL_NAME, checkpoint, run.info.run_id, tags={})
    client.set_terminated(run.info.run_id)
    return version


def _close_announcement(page) -> None:
    """MLflow greets a new browser with a "new Model Registry UI" dialog over the list: close it."""
    import playwright.sync_api

    dialog = page.get_by_role("dialog")
    try:
        dialog.wait_for(timeout=5_000)
    except playwright.sync_api.TimeoutError:
        return  # none this time
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")
    page.wait_for_timeout(500)  # its backdrop fades out after the dialog is gone


def test_mlflow_ui_lists_the_registered_model_and_its_version(services, registered_version, page):
    page.goto(f"{services['mlflow_ui']}/#/models")
    try:
        page.get_by_text(MODEL_NAME).first.wait_for()
        _close_announcement(page)
    finally:
        screenshot(page, "service-pages/mlflow-models")
    row = page.get_by_role("row").filter(has_text=MODEL_NAME).inner_text()
    assert f"Version {registered_version}" in row and "challenger" in row

    page.goto(f"{services['mlflow_ui']}/#/models/{MODEL_NAME}")
    page.get_by_text(f"Version {registered_version}").first.wait_for()
    screenshot(page, "service-pages/mlflow-model")
    assert "challenger" in page.inner_text("body")  # the alias register_checkpoint set


@pytest.fixture
def annotation_url(services, tmp_path, monkeypatch):
    """The page `flywheel annotate` starts in the background (a service like the others), on a labels
    database of this test's own with one annotator and one item waiting."""
    monkeypatch.delenv("FLYWHEEL_ANNOTATION_URL", raising=False)
    monkeypatch.setenv("FLYWHEEL_LABELS_DB", f"sqlite:///{tmp_path / 'labels.db'}")
    store = st.open_store()
    st.add_annotator(store, "ana", "pw-ana")
    st.add_items(store, [{"prompt": "Which planet is known as the red planet?", "response_a": "Mars.",
                          "response_b": "Venus.", "source": "service-pages"}])
    store.engine.dispose()
    url = infra_services.up_annotation()
    yield url
    infra_services.down(names=("annotation",))


def test_annotation_page_logs_in_and_shows_the_waiting_item(annotation_url, page):
    page.goto(annotation_url)
    page.locator("input[type=password]").wait_for()
    page.locator("input[type=text]").fill("ana")
    page.locator("input[type=password]").fill("pw-ana")
    page.get_by_role("button", name="Login").click()
    try:
        page.get_by_text("Which planet is known as the red planet?").first.wait_for()
    finally:
        screenshot(page, "service-pages/annotation-page")
    body = page.inner_text("body")
    assert "Mars." in body and "Venus." in body
