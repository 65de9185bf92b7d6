"""The train stage as `t2i train` runs it (the train flow), on real latents and captions: resume is exact,
checkpoints rotate, bad losses stop the run, and CutMix composites replace whole samples."""

import json
import logging
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from t2i.data.schemas import CAPTIONS, LATENTS, SHAPE_META_KEY, TEXT_EMBEDDINGS
from t2i.data.store import checkpoint_dirs
from t2i.flows.config import load_config
from t2i.flows.download import download_flow
from t2i.flows.latents import latents_flow
from t2i.flows.plan import Plan
from t2i.flows.recaption import recaption_flow
from t2i.flows.train import run_train, train_flow, train_job
from t2i.models.loading import load_final
from t2i.models.objectives import objective
from t2i.tasks.checkpoints import load_state
from t2i.tasks.train import (
    NonFiniteLoss,
    TrainText,
    open_run,
    open_train_table,
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


def test_resumed_run_equals_uninterrupted_run_past_a_torn_checkpoint(data_workspace, tmp_path, caplog):
    """The train flow stopped after step 4, its newest checkpoint cut to half its size (a crash before it
    reached the disk): the rerun says so, resumes from the one before, and ends where the uninterrupted run
    ends."""
    other = tmp_path / "other"
    shutil.copytree(data_workspace, other)
    straight = load_config("tiny", OVERRIDES, str(data_workspace))
    train_flow(straight)
    interrupted = load_config("tiny", OVERRIDES, str(other))
    assert run_train(interrupted, stop_after=4)["step"] == 4
    b_dir = Plan(interrupted).checkpoints.root
    assert not (b_dir / "final").exists() and not Plan(interrupted).checkpoints.is_complete()
    newest = checkpoint_dirs(b_dir)[-1] / "state.pt"
    newest_size = newest.stat().st_size
    os.truncate(newest, newest_size // 2)
    with caplog.at_level("INFO", logger="t2i"):
        assert train_flow(interrupted)["step"] == 6
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
        train_flow(cfg)
    assert not Plan(cfg).checkpoints.is_complete()
    for ckpt in checkpoint_dirs(Plan(cfg).checkpoints.root):
        state = load_state(ckpt)
        assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_data_order():
    epoch = torch.cat([batch_indices(10, 5, s, seed=0) for s in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))  # one epoch visits every sample once
    assert torch.equal(batch_indices(10, 5, 3, seed=0), batch_indices(10, 5, 3, seed=0))
    assert not torch.equal(batch_indices(10, 5, 2, seed=0), batch_indices(10, 5, 0, seed=0))


COMPOSITE = 8.0  # composite k's latent is k + COMPOSITE everywhere, and so is each of its stored text tokens


def write_distinct_composites(plan: Plan) -> None:
    """In place of the composites' latents, captions and (precomputed) text, a stream unlike any image,
    written as the stages write theirs: composite k has the latent k + COMPOSITE everywhere with std 0 (so
    its z is exact and names k), the caption "composite k" with k % 4 more words, and 2 + k % 5 text tokens
    of value k + COMPOSITE."""
    latents, captions = plan.latents_of(plan.composites), plan.captions_of(plan.composites)
    text, stored = plan.text_of(plan.captions), plan.text_of(captions)
    shape_meta = plan.latents.read_shard(0).schema.metadata[SHAPE_META_KEY]
    shape, per_shard = json.loads(shape_meta), 8
    for shard in range(plan.num_shards):
        ks = range(shard * per_shard, (shard + 1) * per_shard)
        keys = [f"composite-{k}" for k in ks]
        means = [np.full(shape, k + COMPOSITE, np.float16).tobytes() for k in ks]
        stds = [np.zeros(shape, np.float16).tobytes() for _ in ks]
        table = pa.Table.from_pydict({"key": keys, "mean": means, "std": stds}, schema=LATENTS)
        latents.write_shard(shard, table.replace_schema_metadata({SHAPE_META_KEY: shape_meta}))
        rows = [{"key": key, "caption": composite_caption(k)} for key, k in zip(keys, ks, strict=True)]
        captions.write_shard(shard, pa.Table.from_pylist(rows, schema=CAPTIONS))
        if stored is not None:
            meta = text.read_manifest()
            dtype = getattr(torch, meta["dtype"])
            embeddings = [torch.full((2 + k % 5, meta["dim"]), k + COMPOSITE, dtype=dtype) for k in ks]
            columns = {
                "key": keys,
                "embedding": [e.view(torch.uint8).numpy().tobytes() for e in embeddings],
                "tokens": [len(e) for e in embeddings],
            }
            stored.write_shard(shard, pa.Table.from_pydict(columns, schema=TEXT_EMBEDDINGS))
    extra = (
        {k: text.read_manifest()[k] for k in ("dim", "dtype", "null_embedding")} if stored is not None else {}
    )
    for artifact, more in ((latents, {}), (captions, {}), (stored, extra)):
        if artifact is not None:
            artifact.write_manifest(config={}, inputs={}, started=time.time(), extra=more)


def composite_caption(k: int) -> str:
    return f"composite {k}" + " with stripes" * (k % 4)


def composite_of(z: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> int | None:
    """k if the model-space latent z is composite k's, else None."""
    k = round(float(z[0, 0, 0] / scale[0, 0, 0] + shift[0, 0, 0]) - COMPOSITE)
    expected = (torch.full_like(z, k + COMPOSITE) - shift) * scale
    return k if torch.allclose(z, expected, rtol=1e-6, atol=0) else None


def check_rows(batch, step: int, run, norm, shapes) -> tuple[list[int], list[float]]:
    """Each row of a training batch is its own sample whole, or composite k whole: latent, caption or stored
    text, and mask; returns the rows that are composites and every row's t."""
    table, cfg = run.trainer.text.table, run.trainer.cfg
    idx = batch_indices(len(table), cfg.batch_size, step, cfg.seed).numpy()
    shift, scale = (torch.tensor(norm[k]).view(-1, 1, 1) for k in ("shift", "scale"))
    swapped = []
    for j, z in enumerate(batch["z"]):
        k = composite_of(z, shift, scale)
        if k is None:  # its own sample: noise around its own latent
            mean, std = table.moments_of(idx[j : j + 1])
            noise = (z / scale + shift - mean[0]) / std[0]
            assert noise.abs().max() < 7 and 0.5 < noise.std() < 1.5, (step, j)
        else:
            swapped.append(j)
        if "text" in batch:  # stored text: the sample's embedding, or k + COMPOSITE in 2 + k % 5 tokens
            mask = batch["mask"][j]
            text = batch["text"][j][: int(mask.sum())]
            if k is None:
                own = table.embeddings_of(idx[j : j + 1])[0]
            else:
                own = torch.full((2 + k % 5, 1), k + COMPOSITE)
            assert mask[: len(own)].all() and not mask[len(own) :].any(), (step, j)
            assert torch.equal(text.float(), own.float().expand_as(text)), (step, j)
        else:  # online text: the caption's tokens and mask
            caption = table.column("caption", idx[j : j + 1])[0] if k is None else composite_caption(k)
            ids, attention = shapes.tokenize([caption])
            kept = batch["attention_mask"][j].bool()
            assert int(kept.sum()) == int(attention[0].sum()), (step, j)
            assert torch.equal(batch["input_ids"][j][kept], ids[0][attention[0].bool()]), (step, j)
    assert batch["swapped"] == len(swapped)
    return swapped, batch["t"].tolist()


@pytest.mark.parametrize("text_mode", ["online", "precomputed"])
def test_cutmix_stream_replaces_about_thirty_percent(data_workspace, text_mode):
    """The batches training draws (the train flow's job, `open_run`'s loader) from the images and a composite
    stream unlike them: a row is a composite exactly where the gate opens (t above the threshold and, with
    cutmix_p 1, always), and then carries that composite's latent, text and mask; every other row its own.
    With the paper's cutmix_p (0.5) about 30 % of the samples are composites."""
    overrides = [
        *OVERRIDES,
        f"text.mode={text_mode}",
        "train.steps=12",
        "train.batch_size=16",
        "train.cfg_dropout=0",
        "train.loader_workers=0",
    ]
    if text_mode == "precomputed":
        latents_flow(load_config("tiny", overrides, str(data_workspace)))  # the captions' stored text
    for cutmix_p, share in ((1.0, None), (0.5, (0.18, 0.42))):  # 192 draws of a 0.3 rate
        cfg = load_config(
            "tiny", [*overrides, "cutmix.enabled=true", f"train.cutmix_p={cutmix_p}"], str(data_workspace)
        )
        write_distinct_composites(Plan(cfg))
        job = train_job(cfg)
        run = open_run(job, logging.getLogger("t2i"))
        swapped = drawn = 0
        for step in range(run.step, run.last_stop):
            rows, t = check_rows(next(run.batches), step, run, job.latent_norm, run.trainer.text.shapes)
            opened = [j for j, tj in enumerate(t) if tj > cfg.train.cutmix_threshold]
            assert set(rows) <= set(opened) and (cutmix_p < 1 or rows == opened), (step, rows, t)
            swapped, drawn = swapped + len(rows), drawn + len(t)
        assert share is None or share[0] <= swapped / drawn <= share[1], swapped / drawn


def test_rectified_flow_with_latent_crops_trains_and_samples(data_workspace):
    from t2i.flows.evaluate import evaluate_flow

    overrides = [
        *OVERRIDES,
        "train.objective=rectified_flow",
        "train.latent_crop=8",
        "evaluate.num_prompts=4",
    ]
    cfg = load_config("tiny", [*overrides, "evaluate.steps=3"], str(data_workspace))
    train_flow(cfg)
    assert load_final(Plan(cfg).checkpoints.root)[1]["objective"] == "rectified_flow"
    metrics = evaluate_flow(cfg)["metrics"]
    assert metrics["images"] == 4
    wrong = load_config("tiny", [*overrides, "evaluate.sampler=ddim"], str(data_workspace))
    with pytest.raises(ValueError, match="evaluate.sampler: 'ddim' does not fit a rectified_flow model"):
        evaluate_flow(wrong)


def test_cad_with_self_conditioning_trains_resumes_and_samples(data_workspace, tmp_path):
    from t2i.flows.evaluate import evaluate_flow

    overrides = [*OVERRIDES, "train.model=cad", "evaluate.num_prompts=4", "evaluate.steps=3"]
    other = tmp_path / "other"
    shutil.copytree(data_workspace, other)
    straight = load_config("tiny", overrides, str(data_workspace))
    train_flow(straight)
    interrupted = load_config("tiny", overrides, str(other))
    assert run_train(interrupted, stop_after=3)["step"] == 3
    assert train_flow(interrupted)["step"] == 6
    a, b = load_final(Plan(straight).checkpoints.root)[0], load_final(Plan(interrupted).checkpoints.root)[0]
    assert type(a).__name__ == "CAD"
    sa, sb = a.state_dict(), b.state_dict()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) <= 1e-6
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
        (
            online,
            open_train_table(
                plan.train_table_of(plan.latents, plan.captions, None),
                plan.latents,
                plan.captions,
                plan.num_shards,
            ),
        ),
        (
            stored,
            open_train_table(
                plan.train_table_of(plan.latents, plan.captions, text),
                plan.latents,
                plan.captions,
                plan.num_shards,
                text,
            ),
        ),
    ):
        gens = [step_generator(1, 2, position) for position in range(len(rows))]  # a step that drops 3 of 6
        text = TrainText(mode.text, table, data_workspace, "cpu", cfg.text_buckets)
        shift, scale = torch.zeros(1, 4, 1, 1), torch.ones(1, 4, 1, 1)
        batch = assemble_batch(
            cfg, objective(cfg.objective), table, None, rows, gens, shift, scale, text.shapes
        )
        texts.append((batch["drop"], *text.of_batch(batch)))
    (drop_a, a, mask_a), (drop_b, b, mask_b) = texts
    assert torch.equal(drop_a, drop_b) and 0 < int(drop_a.sum()) < len(rows)  # some rows get the empty text
    assert torch.equal(mask_a, mask_b) and a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-5  # float32 reduction order inside T5 only

    other = tmp_path / "other"
    shutil.copytree(data_workspace, other)
    stored_other = load_config("tiny", [*OVERRIDES, "text.mode=precomputed"], str(other))
    train_flow(online)
    train_flow(stored_other)
    a_state = load_final(Plan(online).checkpoints.root)[0].state_dict()
    b_state = load_final(Plan(stored_other).checkpoints.root)[0].state_dict()
    assert max((a_state[k] - b_state[k]).abs().max().item() for k in a_state) <= 1e-4


def test_loader_workers_feed_the_same_batches_as_the_training_process(data_workspace, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(data_workspace, other)
    inline = load_config("tiny", [*OVERRIDES, "train.loader_workers=0"], str(data_workspace))
    workers = load_config("tiny", [*OVERRIDES, "train.loader_workers=2"], str(other))
    train_flow(inline)
    train_flow(workers)
    a, b = (load_final(Plan(c).checkpoints.root)[0].state_dict() for c in (inline, workers))
    assert all(torch.equal(a[k], b[k]) for k in a)
