"""Evaluation: the prompt sets, sampling them per batch, the metrics of the images and the report.

Sampling itself is `t2i.tasks.sampling`'s. It is resumable per prompt batch: batch b's images are seeded by
(seed, b) and written atomically, so a rerun redoes only the batches whose images are missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from prefect import task

from t2i.data.store import Artifact, atomic_path
from t2i.models.captioners import CLASS_TEMPLATE
from t2i.models.loading import checkpoint_names, load_checkpoint, resolve_model
from t2i.tasks.model_cache import pick_device
from t2i.tasks.reporting import Progress, publish_markdown, run_logger
from t2i.tasks.sampling import (
    decoding_vae,
    image_grid,
    prompt_encoder,
    sample_images,
    sampling_options,
    save_png,
)
from t2i.tasks.train_batches import step_generator

if TYPE_CHECKING:
    from t2i.flows.config import EvaluateConfig, LatentsConfig


@dataclass(frozen=True)
class PromptItem:
    index: int
    text: str
    scene: Any = None  # a t2i.data.shapes.Scene when the prompt comes from the shapes world
    meta: str | None = None  # GenEval: the prompt's metadata line, verbatim; DPG-Bench: the prompt id
    reference: bytes | None = None  # held-out captions: the encoded real image the caption describes


def load_prompts(
    spec: str, num_prompts: int, seed: int = 0, heldout: tuple[Artifact, Artifact] | None = None
) -> list[PromptItem]:
    """The first `num_prompts` prompts of a prompt set (`evaluate.prompts`); `heldout:` sets read the
    captions and images artifacts in `heldout`."""
    kind, _, rest = spec.partition(":")
    if kind in ("shapes", "shapes-class"):
        from t2i.data import shapes

        scenes = [shapes.scene(i, seed=seed, split=rest) for i in range(num_prompts)]
        if kind == "shapes-class":  # the template captioner's text for the scene's class
            return [
                PromptItem(i, CLASS_TEMPLATE.format(class_name=s.class_name), s, meta="class")
                for i, s in enumerate(scenes)
            ]
        return [PromptItem(i, s.caption, s) for i, s in enumerate(scenes)]
    if kind == "heldout":
        if heldout is None:
            raise ValueError(f"{spec!r}: held-out prompts need the captions and images artifacts")
        return heldout_prompts(*heldout, num_prompts)
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


def heldout_prompts(captions: Artifact, images: Artifact, num_prompts: int) -> list[PromptItem]:
    """Captions of held-out images (a `recaption` artifact, e.g. of a validation split made with
    `t2i recaption --set download.split=validation`), each with its real image (from `images`, the artifact
    it captioned) as the FID reference."""
    manifest = captions.read_manifest()
    items: list[PromptItem] = []
    for i in range(len(manifest["shards"])):
        table = captions.read_shard(i, columns=["key", "caption"])
        pixels = dict(
            zip(
                *(images.read_shard(i, columns=["key", "image"])[c].to_pylist() for c in ("key", "image")),
                strict=True,
            )
        )
        for key, caption in zip(table["key"].to_pylist(), table["caption"].to_pylist(), strict=True):
            items.append(PromptItem(len(items), caption, meta=key, reference=pixels[key]))
            if len(items) == num_prompts:
                return items
    return items


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
            save_png(grid, out / f"{p.meta}.png")
        return out
    return None


def reference_images(prompts: list[PromptItem], resolution: int) -> list[Image.Image] | None:
    """The real image behind each prompt (shapes scenes, held-out captions), at the sampling resolution;
    None when the prompt set has none (GenEval, DPG-Bench, text files): then no FID/KID."""
    if any(p.reference is None and p.scene is None for p in prompts):
        return None
    from t2i.data import shapes
    from t2i.data.imaging import center_crop_resize, decode_image

    out = []
    for p in prompts:
        if p.reference is not None:
            out.append(center_crop_resize(decode_image(p.reference), resolution))
        else:
            out.append(shapes.render(p.scene).resize((resolution, resolution), Image.Resampling.BICUBIC))
    return out


def image_metrics(
    cfg: EvaluateConfig,
    prompts: list[PromptItem],
    jobs: list[tuple[PromptItem, int]],
    images: list[Image.Image],
    reference: list[Image.Image] | None,
    workspace: Path,
) -> dict[str, Any]:
    """Everything computed from one checkpoint's samples: shapes breakdown, FID/KID/IS/PRC, CLIPScore."""
    metrics: dict[str, Any] = {}
    if all(p.scene is not None for p in prompts):
        metrics["shapes"] = shapes_metrics(images, [p.scene for p, _ in jobs], prompts[0].meta == "class")
    if cfg.feature_extractor != "none" and reference is not None:
        from t2i.tasks.metrics import fidelity_metrics

        metrics["fidelity"] = fidelity_metrics(
            reference,
            images,
            feature_extractor=cfg.feature_extractor,
            inception_weights=cfg.inception_weights,
            device=pick_device(cfg.device),
        )
    if cfg.clip_model:
        from t2i.tasks.metrics import clip_score

        path = resolve_model(cfg.clip_model, workspace)
        metrics["clip_score"] = clip_score(
            images, [p.text for p, _ in jobs], path, device=pick_device(cfg.device)
        )
    return metrics


