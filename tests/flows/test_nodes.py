"""Two nodes of one multi-node `t2i run`, simulated on this machine: two processes with their own working
directories and Prefect homes (reporting to one Prefect server, as a team's nodes do), one shared workspace,
`train.nodes=2` with gloo on 127.0.0.1. Every shard of every data stage is renamed into place exactly once
(counted by the kernel's inotify, not by the code under test), the data equal a one-node run's table for
table, one training job spans both nodes, and node 0 alone evaluates; a node SIGKILLed mid-recaption and
restarted loses nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from t2i.data.claims import CLAIMS_DIR, shard_claim
from t2i.flows.config import load_config
from t2i.flows.plan import Plan
from tests.conftest import SMALL_PIPELINE, T2I, _free_port, run_cli, wait_until
from tests.file_events import RenameLog, inotify_works

DATA_STAGES = ("download", "cutmix", "recaption", "latents", "text")
pytestmark = pytest.mark.skipif(not inotify_works(), reason="counts renames with Linux inotify")


class Node:
    """One `t2i run` of a two-node job, as a machine of its own would start it."""

    def __init__(self, root: Path, rank: int, workspace: Path, overrides: list[str], server: str) -> None:
        self.rank, self.dir = rank, root / f"node{rank}"
        (self.dir / "prefect").mkdir(parents=True, exist_ok=True)
        sets = [a for o in [*overrides, f"train.node_rank={rank}"] for a in ("--set", o)]
        self.argv = [T2I, "run", "--preset", "tiny", "--workspace", str(workspace), *sets]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
        self.env.update(PREFECT_HOME=str(self.dir / "prefect"), PREFECT_API_URL=server)
        self.proc, self.starts, self.seconds = None, 0, 0.0

    def start(self) -> None:
        self.starts += 1
        self.log = self.dir / f"run-{self.starts}.log"
        self.started = time.time()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.argv, cwd=self.dir, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def wait(self, timeout: float = 900) -> str:
        rc = self.proc.wait(timeout=timeout)
        self.seconds = time.time() - self.started
        text = self.log.read_text()
        assert rc == 0, f"node {self.rank} exited with {rc}:\n{text[-6000:]}"
        return text

    def kill(self) -> None:
        """SIGKILL of the node's whole process tree, as when the machine dies."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def _job(tmp_path: Path, tiny_models: Path, server: str):
    ws = tmp_path / "shared" / "ws"
    ws.mkdir(parents=True)
    (ws / "models").symlink_to(tiny_models, target_is_directory=True)
    overrides = [*SMALL_PIPELINE, "train.nodes=2", "train.processes=1", f"train.master_port={_free_port()}"]
    plan = Plan(load_config("tiny", overrides, str(ws)))
    roots = [art.root for _, _, art in plan.artifacts()]
    nodes = [Node(tmp_path, rank, ws, overrides, server) for rank in (0, 1)]
    return plan, RenameLog(roots), nodes


def _data_artifacts(plan: Plan):
    return [(label, art) for label, _, art in plan.artifacts() if art.stage in DATA_STAGES]


def _assert_written_once_and_equal(plan: Plan, renames, reference: Path) -> None:
    ref_plan = Plan(plan.cfg.model_copy(update={"workspace": str(reference)}))
    refs = dict(_data_artifacts(ref_plan))
    for label, art in _data_artifacts(plan):
        for i in range(plan.num_shards):
            shard = art.shard_path(i)
            assert renames[shard] == 1, f"{label} part {i} was renamed into place {renames[shard]} times"
            assert pq.read_table(shard).equals(pq.read_table(refs[label].shard_path(i))), (label, i)
        assert renames[art.manifest_path] == 1, (
            f"the {label} manifest was written {renames[art.manifest_path]}×"
        )
    train = plan.checkpoints.read_manifest()
    assert train["processes"] == 2 and len(set(train["rank_checksums"])) == 1  # one job across both nodes
    assert renames[plan.checkpoints.manifest_path] == 1
    assert renames[plan.evaluation.manifest_path] == 1 and plan.evaluation.is_complete()


def _computed_by(plan: Plan, pids: dict[int, str]) -> dict[str, int]:
    """Shards per node, from the claims they left (the record of who computed what)."""
    import json

    count: dict[str, int] = {}
    for _, art in _data_artifacts(plan):
        for claim in (art.root / CLAIMS_DIR).glob("part-*"):
            owner = pids.get(json.loads(claim.read_text())["pid"], "other")
            count[owner] = count.get(owner, 0) + 1
    return count


