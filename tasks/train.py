"""Train stage unit of work: the denoiser on stored latents and captions, resumable from its checkpoints.

The loop reads like a story: open the memory-mapped train tables, build (or resume) the model, EMA and
optimizer on the training device, then per step take this rank's micro-batches from the loader
(`t2i.tasks.train_batches`), step, and log / preview / checkpoint on schedule. Every random draw of a step
comes from generators seeded by the step, so a resumed run replays exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from prefect import task

from t2i.data.store import CHECKPOINTS, FINAL, Artifact, atomic_path, checkpoint_dirs
from t2i.data.train_data import TrainTable, build_train_table, collate_text_rows
from t2i.flows.config import ConfigError
from t2i.models.architectures import build_denoiser, denoiser_from_config
from t2i.models.cad import self_conditioned_forward
from t2i.models.conditioning import apply_text_dropout, trim_padding
from t2i.models.dit import count_parameters
from t2i.models.ema import EMA
from t2i.models.latent_norm import LatentNorm, describe_latent_norm, per_channel_latent_norm
from t2i.models.loading import initial_run_meta, resolve_model, train_run
from t2i.models.lr_schedule import lr_factor
from t2i.models.objectives import Objective, objective, pad_text
from t2i.tasks.checkpoints import CheckpointWriter, load_state, save_final
from t2i.tasks.model_cache import cached_model, pick_device
from t2i.tasks.reporting import publish_markdown, run_logger
from t2i.tasks.text import OnlineText, TextShapes, load_encoder
from t2i.tasks.trackers import Trackers, accelerate_trackers, redact, require_trackers, start_trackers
from t2i.tasks.train_batches import StepBatches, batch_loader
from t2i.tasks.train_job import TrainJob

if TYPE_CHECKING:
    from t2i.flows.config import TextConfig, TrainConfig


class StopTraining(RuntimeError):
    """Every rank stops at the same step for a reason a restart would meet again."""


class NonFiniteLoss(StopTraining):
    pass


class CheckpointWriteFailed(StopTraining):
    pass


class InitialRunMismatch(StopTraining):
    """The run `train.init_from` names does not fit this run's latents or text: every rank stops, with no
    restart (another try would fail the same way)."""


class TrackersUnavailable(StopTraining):
    """A tracker in `train.trackers` is not installed or could not start (credentials, server): every rank
    stops before the first step."""


def open_train_table(
    table: Artifact, latents: Artifact, captions: Artifact, num_shards: int, text: Artifact | None = None
) -> TrainTable:
    """The memory-mapped join of these inputs at `table` (`Plan.train_table_of`), built first if missing."""
    return TrainTable(build_train_table(table, latents, captions, num_shards, text).root)


def table_inputs(job: TrainJob) -> list[tuple[Artifact, Artifact, Artifact | None]]:
    """(latents, captions, stored text or None) of the images, then of the composites if any."""
    stored = list(job.text_embeddings) if job.text.mode == "precomputed" else []
    if job.text.mode == "precomputed" and not stored:
        raise ValueError("text.mode is precomputed but no text artifact was given: run the latents stage")
    inputs = [(job.latents, job.captions, stored[0] if stored else None)]
    if job.composites is not None:
        inputs.append((*job.composites, stored[1] if len(stored) > 1 else None))
    return inputs


def train_tables(job: TrainJob) -> tuple[TrainTable, TrainTable | None]:
    """The memory-mapped tables of the images and of the composites, built first if missing."""
    tables = [
        open_train_table(table, latents, captions, job.num_shards, text)
        for table, (latents, captions, text) in zip(job.train_tables, table_inputs(job), strict=True)
    ]
    return tables[0], tables[1] if len(tables) > 1 else None


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay and no LAMB trust ratio on norms and biases (1-D parameters), as the recipe says."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "trust_ratio": False},  # LAMB only; AdamW ignores it
    ]
    if cfg.optimizer == "lamb":
        from t2i.models.lamb import Lamb

        return Lamb(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    # fused: one kernel for all tensors, and the step count stays on the device (no host read per step)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)


class SamplePreview:
    """Sample grids of fixed training captions with the EMA weights every `sample_every` steps: a PNG under
    `samples/`, the trackers' image, and a Prefect markdown artifact pointing at the file.

    Runs on the main process's training device (the denoiser copy is built once), so it takes seconds and
    the other ranks, waiting at the next gradient all-reduce, are never held long.
    """

    def __init__(
        self, root: Path, vae_path: str, text: TrainText, count: int, latent_norm, cfg, build, device
    ):
        self.root, self.vae_path, self.text, self.cfg = root, vae_path, text, cfg
        self.latent_norm: LatentNorm = latent_norm
        self.rows = np.arange(min(count, len(text.table)))
        self.prompts = text.table.column("caption", self.rows)
        self.build, self.device, self.model = build, torch.device(device), None

    def sample(self, ema: EMA, step: int):
        from PIL import Image

        from t2i.tasks.sampling import image_grid, sample_pixels

        vae = cached_model("vae", path=self.vae_path, device=str(self.device), dtype="float32", revision=None)
        if self.model is None:
            self.model = self.build().to(self.device).eval()
        ema.copy_to(self.model)
        text, mask = self.text.of_rows(self.rows)
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed)
        pixels = sample_pixels(
            self.cfg.objective,
            "auto",
            self.model,
            vae,
            self.text.table.latent_shape,
            self.latent_norm,
            text,
            mask,
            self.text.null_text,
            self.text.null_mask,
            steps=20,
            guidance_scale=3.0,
            generator=generator,
        )
        grid = image_grid([Image.fromarray(px) for px in pixels], columns=len(pixels), cell=128)
        path = self.root / "samples" / f"step-{step:08d}.png"
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")
        lines = [f"Samples at step {step}: `{path}`", ""] + [
            f"{i + 1}. {p}" for i, p in enumerate(self.prompts)
        ]
        publish_markdown("\n".join(lines), key="train-samples", description="Training samples")
        return grid


# --- one step ---------------------------------------------------------------------------------------------


# Set (to anything) in a job's environment to count the backward passes that all-reduce gradients; the count
# is a Python hook around the all-reduce, so only a test asks for it.
COUNT_SYNCS_ENV = "T2I_COUNT_GRADIENT_SYNCS"


@dataclass
class GradientSyncs:
    """Backward passes that all-reduced gradients; under gradient accumulation, one per optimizer step."""

    compress: bool
    passes: int = 0


def _count_and_allreduce(syncs: GradientSyncs, bucket):
    """DDP communication hook: the run's all-reduce (bf16-compressed or not); bucket 0 is reduced once per
    synchronising pass."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if bucket.index() == 0:
        syncs.passes += 1
    hook = default_hooks.bf16_compress_hook if syncs.compress else default_hooks.allreduce_hook
    return hook(None, bucket)


