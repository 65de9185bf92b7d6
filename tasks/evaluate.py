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
import torch
from PIL import Image
from prefect import task

from t2i.data.store import CHECKPOINTS, FINAL, Artifact, atomic_path, checkpoint_dirs
from t2i.models.ema import EMA
from t2i.models.sampling import sample_latents
from t2i.models.tiny import resolve_model
from t2i.models.vae import decode_latents
from t2i.tasks.checkpoints import load_final
from t2i.tasks.model_cache import cached_model, pick_device
from t2i.tasks.shards import Progress, publish_markdown, run_logger
from t2i.tasks.text import OnlineText
from t2i.tasks.train import to_vae_latents
from t2i.tasks.train_batches import step_generator

if TYPE_CHECKING:
    from t2i.flows.config import EvaluateConfig, LatentsConfig

CLASS_PROMPT = "An image of {class_name}"  # the recaption stage's default template


@dataclass(frozen=True)
class PromptItem:
    index: int
    text: str
    scene: Any = None  # a t2i.data.shapes.Scene when the prompt comes from the shapes world
    meta: str | None = None  # GenEval: the prompt's metadata line, verbatim; DPG-Bench: the prompt id
    reference: bytes | None = None  # held-out captions: the encoded real image the caption describes


def load_prompts(spec: str, num_prompts: int, seed: int = 0) -> list[PromptItem]:
    kind, _, rest = spec.partition(":")
    if kind in ("shapes", "shapes-class"):
        from t2i.data import shapes

        scenes = [shapes.scene(i, seed=seed, split=rest) for i in range(num_prompts)]
        if kind == "shapes-class":  # the template captioner's text for the scene's class
            return [
                PromptItem(i, CLASS_PROMPT.format(class_name=s.class_name), s, meta="class")
                for i, s in enumerate(scenes)
            ]
        return [PromptItem(i, s.caption, s) for i, s in enumerate(scenes)]
    if kind == "heldout":
        return heldout_prompts(Path(rest).expanduser(), num_prompts)
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


