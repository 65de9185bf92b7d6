"""`t2i serve` against a real Prefect server: flows listed with their config form, a triggered run executes."""

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from t2i.flows.config import load_config
from t2i.flows.plan import Plan
from tests.conftest import T2I

PREFECT = str(Path(T2I).with_name("prefect"))
FLOWS = [
    "ablation",
    "cutmix",
    "download",
    "evaluate",
    "generate",
    "latents",
    "pipeline",
    "recaption",
    "train",
]


def _api(url: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def served(prefect_server, cli_env, workspace):
    log = workspace.parent / "serve.log"  # a file, not a pipe nobody reads: a full pipe blocks the server
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [T2I, "serve", "--preset", "tiny", "--workspace", str(workspace), "--name", "ci"],
            env=cli_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=workspace.parent,  # not the repository: the flows load from the installed package
        )  # fmt: skip
    url = prefect_server["url"]
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            deployments = _api(url, "/deployments/filter", {})
            if {d["name"] for d in deployments} == {"ci"} and len(deployments) == len(FLOWS):
                break
            assert proc.poll() is None, log.read_text()
            time.sleep(1)
        else:
            pytest.fail("t2i serve did not register its deployments in 120 s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # stop serving before the server goes away
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_served_flows_have_a_config_form_and_a_triggered_run_executes(served, cli_env, workspace):
    url = served
    deployments = {d["name"]: d for d in _api(url, "/deployments/filter", {})}
    flows = {f["id"]: f["name"] for f in _api(url, "/flows/filter", {})}
    deployed = sorted(flows[d["flow_id"]] for d in _api(url, "/deployments/filter", {}))
    assert deployed == FLOWS
    entrypoints = [d["entrypoint"] for d in _api(url, "/deployments/filter", {})]
    assert {e.rsplit(".", 2)[0] for e in entrypoints} == {"t2i.flows"}, entrypoints
    schema = deployments["ci"]["parameter_openapi_schema"]
    assert "cfg" in schema["properties"] and "definitions" in schema
    assert {"download", "recaption", "latents", "train", "evaluate"} <= set(
        schema["definitions"]["PipelineConfig"]["properties"]
    )
    with urllib.request.urlopen(url.removesuffix("/api") + "/", timeout=10) as r:  # the UI is served
        assert r.status == 200 and b"<html" in r.read().lower()

    cfg = load_config("tiny", ["download.max_images=24", "download.shard_size=8"], str(workspace))
    proc = subprocess.run(
        [PREFECT, "deployment", "run", "download/ci", "--params",
         json.dumps({"cfg": cfg.model_dump(mode="json")}), "--watch", "--watch-timeout", "180"],
        env=cli_env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Completed" in proc.stdout
    artifact = Plan(cfg).images
    assert artifact.is_complete() and artifact.read_manifest()["rows"] == 24


def test_the_server_refuses_an_out_of_range_field(served, cli_env, workspace):
    cfg = load_config("tiny", [], str(workspace)).model_dump(mode="json")
    cfg["latents"]["resolution"] = -3
    proc = subprocess.run(
        [PREFECT, "deployment", "run", "latents/ci", "--params", json.dumps({"cfg": cfg})],
        env=cli_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "resolution" in proc.stdout + proc.stderr
