"""What each training step sees: micro-batches assembled from the memory-mapped train tables, in loader
workers, off the training loop's critical path.

Every random draw of a sample (t, CutMix swap, noise, crop, CFG dropout) comes from a generator seeded by
(seed, step, its position in the step's global batch), and the samples of a step are a seeded permutation's
slice: a batch is the same whichever loader worker builds it, whatever the number of ranks and micro-batches,
and a run resumed at step k (on as many GPUs or not) replays exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from t2i.data.store import exit_with
from t2i.data.train_data import TrainTable, collate_text_rows
from t2i.models.conditioning import cfg_dropout_mask, cutmix_gate, random_latent_crop
from t2i.models.latent_norm import LatentNorm, latent_norm_tensors
from t2i.tasks.text import TextShapes

if TYPE_CHECKING:
    from t2i.flows.config import TrainConfig
    from t2i.models.objectives import Objective

# Each sample's draws come from the stream of its position in the global batch; a few choices must agree
# across the ranks (whether CAD-I takes its self-conditioning pass this step), and those come from one stream
# no sample position uses.
SHARED_STREAM = 2**32 - 1


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The generator of one stream of a step: a sample position of the global batch, or SHARED_STREAM."""
    entropy = [seed, step, stream]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


def stack_draws(gens: list[torch.Generator], draw) -> torch.Tensor:
    """`draw(g)` for each sample's generator, stacked along a new batch dimension."""
    return torch.stack([draw(g) for g in gens])


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Samples of `step`: epochs are seeded permutations, walked in order, so any step is addressable.

    An epoch's permutation is drawn once and kept, so a step costs O(batch), not O(dataset).
    """
    start = step * batch
    parts, taken = [], 0
    while taken < batch:
        epoch, offset = divmod(start + taken, n)
        part = _epoch_permutation(n, seed, epoch)[offset : offset + batch - taken]
        parts.append(part)
        taken += len(part)
    return torch.cat(parts)


def assemble_batch(
    cfg: TrainConfig,
    objective: Objective,
    table: TrainTable,
    comps: TrainTable | None,
    idx: np.ndarray,
    gens: list[torch.Generator],
    shift: torch.Tensor,
    scale: torch.Tensor,
    shapes: TextShapes,
) -> dict[str, Any]:
    """One micro-batch of the rows `idx`, each sample drawing from its own generator in `gens`: model-space
    latents z (CutMix composites swapped in where `cutmix_gate` says, latent and caption together), t,
    noise, the CFG dropout mask, and the text padded to its length bucket: the stored embeddings when there
    are (`text`, `mask`), else the captions' token ids (`input_ids`, `attention_mask`); dropped rows empty."""
    mean, std = table.moments_of(idx)
    captions = table.column("caption", idx)
    text_rows = table.embeddings_of(idx) if table.words is not None else None
    t = stack_draws(gens, lambda g: objective.sample_t(1, generator=g)[0])
    swapped = np.zeros(0, dtype=np.int64)
    if comps is not None:
        gates = [cutmix_gate(t[j : j + 1], g, cfg.cutmix_threshold, cfg.cutmix_p) for j, g in enumerate(gens)]
        gate = torch.cat(gates)
        pick = stack_draws(gens, lambda g: torch.randint(len(comps), (), generator=g)).numpy()
        swapped = gate.nonzero().flatten().numpy()
        if len(swapped):
            mean[swapped], std[swapped] = comps.moments_of(pick[swapped])
            for j, caption in zip(swapped, comps.column("caption", pick[swapped]), strict=True):
                captions[j] = caption
            if text_rows is not None:
                for j, row in zip(swapped, comps.embeddings_of(pick[swapped]), strict=True):
                    text_rows[j] = row
    z = (mean + std * stack_draws(gens, lambda g: torch.randn(mean.shape[1:], generator=g)) - shift) * scale
    if cfg.latent_crop:
        z = torch.cat([random_latent_crop(z[j : j + 1], cfg.latent_crop, g) for j, g in enumerate(gens)])
    drop = stack_draws(gens, lambda g: cfg_dropout_mask(1, cfg.cfg_dropout, g)[0])
    eps = stack_draws(gens, lambda g: torch.randn(z.shape[1:], generator=g))
    batch = {"z": z, "t": t, "eps": eps, "drop": drop, "swapped": len(swapped)}
    if text_rows is not None:
        rows = [row[:0] if dropped else row for row, dropped in zip(text_rows, drop.tolist(), strict=True)]
        batch["text"], batch["mask"] = collate_text_rows(rows, shapes.length(max(len(r) for r in rows)))
    else:
        texts = ["" if dropped else c for c, dropped in zip(captions, drop.tolist(), strict=True)]
        batch["input_ids"], batch["attention_mask"] = shapes.tokenize(texts)
    return batch


