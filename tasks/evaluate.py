"""Evaluate stage unit of work: sample prompts with classifier-free guidance, save images, score, report.

Sampling is resumable per prompt batch: batch b's images are seeded by (seed, b) and written atomically,
so a rerun redoes only the batches whose images are missing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from prefect import task

from data.store import Artifact, atomic_path
from models.diffusion import ddim_sample, ddpm_sample
from models.flow_matching import euler_sample
from models.tiny import resolve_model
from models.vae import decode_latents
from tasks.model_cache import cached_model, pick_device
from tasks.shards import Progress, publish_markdown, run_logger
from tasks.train import load_final, step_generator

if TYPE_CHECKING:
    from flows.config import EvaluateConfig, LatentsConfig

VERSION = 1


@dataclass(frozen=True)
class PromptItem:
    index: int
    text: str
    scene: Any = None  # a data.shapes.Scene when the prompt comes from the shapes world
    meta: str | None = None  # GenEval: the prompt's metadata line, verbatim; DPG-Bench: the prompt id


def load_prompts(spec: str, num_prompts: int, seed: int = 0) -> list[PromptItem]:
    kind, _, rest = spec.partition(":")
    if kind == "shapes":
        from data import shapes

        scenes = [shapes.scene(i, seed=seed, split=rest) for i in range(num_prompts)]
        return [PromptItem(i, s.caption, s) for i, s in enumerate(scenes)]
    if kind == "file":
        path = Path(rest).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"evaluate.prompts: {path} does not exist")
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        return [PromptItem(i, t) for i, t in enumerate(lines[:num_prompts])]
    if kind == "geneval":  # evaluation_metadata.jsonl: one JSON object per prompt
        path = Path(rest).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"evaluate.prompts: {path} does not exist (GenEval's evaluation_metadata.jsonl)"
            )
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        return [PromptItem(i, json.loads(ln)["prompt"], meta=ln) for i, ln in enumerate(lines[:num_prompts])]
    if kind == "dpg":  # a folder of <id>.txt prompt files
        folder = Path(rest).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"evaluate.prompts: {folder} does not exist (DPG-Bench's prompts folder)")
        files = sorted(
            folder.glob("*.txt"),
            key=lambda f: (not f.stem.isdigit(), int(f.stem) if f.stem.isdigit() else 0, f.stem),
        )
        return [PromptItem(i, f.read_text().strip(), meta=f.stem) for i, f in enumerate(files[:num_prompts])]
    raise ValueError(f"unknown prompt set {spec!r}")


def write_benchmark_layout(
    kind: str, root: Path, prompts: list[PromptItem], paths: dict, per_prompt: int
) -> Path | None:
    """The folder layouts the official scorers read unchanged.

    GenEval: `geneval/<index:05d>/metadata.jsonl` (the prompt's line) and `samples/<n:04d>.png`.
    DPG-Bench: `dpg_bench/<id>.png`, a 2×2 grid of four samples per prompt.
    """
    if kind == "geneval":
        out = root / "geneval"
        for p in prompts:
            folder = out / f"{p.index:05d}"
            with atomic_path(folder / "metadata.jsonl") as tmp:
                tmp.write_text(p.meta + "\n")
            for k in range(per_prompt):
                target = folder / "samples" / f"{k:04d}.png"
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(target) as tmp:
                        tmp.write_bytes(paths[(p.index, k)].read_bytes())
        return out
    if kind == "dpg":
        if per_prompt != 4:
            raise ValueError("evaluate.images_per_prompt must be 4 for DPG-Bench (a 2×2 grid per prompt)")
        out = root / "dpg_bench"
        for p in prompts:
            tiles = [Image.open(paths[(p.index, k)]).convert("RGB") for k in range(4)]
            w, h = tiles[0].size
            grid = Image.new("RGB", (2 * w, 2 * h))
            for k, tile in enumerate(tiles):
                grid.paste(tile, ((k % 2) * w, (k // 2) * h))
            _save_png(grid, out / f"{p.meta}.png")
        return out
    return None


SAMPLERS = {"epsilon": {"ddim": ddim_sample, "ddpm": ddpm_sample}, "rectified_flow": {"euler": euler_sample}}
DEFAULT_SAMPLER = {"epsilon": "ddim", "rectified_flow": "euler"}


def sample_latents(objective: str, sampler: str, model, shape, text, mask, null_text, null_mask, **kwargs):
    """Sample with the sampler that matches the objective the model was trained with."""
    name = DEFAULT_SAMPLER[objective] if sampler == "auto" else sampler
    if name not in SAMPLERS[objective]:
        allowed = ", ".join(["auto", *SAMPLERS[objective]])
        raise ValueError(f"evaluate.sampler: {name!r} does not fit a {objective} model; allowed: {allowed}")
    return SAMPLERS[objective][name](model, shape, text, mask, null_text, null_mask, **kwargs)


def image_grid(images: list[Image.Image], columns: int = 8, cell: int = 128) -> Image.Image:
    rows = max(1, math.ceil(len(images) / columns))
    grid = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im.resize((cell, cell), Image.NEAREST), ((i % columns) * cell, (i // columns) * cell))
    return grid


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


@task(name="evaluate")
def evaluate_checkpoint(
    cfg: EvaluateConfig, latents_cfg: LatentsConfig, artifact: Artifact, checkpoints: Artifact
) -> dict[str, Any]:
    log = run_logger()
    device = pick_device(cfg.device)
    model, meta = load_final(checkpoints.root, device=device)
    text_cfg = meta["text_encoder"]
    encoder = cached_model(
        "text",
        path=resolve_model(text_cfg["encoder"], artifact.workspace),
        max_length=text_cfg["max_length"],
        device=device,
        revision=text_cfg.get("revision"),
    )
    vae = cached_model(
        "vae",
        path=resolve_model(latents_cfg.vae, artifact.workspace),
        device=device,
        dtype="float32",
        revision=latents_cfg.revision,
    )
    scale = meta["scale_factor"]
    prompts = load_prompts(cfg.prompts, cfg.num_prompts)
    jobs = [(p, k) for p in prompts for k in range(cfg.images_per_prompt)]
    image_dir = artifact.root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    null_text, null_mask = encoder.encode([""])
    batches = [jobs[i : i + cfg.batch_size] for i in range(0, len(jobs), cfg.batch_size)]
    paths = {(p.index, k): image_dir / f"{p.index:05d}-{k:02d}.png" for p, k in jobs}
    progress = Progress("evaluate", len(batches))
    for b, batch in enumerate(batches):
        if all(paths[(p.index, k)].is_file() for p, k in batch):
            progress.advance("(already sampled)")
            continue
        text, mask = encoder.encode([p.text for p, _ in batch])
        shape = (len(batch), *meta["latent_shape"])
        z = sample_latents(
            meta.get("objective", "epsilon"), cfg.sampler, model, shape, text, mask, null_text, null_mask,
            steps=cfg.steps, guidance_scale=cfg.guidance_scale, generator=step_generator(cfg.seed, b),
        )  # fmt: skip
        pixels = decode_latents(vae, z / scale)
        for (p, k), px in zip(batch, pixels, strict=True):
            _save_png(Image.fromarray(px), paths[(p.index, k)])
        progress.advance(f"({len(batch)} images)")

    images = [Image.open(paths[(p.index, k)]).convert("RGB") for p, k in jobs]
    _save_png(image_grid(images[:64]), artifact.root / "grid.png")
    metrics: dict[str, Any] = {"prompts": len(prompts), "images": len(images), "prompt_set": cfg.prompts}
    layout = write_benchmark_layout(
        cfg.prompts.partition(":")[0], artifact.root, prompts, paths, cfg.images_per_prompt
    )
    if layout is not None:
        metrics["benchmark_folder"] = str(layout)
    if all(p.scene is not None for p in prompts):
        metrics["shapes"] = shapes_metrics(images, [p.scene for p, _ in jobs])
    artifact.write_json("metrics.json", metrics)
    report = render_report(cfg, metrics, checkpoints)
    with atomic_path(artifact.root / "report.md") as tmp:
        tmp.write_text(report)
    publish_markdown(report, key="evaluate-report", description="Evaluation report")
    log.info(f"[evaluate] {len(images)} images, report: {artifact.root / 'report.md'}")
    return metrics


def shapes_metrics(images: list[Image.Image], scenes: list[Any]) -> dict[str, Any]:
    """Share of generated images that show what the prompt asked for, per category, against chance."""
    from data import shapes

    totals: dict[str, list[float]] = {}
    for image, scene in zip(images, scenes, strict=True):
        for key, value in shapes.score_generation(image, scene).items():
            if value is not None:
                totals.setdefault(key, []).append(value)
    scores = {k: float(np.mean(v)) for k, v in totals.items()}
    return {"scores": scores, "chance": shapes.chance_levels(n=500)}


def render_report(cfg: EvaluateConfig, metrics: dict[str, Any], checkpoints: Artifact) -> str:
    lines = [
        "# Evaluation",
        "",
        f"- checkpoint: `{checkpoints.root}`",
        f"- prompts: `{cfg.prompts}` ({metrics['prompts']} prompts, {cfg.images_per_prompt} image(s) each)",
        f"- sampler: {cfg.sampler}, {cfg.steps} steps, guidance {cfg.guidance_scale}, seed {cfg.seed}",
        "",
    ]
    if "shapes" in metrics:
        scores, chance = metrics["shapes"]["scores"], metrics["shapes"]["chance"]
        lines += ["| category | score | chance |", "|---|---|---|"]
        for key in scores:
            lines.append(f"| {key} | {scores[key]:.3f} | {chance.get(key, float('nan')):.3f} |")
        lines.append("")
    lines += ["![samples](grid.png)", ""]
    return "\n".join(lines)