@task(name="evaluate")
def evaluate_checkpoint(
    cfg: EvaluateConfig,
    latents_cfg: LatentsConfig,
    artifact: Artifact,
    checkpoints: Artifact,
    heldout: tuple[Artifact, Artifact] | None = None,
) -> dict[str, Any]:
    """Sample and score each selected checkpoint; the first is the headline, the rest a comparison table.
    `heldout`: the captions and images artifacts of `heldout:` prompts."""
    log = run_logger()
    device = pick_device(cfg.device)
    names = checkpoint_names(cfg.checkpoints, checkpoints.root)
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, heldout=heldout)
    reference = reference_images(prompts, latents_cfg.resolution)
    # Fail before sampling, not after: the metric models must be on disk (no download at this point).
    if cfg.feature_extractor == "inception" and reference is not None:
        from t2i.tasks.metrics import inception_weights_file

        inception_weights_file(cfg.inception_weights)
    if cfg.clip_model:
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(
                resolve_model(cfg.clip_model, artifact.workspace), local_files_only=True
            )
        except OSError as exc:
            raise FileNotFoundError(
                f"evaluate.clip_model: {cfg.clip_model!r} is not on disk ({exc}); download it once "
                "(`huggingface-cli download <id>`), point the field at a local folder, or set it to null"
            ) from exc
    jobs = [(p, k) for p in prompts for k in range(cfg.images_per_prompt)]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        model, meta = load_checkpoint(checkpoints.root, name, device, cfg.use_ema)
        vae = decoding_vae(latents_cfg, artifact.workspace, device, meta)  # loaded once (cached)
        image_dir = artifact.root / "images" / (name if len(names) > 1 else "")
        paths = sample_prompts(cfg, model, meta, vae, jobs, image_dir, artifact.workspace, device, name)
        images = [Image.open(paths[(p.index, k)]).convert("RGB") for p, k in jobs]
        results[name] = image_metrics(cfg, prompts, jobs, images, reference, artifact.workspace)
        if name == names[0]:
            save_png(image_grid(images[:64]), artifact.root / "grid.png")
            layout = write_benchmark_layout(
                cfg.prompts.partition(":")[0], artifact.root, prompts, paths, cfg.images_per_prompt
            )
            if layout is not None:
                results[name]["benchmark_folder"] = str(layout)
        log.info(f"[evaluate] {name}: {headline(results[name])}")

    metrics: dict[str, Any] = {
        "prompts": len(prompts),
        "images": len(jobs),
        "prompt_set": cfg.prompts,
        "checkpoint": names[0],
        **results[names[0]],
    }
    if len(names) > 1:
        metrics["checkpoints"] = results
    artifact.write_json("metrics.json", metrics)
    report = render_report(cfg, metrics, checkpoints)
    with atomic_path(artifact.root / "report.md") as tmp:
        tmp.write_text(report)
    publish_markdown(report, key="evaluate-report", description="Evaluation report")
    log.info(f"[evaluate] {len(jobs)} images per checkpoint, report: {artifact.root / 'report.md'}")
    return metrics


def sample_prompts(
    cfg, model, meta, vae, jobs, image_dir: Path, workspace: Path, device: str, name: str
) -> dict:
    """Sample every (prompt, k) job in batches; a batch whose images all exist is skipped (resume)."""
    encoder = prompt_encoder(meta, workspace, device)
    image_dir.mkdir(parents=True, exist_ok=True)
    batches = [jobs[i : i + cfg.batch_size] for i in range(0, len(jobs), cfg.batch_size)]
    paths = {(p.index, k): image_dir / f"{p.index:05d}-{k:02d}.png" for p, k in jobs}
    progress = Progress(f"evaluate {name}", len(batches))
    for b, batch in enumerate(batches):
        if all(paths[(p.index, k)].is_file() for p, k in batch):
            progress.advance("(already sampled)")
            continue
        texts = [p.text for p, _ in batch]
        generator = step_generator(cfg.seed, b)
        pixels = sample_images(
            model, meta, vae, encoder, texts, sampling_options(cfg), cfg.steps, cfg.guidance_scale, generator
        )
        for (p, k), px in zip(batch, pixels, strict=True):
            save_png(Image.fromarray(px), paths[(p.index, k)])
        progress.advance(f"({len(batch)} images)")
    return paths


