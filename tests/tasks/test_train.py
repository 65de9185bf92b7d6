"""Training on real latents and captions: resume is exact, checkpoints rotate, bad losses stop the run."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.data.store import checkpoint_dirs
from t2i.flows.config import load_config
from t2i.flows.download import download_flow
from t2i.flows.latents import latents_flow
from t2i.flows.plan import Plan
from t2i.flows.recaption import recaption_flow
from t2i.flows.train import train_flow, train_job
from t2i.tasks.checkpoints import load_final, load_state
from t2i.tasks.train import (
    NonFiniteLoss,
    TrainText,
    lr_factor,
    objective_for,
    open_train_table,
    train_denoiser,
)
from t2i.tasks.train_batches import assemble_batch, batch_indices, step_generator

OVERRIDES = [
    "cutmix.enabled=false",
    "download.max_images=48",
    "download.shard_size=16",
    "recaption.backend=template",
    "train.steps=6",
    "train.batch_size=8",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=2",
    "train.warmup_steps=2",
    "text.mode=online",  # the preset stores embeddings; that path has its own test below
]


@pytest.fixture
def data_workspace(prefect_harness, workspace):
    cfg = load_config("tiny", OVERRIDES, str(workspace))
    download_flow(cfg)
    recaption_flow(cfg)
    latents_flow(cfg)
    return workspace


def _run(cfg, stop_after=None):
    """The train flow's own job, run in this process (the flow runs it to the end; tests stop it early)."""
    return train_denoiser.fn(train_job(cfg, stop_after=stop_after))


def test_resumed_run_equals_uninterrupted_run_past_a_torn_checkpoint(data_workspace, tmp_path, caplog):
    """The newest checkpoint cut to half its size (a crash before it reached the disk): the rerun says so,
    resumes from the one before, and ends where the uninterrupted run ends."""
    other = tmp_path / "other"
    shutil.copytree(data_workspace, other)
    straight = load_config("tiny", OVERRIDES, str(data_workspace))
    _run(straight)
    interrupted = load_config("tiny", OVERRIDES, str(other))
    assert _run(interrupted, stop_after=4)["step"] == 4
    b_dir = Plan(interrupted).checkpoints.root
    assert not (b_dir / "final").exists()
    newest = checkpoint_dirs(b_dir)[-1] / "state.pt"
    newest_size = newest.stat().st_size
    os.truncate(newest, newest_size // 2)
    with caplog.at_level("INFO", logger="t2i"):
        assert _run(interrupted)["step"] == 6
    assert "step-00000004 cannot be loaded (RuntimeError: " in caplog.text
    assert (b_dir / "checkpoints" / "torn-step-00000004" / "state.pt").stat().st_size < newest_size
    assert "resuming from step-00000002 (step 2 of 6)" in caplog.text

    a_dir = Plan(straight).checkpoints.root
    a = load_state(checkpoint_dirs(a_dir)[-1])
    b = load_state(checkpoint_dirs(b_dir)[-1])
    for key in a["model"]:
        assert (a["model"][key] - b["model"][key]).abs().max().item() <= 1e-6, key
    ema_a, ema_b = load_final(a_dir)[0].state_dict(), load_final(b_dir)[0].state_dict()
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) <= 1e-6
    assert [p.name for p in checkpoint_dirs(a_dir)] == ["step-00000004", "step-00000006"]  # keep the last 2


def test_train_flow_writes_manifest_and_final_weights(data_workspace):
    cfg = load_config("tiny", OVERRIDES, str(data_workspace))
    summary = train_flow(cfg)
    manifest = Plan(cfg).checkpoints.read_manifest()
    assert summary["step"] == 6 and manifest["step"] == 6 and manifest["samples"] == 48
    stats = Plan(cfg).latents.read_manifest()  # 'auto': each channel to zero mean, unit variance
    assert manifest["latent_norm"]["shift"] == pytest.approx(stats["channel_mean"])
    assert manifest["latent_norm"]["scale"] == pytest.approx([1 / s for s in stats["channel_std"]])
    model, meta = load_final(Plan(cfg).checkpoints.root)
    assert meta["latent_shape"] == [4, 16, 16] and meta["text_encoder"]["encoder"] == "tiny:t5"
    root = Plan(cfg).checkpoints.root
    assert list((root / "tensorboard").glob("events.out.tfevents.*"))
    grids = sorted((root / "samples").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-00000006.png"]
    assert Image.open(grids[0]).size == (128 * 8, 128)
    assert train_flow(cfg)["skipped"] is True


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(data_workspace):
    cfg = load_config(
        "tiny",
        [
            "cutmix.enabled=false",
            *OVERRIDES,
            "train.lr=1e30",
            "train.optimizer=adamw",
            "train.grad_clip=1e30",
        ],
        str(data_workspace),
    )
    with pytest.raises(NonFiniteLoss, match=r"at step \d+"):
        _run(cfg)
    for ckpt in checkpoint_dirs(Plan(cfg).checkpoints.root):
        state = load_state(ckpt)
        assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_schedule_and_data_order():
    assert lr_factor(0, 10, 100, 0.21) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.21) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.21) == pytest.approx(0.21)
    epoch = torch.cat([batch_indices(10, 5, s, seed=0) for s in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))  # one epoch visits every sample once
    assert torch.equal(batch_indices(10, 5, 3, seed=0), batch_indices(10, 5, 3, seed=0))
    assert not torch.equal(batch_indices(10, 5, 2, seed=0), batch_indices(10, 5, 0, seed=0))


