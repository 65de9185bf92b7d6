"""Lineage on the Prefect server, read back through its events API: after `t2i run`, every artifact of the plan
is one `prefect.asset.materialization.succeeded` event that names the artifacts it was made from and carries
its manifest's summary; a rerun records references, not materializations; a stage split in parts is
materialized once, when its last part completes; the server's Events page shows the events (a screenshot)."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import pytest

from t2i.data.store import Artifact
from t2i.flows.assets import asset_key
from t2i.flows.config import load_config
from t2i.flows.plan import Plan
from tests.conftest import REPO, SMALL_PIPELINE, run_cli, wait_until
from tests.service.conftest import CHROMIUM, chromium_page

SUCCEEDED = "prefect.asset.materialization.succeeded"
REFERENCED = "prefect.asset.referenced"
SHOT = REPO / "test-output" / "prefect-events.png"
SMALL = [f"--set={o}" for o in SMALL_PIPELINE]
STAGE_FLOW = {
    "text": "latents"
}  # the flow that makes each stage's artifacts, where it is not the stage's own


def _request(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def read_events(url: str, name: str, prefix: str, since: str | None = None) -> list[dict]:
    """Every event called `name` whose resource id starts with `prefix`, oldest first, through all the pages
    of the server's `POST /events/filter`."""
    query: dict = {"event": {"name": [name]}, "resource": {"id_prefix": [prefix]}, "order": "ASC"}
    if since:
        query["occurred"] = {"since": since}
    page = _request(f"{url}/events/filter", {"filter": query, "limit": 50})
    events = page["events"]
    while page.get("next_page"):
        page = _request(page["next_page"])
        events += page["events"]
    return events


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def key(artifact) -> str:
    return f"file://{artifact.root}"


def related(event: dict, role: str) -> set[str]:
    """The ids (assets) or names (flows, runs) of the event's related resources in `role`."""
    field = "prefect.resource.id" if role == "asset" else "prefect.resource.name"
    return {r[field] for r in event["related"] if r.get("prefect.resource.role") == role}


def plan_inputs(plan: Plan) -> dict[str, set[str]]:
    """Each artifact's key → the keys of the artifacts it is made from: the inputs its fingerprint names, and
    for training the precomputed text embeddings it reads."""
    known = {art.fingerprint: art for _, _, art in plan.artifacts()}
    texts = {plan.text_of(plan.captions_of(images)) for _, images in plan.image_sets()} - {None}
    inputs = {}
    for _, _, art in plan.artifacts():
        upstream = {known[fp] for fp in art.extra["inputs"].values()}
        inputs[key(art)] = {key(a) for a in upstream | (texts if art.stage == "train" else set())}
    return inputs


def test_every_artifact_of_a_pipeline_run_is_one_materialization_naming_its_inputs(
    small_pipeline, prefect_server
):
    url, plan = prefect_server["url"], Plan(load_config("tiny", SMALL_PIPELINE, str(small_pipeline)))
    expected, artifacts = plan_inputs(plan), {key(art): art for _, _, art in plan.artifacts()}
    assert len(expected) == 10  # download, cutmix, 2 × recaption, latents, text embeddings; train, evaluate

    def all_recorded() -> list[dict] | None:
        events = read_events(url, SUCCEEDED, f"file://{small_pipeline}/")
        return events if {e["resource"]["prefect.resource.id"] for e in events} >= set(expected) else None

    events = wait_until(all_recorded, 60, "a materialization event for every artifact")
    assert Counter(e["resource"]["prefect.resource.id"] for e in events) == Counter(set(expected))
    for event in events:
        art = artifacts[event["resource"]["prefect.resource.id"]]
        manifest, payload = art.read_manifest(), event["payload"]
        assert related(event, "asset") == expected[key(art)], art.stage
        assert related(event, "flow") == {
            STAGE_FLOW.get(art.stage, art.stage)
        }  # recorded by the stage's flow
        assert event["resource"]["prefect.resource.name"].endswith(art.fingerprint)
        assert payload["path"] == str(art.root)
        for name in ("stage", "fingerprint", "config", "inputs", "rows", "rejects", "rejects_by_reason"):
            assert payload.get(name) == manifest.get(name), (art.stage, name)
        if "shards" in manifest:
            assert payload["shards"] == plan.num_shards == len(manifest["shards"])
    payloads = {artifacts[e["resource"]["prefect.resource.id"]].stage: e["payload"] for e in events}
    assert payloads["download"]["rows"] == 192 and payloads["download"]["rejects"] == 0
    assert payloads["train"]["step"] == 20
    assert payloads["evaluate"]["metrics"] == plan.evaluation.read_manifest()["metrics"]