@dataclass
class Trainer:
    """What every step of one run uses: the prepared model and optimizer, and the text conditioning."""

    cfg: TrainConfig
    accelerator: Any
    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: Any
    text: TrainText
    swapped: int = 0
    drawn: int = 0
    timing: dict[str, float] = field(default_factory=lambda: {"data": 0.0, "text": 0.0, "total": 0.0})

    @property
    def objective(self) -> Objective:
        return objective(self.cfg.objective)

    def step(self, step: int, batches: Iterator[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this rank's micro-batches; returns loss and gradient norm on the device
        (no host sync). Gradients are all-reduced once, on the last micro-batch: the others run forward and
        backward inside `no_sync`."""
        cfg, accelerator, model, dev = self.cfg, self.accelerator, self.model, self.accelerator.device
        accum = cfg.grad_accumulation
        loss_sum = torch.zeros((), device=dev)
        for m in range(accum):
            t_data = time.perf_counter()
            b = next(batches)
            t_text = time.perf_counter()
            text, mask = self.text.of_batch(b)
            self.timing["data"] += t_text - t_data
            self.timing["text"] += time.perf_counter() - t_text
            self.swapped, self.drawn = self.swapped + b["swapped"], self.drawn + len(b["drop"])
            z, t, eps = (b[k].to(dev, non_blocking=True) for k in ("z", "t", "eps"))
            denoise = model
            if "self_condition" in b:  # CAD-I: RIN self-conditioning, the coin drawn with the batch

                def denoise(x, t, text, mask, take=b["self_condition"]):
                    return self_conditioned_forward(model, x, t, text, mask, cfg.self_condition, take=take)

            with contextlib.nullcontext() if m == accum - 1 else accelerator.no_sync(model):
                with accelerator.autocast():
                    loss, _ = self.objective.loss(denoise, z, text, mask, t=t, eps=eps)
                accelerator.backward(loss / accum)
            loss_sum += loss.detach().float() / accum
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(model)
        return loss_sum, grad_norm


class TrainText:
    """The denoiser's text: the captions' token ids encoded by the frozen encoder in the step (online), or their
    stored embeddings; both arrive padded to a length bucket by the loader (`TextShapes`), and then
    `apply_text_dropout` puts the empty text's embedding in the dropped rows. Both modes give the same tensors,
    and the CFG dropout is the unit its tests test. Nothing here reads a tensor's values on the host."""

    def __init__(self, text_cfg: TextConfig, table: TrainTable, workspace, device, buckets: int) -> None:
        self.table, self.device, self.encoder = table, torch.device(device), None
        tokenizer = None  # online text: captions are tokenized where batches are built
        if table.words is not None:  # text.mode precomputed
            self.dim = table.words.shape[1]
            null = table.null_embedding().float()[None]
            null_text, null_mask = null, torch.ones(null.shape[:2], dtype=torch.bool)
        else:
            tokenizer = resolve_model(text_cfg.encoder, workspace)
            self.encoder = OnlineText(load_encoder(text_cfg, workspace, str(device)), text_cfg.dtype)
            self.dim = self.encoder.dim
            null_text, null_mask = self.encoder.encode([None])
        self.shapes = TextShapes(text_cfg.max_length, buckets, tokenizer, text_cfg.revision)
        null_text, null_mask = trim_padding(null_text, null_mask)  # once, here: it reads the mask
        self.null_text, self.null_mask = null_text.to(self.device), null_mask.to(self.device)

    def of_batch(self, b: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        if "text" in b:
            text, mask = b["text"].to(dev, non_blocking=True).float(), b["mask"].to(dev, non_blocking=True)
        else:
            ids, attention = (b[k].to(dev, non_blocking=True) for k in ("input_ids", "attention_mask"))
            text, mask = self.encoder.embed(ids, attention)
        drop = b["drop"].to(dev, non_blocking=True)
        text, mask = apply_text_dropout(text, mask, drop, self.null_text, self.null_mask)
        return pad_text(text, mask, self.shapes.length(text.shape[1]))

    def of_rows(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The text of table rows as the denoiser sees it (for previews)."""
        if self.encoder is None:
            text, mask = collate_text_rows(self.table.embeddings_of(rows))
        else:
            text, mask = self.encoder.encode(self.table.column("caption", rows))
        return text.to(self.device).float(), mask.to(self.device)


# --- logging and health -----------------------------------------------------------------------------------


class StepLog:
    """Losses stay on the device between log steps, and so does the first step whose loss was not finite:
    no step waits for the host. `check` and `flush` gather them, on every rank at the same steps."""

    def __init__(self, accelerator) -> None:
        self.accelerator, dev = accelerator, accelerator.device
        self.first_bad = torch.full((), -1, dtype=torch.long, device=dev)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.accelerator.device)
        self.count, self.seen, self.t0, self.grad_norm = 0, 0, time.time(), None

    def add(self, step: int, loss: torch.Tensor, grad_norm, samples: int) -> None:
        self.loss_sum += loss
        self.count, self.seen, self.grad_norm = self.count + 1, self.seen + samples, grad_norm
        self.first_bad = torch.where(~torch.isfinite(loss) & (self.first_bad < 0), step, self.first_bad)

    def check(self, root: Path, writer: CheckpointWriter | None) -> None:
        """Stop every rank at the same step if any rank's loss went non-finite, or rank 0's background
        checkpoint write failed (the error named on every rank)."""
        from accelerate.utils import broadcast_object_list

        failed = writer is not None and writer.failure is not None
        flags = torch.stack([self.first_bad, torch.tensor(int(failed), device=self.first_bad.device)])
        gathered = self.accelerator.gather(flags.reshape(1, 2))
        firsts, failures = gathered[:, 0], gathered[:, 1]
        if failures.any():
            failure = broadcast_object_list([writer.failure if writer else None], from_process=0)[0]
            raise CheckpointWriteFailed(
                f"train: {failure} (on rank 0); the job stops, the checkpoints on disk are kept in "
                f"{root / CHECKPOINTS}"
            )
        if (firsts >= 0).any():
            step = int(firsts[firsts >= 0].min())
            raise NonFiniteLoss(
                f"train: loss is not finite at step {step}; the last good checkpoint is kept in "
                f"{root / CHECKPOINTS}"
            )

    def flush(self, lr: float) -> dict[str, float]:
        losses = self.accelerator.gather(self.loss_sum.reshape(1))
        stats = {
            "loss": float(losses.mean()) / max(self.count, 1),
            "lr": lr,
            "grad_norm": float(self.grad_norm) if self.grad_norm is not None else float("nan"),
            "samples_per_second": self.seen / max(time.time() - self.t0, 1e-9),
        }
        self._reset()
        return stats


def weights_are_finite(model: torch.nn.Module) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


# --- the run ----------------------------------------------------------------------------------------------


def compresses_gradients(cfg: TrainConfig, device: str) -> bool:
    """bf16 all-reduce: asked for (or auto with bf16 training), on GPUs (torch offers the hook on NCCL only)."""
    asked = cfg.gradient_compression == "bf16" or (
        cfg.gradient_compression == "auto" and cfg.mixed_precision == "bf16"
    )
    return asked and device.startswith("cuda")


def make_accelerator(cfg: TrainConfig, root: Path):
    """accelerate, told how this run trains: DDP with gradients all-reduced in bf16 (half the bytes of fp32)
    straight from their buckets (no copy), no per-step buffer broadcast (the denoisers' buffers are constant
    tables); and where it logs: `train.trackers`, their local files in the run folder `root`."""
    from accelerate import Accelerator
    from accelerate.utils import (
        DDPCommunicationHookType,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
    )

    device = pick_device(cfg.device)
    if device.startswith("cuda"):  # TF32 for the float32 matmuls outside autocast (text encoder, EMA)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # a collective that waits longer than this for a lost rank fails, so torchrun can restart the group
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.collective_timeout))
    bf16 = compresses_gradients(cfg, device) and not os.environ.get(COUNT_SYNCS_ENV)  # else the counting hook
    ddp = DistributedDataParallelKwargs(
        broadcast_buffers=False,
        gradient_as_bucket_view=True,
        comm_hook=DDPCommunicationHookType.BF16 if bf16 else DDPCommunicationHookType.NO,
    )
    return Accelerator(
        cpu=device == "cpu",
        mixed_precision=cfg.mixed_precision,
        kwargs_handlers=[timeout, ddp],
        log_with=accelerate_trackers(cfg.trackers, root),
        project_dir=str(root),
    )


def rank_batch(cfg: TrainConfig, world: int) -> int:
    """Samples per rank and step; the global batch must split evenly over ranks and micro-batches."""
    if cfg.batch_size % (world * cfg.grad_accumulation):
        raise ValueError(
            f"train.batch_size {cfg.batch_size} is not divisible by {world} processes × "
            f"{cfg.grad_accumulation} accumulation steps"
        )
    return cfg.batch_size // world


def training_state(trainer: Trainer, step: int) -> dict[str, Any]:
    acc = trainer.accelerator
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {
        "step": step,
        "model": acc.unwrap_model(trainer.model).state_dict(),
        "ema": trainer.ema.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "rng": rng,
    }
    if acc.scaler is not None:
        state["scaler"] = acc.scaler.state_dict()
    return state


def restore(trainer: Trainer, state: dict[str, Any]) -> int:
    """Load a checkpoint into the unprepared model, EMA, optimizer, scheduler (and scaler, RNG); its step."""
    trainer.model.load_state_dict(state["model"])
    trainer.ema.load_state_dict(state["ema"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state and trainer.accelerator.scaler is not None:
        trainer.accelerator.scaler.load_state_dict(state["scaler"])
    if rng := state.get("rng"):
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.device_count() == len(rng["cuda"]):
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"]


def newest_loadable(root: Path, log) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, memory-mapped (its pages are read on demand and shared by the ranks
    of a node). One that does not (torn by a crash) is moved aside as `torn-step-…`, kept for a person to
    look at, and the one before is tried, saying which and why."""
    for path in reversed(checkpoint_dirs(root)):
        try:
            return path, load_state(path)
        except Exception as exc:  # a truncated or corrupt file: torch raises RuntimeError, EOFError, …
            reason = f"{type(exc).__name__}: {str(exc).split('. ')[0][:160]}"
            aside = path.with_name(f"torn-{path.name}")
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            log.warning(
                f"[train] {path.name} cannot be loaded ({reason}); moved aside to {aside.name}, trying the "
                "checkpoint before it"
            )
    return None


def resume_point(accelerator, root: Path, log) -> tuple[str | None, dict[str, Any] | None]:
    """Rank 0 chooses the checkpoint (each rank listing a network folder itself could see another newest)
    and every rank loads that one."""
    from accelerate.utils import broadcast_object_list

    found = newest_loadable(root, log) if accelerator.is_main_process else None
    name = broadcast_object_list([found[0].name if found else None], from_process=0)[0]
    if name is None:
        return None, None
    return name, found[1] if found else load_state(root / CHECKPOINTS / name)


@dataclass
class InitialRun:
    """The run a fine-tuning run starts from (`train.init_from`): its meta, and its final weights, read only
    when a run starts fresh (a resumed run loads its checkpoint instead)."""

    root: Path
    meta: dict[str, Any]

    def weights(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.root / FINAL / "model.safetensors")


def initial_run(job: TrainJob, latent_shape, text_dim: int, log) -> InitialRun | None:
    """The run `train.init_from` names, checked against this run's latents and text before any step (a
    mismatch stops every rank); None without one."""
    cfg = job.train
    if cfg.init_from is None:
        return None
    try:
        run = train_run(cfg.init_from, job.checkpoints.workspace, "train.init_from")
        meta = initial_run_meta(run, cfg.model, job.text.encoder)
    except (OSError, ValueError) as err:
        raise InitialRunMismatch(str(err)) from None
    model_cfg, (c, h, _) = meta["model_config"], latent_shape
    if model_cfg["latent_channels"] != c or model_cfg["latent_size"] < h or model_cfg["text_dim"] != text_dim:
        raise InitialRunMismatch(
            f"train.init_from: {run.root} was trained on {model_cfg['latent_channels']}-channel latents up to "
            f"{model_cfg['latent_size']}² with {model_cfg['text_dim']}-wide text; this run's are {c}-channel, "
            f"{h}², {text_dim}-wide"
        )
    theirs, ours = (per_channel_latent_norm(n, c) for n in (meta["latent_norm"], job.latent_norm))
    if theirs != ours:  # allowed (a new VAE scale on purpose), but the weights start on other inputs
        log.warning(
            f"[train] train.init_from: {run.root} saw latents normalised by "
            f"{describe_latent_norm(meta['latent_norm'])}, this run normalises by "
            f"{describe_latent_norm(job.latent_norm)} (train.scale_factor / shift_factor)"
        )
    return InitialRun(run.root, meta)


def build_trainer(cfg, accelerator, build, text: TrainText, latent_norm, root: Path, log, start=None):
    """Model, EMA, optimizer and scheduler on the training device, resumed from the newest good checkpoint,
    else (fine-tuning) from the `start` run's weights; then prepared (DDP); the step to continue from."""
    name, state = resume_point(accelerator, root, log)
    torch.manual_seed(cfg.seed)
    model = build()
    if start is not None and state is None:
        model.load_state_dict(start.weights())
    model = model.to(accelerator.device)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.final_lr_ratio)
    )
    trainer = Trainer(cfg, accelerator, model, EMA(model, decay=cfg.ema_decay), optimizer, scheduler, text)
    step = 0
    if state is not None:
        step = restore(trainer, state)
        del state
        log.info(f"[train] resuming from {name} (step {step} of {cfg.steps})")
    else:
        shape = "×".join(map(str, text.table.latent_shape))
        log.info(
            f"[train] {cfg.model}-{cfg.size} (patch {model.config.patch_size}): "
            f"{count_parameters(model) / 1e6:.2f}M parameters, {len(text.table)} samples, "
            f"latents {shape}, normalised by {describe_latent_norm(latent_norm)}"
            + (f", initialised from {cfg.init_from}" if start is not None else "")
        )
    trainer.model, trainer.optimizer = accelerator.prepare(model, optimizer)
    # compiled after DDP, as torch wants (here, not accelerate's dynamo plugin: its state is per process)
    if cfg.compile:
        trainer.model = torch.compile(trainer.model, backend="inductor", dynamic=False)
    return trainer, step


def watch_gradient_syncs(model: torch.nn.Module, cfg: TrainConfig) -> GradientSyncs | None:
    """The counting hook, when the job's environment asks for it and gradients are all-reduced at all."""
    ddp = unwrap_compiled(model)
    if not os.environ.get(COUNT_SYNCS_ENV) or not hasattr(ddp, "register_comm_hook"):
        return None
    syncs = GradientSyncs(compress=compresses_gradients(cfg, str(next(ddp.parameters()).device)))
    ddp.register_comm_hook(syncs, _count_and_allreduce)
    return syncs


def unwrap_compiled(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)


def after_step(trainer: Trainer, step: int, last_stop: int, steplog: StepLog, outputs: dict, log) -> None:
    """Log, preview and checkpoint on their schedules. Health checks run at log and checkpoint steps on every
    rank, so all ranks stop together and no checkpoint holds a non-finite state."""
    cfg, root = trainer.cfg, outputs["root"]
    log_now = step % cfg.log_every == 0 or step == last_stop
    save_now = step % cfg.checkpoint_every == 0 or step == last_stop
    writer = outputs.get("writer")
    if save_now and writer is not None:  # the previous write has ended (or failed) before the ranks agree
        writer.wait(raise_error=False)
    if log_now or save_now:
        steplog.check(root, writer)
    trackers: Trackers | None = outputs.get("trackers")
    if log_now:
        stats = steplog.flush(trainer.scheduler.get_last_lr()[0])
        log.info(
            f"[train] step {step}/{cfg.steps} loss {stats['loss']:.4f} lr {stats['lr']:.2e} "
            f"grad-norm {stats['grad_norm']:.3f} {stats['samples_per_second']:.1f} samples/s"
        )
        if trackers is not None:
            trackers.scalars({f"train/{name}": value for name, value in stats.items()}, step)
    preview = outputs.get("preview")
    if preview is not None and (step % cfg.sample_every == 0 or step == cfg.steps):
        grid = preview.sample(trainer.ema, step)
        if trackers is not None:
            trackers.image("samples", grid, step)
    if save_now:
        if not weights_are_finite(trainer.model):  # the ranks hold the same weights: all stop here
            raise NonFiniteLoss(
                f"train: weights became non-finite by step {step}; the last good checkpoint is kept in "
                f"{root / CHECKPOINTS}"
            )
        if writer is not None:
            writer.save(step, training_state(trainer, step))


@dataclass
class Run:
    """A training process ready to step: the trainer (resumed), the step it continues from and the one it stops
    after, its batches, and how to build a fresh denoiser of its shape."""

    trainer: Trainer
    step: int
    last_stop: int
    batches: Iterator[dict[str, Any]]
    build: Any


def open_run(job: TrainJob, log) -> Run:
    """Accelerator, train tables, text, the model resumed from the newest good checkpoint, and the loader."""
    cfg, root = job.train, job.checkpoints.root
    accelerator = make_accelerator(cfg, root)
    rank_batch(cfg, accelerator.num_processes)
    table, comps = train_tables(job)
    text = TrainText(job.text, table, job.checkpoints.workspace, accelerator.device, cfg.text_buckets)
    c, h, _ = table.latent_shape
    start = initial_run(job, table.latent_shape, text.dim, log)

    def build() -> torch.nn.Module:
        if start is not None:  # fine-tuning: the starting run's architecture, as it was trained
            return denoiser_from_config(start.meta["architecture"], start.meta["model_config"])
        sizes = {"latent_channels": c, "latent_size": h, "text_dim": text.dim, "patch_size": cfg.patch_size}
        return build_denoiser(cfg.model, cfg.size, **sizes)

    trainer, step = build_trainer(cfg, accelerator, build, text, job.latent_norm, root, log, start)
    last_stop = cfg.steps if job.stop_after is None else min(cfg.steps, job.stop_after)
    rank, world = accelerator.process_index, accelerator.num_processes
    dataset = StepBatches(
        cfg, trainer.objective, table, comps, step, last_stop, rank, world, job.latent_norm, text.shapes
    )
    batches = iter(batch_loader(dataset, cfg.loader_workers, pin_memory=accelerator.device.type == "cuda"))
    return Run(trainer, step, last_stop, batches, build)


@task(name="train", retries=0)
def train_denoiser(job: TrainJob) -> dict[str, Any]:
    """Train to `train.steps` (or stop after step `job.stop_after`), resuming from the newest good checkpoint.

    With composites, a composite replaces a sample when its t > cutmix_threshold and a coin with
    probability cutmix_p says so.
    """
    cfg, log, root = job.train, run_logger(), job.checkpoints.root
    try:
        require_trackers(cfg.trackers)
    except ConfigError as exc:  # on every rank: a restart would meet it again
        raise TrackersUnavailable(str(exc)) from None
    run = open_run(job, log)
    trainer, step, batches = run.trainer, run.step, run.batches
    syncs, first, steplog = watch_gradient_syncs(trainer.model, cfg), step, StepLog(trainer.accelerator)
    outputs = rank_outputs(job, trainer.accelerator, trainer.text, run.build, step, log)
    try:
        while step < run.last_stop:
            t_step = time.perf_counter()
            loss, grad_norm = trainer.step(step, batches)
            step += 1
            trainer.timing["total"] += time.perf_counter() - t_step
            steplog.add(step, loss, grad_norm, cfg.batch_size)
            after_step(trainer, step, run.last_stop, steplog, outputs, log)
        next(batches, None)  # the loader is exhausted: its workers exit now, not at garbage collection
    except BaseException:
        if "writer" in outputs:  # the step's error is the one to report, not a failed write's
            outputs["writer"].wait(raise_error=False)
        if "trackers" in outputs:
            outputs["trackers"].finish(failed=True)
        raise
    if "trackers" in outputs:
        outputs["trackers"].finish(failed=False)
    if "writer" in outputs:
        outputs["writer"].wait(raise_error=False)
    steplog.check(root, outputs.get("writer"))  # the last write too: every rank stops if it failed
    result = run_record(trainer, step, first, syncs, check_ranks_agree(trainer))
    if step >= cfg.steps and trainer.accelerator.is_main_process:
        save_final_model(trainer, run.build, job.text, job.latent_norm, step, root)
    return result


def rank_outputs(job: TrainJob, accelerator, text: TrainText, build, step: int, log) -> dict[str, Any]:
    """What the main process writes besides training: checkpoints (in the background), previews, and the
    trackers' logs, continuing the run's tracker runs from `step`. A tracker that cannot start stops every
    rank here, before the first step."""
    from accelerate.utils import broadcast_object_list

    cfg, root = job.train, job.checkpoints.root
    outputs: dict[str, Any] = {"root": root}
    error = None
    if accelerator.is_main_process:
        outputs["writer"] = CheckpointWriter(root, cfg.keep_checkpoints)
        if job.vae_path and cfg.sample_prompts:
            outputs["preview"] = SamplePreview(
                root, job.vae_path, text, cfg.sample_prompts, job.latent_norm, cfg, build, accelerator.device
            )
        if cfg.trackers:
            try:
                outputs["trackers"] = start_trackers(accelerator, job, step, log)
            except Exception as exc:
                reason = redact(f"{type(exc).__name__}: {exc}")
                error = f"train: a tracker of train.trackers ({', '.join(cfg.trackers)}) could not start: {reason}"
    if cfg.trackers and (error := broadcast_object_list([error], from_process=0)[0]) is not None:
        raise TrackersUnavailable(error)
    return outputs


def check_ranks_agree(trainer: Trainer) -> list[float]:
    """Every rank's weight checksum, the same on all (else the run stops: the ranks have drifted apart)."""
    acc = trainer.accelerator
    unwrapped = acc.unwrap_model(trainer.model)
    checksum = torch.stack([p.detach().double().sum() for p in unwrapped.parameters()]).sum().reshape(1)
    checksums = acc.gather(checksum.to(acc.device)).tolist()
    if len(set(checksums)) > 1:
        raise RuntimeError(
            f"train: the {acc.num_processes} processes ended with different weights: {checksums}"
        )
    return checksums


def run_record(
    trainer: Trainer, step: int, first: int, syncs: GradientSyncs | None, checksums: list[float]
) -> dict[str, Any]:
    """What the run reports: its size, how it all-reduced, the ranks' checksums, CutMix share and timing."""
    acc, cfg = trainer.accelerator, trainer.cfg
    allreduce = "bf16" if compresses_gradients(cfg, str(acc.device)) else "float32"
    unwrapped = acc.unwrap_model(trainer.model)
    return {
        "step": step,
        "samples": len(trainer.text.table),
        "parameters": count_parameters(unwrapped),
        "processes": acc.num_processes,
        "global_batch": cfg.batch_size,
        "gradient_allreduce": allreduce if acc.num_processes > 1 else None,
        "rank_checksums": checksums,
        "cutmix_share": trainer.swapped / max(trainer.drawn, 1),  # of this run's samples (this process)
        # backward passes that all-reduced gradients, per optimizer step (1 whatever the accumulation)
        "gradient_syncs_per_step": syncs.passes / (step - first) if syncs and step > first else None,
        "timing": {k: round(v, 4) for k, v in trainer.timing.items()},  # seconds: batches, text, steps
    }


def save_final_model(
    trainer: Trainer, build, text_cfg: TextConfig, latent_norm: LatentNorm, step: int, root: Path
) -> None:
    final_model = build()
    trainer.ema.copy_to(final_model)
    meta = {
        "architecture": trainer.cfg.model,
        "model_config": asdict(final_model.config),
        "objective": trainer.cfg.objective,
        "text_encoder": text_cfg.model_dump(mode="json"),
        "latent_norm": latent_norm,
        "latent_shape": list(trainer.text.table.latent_shape),
        "ema_decay": trainer.cfg.ema_decay,
        "steps": step,
    }
    save_final(root, final_model, meta)