def test_cutmix_stream_replaces_about_thirty_percent(data_workspace, tmp_path):
    """Any second (latents, captions) artifact serves as the composite stream here."""
    cfg = load_config(
        "tiny",
        ["cutmix.enabled=false", *OVERRIDES, "train.steps=12", "train.batch_size=16"],
        str(data_workspace),
    )
    plan = Plan(cfg)
    job = train_job(cfg).model_copy(update={"composites": (plan.latents, plan.captions)})
    result = train_denoiser.fn(job)
    assert 0.18 <= result["cutmix_share"] <= 0.42  # 192 draws of a 0.3 rate
    plain = load_config("tiny", ["cutmix.enabled=false", *OVERRIDES, "train.steps=12", "train.batch_size=16", "train.seed=1"],
                        str(data_workspace))  # fmt: skip
    assert _run(plain)["cutmix_share"] == 0.0


def test_rectified_flow_with_latent_crops_trains_and_samples(data_workspace):
    from t2i.flows.evaluate import evaluate_flow

    cfg = load_config("tiny", ["cutmix.enabled=false", *OVERRIDES, "train.objective=rectified_flow", "train.latent_crop=8",
                               "evaluate.num_prompts=4", "evaluate.steps=3"], str(data_workspace))  # fmt: skip
    train_flow(cfg)
    assert load_final(Plan(cfg).checkpoints.root)[1]["objective"] == "rectified_flow"
    metrics = evaluate_flow(cfg)["metrics"]
    assert metrics["images"] == 4
    wrong = load_config("tiny", ["cutmix.enabled=false", *OVERRIDES, "train.objective=rectified_flow", "train.latent_crop=8",
                                 "evaluate.sampler=ddim", "evaluate.num_prompts=4"], str(data_workspace))  # fmt: skip
    with pytest.raises(ValueError, match="evaluate.sampler: 'ddim' does not fit a rectified_flow model"):
        evaluate_flow(wrong)


def test_cad_with_self_conditioning_trains_resumes_and_samples(data_workspace, tmp_path):
    from t2i.flows.evaluate import evaluate_flow

    overrides = [*OVERRIDES, "train.model=cad", "evaluate.num_prompts=4", "evaluate.steps=3"]
    other = tmp_path / "other"
    shutil.copytree(data_workspace, other)
    straight = load_config("tiny", overrides, str(data_workspace))
    _run(straight)
    interrupted = load_config("tiny", overrides, str(other))
    _run(interrupted, stop_after=3)
    _run(interrupted)
    a, b = load_final(Plan(straight).checkpoints.root)[0], load_final(Plan(interrupted).checkpoints.root)[0]
    assert type(a).__name__ == "CAD"
    sa, sb = a.state_dict(), b.state_dict()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) <= 1e-6
    train_flow(straight)
    assert evaluate_flow(straight)["metrics"]["images"] == 4


def test_precomputed_text_feeds_the_same_batches_as_the_online_encoder(data_workspace, tmp_path):
    online = load_config("tiny", OVERRIDES, str(data_workspace))
    stored = load_config("tiny", [*OVERRIDES, "text.mode=precomputed"], str(data_workspace))
    summary = latents_flow(stored)
    plan = Plan(stored)
    text = plan.text_of(plan.captions)
    assert summary["skipped"] is True  # the latents are shared with the online config ...
    assert summary["text"]["complete"] and text.read_manifest()["rows"] == 48  # ... only text was added
    assert [row[0] for row in plan.artifacts()].count("text embeddings") == 1

    rows, cfg = np.array([0, 5, 9, 17, 30, 47]), stored.train.model_copy(update={"cfg_dropout": 0.4})
    texts = []
    for mode, table in (
        (online, open_train_table(plan.latents, plan.captions, plan.num_shards)),
        (stored, open_train_table(plan.latents, plan.captions, plan.num_shards, text)),
    ):
        gens = [step_generator(1, 2, position) for position in range(len(rows))]  # a step that drops 3 of 6
        text = TrainText(mode.text, table, data_workspace, "cpu", cfg.text_buckets)
        batch = assemble_batch(cfg, objective_for(cfg), table, None, rows, gens, torch.zeros(1, 4, 1, 1),
                               torch.ones(1, 4, 1, 1), text.shapes)  # fmt: skip
        texts.append((batch["drop"], *text.of_batch(batch)))
    (drop_a, a, mask_a), (drop_b, b, mask_b) = texts
    assert torch.equal(drop_a, drop_b) and 0 < int(drop_a.sum()) < len(rows)  # some rows get the empty text
    assert torch.equal(mask_a, mask_b) and a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-5  # float32 reduction order inside T5 only

    other = tmp_path / "other"
    shutil.copytree(data_workspace, other)
    stored_other = load_config("tiny", [*OVERRIDES, "text.mode=precomputed"], str(other))
    _run(online)
    _run(stored_other)
    a_state = load_final(Plan(online).checkpoints.root)[0].state_dict()
    b_state = load_final(Plan(stored_other).checkpoints.root)[0].state_dict()
    assert max((a_state[k] - b_state[k]).abs().max().item() for k in a_state) <= 1e-4


def test_loader_workers_feed_the_same_batches_as_the_training_process(data_workspace, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(data_workspace, other)
    inline = load_config("tiny", [*OVERRIDES, "train.loader_workers=0"], str(data_workspace))
    workers = load_config("tiny", [*OVERRIDES, "train.loader_workers=2"], str(other))
    _run(inline)
    _run(workers)
    a, b = (load_final(Plan(c).checkpoints.root)[0].state_dict() for c in (inline, workers))
    assert all(torch.equal(a[k], b[k]) for k in a)