def test_a_rerun_references_the_artifacts_it_finds_complete_and_materializes_none(
    small_pipeline, prefect_server, cli_env
):
    """A complete stage is skipped: its artifact is recorded as referenced by the run, not made again."""
    url, plan = prefect_server["url"], Plan(load_config("tiny", SMALL_PIPELINE, str(small_pipeline)))
    since = _now()
    run_cli(["download", "--preset", "tiny", "--workspace", str(small_pipeline), *SMALL], cli_env)

    def referenced_by_download() -> list[dict]:
        events = read_events(url, REFERENCED, key(plan.images), since)
        return [e for e in events if related(e, "flow") == {"download"}]

    (reference,) = wait_until(referenced_by_download, 60, "the rerun's reference to the images")
    assert related(reference, "flow-run")  # tied to the run that reused it
    assert read_events(url, SUCCEEDED, key(plan.images), since) == []


@pytest.mark.slow
def test_a_stage_split_in_parts_is_materialized_once_when_its_last_part_completes(
    small_pipeline, prefect_server, cli_env, tmp_path
):
    """`t2i latents --part 1/2`, then `--part 2/2`, with a shard of part 2's share missing: the first finds
    the artifact incomplete after its share and records no materialization; the second completes it and
    records it, once."""
    url, ws = prefect_server["url"], tmp_path / "ws"
    shutil.copytree(small_pipeline, ws, symlinks=True)
    plan = Plan(load_config("tiny", SMALL_PIPELINE, str(ws)))
    latents, composites = plan.latents, plan.latents_of(plan.composites)
    latents.manifest_path.unlink()
    latents.shard_path(1).unlink()  # part 2's share: shards 1 and 3
    args = ["latents", "--preset", "tiny", "--workspace", str(ws), *SMALL]

    since = _now()
    run_cli([*args, "--part", "1/2"], cli_env)
    assert not latents.is_complete()
    wait_until(lambda: read_events(url, REFERENCED, key(composites), since), 60, "part 1's events")
    assert read_events(url, SUCCEEDED, key(latents)) == []

    run_cli([*args, "--part", "2/2"], cli_env)
    assert latents.is_complete()
    (event,) = wait_until(lambda: read_events(url, SUCCEEDED, key(latents)), 60, "the materialization")
    assert related(event, "asset") == {key(plan.images)}
    assert event["payload"]["rows"] == 192 and event["payload"]["shards"] == plan.num_shards
    assert read_events(url, SUCCEEDED, key(composites)) == []  # complete before: referenced, not remade


def test_a_workspace_path_that_is_no_valid_asset_key_gets_a_stable_key_of_its_own(tmp_path):
    """Prefect refuses keys with spaces, `%`, `#`, ... or over 512 characters: such a workspace maps to a
    `t2i://` key, the same for the same folder, different for another."""
    from prefect.assets import Asset

    spaced, other = Path("/data/team a/ws"), Path("/data/team b/ws")
    keys = [asset_key(Artifact(ws, "latents", "0123456789abcdef")) for ws in (spaced, spaced, other)]
    assert keys[0] == keys[1] != keys[2]
    assert keys[0].startswith("t2i://workspace-") and keys[0].endswith("/latents/0123456789abcdef")
    assert Asset(key=keys[0]).key == keys[0]
    long = Artifact(Path("/data") / ("x" * 600), "train", "0123456789abcdef")
    assert Asset(key=asset_key(long)).key.startswith("t2i://")
    assert (
        asset_key(Artifact(tmp_path, "train", "0123456789abcdef"))
        == f"file://{tmp_path}/train/0123456789abcdef"
    )


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: `make test` installs Debian's package")
def test_the_events_page_shows_each_artifact_materialized_with_its_inputs(small_pipeline, prefect_server):
    """The server's Event Feed, filtered to this workspace's materializations: one card per artifact, each
    listing its upstream assets. Saved to test-output/prefect-events.png."""
    root = prefect_server["url"].removesuffix("/api")
    keys = [
        key(art) for _, _, art in Plan(load_config("tiny", SMALL_PIPELINE, str(small_pipeline))).artifacts()
    ]
    with chromium_page(height=2600) as page:  # tall enough for every card
        _ui_calls_this_server(page, root)
        page.goto(f"{root}/events?resource={quote(f'file://{small_pipeline}/')}&events={SUCCEEDED}")
        cards = page.locator(".workspace-events-timeline-content", has_text="Asset materialization succeeded")
        cards.nth(len(keys) - 1).wait_for()
        page.wait_for_load_state("networkidle")  # the chart above the cards too
        SHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SHOT, full_page=True)
        assert cards.count() == len(keys)
        for k in keys:  # each card names its asset and the assets it was made from
            assert cards.filter(has_text=k).count() >= 1, k


def _ui_calls_this_server(page, root: str) -> None:
    """The UI learns where the API is from /ui-settings, which names port 4200 unless the server was started
    with PREFECT_UI_API_URL (`t2i server` sets it): point it at this server."""
    settings = _request(f"{root}/ui-settings")
    if settings["api_url"] != f"{root}/api":
        page.route("**/ui-settings", lambda route: route.fulfill(json={**settings, "api_url": f"{root}/api"}))
