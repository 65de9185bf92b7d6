"""The pipeline as a team's service: deployments on a work pool, two worker machines, parts fanned out as
child runs, a dead machine and a killed part recovered by Retry, a pool limit, API auth, the UI's port."""

from __future__ import annotations

import os
import signal
import time
import urllib.error

import pyarrow.parquet as pq
import pytest

from t2i.data.claims import ShardClaims, shard_claim
from t2i.flows.config import PipelineConfig
from t2i.flows.parts import part_shards
from t2i.flows.plan import Plan
from tests.conftest import T2I, wait_until
from tests.service.conftest import CRASH_AFTER, PREFECT, config

DATA_STAGES = ("download", "cutmix", "recaption", "latents", "text")


def _files(root) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*.parquet")}


def _parts(service, stage: str) -> dict[int, dict]:
    runs = service.flow_runs(name={"like_": f"{stage}-part-"})
    return {int(r["name"].split("-")[-3]): r for r in runs}


@pytest.mark.slow
def test_pipeline_in_two_parts_over_two_machines_recovers_from_a_dead_machine(service, small_pipeline):
    """Parts run on both machines; one machine dies and the other's part process is SIGKILLed while they
    caption. The fault comes at a point the test holds: the test claims one composite shard of each part (as
    a third node would), so each part captions its other shards and then waits for that one. The killed
    process's part is Crashed at once and retried while the dead machine's part is still a zombie; that one is
    Crashed when its heartbeats stop, and the pipeline fails naming it. `prefect flow-run retry` finishes it on
    the surviving machine, Retry on the pipeline finishes the rest, finished shards are never rewritten, and
    every output equals a single-process run's."""
    cfg = config(service.ws, "cluster.parts=2", "cluster.deployment=tiny")
    plan = Plan(PipelineConfig.model_validate(cfg))
    sets = [plan.captions_of(plan.images), plan.captions_of(plan.composites)]  # each part captions both
    share = {k: part_shards(plan.num_shards, (k, 2)) for k in (1, 2)}
    held = ShardClaims(sets[1].root)  # this test, holding the last composite shard of each part
    assert all(held.take(shard_claim(share[k][-1])) for k in (1, 2))
    parent = service.start("pipeline/tiny", cfg)

    blocked = {(sets[1], share[k][-1]) for k in (1, 2)}
    free = [(art, i) for art in sets for i in range(plan.num_shards) if (art, i) not in blocked]

    def parts_waiting():
        """Both parts running, every shard but the held ones on disk: each part waits for its held shard."""
        parts = _parts(service, "recaption")
        running = len(parts) == 2 and all(p["state_type"] == "RUNNING" for p in parts.values())
        return parts if running and all(art.has_shard(i) for art, i in free) else None

    parts = wait_until(parts_waiting, 600, "both recaption parts to wait for the held shards")
    assert sorted(p["labels"]["prefect.worker.name"] for p in parts.values()) == ["a-cpu", "b-cpu"]
    host = service.run(parent)["labels"]["prefect.worker.name"].split("-")[0]
    (mine,) = [k for k, p in parts.items() if p["labels"]["prefect.worker.name"] == f"{host}-cpu"]
    (theirs,) = [k for k in parts if k != mine]
    before = {p: v for art in sets for p, v in _files(art.root).items()}
    pid = int(service.run(parts[mine]["id"])["infrastructure_pid"].rsplit(":", 1)[-1])  # "host:pid"
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    service.kill_machine("b" if host == "a" else "a")
    held.release_all()  # the third node gives its shards back: the retries caption them

    service.wait_for(parts[mine]["id"], {"CRASHED", "FAILED"}, timeout=60)
    assert time.time() - killed < 60  # the surviving worker reports its killed process at once
    service.cli([PREFECT, "flow-run", "retry", parts[mine]["id"]])  # reruns while the other part is a zombie
    service.wait_for(parts[theirs]["id"], {"CRASHED"}, timeout=CRASH_AFTER + 60)  # its heartbeats stopped
    failed = service.wait_for(parent, {"FAILED", "CRASHED"}, timeout=300)
    assert f"part {theirs} 'recaption-part-{theirs}-of-2' (Crashed)" in failed["state"]["message"]
    assert service.run(parts[mine]["id"])["state_type"] == "COMPLETED"

    service.cli([PREFECT, "flow-run", "retry", parts[theirs]["id"]])
    retried = service.wait_for(parts[theirs]["id"], {"COMPLETED", "FAILED", "CRASHED"}, timeout=300)
    assert retried["state_type"] == "COMPLETED"
    assert retried["labels"]["prefect.worker.name"] == f"{host}-cpu"  # the surviving machine took it
    assert {p: v for art in sets for p, v in _files(art.root).items() if p in before} == before

    service.start_worker("b" if host == "a" else "a")
    service.cli([PREFECT, "flow-run", "retry", parent])
    done = service.wait_for(parent, {"COMPLETED", "FAILED", "CRASHED"}, timeout=600)
    assert done["state_type"] == "COMPLETED", done["state"]["message"]
    assert {k: service.run(p["id"])["run_count"] for k, p in parts.items()} == {1: 2, 2: 2}  # left alone
    assert {p: v for art in sets for p, v in _files(art.root).items() if p in before} == before

    reference = Plan(PipelineConfig.model_validate({**cfg, "workspace": str(small_pipeline)}))
    for (label, stage, art), (_, _, ref) in zip(plan.artifacts(), reference.artifacts(), strict=True):
        assert art.is_complete(), label
        if stage in DATA_STAGES:
            for i in range(plan.num_shards):
                assert pq.read_table(art.shard_path(i)).equals(pq.read_table(ref.shard_path(i))), (label, i)
    assert (plan.checkpoints.root / "final" / "model.safetensors").read_bytes() == (
        reference.checkpoints.root / "final" / "model.safetensors"
    ).read_bytes()


