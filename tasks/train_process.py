"""The entry point of a distributed training job's processes (`python -m t2i.tasks.train_process`, the command
`t2i.tasks.train_job.launch_command` builds): `--launch` runs torchrun (dying with the task that started it),
and each rank torchrun starts runs `train_denoiser` on the job the train flow described (dying with torchrun).
Global rank 0 writes the result; a stop every rank agrees on is recorded, not restarted."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from t2i.data.store import atomic_path, die_with_parent
from t2i.tasks.train_job import TrainJob, record_stop, run_torchrun


def rank_logger(rank: int) -> logging.Logger:
    """The `t2i` logger of this rank, on stderr (which torchrun passes to the task's log): rank 0 says
    everything, the others their warnings and errors."""
    logger = logging.getLogger("t2i")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    return logger


def main(job_path: str) -> int:
    from t2i.tasks.train import StopTraining, train_denoiser

    die_with_parent()
    rank = int(os.environ.get("RANK", "0"))
    log = rank_logger(rank)
    job = TrainJob.model_validate_json(Path(job_path).read_text())
    if restart := int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")):
        log.warning(
            f"[train] restart {restart} of at most {job.train.max_restarts} after a failed rank or node "
            "(its error is above): resuming from the newest good checkpoint"
        )
    try:
        result = train_denoiser.fn(job)
    except StopTraining as exc:  # every rank stops here; restarting would meet it again
        log.error(str(exc))
        if rank == 0:
            record_stop(job, exc)
        return 0
    if rank == 0:
        with atomic_path(job.launch_dir / "result.json") as tmp:
            tmp.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--launch":
        sys.exit(run_torchrun(sys.argv[2:]))
    sys.exit(main(sys.argv[1]))
