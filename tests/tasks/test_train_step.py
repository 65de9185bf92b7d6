"""The training step itself: it never makes the host wait for the device, and compiled it trains as eager does.

Both run the real `Trainer.step` of a run opened the way `train_denoiser` opens it (`open_run`), on the tiny
preset's latents and captions, with the text online (T5 in the step) and precomputed (stored embeddings).
"""

import logging
import shutil

import pytest
import torch

from t2i.flows.config import load_config
from t2i.flows.download import download_flow
from t2i.flows.latents import latents_flow
from t2i.flows.recaption import recaption_flow
from t2i.flows.train import train_job
from t2i.models.conditioning import text_buckets, trim_padding
from t2i.tasks.train import TrainText, open_run, train_tables
from tests.host_syncs import HostSyncError, no_host_syncs

DATA = [
    "cutmix.enabled=false",
    "download.max_images=32",
    "download.shard_size=16",
    "recaption.backend=template",
]
STEP = [*DATA, "train.steps=6", "train.batch_size=8", "train.sample_prompts=0"]
LOG = logging.getLogger("test")


@pytest.fixture(scope="module")
def step_data(tmp_path_factory, tiny_models, prefect_harness):
    """Latents, captions and stored text embeddings of 32 images."""
    ws = tmp_path_factory.mktemp("step") / "ws"
    shutil.copytree(tiny_models, ws / "models")
    cfg = load_config("tiny", [*DATA, "text.mode=precomputed"], str(ws))
    download_flow(cfg)
    recaption_flow(cfg)
    latents_flow(cfg)
    return ws


def config(ws, *overrides):
    return load_config("tiny", [*STEP, *overrides], str(ws))


def test_the_guard_fails_on_what_would_wait_for_a_gpu(step_data):
    """Code that reads a value on the host, or copies without non_blocking, fails under the guard; the same
    code is fine outside it (set-up and previews may wait, the step may not)."""
    text, mask = torch.randn(2, 5, 4), torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    with no_host_syncs(), pytest.raises(HostSyncError, match="nonzero"):
        trim_padding(text, mask)  # nonzero, then int() of a maximum
    cfg = config(step_data, "text.mode=precomputed")
    table, _ = train_tables(train_job(cfg))
    train_text = TrainText(cfg.text, table, step_data, "cpu", cfg.train.text_buckets)
    with no_host_syncs(), pytest.raises(HostSyncError, match="blocking copy"):
        train_text.of_rows(torch.arange(2).numpy())  # `.to(device)` without non_blocking
    assert train_text.of_rows(torch.arange(2).numpy())[0].shape[0] == 2


@pytest.mark.parametrize("mode", ["online", "precomputed"])
@pytest.mark.parametrize("model", ["dit", "cad"])
def test_a_training_step_never_waits_for_the_host(step_data, model, mode):
    """Three steps of two micro-batches each (no_sync, then the all-reduce pass), CAD-I's self-conditioning
    pass included: no scalar read, no data-dependent shape, no blocking copy, from the batch's arrival to the
    EMA update. Losses and gradient norms stay on the device."""
    settings = ["train.grad_accumulation=2", "train.loader_workers=1", "train.self_condition=0.5"]
    cfg = config(step_data, f"train.model={model}", f"text.mode={mode}", *settings)
    run = open_run(train_job(cfg), LOG)
    losses = []
    with no_host_syncs():
        for step in range(3):
            loss, grad_norm = run.trainer.step(step, run.batches)
            losses.append(loss)
    assert isinstance(grad_norm, torch.Tensor) and torch.isfinite(torch.stack(losses)).all()
    assert run.trainer.ema.num_updates == 3


def test_a_compiled_denoiser_trains_as_eager_with_one_graph_per_text_length(step_data):
    """`train.compile`: inductor compiles the denoiser once per text-length bucket the batches use (not once
    per batch), and the compiled steps give the eager steps' losses. The template captions all have 7 tokens
    (bucket 8 of 2, 4, …, 64); batches of 2 whose captions are both dropped (CFG dropout 0.7) carry only the
    empty text's token (bucket 2)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    losses, lengths, graphs = {}, set(), 0
    for compiled in (False, True):
        settings = [
            "train.loader_workers=0",
            "train.text_buckets=32",
            "train.batch_size=2",
            "train.cfg_dropout=0.7",
        ]
        cfg = config(step_data, "text.mode=precomputed", *settings, f"train.compile={compiled}")
        run = open_run(train_job(cfg), LOG)
        before = counters["stats"]["unique_graphs"]
        batches = (lengths.add(b["text"].shape[1]) or b for b in run.batches)
        losses[compiled] = torch.stack([run.trainer.step(step, batches)[0] for step in range(6)])
        graphs = counters["stats"]["unique_graphs"] - before
    assert len(lengths) >= 2 and lengths <= set(text_buckets(cfg.text.max_length, cfg.train.text_buckets))
    assert 1 <= graphs <= len(lengths), (graphs, lengths)
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)