def test_a_pool_limit_of_one_runs_two_gpu_stage_runs_one_after_the_other(service):
    """Two latents runs started at once under `t2i deploy --limit 1`: each machine has a free worker, but the
    pool's run queue admits one run at a time."""
    ws = service.root / "limit-ws"
    ws.mkdir()
    (ws / "models").symlink_to(service.ws / "models", target_is_directory=True)
    small = ["text.mode=online", "download.max_images=16", "download.shard_size=8"]
    for stage in ("download", "cutmix"):
        service.cli([T2I, stage, "--preset", "tiny", "--workspace", str(ws), *[f"--set={o}" for o in small]])
    runs = [service.start("latents/tiny", config(ws, *small, f"latents.resolution={r}")) for r in (32, 40)]
    done = [service.wait_for(r, {"COMPLETED", "FAILED", "CRASHED"}, timeout=300) for r in runs]
    assert [d["state_type"] for d in done] == ["COMPLETED", "COMPLETED"]
    first, second = sorted(done, key=lambda d: d["start_time"])
    assert second["start_time"] >= first["end_time"]


def test_a_server_with_an_auth_string_refuses_a_client_without_it(service):
    """Deploy and the workers above ran with PREFECT_API_AUTH_STRING; without it the API answers 401."""
    with pytest.raises(urllib.error.HTTPError) as err:
        service.api("/deployments/filter", {}, auth=False)
    assert err.value.code == 401
    no_auth = {k: v for k, v in service.env.items() if k != "PREFECT_API_AUTH_STRING"}
    proc = service.cli([PREFECT, "deployment", "ls"], check=False, env=no_auth)
    assert proc.returncode != 0
    assert service.auth not in proc.stdout + proc.stderr
    for log in service.root.rglob("*.log"):
        assert service.auth not in log.read_text(errors="replace"), log


def test_the_ui_of_a_server_on_another_port_calls_that_port(service):
    settings = service.ui_settings()
    assert settings["api_url"] == service.url
    assert settings["auth"] == "BASIC"