def headline(metrics: dict[str, Any]) -> str:
    parts = []
    if "shapes" in metrics:
        parts.append(f"shapes overall {metrics['shapes']['scores']['overall']:.3f}")
    if "fidelity" in metrics:
        f = metrics["fidelity"]
        parts.append(f"FID ({f['feature_extractor']}) {f['fid']:.2f}, KID {f['kid_mean']:.4f}")
    if "clip_score" in metrics:
        parts.append(f"CLIPScore {metrics['clip_score']:.2f}")
    return ", ".join(parts) or "sampled"


def shapes_metrics(
    images: list[Image.Image], scenes: list[Any], class_prompts: bool = False
) -> dict[str, Any]:
    """Share of generated images that show what the prompt asked for, per category, against chance."""
    from t2i.data import shapes

    score = shapes.score_class_generation if class_prompts else shapes.score_generation
    totals: dict[str, list[float]] = {}
    for image, scene in zip(images, scenes, strict=True):
        for key, value in score(image, scene).items():
            if value is not None:
                totals.setdefault(key, []).append(value)
    scores = {k: float(np.mean(v)) for k, v in totals.items()}
    return {"scores": scores, "chance": shapes.chance_levels(n=500, class_prompts=class_prompts)}


def render_report(cfg: EvaluateConfig, metrics: dict[str, Any], checkpoints: Artifact) -> str:
    lines = [
        "# Evaluation",
        "",
        f"- checkpoint: `{checkpoints.root}` ({metrics['checkpoint']})",
        f"- prompts: `{cfg.prompts}` ({metrics['prompts']} prompts, {cfg.images_per_prompt} image(s) each)",
        f"- sampler: {cfg.sampler}, {cfg.steps} steps, guidance {cfg.guidance_scale}, seed {cfg.seed}",
        "",
    ]
    lines += shapes_table(metrics)
    if rows := fidelity_table(metrics):
        lines += rows[:-1]
        if "fidelity" in metrics:
            lines += ["", f"_{metrics['fidelity']['note']}_"]
        lines.append("")
    if "checkpoints" in metrics:
        lines += comparison_table(metrics["checkpoints"]) + [""]
    lines += ["![samples](grid.png)", ""]
    return "\n".join(lines)


def shapes_table(metrics: dict[str, Any]) -> list[str]:
    """The shapes scorer's categories against chance as markdown lines (ending with a blank one), or none."""
    if "shapes" not in metrics:
        return []
    scores, chance = metrics["shapes"]["scores"], metrics["shapes"]["chance"]
    lines = ["| category | score | chance |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {chance.get(k, float('nan')):.3f} |" for k, v in scores.items()]
    return [*lines, ""]


def fidelity_table(metrics: dict[str, Any]) -> list[str]:
    """FID/KID/precision-recall/IS and CLIPScore as markdown lines (ending with a blank one), or none."""
    rows = fidelity_rows(metrics)
    if not rows:
        return []
    return ["| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def fidelity_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    if f := metrics.get("fidelity"):
        rows += [
            (f"FID ({f['feature_extractor']})", f"{f['fid']:.3f}"),
            ("KID", f"{f['kid_mean']:.4f} ± {f['kid_std']:.4f}"),
            ("precision / recall", f"{f['precision']:.3f} / {f['recall']:.3f}"),
        ]
        if "isc_mean" in f:
            rows.append(("Inception Score", f"{f['isc_mean']:.2f} ± {f['isc_std']:.2f}"))
    if "clip_score" in metrics:
        rows.append(("CLIPScore", f"{metrics['clip_score']:.2f}"))
    return rows


def comparison_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """One row per checkpoint: the shapes overall score and the fidelity/CLIP numbers that exist."""
    columns: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    for name, m in results.items():
        row = {}
        if "shapes" in m:
            row["shapes overall"] = f"{m['shapes']['scores']['overall']:.3f}"
        row.update(dict(fidelity_rows(m)))
        rows[name] = row
        columns += [c for c in row if c not in columns]
    lines = ["| checkpoint | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [
        f"| {name} | " + " | ".join(row.get(c, "") for c in columns) + " |" for name, row in rows.items()
    ]
    return lines