class StepBatches(torch.utils.data.Dataset):
    """Item i is micro-batch i % accumulation of step first + i // accumulation, for one rank: a torch
    DataLoader walks it in order with workers and pinned memory, so batches wait ready for the GPU."""

    def __init__(
        self,
        cfg: TrainConfig,
        objective: Objective,
        table: TrainTable,
        comps: TrainTable | None,
        first: int,
        last: int,
        rank: int,
        world: int,
        latent_norm: LatentNorm,
        shapes: TextShapes,
    ):
        self.cfg, self.objective, self.table, self.comps = cfg, objective, table, comps
        self.first, self.last, self.rank, self.world = first, last, rank, world
        self.shift, self.scale = latent_norm_tensors(latent_norm, table.latent_shape[0])
        self.shapes = shapes
        self.owner = os.getpid()  # the rank whose loader workers build these batches

    def __len__(self) -> int:
        return (self.last - self.first) * self.cfg.grad_accumulation

    def __getitem__(self, i: int) -> dict[str, Any]:
        cfg, accum = self.cfg, self.cfg.grad_accumulation
        step, micro = divmod(i, accum)
        step += self.first
        per_rank = cfg.batch_size // self.world
        size = per_rank // accum
        start = self.rank * per_rank + micro * size
        idx = batch_indices(len(self.table), cfg.batch_size, step, cfg.seed)[start : start + size].numpy()
        gens = [step_generator(cfg.seed, step, position) for position in range(start, start + size)]
        batch = assemble_batch(
            cfg, self.objective, self.table, self.comps, idx, gens, self.shift, self.scale, self.shapes
        )
        if cfg.model == "cad":
            batch["self_condition"] = self_condition_coin(cfg, step, micro)
        return batch


def self_condition_coin(cfg: TrainConfig, step: int, micro: int) -> bool:
    """Whether CAD-I takes its self-conditioning pass on micro-batch `micro` of `step`: the shared stream's
    draw, the same on every rank (so no rank waits at the all-reduce for another's extra pass), decided here
    so the step reads no value from a tensor."""
    shared = step_generator(cfg.seed, step, SHARED_STREAM)
    draws = torch.rand(micro + 1, generator=shared)
    return cfg.self_condition > 0 and bool(draws[micro] < cfg.self_condition)


def batch_loader(dataset: StepBatches, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """Workers start from a fork server, not by forking the training process: that process holds CUDA and
    the orchestrator's threads, which a forked child must not inherit (Prefect's handlers made forked
    workers exit with an error). They end with their rank, so a killed rank leaves none behind."""
    workers = min(workers, len(os.sched_getaffinity(0)))
    if not workers:
        return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, pin_memory=pin_memory)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4,
        multiprocessing_context="forkserver",
        worker_init_fn=_loader_worker_init,
    )


def _loader_worker_init(_worker_id: int) -> None:
    """A loader worker is the fork server's child, not the rank's: it ends when its rank ends (and the fork
    server and resource tracker, which live as long as it, with it)."""
    exit_with(torch.utils.data.get_worker_info().dataset.owner)
