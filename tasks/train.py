"""Train stage unit of work: the denoiser on stored latents and captions, resumable from its checkpoints.

Every random draw of step `s` (batch order, CFG dropout, t, noise, latent sampling) comes from generators
seeded by (seed, s), so a run resumed from the checkpoint of step k replays exactly the steps an
uninterrupted run would have taken.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from prefect import task

from t2i.data.store import Artifact, atomic_path
from t2i.models.cad import self_conditioned_forward
from t2i.models.conditioning import cfg_dropout_mask, cutmix_gate, random_latent_crop
from t2i.models.diffusion import EpsilonObjective
from t2i.models.dit import DiT, DiTConfig, build_dit, count_parameters
from t2i.models.ema import EMA
from t2i.models.flow_matching import RectifiedFlowObjective
from t2i.tasks.latents import SHAPE_META_KEY
from t2i.tasks.model_cache import cached_model, pick_device
from t2i.tasks.shards import publish_markdown, run_logger
from t2i.tasks.text import text_conditioning

if TYPE_CHECKING:
    from t2i.flows.config import TextConfig, TrainConfig

VERSION = 1
CHECKPOINTS = "checkpoints"
FINAL = "final"
_STEP_DIR = re.compile(r"step-(\d{8})$")


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainData:
    """Latent moments and captions joined by key, in memory (float16 moments: ~16 KB per 256-px image)."""

    keys: list[str]
    mean: torch.Tensor  # (N, C, H, W) float16
    std: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def load_train_data(latents: Artifact, captions: Artifact, num_shards: int) -> TrainData:
    keys, means, stds, texts = [], [], [], []
    for i in range(num_shards):
        lat = latents.read_shard(i)
        shape = json.loads(lat.schema.metadata[SHAPE_META_KEY])
        by_key = dict(
            zip(
                *(
                    captions.read_shard(i, columns=["key", "caption"])[c].to_pylist()
                    for c in ("key", "caption")
                ),
                strict=True,
            )
        )
        for key, mean, std in zip(
            lat["key"].to_pylist(), lat["mean"].to_pylist(), lat["std"].to_pylist(), strict=True
        ):
            if key not in by_key:  # rejected by the captioner: no text, no training sample
                continue
            keys.append(key)
            means.append(np.frombuffer(mean, np.float16).reshape(shape))
            stds.append(np.frombuffer(std, np.float16).reshape(shape))
            texts.append(by_key[key])
    if not keys:
        raise RuntimeError("no training samples: latents and captions share no keys")
    return TrainData(keys, torch.from_numpy(np.stack(means)), torch.from_numpy(np.stack(stds)), texts)


LatentNorm = dict[str, list[float]] | float  # {"shift": [C], "scale": [C]}, or one scale with no shift


def latent_norm_tensors(norm: LatentNorm, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) shaped (1, C, 1, 1): the model sees (z − shift) × scale."""
    if not isinstance(norm, dict):
        norm = {"shift": [0.0] * channels, "scale": [float(norm)] * channels}
    shift, scale = (
        torch.tensor(norm[k], dtype=torch.float32).reshape(1, -1, 1, 1) for k in ("shift", "scale")
    )
    if shift.shape[1] != channels or scale.shape[1] != channels:
        raise ValueError(f"latent normalisation has {shift.shape[1]} channels, the latents {channels}")
    return shift, scale


def describe_norm(norm: LatentNorm) -> str:
    if not isinstance(norm, dict):
        return f"scale {norm:g}"
    shift, scale = (", ".join(f"{v:.3f}" for v in norm[k]) for k in ("shift", "scale"))
    return f"per-channel shift [{shift}], scale [{scale}]"


def to_vae_latents(z: torch.Tensor, norm: LatentNorm) -> torch.Tensor:
    """Model-space latents back to what the VAE decodes."""
    shift, scale = latent_norm_tensors(norm, z.shape[1])
    return z / scale.to(z.device) + shift.to(z.device)


