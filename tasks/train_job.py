"""One training job, described once: the train flow builds a `TrainJob`, `train_denoiser` runs it in this
process, and the distributed launch hands the same object, as JSON, to every rank.

The distributed job is one process tree that cleans up after itself: torchrun runs under a launcher that
dies with the task (and every rank's process dies with torchrun), rank 0's log lines and every rank's errors reach
the task's log, and rank 0's artifacts are published by the task, in its own Prefect run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

from prefect import task
from pydantic import BaseModel, ConfigDict, PlainSerializer, PlainValidator

from t2i.data.store import Artifact, atomic_path, die_with_parent
from t2i.flows.config import TextConfig, TrainConfig
from t2i.tasks.reporting import ARTIFACT_LINE, RELAY_ENV, publish_markdown, run_logger


def _artifact(value: Any) -> Artifact:
    return value if isinstance(value, Artifact) else Artifact.from_ref(value)


ArtifactField = Annotated[Artifact, PlainValidator(_artifact), PlainSerializer(lambda a: a.ref())]


class TrainJob(BaseModel):
    """Everything a training run needs; a field added here reaches the in-process and the torchrun path."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    train: TrainConfig
    text: TextConfig
    checkpoints: ArtifactField
    latents: ArtifactField
    captions: ArtifactField
    num_shards: int
    latent_norm: dict[str, list[float]] | float
    vae_path: str | None = None
    # the CutMix stream: the composites' latents and captions (same shard count), None without composites
    composites: tuple[ArtifactField, ArtifactField] | None = None
    # precomputed text artifacts (images', then composites') when text.mode is precomputed
    text_embeddings: tuple[ArtifactField, ...] = ()
    # where the inputs are joined for training (`Plan.train_table_of`): images', then composites'
    train_tables: tuple[ArtifactField, ...] = ()
    stop_after: int | None = None  # stop after this step (tests, and the last step of a bounded run)

    @property
    def launch_dir(self) -> Path:
        return self.checkpoints.root / "launch"


# --- the process tree -------------------------------------------------------------------------------------

STOP_GRACE = 30.0  # seconds torchrun gets to stop its ranks after SIGTERM before it is killed


def relay(proc: subprocess.Popen, log, publish) -> int:
    """Copy the job's output to the task's log, line by line, publishing the artifacts rank 0 asks for; stop
    the job if this task is interrupted (a cancelled run, Ctrl-C)."""
    try:
        for line in proc.stdout:
            if not line.startswith(ARTIFACT_LINE):
                log.info(line.rstrip())
                continue
            try:
                publish(**json.loads(line[len(ARTIFACT_LINE) :]))
            except Exception as exc:  # a lost artifact must not stop a job of days
                log.warning(f"[train] could not publish an artifact of rank 0: {type(exc).__name__}: {exc}")
        return proc.wait()
    finally:
        if proc.poll() is None:  # torchrun forwards SIGTERM to its ranks and waits for them
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()


@task(name="train-distributed", retries=0)
def launch_distributed(job: TrainJob, processes: int) -> dict[str, Any]:
    """Run `train_denoiser` as `processes` DDP processes on this node (torchrun; gloo on CPU, NCCL on GPU),
    restarted by torchrun from the newest good checkpoint when a rank or node fails. Global rank 0 writes
    the result, which node 0 returns."""
    from t2i.tasks.train import rank_batch

    cfg, log = job.train, run_logger()
    rank_batch(cfg, processes * cfg.nodes)  # a layout that cannot work fails here, not in every rank
    job_path = job.launch_dir / f"job-node{cfg.node_rank}.json"
    with atomic_path(job_path) as tmp:
        tmp.write_text(job.model_dump_json())
    result_path = job.launch_dir / "result.json"
    if cfg.node_rank == 0:  # what an earlier launch left
        result_path.unlink(missing_ok=True)
        (job.launch_dir / STOPPED).unlink(missing_ok=True)
    cmd = launch_command(job, processes, job_path)
    log.info(f"[train] launching {processes} processes on node {cfg.node_rank}: torchrun {' '.join(cmd[4:])}")
    # gloo connects a pair on first use, not all pairs at start-up: after a restart a rank that started first
    # no longer fails (connection refused, 3 instant retries) before its peer listens
    env = {"TORCH_GLOO_LAZY_INIT": "1", **os.environ, RELAY_ENV: str(job_path)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    code = relay(proc, log, publish_markdown)
    raise_if_stopped(job)
    if code != 0:
        raise RuntimeError(f"train: the distributed job exited with {code} (see the log above)")
    if cfg.node_rank != 0:
        return {"node_rank": cfg.node_rank, "processes": processes * cfg.nodes}
    return json.loads(result_path.read_text())


# --- torchrun ---------------------------------------------------------------------------------------------


def torchrun_args(cfg: TrainConfig, processes: int, run_id: str) -> list[str]:
    """One machine: a standalone rendezvous. Several: every node joins node 0's c10d rendezvous, waiting up to
    `rendezvous_timeout` for nodes that start late. Either way a failed rank restarts the whole group from the
    newest checkpoint, up to `max_restarts` times."""
    common = [f"--nproc-per-node={processes}", f"--max-restarts={cfg.max_restarts}"]
    if cfg.nodes == 1:
        return ["--standalone", *common]
    return [
        f"--nnodes={cfg.nodes}",
        *common,
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={cfg.master_addr}:{cfg.master_port}",
        f"--rdzv-id={run_id}",
        f"--rdzv-conf=join_timeout={cfg.rendezvous_timeout}",
    ]


def launch_command(job: TrainJob, processes: int, job_path: Path) -> list[str]:
    args = torchrun_args(job.train, processes, job.checkpoints.fingerprint)
    entry = ["-m", "t2i.tasks.train_process"]
    return [sys.executable, *entry, "--launch", *args, *entry, str(job_path)]


def run_torchrun(argv: list[str]) -> int:
    """The launcher: torchrun in this process, which dies with the task that started it."""
    from torch.distributed.run import main as torchrun

    die_with_parent()
    try:
        torchrun(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:  # torchrun raises ChildFailedError once the restarts are spent
        print(f"[train] the distributed job failed: {type(exc).__name__}", file=sys.stderr, flush=True)
        return 1
    return 0


# --- a job that stops on purpose --------------------------------------------------------------------------


STOPPED = "stopped.json"


class JobStopped(RuntimeError):
    """Every rank stopped at the same step for a reason a restart would meet again (a non-finite loss, a failed
    checkpoint write): the job is not restarted."""


def record_stop(job: TrainJob, error: BaseException) -> None:
    """Rank 0 records why the job stopped; every rank then exits 0, so torchrun does not restart it."""
    with atomic_path(job.launch_dir / STOPPED) as tmp:
        tmp.write_text(json.dumps({"error": type(error).__name__, "message": str(error)}))


def raise_if_stopped(job: TrainJob) -> None:
    path = job.launch_dir / STOPPED
    if path.is_file():
        record = json.loads(path.read_text())
        raise JobStopped(f"{record['error']}: {record['message']}")