def heldout_prompts(folder: Path, num_prompts: int) -> list[PromptItem]:
    """Captions of held-out images (a `recaption` artifact folder, e.g. of a validation split made with
    `t2i recaption --set download.split=validation`), each with its real image as the FID reference."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"evaluate.prompts: {folder} is not a complete recaption artifact (no manifest.json); "
            "pass the folder `t2i status` prints for recaption"
        )
    manifest = json.loads(manifest_path.read_text())
    workspace = folder.parents[1]
    captions = Artifact(workspace, "recaption", folder.name)
    source = manifest["inputs"]["images"]  # the images it captioned: downloaded ones, or composites
    stage = "download" if (workspace / "download" / source).is_dir() else "cutmix"
    images = Artifact(workspace, stage, source)
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
            _save_png(grid, out / f"{p.meta}.png")
        return out
    return None


def image_grid(images: list[Image.Image], columns: int = 8, cell: int = 128) -> Image.Image:
    rows = max(1, math.ceil(len(images) / columns))
    grid = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im.resize((cell, cell), Image.NEAREST), ((i % columns) * cell, (i // columns) * cell))
    return grid


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def checkpoint_names(spec: list[str], root: Path) -> list[str]:
    """`final`, `step-NNNNNNNN` names, or `all` (final, then every kept checkpoint, oldest first).

    The first name is the headline of the report, so `all` puts final there.
    """
    kept = [p.name for p in checkpoint_dirs(root)]
    names: list[str] = []
    for item in spec:
        for name in [FINAL, *kept] if item == "all" else [item]:
            if name != FINAL and name not in kept:
                raise FileNotFoundError(
                    f"evaluate.checkpoints: {name!r} is not among the kept checkpoints of {root} "
                    f"({', '.join(kept) or 'none'}); use 'final', 'all' or one of those"
                )
            if name not in names:
                names.append(name)
    return names


def load_checkpoint(root: Path, name: str, device: str, use_ema: bool = True):
    """A kept checkpoint's EMA (or raw) weights in the final model's architecture. `final` holds only the EMA
    weights, so its raw weights come from the checkpoint of the last step (always kept)."""
    model, meta = load_final(root, device=device)
    if name == FINAL and not use_ema:
        name = f"step-{meta['steps']:08d}"
        if not (root / CHECKPOINTS / name / "state.pt").is_file():
            raise FileNotFoundError(
                f"evaluate.use_ema: false needs the raw weights of the final step, but {name} is not among "
                f"the kept checkpoints of {root}"
            )
    if name != FINAL:
        state = torch.load(root / CHECKPOINTS / name / "state.pt", map_location=device, weights_only=True)
        if use_ema:
            _load_ema(model, state["ema"])
        else:
            model.load_state_dict(state["model"])
    return model.eval(), meta


def _load_ema(model: torch.nn.Module, ema_state: dict[str, Any]) -> None:
    ema = EMA(model)
    ema.load_state_dict(ema_state)
    ema.copy_to(model)


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
    cfg: EvaluateConfig, latents_cfg: LatentsConfig, artifact: Artifact, checkpoints: Artifact
) -> dict[str, Any]:
    """Sample and score each selected checkpoint; the first is the headline, the rest a comparison table."""
    log = run_logger()
    device = pick_device(cfg.device)
    names = checkpoint_names(cfg.checkpoints, checkpoints.root)
    prompts = load_prompts(cfg.prompts, cfg.num_prompts)
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
    vae = decoding_vae(latents_cfg, artifact.workspace, device)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        model, meta = load_checkpoint(checkpoints.root, name, device, cfg.use_ema)
        image_dir = artifact.root / "images" / (name if len(names) > 1 else "")
        paths = sample_prompts(cfg, model, meta, vae, jobs, image_dir, artifact.workspace, device, name)
        images = [Image.open(paths[(p.index, k)]).convert("RGB") for p, k in jobs]
        results[name] = image_metrics(cfg, prompts, jobs, images, reference, artifact.workspace)
        if name == names[0]:
            _save_png(image_grid(images[:64]), artifact.root / "grid.png")
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
        pixels = sample_images(
            model, meta, vae, encoder, [p.text for p, _ in batch], cfg.sampler, cfg.steps, cfg.guidance_scale,
            step_generator(cfg.seed, b),
        )  # fmt: skip
        for (p, k), px in zip(batch, pixels, strict=True):
            _save_png(Image.fromarray(px), paths[(p.index, k)])
        progress.advance(f"({len(batch)} images)")
    return paths


def decoding_vae(latents_cfg: LatentsConfig, workspace: Path, device: str):
    """The VAE of the latents stage, in float32, that decodes samples to pixels."""
    path = resolve_model(latents_cfg.vae, workspace)
    return cached_model("vae", path=path, device=device, dtype="float32", revision=latents_cfg.revision)


def prompt_encoder(meta: dict[str, Any], workspace: Path, device: str) -> OnlineText:
    """The run's text encoder for new prompts, its outputs rounded like the training batches' embeddings."""
    text_cfg = meta["text_encoder"]
    text_dtype = text_cfg.get("dtype", "float32")
    return OnlineText(
        cached_model(
            "text",
            path=resolve_model(text_cfg["encoder"], workspace),
            max_length=text_cfg["max_length"],
            device=device,
            dtype=text_dtype,
            revision=text_cfg.get("revision"),
        ),
        text_dtype,
    )


def sample_images(
    model,
    meta,
    vae,
    encoder: OnlineText,
    texts: list[str],
    sampler: str,
    steps: int,
    guidance: float,
    generator,
) -> np.ndarray:
    """One batch of prompts → uint8 images (B, H, W, 3): guided sampling from the empty prompt's branch, the
    latent normalisation undone, decoded by the VAE. `t2i evaluate` and `t2i generate` both sample here."""
    text, mask = encoder.encode(texts)
    null_text, null_mask = encoder.encode([None])
    z = sample_latents(
        meta.get("objective", "epsilon"), sampler, model, (len(texts), *meta["latent_shape"]), text, mask,
        null_text, null_mask, steps=steps, guidance_scale=guidance, generator=generator,
    )  # fmt: skip
    return decode_latents(vae, to_vae_latents(z, meta["latent_norm"]))


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