def lr_factor(step: int, warmup: int, total: int, final_ratio: float) -> float:
    """Linear warmup, then cosine decay from 1 to `final_ratio` at the last step."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay on norms and biases (1-D parameters), as the recipe says."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "lamb":
        from t2i.models.lamb import Lamb

        return Lamb(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Samples of `step`: epochs are seeded permutations, walked in order, so any step is addressable."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[offset : offset + batch - len(out)].tolist())
    return torch.tensor(out)


# --- checkpoints ------------------------------------------------------------------------------------------


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint appears only through an atomic rename)."""
    folder = root / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _STEP_DIR.match(p.name) and (p / "state.pt").is_file())


def save_checkpoint(root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    final = root / CHECKPOINTS / f"step-{step:08d}"
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        torch.save(state, tmp / "state.pt")
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_final(root: Path, model: DiT, meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    final = root / FINAL
    if final.exists():
        shutil.rmtree(final)
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return final


def build_denoiser(architecture: str, size: str, **overrides) -> torch.nn.Module:
    """DiT-I or CAD-I of a named size; `patch_size=None` keeps the size's own."""
    if overrides.get("patch_size", 0) is None:
        del overrides["patch_size"]
    if architecture == "cad":
        from t2i.models.cad import build_cad

        return build_cad(size, **overrides)
    return build_dit(size, **overrides)


def load_final(root: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    from safetensors.torch import load_file

    meta = json.loads((root / FINAL / "config.json").read_text())
    if meta.get("architecture") == "cad":
        from t2i.models.cad import CAD, CADConfig

        model = CAD(CADConfig(**meta["model_config"]))
    else:
        model = DiT(DiTConfig(**meta["model_config"]))
    model.load_state_dict(load_file(root / FINAL / "model.safetensors"))
    return model.to(device).eval(), meta


class SamplePreview:
    """Sample grids of fixed training captions with the EMA weights every `sample_every` steps: a PNG under
    `samples/`, the TensorBoard image, and a Prefect markdown artifact pointing at the file."""

    def __init__(
        self,
        root: Path,
        vae_path: str,
        prompts: list[str],
        keys: list[str],
        texts,
        latent_shape,
        scale,
        cfg,
        build,
    ):
        self.root, self.vae_path, self.prompts, self.keys, self.texts = root, vae_path, prompts, keys, texts
        self.latent_shape, self.scale, self.cfg, self.build = tuple(latent_shape), scale, cfg, build

    def sample(self, ema: EMA, step: int):
        from PIL import Image

        from t2i.models.diffusion import ddim_sample
        from t2i.models.flow_matching import euler_sample
        from t2i.models.vae import decode_latents

        vae = cached_model("vae", path=self.vae_path, device="cpu", dtype="float32", revision=None)
        model = self.build()
        ema.copy_to(model)
        model.eval()
        text, mask = self.texts.encode(self.prompts, self.keys)
        null_text, null_mask = self.texts.encode([None], [None])
        sampler = ddim_sample if self.cfg.objective == "epsilon" else euler_sample
        z = sampler(
            model, (len(self.prompts), *self.latent_shape), text.cpu(), mask.cpu(), null_text.cpu(), null_mask.cpu(),
            steps=20, guidance_scale=3.0, generator=torch.Generator().manual_seed(self.cfg.seed),
        )  # fmt: skip
        pixels = decode_latents(vae, to_vae_latents(z, self.scale))
        cell = 128
        grid = Image.new("RGB", (cell * len(pixels), cell))
        for i, px in enumerate(pixels):
            grid.paste(Image.fromarray(px).resize((cell, cell), Image.NEAREST), (i * cell, 0))
        path = self.root / "samples" / f"step-{step:08d}.png"
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")
        lines = [f"Samples at step {step}: `{path}`", ""] + [
            f"{i + 1}. {p}" for i, p in enumerate(self.prompts)
        ]
        publish_markdown("\n".join(lines), key="train-samples", description="Training samples")
        return grid


# --- the loop ---------------------------------------------------------------------------------------------


@task(name="train", retries=0)
def train_denoiser(
    cfg: TrainConfig,
    text_cfg: TextConfig,
    artifact: Artifact,
    latents: Artifact,
    captions: Artifact,
    num_shards: int,
    scale_factor: LatentNorm,
    stop_after: int | None = None,
    composites: tuple[Artifact, Artifact, int] | None = None,
    vae_path: str | None = None,
    text_embeddings: Sequence[Artifact] = (),
) -> dict[str, Any]:
    """Train to `cfg.steps` (or stop after step `stop_after`, for tests), resuming from the newest checkpoint.

    `composites` (latents, captions, shard count) is the CutMix stream: a composite replaces a sample when
    its t > cutmix_threshold and a coin with probability cutmix_p says so. `text_embeddings` are the
    precomputed text artifacts (images', then composites') when `text.mode` is precomputed.
    """
    from accelerate import Accelerator

    log = run_logger()
    root = artifact.root
    device = pick_device(cfg.device)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=cfg.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    accum = cfg.grad_accumulation
    if cfg.batch_size % (world * accum):
        raise ValueError(
            f"train.batch_size {cfg.batch_size} is not divisible by {world} processes × {accum} accumulation steps"
        )
    per_rank = cfg.batch_size // world
    micro = per_rank // accum

    data = load_train_data(latents, captions, num_shards)
    if composites is not None:
        composites = load_train_data(*composites)
    texts = text_conditioning(
        text_cfg, artifact.workspace, str(accelerator.device), text_embeddings, num_shards
    )
    channels, height, width = data.mean.shape[1:]
    shift, scale = latent_norm_tensors(scale_factor, channels)
    torch.manual_seed(cfg.seed)

    def build() -> torch.nn.Module:
        return build_denoiser(
            cfg.model,
            cfg.size,
            latent_channels=channels,
            latent_size=height,
            text_dim=texts.dim,
            patch_size=cfg.patch_size,
        )

    model = build()
    ema = EMA(model, decay=cfg.ema_decay)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.final_lr_ratio)
    )
    step = 0
    if ckpts := checkpoint_dirs(root):
        state = torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        log.info(f"[train] resuming from {ckpts[-1].name} (step {step} of {cfg.steps})")
    else:
        log.info(
            f"[train] {cfg.model}-{cfg.size} (patch {model.config.patch_size}): "
            f"{count_parameters(model) / 1e6:.2f}M parameters, {len(data)} samples, "
            f"latents {channels}×{height}×{width}, normalised by {describe_norm(scale_factor)}"
        )
    model, optimizer = accelerator.prepare(model, optimizer)
    objective = EpsilonObjective() if cfg.objective == "epsilon" else RectifiedFlowObjective()
    last_stop = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    t0, seen, loss_sum = time.time(), 0, 0.0
    swapped, drawn, logged = 0, 0, 0
    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(root / "tensorboard"))
    preview = (
        SamplePreview(root, vae_path, data.captions[: cfg.sample_prompts], data.keys[: cfg.sample_prompts], texts,
                      data.mean.shape[1:], scale_factor,
                      cfg, build=build)
        if vae_path and cfg.sample_prompts
        else None
    )  # fmt: skip
    timing = {"data": 0.0, "text": 0.0, "total": 0.0}

    while step < last_stop:
        t_step = time.perf_counter()
        g = step_generator(cfg.seed, step, rank)
        denoise = model
        if cfg.model == "cad" and cfg.self_condition > 0:  # RIN self-conditioning on the latent tokens

            def denoise(x, t, text, mask, _g=g):
                return self_conditioned_forward(model, x, t, text, mask, cfg.self_condition, generator=_g)

        rank_idx = batch_indices(len(data), cfg.batch_size, step, cfg.seed)[
            rank * per_rank : (rank + 1) * per_rank
        ]
        dev = accelerator.device
        step_loss = 0.0
        for m in range(accum):  # gradient accumulation: micro-batches of this rank's share
            t_data = time.perf_counter()
            idx = rank_idx[m * micro : (m + 1) * micro]
            drawn += len(idx)
            mean, std = data.mean[idx].float(), data.std[idx].float()
            captions_b = [data.captions[i] for i in idx.tolist()]
            keys_b = [data.keys[i] for i in idx.tolist()]
            t = objective.sample_t(len(idx), generator=g)
            if composites is not None:  # CutMix: latent and caption swapped together, only at t > threshold
                gate = cutmix_gate(t, g, cfg.cutmix_threshold, cfg.cutmix_p)
                pick = torch.randint(len(composites), (len(idx),), generator=g)
                swapped += int(gate.sum())
                for j in gate.nonzero().flatten().tolist():
                    c = int(pick[j])
                    mean[j], std[j] = composites.mean[c].float(), composites.std[c].float()
                    captions_b[j], keys_b[j] = composites.captions[c], composites.keys[c]
            z = (mean + std * torch.randn(mean.shape, generator=g) - shift) * scale
            if cfg.latent_crop:
                z = random_latent_crop(z, cfg.latent_crop, g)
            drop = cfg_dropout_mask(len(idx), cfg.cfg_dropout, g)
            t_text = time.perf_counter()
            timing["data"] += t_text - t_data
            text, mask = texts.encode(
                [None if d else c for c, d in zip(captions_b, drop.tolist(), strict=True)], keys_b
            )
            eps = torch.randn(z.shape, generator=g)
            timing["text"] += time.perf_counter() - t_text
            with accelerator.autocast():
                loss, _ = objective.loss(
                    denoise, z.to(dev), text.to(dev), mask.to(dev), t=t.to(dev), eps=eps.to(dev)
                )
            with accelerator.no_sync(model) if m < accum - 1 else contextlib.nullcontext():
                accelerator.backward(loss / accum)
            step_loss += loss.detach().float() / accum
        all_losses = accelerator.gather(step_loss.reshape(1).to(dev))
        if not torch.isfinite(all_losses).all():  # every rank stops at the same step
            raise NonFiniteLoss(
                f"train: loss is {all_losses.tolist()} at step {step}; the last good checkpoint is kept in "
                f"{root / CHECKPOINTS}"
            )
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(accelerator.unwrap_model(model))
        loss = all_losses.mean()
        step += 1
        timing["total"] += time.perf_counter() - t_step
        seen += cfg.batch_size
        loss_sum += loss.item()
        logged += 1
        if step % cfg.log_every == 0 or step == last_stop:
            dt = time.time() - t0
            stats = {
                "loss": loss_sum / logged,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "samples_per_second": seen / max(dt, 1e-9),
            }
            log.info(
                f"[train] step {step}/{cfg.steps} loss {stats['loss']:.4f} lr {stats['lr']:.2e} "
                f"grad-norm {stats['grad_norm']:.3f} {stats['samples_per_second']:.1f} samples/s"
            )
            if writer is not None:
                for name, value in stats.items():
                    writer.add_scalar(f"train/{name}", value, step)
            t0, seen, loss_sum, logged = time.time(), 0, 0.0, 0
        if (
            preview is not None
            and accelerator.is_main_process
            and (step % cfg.sample_every == 0 or step == cfg.steps)
        ):
            grid = preview.sample(ema, step)
            if writer is not None:
                writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        if accelerator.is_main_process and (step % cfg.checkpoint_every == 0 or step == last_stop):
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise NonFiniteLoss(
                    f"train: weights became non-finite by step {step}; the last good checkpoint is kept in "
                    f"{root / CHECKPOINTS}"
                )
            save_checkpoint(
                root,
                step,
                {
                    "step": step,
                    "model": accelerator.unwrap_model(model).state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                },
                cfg.keep_checkpoints,
            )
        accelerator.wait_for_everyone()

    if writer is not None:
        writer.close()
    unwrapped = accelerator.unwrap_model(model)
    checksum = torch.stack([p.detach().double().sum() for p in unwrapped.parameters()]).sum().reshape(1)
    checksums = accelerator.gather(checksum.to(accelerator.device)).tolist()
    if len(set(checksums)) > 1:
        raise RuntimeError(f"train: the {world} processes ended with different weights: {checksums}")
    result = {
        "step": step,
        "samples": len(data),
        "parameters": count_parameters(unwrapped),
        "processes": world,
        "global_batch": micro * accum * world,
        "rank_checksums": checksums,
        "cutmix_share": swapped / max(drawn, 1),  # of this run's samples (this process)
        "timing": {
            k: round(v, 4) for k, v in timing.items()
        },  # seconds: batch assembly, text encoding, steps
    }
    if step >= cfg.steps and accelerator.is_main_process:
        final_model = build()
        ema.copy_to(final_model)
        meta = {
            "architecture": cfg.model,
            "model_config": asdict(final_model.config),
            "objective": cfg.objective,
            "text_encoder": text_cfg.model_dump(mode="json"),
            "latent_norm": scale_factor,
            "latent_shape": [channels, height, width],
            "ema_decay": cfg.ema_decay,
            "steps": step,
        }
        save_final(root, final_model, meta)
    return result