@pytest.mark.slow
def test_two_nodes_compute_every_shard_once_and_node_0_evaluates(
    tmp_path, tiny_models, small_pipeline, prefect_server
):
    """Node 1 starts 30 s after node 0, as a second machine of a job often does."""
    plan, renames, nodes = _job(tmp_path, tiny_models, prefect_server["url"])
    try:
        nodes[0].start()
        time.sleep(30)
        nodes[1].start()
        logs = [node.wait() for node in nodes]
    finally:
        for node in nodes:
            node.close()
        counts = renames.close()
    print(
        f"\nwall time: node 0 {nodes[0].seconds:.0f} s, node 1 {nodes[1].seconds:.0f} s (started 30 s later)"
    )
    print("shards computed:", _computed_by(plan, {n.proc.pid: f"node {n.rank}" for n in nodes}))
    _assert_written_once_and_equal(plan, counts, small_pipeline)
    assert "[evaluate] runs on node 0 only" in logs[1] and str(plan.evaluation.root) in logs[1]
    assert "[evaluate]" in logs[0] and "runs on node 0 only" not in logs[0]


@pytest.mark.slow
def test_a_node_killed_mid_recaption_and_restarted_loses_only_its_shards_in_flight(
    tmp_path, tiny_models, small_pipeline, prefect_server
):
    """Node 0 is frozen (SIGSTOP) after its first recaption shard, so node 1 captions too; node 1 is SIGKILLed
    while it holds a shard it has not written, node 0 resumes and takes that shard over at once (a dead
    process on the same machine), and node 1, restarted, finishes the job with node 0."""
    plan, renames, nodes = _job(tmp_path, tiny_models, prefect_server["url"])
    captions = [art for _, _, art in plan.artifacts() if art.stage == "recaption"]

    def on_disk(art, i):
        return art.shard_path(i).exists()

    def claimed_by(pid: int) -> list[tuple]:
        import json

        held = []
        for art in captions:
            for i in range(plan.num_shards):
                claims = sorted((art.root / CLAIMS_DIR).glob(f"{shard_claim(i)}.*"))
                try:
                    pids = [json.loads(c.read_text())["pid"] for c in claims]
                except (OSError, ValueError):
                    continue  # a claim being written
                if pids and pids[-1] == pid and not on_disk(art, i):
                    held.append((art, i))
        return held

    try:
        nodes[0].start()
        first = [a.shard_path(i) for a in captions for i in range(plan.num_shards)]
        wait_until(
            lambda: any(renames.counts()[p] for p in first), 600, "node 0's first recaption shard", 0.02
        )
        os.kill(nodes[0].proc.pid, signal.SIGSTOP)  # node 0 stalls mid-stage
        nodes[1].start()
        while True:  # freeze node 1 while it holds a shard it has not written, then kill it there
            wait_until(lambda: claimed_by(nodes[1].proc.pid), 600, "node 1 to claim a recaption shard", 0.02)
            os.kill(nodes[1].proc.pid, signal.SIGSTOP)
            in_flight = claimed_by(nodes[1].proc.pid)
            if in_flight:
                break
            os.kill(nodes[1].proc.pid, signal.SIGCONT)
        finished = {
            p: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in renames.counts()
            if p.name.endswith(".parquet")
        }
        nodes[1].kill()
        os.kill(nodes[0].proc.pid, signal.SIGCONT)
        nodes[1].start()
        logs = [node.wait() for node in nodes]
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                os.killpg(node.proc.pid, signal.SIGCONT)
            node.close()
        counts = renames.close()
    print(f"\nwall time: node 0 {nodes[0].seconds:.0f} s, node 1 (restarted) {nodes[1].seconds:.0f} s; "
          f"node 1 was killed holding {[(a.stage, i) for a, i in in_flight]}")  # fmt: skip
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished} == finished  # untouched
    for art, i in in_flight:
        assert counts[art.shard_path(i)] == 1
    assert "took over" in logs[0] + logs[1]
    _assert_written_once_and_equal(plan, counts, small_pipeline)


@pytest.mark.slow
def test_two_latents_commands_started_at_once_encode_every_shard_once(workspace, cli_env, tmp_path):
    """A plain stage command started on two machines at the same moment (here: two processes with their own
    working directories) shares the shards the same way."""
    sets = ["download.max_images=64", "download.shard_size=8", "text.mode=online"]
    args = ["--preset", "tiny", "--workspace", str(workspace), *[a for o in sets for a in ("--set", o)]]
    for stage in ("download", "cutmix"):
        run_cli([stage, *args], cli_env)
    plan = Plan(load_config("tiny", sets, str(workspace)))
    latents = [plan.latents_of(images) for _, images in plan.image_sets()]
    renames = RenameLog([art.root for art in latents])
    procs = []
    try:
        for k in (0, 1):
            (tmp_path / f"node{k}").mkdir()
            procs.append(subprocess.Popen([T2I, "latents", *args], cwd=tmp_path / f"node{k}", env=cli_env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
        counts = renames.close()
    assert [p.returncode for p in procs] == [0, 0], outputs
    for art in latents:
        assert all(counts[art.shard_path(i)] == 1 for i in range(plan.num_shards)), counts
        assert counts[art.manifest_path] == 1 and art.is_complete()
