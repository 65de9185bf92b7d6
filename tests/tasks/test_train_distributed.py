"""Training as a torchrun job of CPU processes (gloo), as a team runs it on GPUs: the same run whatever the
number of processes, a lost rank recovered without a person, a job that dies with its task, a failed
checkpoint write that stops every rank, two nodes that start 90 s apart."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from t2i.data.store import checkpoint_dirs
from t2i.flows.config import load_config
from t2i.flows.download import download_flow
from t2i.flows.latents import latents_flow
from t2i.flows.plan import Plan
from t2i.flows.recaption import recaption_flow
from t2i.flows.train import train_flow, train_job
from t2i.models.loading import load_final
from t2i.tasks.checkpoints import load_state
from t2i.tasks.reporting import RELAY_ENV
from t2i.tasks.train import COUNT_SYNCS_ENV, train_denoiser
from t2i.tasks.train_job import launch_distributed
from tests.conftest import T2I, _free_port, wait_until
from tests.file_events import RenameLog, inotify_works

DATA = [
    "text.mode=online",
    "cutmix.enabled=false",
    "download.max_images=48",
    "download.shard_size=16",
    "recaption.backend=template",
]
RUN = [*DATA, "train.steps=60", "train.batch_size=8", "train.checkpoint_every=10", "train.log_every=10",
       "train.sample_prompts=0"]  # fmt: skip
# Processes sum gradients in another order than one process does, and the optimizer turns those float32
# rounding differences into weight differences that grow with the steps: measured ≤ 7e-4 after 60 steps
# (weights of magnitude ~1), against 0.25 when each rank drew its own samples' noise.
WEIGHTS_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def data_and_reference(tmp_path_factory, tiny_models, prefect_harness) -> Path:
    """Latents and captions of 48 images, and the uninterrupted one-process run of RUN beside them."""
    ws = tmp_path_factory.mktemp("train-data") / "ws"
    shutil.copytree(tiny_models, ws / "models")
    cfg = load_config("tiny", RUN, str(ws))
    download_flow(cfg)
    recaption_flow(cfg)
    latents_flow(cfg)
    train_denoiser.fn(train_job(cfg))
    return ws


@pytest.fixture
def ws(data_and_reference, tmp_path) -> Path:
    """A copy of the data and the models, without the reference run and its train table."""
    ws = tmp_path / "ws"
    shutil.copytree(data_and_reference, ws, ignore=shutil.ignore_patterns("train", "train-data"))
    return ws


def max_difference(cfg, reference: Path) -> tuple[float, float]:
    """max |Δ| of the last checkpoint's weights and of the final EMA weights, against the reference run."""
    ours, theirs = Plan(cfg).checkpoints.root, Plan(load_config("tiny", RUN, str(reference))).checkpoints.root
    a, b = (load_state(checkpoint_dirs(root)[-1])["model"] for root in (ours, theirs))
    ema_a, ema_b = (load_final(root)[0].state_dict() for root in (ours, theirs))
    return max((a[k] - b[k]).abs().max().item() for k in a), max(
        (ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a
    )


def cli_train(ws: Path, env: dict, *overrides: str, log: Path) -> subprocess.Popen:
    """`t2i train` in a session of its own, as a shell starts it; its output goes to `log`."""
    sets = [a for o in [*RUN, *overrides] for a in ("--set", o)]
    with open(log, "w") as out:
        return subprocess.Popen([T2I, "train", "--preset", "tiny", "--workspace", str(ws), *sets], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def job_processes(root: Path) -> dict[int, str]:
    """The live processes of the job of the train folder `root` (launcher, ranks, their loader processes), by the
    variable its launch sets for all of them: pid → command line."""
    mark = f"{RELAY_ENV}={root / 'launch'}".encode()
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if any(v.startswith(mark) for v in (proc / "environ").read_bytes().split(b"\0")):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_two_processes_resumed_on_one_continue_the_one_process_run(data_and_reference, ws, monkeypatch):
    """Draws are keyed by the sample, not the rank: 2 processes × 2 micro-batches to step 30, then 1 process to
    step 60, end where one process alone ends."""
    monkeypatch.setenv(COUNT_SYNCS_ENV, "1")
    two = load_config("tiny", [*RUN, "train.processes=2", "train.grad_accumulation=2"], str(ws))
    result = launch_distributed.fn(train_job(two, stop_after=30), 2)
    assert result["step"] == 30 and result["processes"] == 2 and result["global_batch"] == 8
    assert result["rank_checksums"][0] == result["rank_checksums"][1]
    assert result["gradient_syncs_per_step"] == 1  # 2 micro-batches, one all-reduce
    one = load_config("tiny", RUN, str(ws))
    assert train_denoiser.fn(train_job(one))["step"] == 60
    weights, ema = max_difference(one, data_and_reference)
    assert weights <= WEIGHTS_TOLERANCE and ema <= WEIGHTS_TOLERANCE, (weights, ema)


@pytest.mark.slow
def test_a_killed_rank_is_restarted_from_the_checkpoint_and_ends_as_the_uninterrupted_run(
    data_and_reference, ws, cli_env, tmp_path
):
    log = tmp_path / "train.log"
    proc = cli_train(ws, cli_env, "train.processes=2", log=log)
    cfg = load_config("tiny", RUN, str(ws))
    root = Plan(cfg).checkpoints.root
    wait_until(lambda: (root / "checkpoints" / "step-00000020").is_dir(), 300, "the checkpoint of step 20")
    ranks = [
        pid for pid, cmd in job_processes(root).items() if "train_process" in cmd and "--launch" not in cmd
    ]
    assert len(ranks) == 2, job_processes(root)
    os.kill(max(ranks), signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    out = log.read_text()
    assert "[train] restart 1 of at most 3" in out
    assert "[train] resuming from step-000000" in out
    assert "[rank 0] [train] step 60/60" in out  # rank 0's step lines reach the run's output
    manifest = Plan(cfg).checkpoints.read_manifest()
    assert manifest["step"] == 60 and manifest["processes"] == 2
    weights, ema = max_difference(cfg, data_and_reference)
    assert weights <= WEIGHTS_TOLERANCE and ema <= WEIGHTS_TOLERANCE, (weights, ema)


@pytest.mark.slow
def test_killing_the_train_process_group_ends_every_rank(ws, cli_env, tmp_path):
    """What an OOM kill or a cancelled run does: no rank goes on training or writing checkpoints."""
    log = tmp_path / "train.log"
    long_run = ["train.processes=2", "train.steps=5000", "train.checkpoint_every=5", "train.log_every=1",
                "train.loader_workers=1"]  # fmt: skip
    proc = cli_train(ws, cli_env, *long_run, log=log)
    root = Plan(load_config("tiny", [*RUN, *long_run], str(ws))).checkpoints.root
    wait_until(lambda: "[rank 0] [train] step 6/5000" in log.read_text(), 300, "step 6 in the output")
    assert len(job_processes(root)) >= 3  # the launcher (torchrun), 2 ranks and their loader processes
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    at_kill = {p.name for p in checkpoint_dirs(root)}
    time.sleep(5)
    assert job_processes(root) == {}
    assert {p.name for p in checkpoint_dirs(root)} == at_kill


@pytest.mark.slow
def test_a_failed_checkpoint_write_stops_every_rank_at_the_next_log_step(ws, cli_env, tmp_path):
    """The checkpoints folder cannot be made (a file is in its way, as a full or read-only disk would fail):
    every rank stops at the next log step naming the error, and torchrun does not restart the job."""
    log = tmp_path / "train.log"
    overrides = ["train.processes=2", "train.steps=20", "train.checkpoint_every=2", "train.log_every=1"]
    root = Plan(load_config("tiny", [*RUN, *overrides], str(ws))).checkpoints.root
    root.mkdir(parents=True)
    (root / "checkpoints").write_text("not a folder")
    proc = cli_train(ws, cli_env, *overrides, log=log)
    assert proc.wait(timeout=300) != 0
    out = log.read_text()
    for rank in (0, 1):
        assert f"[rank {rank}] train: writing checkpoint step-00000002 failed: FileExistsError" in out, out[
            -4000:
        ]
    assert "[rank 0] [train] step 2/20" in out and "[train] step 3/20" not in out
    assert "restart 1" not in out


@pytest.mark.skipif(not inotify_works(), reason="counts renames with Linux inotify")
@pytest.mark.slow
def test_two_nodes_started_ninety_seconds_apart_build_one_table_and_train_one_job(ws, cli_env, tmp_path):
    port = _free_port()
    nodes = ["train.nodes=2", "train.processes=1", f"train.master_port={port}"]
    renames = RenameLog([ws / "train-data"])
    node0 = cli_train(ws, cli_env, *nodes, "train.node_rank=0", log=tmp_path / "node0.log")
    time.sleep(90)
    node1 = cli_train(ws, cli_env, *nodes, "train.node_rank=1", log=tmp_path / "node1.log")
    for rank, proc in enumerate((node0, node1)):
        assert proc.wait(timeout=600) == 0, (tmp_path / f"node{rank}.log").read_text()[-4000:]
    renames.close()
    tables = [path for path, count in renames.renames.items() if not path.name.startswith(".")]
    assert len(tables) == 1 and renames.renames[tables[0]] == 1  # one table, renamed into place once
    manifest = Plan(load_config("tiny", [*RUN, *nodes], str(ws))).checkpoints.read_manifest()
    assert manifest["step"] == 60 and manifest["processes"] == 2
    assert (
        "[rank 0] [train] step 60/60"
        in (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
    )


def test_two_processes_train_cad_with_self_conditioning_to_the_end(ws):
    """At rate 0.5 several steps skip the self-conditioning pass: DDP must still reduce every parameter."""
    cfg = load_config("tiny", [*RUN, "train.model=cad", "train.self_condition=0.5", "train.steps=6",
                               "train.processes=2", "train.sample_prompts=2", "train.sample_every=3",
                               "train.gradient_compression=bf16"], str(ws))  # fmt: skip
    started = datetime.datetime.now(datetime.timezone.utc)
    train_flow(cfg)
    with get_client(sync_client=True) as client:  # rank 0's grids, published by the task in this run's server
        grids = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-samples"]))
        )
    assert sum(g.created >= started and "step-00000003.png" in g.data for g in grids) == 1
    manifest = Plan(cfg).checkpoints.read_manifest()
    assert manifest["step"] == 6 and manifest["processes"] == 2
    assert manifest["gradient_allreduce"] == "float32"  # bf16 asked for: torch compresses on NCCL (GPUs) only
    assert manifest["rank_checksums"][0] == manifest["rank_checksums"][1]
    model, _ = load_final(Plan(cfg).checkpoints.root)
    assert type(model).__name__ == "CAD"


def test_batch_must_split_evenly_over_processes_and_micro_batches(ws):
    cfg = load_config(
        "tiny", [*RUN, "train.batch_size=6", "train.processes=2", "train.grad_accumulation=2"], str(ws)
    )
    with pytest.raises(
        ValueError, match=r"train.batch_size 6 is not divisible by 2 processes × 2 accumulation steps"
    ):
        train_flow(cfg)
    assert not (Plan(cfg).checkpoints.root / "launch").exists()  # refused before torchrun started