@task(name="train-distributed")
def launch_distributed(
    cfg: TrainConfig,
    text_cfg: TextConfig,
    artifact: Artifact,
    latents: Artifact,
    captions: Artifact,
    num_shards: int,
    scale_factor: LatentNorm,
    processes: int,
    vae_path: str | None = None,
    composites: tuple[Artifact, Artifact, int] | None = None,
    text_embeddings: Sequence[Artifact] = (),
) -> dict[str, Any]:
    """Run the same training loop as `processes` DDP processes (torchrun, gloo on CPU / NCCL on GPU).

    One Prefect task drives the whole job; a retry or rerun resumes from the newest checkpoint like the
    in-process path, since the worker runs exactly `train_denoiser`.
    """
    import subprocess
    import sys

    log = run_logger()
    spec = {
        "train": cfg.model_dump(mode="json"),
        "text": text_cfg.model_dump(mode="json"),
        "artifact": artifact.ref(),
        "latents": latents.ref(),
        "captions": captions.ref(),
        "num_shards": num_shards,
        "scale_factor": scale_factor,
        "vae_path": vae_path,
        "composites": [composites[0].ref(), composites[1].ref(), composites[2]] if composites else None,
        "text_embeddings": [a.ref() for a in text_embeddings],
    }
    spec_path = artifact.write_json(f"launch-node{cfg.node_rank}.json", spec)
    result_path = artifact.root / "result.json"
    if cfg.node_rank == 0:
        result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(cfg, processes)]
    cmd += ["-m", "t2i.flows.train_worker", str(spec_path)]
    log.info(f"[train] launching {processes} processes on node {cfg.node_rank}: {' '.join(cmd[2:])}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        log.info(line.rstrip())
    if proc.wait() != 0:
        raise RuntimeError(f"train: the distributed job exited with {proc.returncode} (see the log above)")
    if cfg.node_rank != 0:  # global rank 0 (on node 0) writes the result and the checkpoints
        return {"node_rank": cfg.node_rank, "processes": processes * cfg.nodes}
    return json.loads(result_path.read_text())


def torchrun_args(cfg: TrainConfig, processes: int) -> list[str]:
    """One machine: a standalone rendezvous. Several: every node meets node 0 at master_addr:master_port
    (static ranks, so a restarted job gets the same ranks and resumes from the same checkpoint)."""
    if cfg.nodes == 1:
        return ["--standalone", f"--nproc_per_node={processes}"]
    return [
        f"--nnodes={cfg.nodes}",
        f"--node_rank={cfg.node_rank}",
        f"--nproc_per_node={processes}",
        f"--master_addr={cfg.master_addr}",
        f"--master_port={cfg.master_port}",
    ]
