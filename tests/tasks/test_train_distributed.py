"""Two CPU processes (torchrun, gloo) train one model: same weights on both ranks, the configured global batch."""

import pytest
import torch

from flows.config import load_config
from flows.download import download_flow
from flows.latents import latents_flow
from flows.plan import Plan
from flows.recaption import recaption_flow
from flows.train import train_flow
from tasks.train import checkpoint_dirs, load_final

OVERRIDES = [
    "cutmix.enabled=false",
    "download.max_images=32",
    "download.shard_size=16",
    "recaption.backend=template",
    "train.steps=4",
    "train.batch_size=8",
    "train.checkpoint_every=2",
    "train.processes=2",
    "train.grad_accumulation=2",
]


def test_two_processes_train_identical_weights_with_the_global_batch(prefect_harness, workspace):
    cfg = load_config("tiny", OVERRIDES, str(workspace))
    download_flow(cfg)
    recaption_flow(cfg)
    latents_flow(cfg)
    summary = train_flow(cfg)
    manifest = Plan(cfg).checkpoints.read_manifest()
    assert summary["processes"] == 2 and manifest["processes"] == 2
    assert manifest["global_batch"] == 8 and manifest["step"] == 4
    checksums = manifest["rank_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    root = Plan(cfg).checkpoints.root
    state = torch.load(checkpoint_dirs(root)[-1] / "state.pt", weights_only=False)
    assert state["step"] == 4
    model, _ = load_final(root)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_batch_must_split_evenly_over_processes_and_micro_batches(prefect_harness, workspace):
    cfg = load_config("tiny", ["cutmix.enabled=false", *OVERRIDES[:-3], "train.batch_size=6", "train.processes=1", "train.grad_accumulation=4"],
                      str(workspace))  # fmt: skip
    download_flow(cfg)
    recaption_flow(cfg)
    latents_flow(cfg)
    with pytest.raises(
        ValueError, match=r"train.batch_size 6 is not divisible by 1 processes × 4 accumulation steps"
    ):
        train_flow(cfg)
