"""The Prefect UI in headless Chromium (Debian's package, installed by `make test`; no browser download), on the
team service of tests/service: log in with the auth string, start the pipeline from its deployment form with
one field changed, then Retry a failed run. Screenshots go to test-output/ui/."""

from __future__ import annotations

import re
import shutil
import time

import pytest
from PIL import Image

from t2i.flows.config import PipelineConfig
from t2i.flows.plan import Plan
from tests.conftest import REPO
from tests.service.conftest import CHROMIUM, chromium_page, config

SHOTS = REPO / "test-output" / "ui"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: `make test` installs Debian's package")


@pytest.fixture
def page(service):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with chromium_page() as page:
        page.goto(service.url.removesuffix("/api") + "/dashboard")
        password = page.locator("input[type=password]")
        password.wait_for()  # the server requires its auth string: the UI asks for it first
        page.screenshot(path=SHOTS / "0-login.png")
        password.fill(service.auth)
        password.press("Enter")
        page.get_by_text("Dashboard").first.wait_for()
        yield page


def _wait_for_state(page, state: str, shot: str, timeout_s: float = 400) -> None:
    """Until the run page's state badge says `state` (the page updates itself while the run goes on)."""
    page.wait_for_function(
        "s => [...document.querySelectorAll('.state-badge')].some(e => e.innerText.trim() === s)",
        arg=state,
        timeout=timeout_s * 1000,
        polling=2000,
    )
    page.screenshot(path=SHOTS / shot)


def _field(page, label: str | re.Pattern):
    """The input (or textarea) of the form field whose label reads `label` (a regex where one label's text
    is inside another's)."""
    header = page.locator("label.p-label__label", has_text=label).first
    return (
        header.locator("xpath=ancestor::*[contains(concat(' ', @class, ' '), ' p-label ')][1]")
        .locator("input, textarea")
        .first
    )


@pytest.mark.slow
def test_start_the_pipeline_from_its_form_and_retry_a_failed_run(service, small_pipeline, page):
    root = service.url.removesuffix("/api")
    deployment = service.api("/deployments/name/pipeline/tiny")
    # A workspace holding the small pipeline already: the run from the form re-evaluates with 4 prompts.
    shutil.copytree(small_pipeline, service.root / "ui-ws", symlinks=True)
    cfg = config(service.root / "ui-ws")
    known = {r["id"] for r in service.flow_runs()}
    page.goto(f"{root}/deployments/deployment/{deployment['id']}/run")
    prompts = _field(page, "Num Prompts (Optional)")
    assert prompts.input_value() == "8"  # the form is prefilled from the deployed config
    prompts.fill("4")
    _field(page, "Workspace (Optional)").fill(cfg["workspace"])
    page.screenshot(path=SHOTS / "1-form.png")
    page.get_by_role("button", name="Submit").click()
    deadline = time.time() + 60
    while not (new := [r for r in service.flow_runs() if r["id"] not in known]) and time.time() < deadline:
        time.sleep(1)
    (run,) = [r for r in new if r["deployment_id"] == deployment["id"]]
    page.goto(f"{root}/runs/flow-run/{run['id']}")
    _wait_for_state(page, "Completed", "2-pipeline-completed.png")
    params = service.run(run["id"])["parameters"]["cfg"]
    assert params["evaluate"]["num_prompts"] == 4 and params["workspace"] == cfg["workspace"]
    evaluation = Plan(PipelineConfig.model_validate(params)).evaluation
    assert evaluation.is_complete() and len(list((evaluation.root / "images").glob("*.png"))) == 4

    # A download from a folder that is not there yet fails; once it exists, Retry in the UI completes it.
    folder = service.root / "late-folder"
    failing = config(service.root / "ui-ws", f"download.source=folder:{folder}", "download.max_images=8")
    failed = service.start("download/tiny", failing)
    service.wait_for(failed, {"FAILED", "CRASHED"}, timeout=120)
    for i in range(8):
        (folder / f"n0{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 32), (30 * i, 90, 200 - 20 * i)).save(folder / f"n0{i % 2}" / f"{i}.JPEG")
    page.goto(f"{root}/runs/flow-run/{failed}")
    _wait_for_state(page, "Failed", "3-failed-run.png", timeout_s=30)
    page.get_by_role("button", name="Retry").first.click()
    page.get_by_role("button", name="Retry").last.click()  # the confirmation dialog
    _wait_for_state(page, "Completed", "4-retried-completed.png")
    assert service.run(failed)["run_count"] == 2
    assert Plan(PipelineConfig.model_validate(failing)).images.read_manifest()["rows"] == 8


def test_images_from_the_generate_form_show_in_the_run_artifacts(service, small_pipeline, page):
    """A prompt typed into the `generate` deployment's form: the run's Artifacts tab lists an image per
    prompt, and opening it draws the images."""
    root = service.url.removesuffix("/api")
    shutil.copytree(small_pipeline, service.root / "ui-generate-ws", symlinks=True)
    deployment = service.api("/deployments/name/generate/tiny")
    page.goto(f"{root}/deployments/deployment/{deployment['id']}/run")
    _field(page, "Workspace (Optional)").fill(str(service.root / "ui-generate-ws"))
    _field(page, re.compile(r"^prompts \(Optional\)$")).fill("two small blue squares")
    page.screenshot(path=SHOTS / "5-generate-form.png")
    page.get_by_role("button", name="Submit").click()
    try:  # a submitted form leaves for the deployment's page
        page.wait_for_url(re.compile(r"/deployments/deployment/[^/]+$"), timeout=60_000)
    finally:
        page.screenshot(path=SHOTS / "5-generate-submitted.png")
    (run,) = service.flow_runs(deployment_id={"any_": [deployment["id"]]})
    page.goto(f"{root}/runs/flow-run/{run['id']}")
    _wait_for_state(page, "Completed", "6-generate-completed.png", timeout_s=300)
    (artifact,) = [a for a in service.artifacts(run["id"]) if a["type"] == "image"]
    assert artifact["description"] == "two small blue squares"
    assert artifact["data"].startswith("data:image/png;base64,")  # shown without the server serving files
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("two small blue squares", exact=True).first.click()
    image = page.locator('img[src^="data:image/png"]').first
    image.wait_for()
    page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=image.element_handle())
    assert page.evaluate("e => [e.naturalWidth, e.naturalHeight]", image.element_handle()) == [4 * 128, 128]
    page.screenshot(path=SHOTS / "7-generated-images.png")
