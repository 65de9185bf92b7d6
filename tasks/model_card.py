"""The exported model's card (`README.md` with the Hub's metadata header), written from the run's
manifests: what was trained on what, the evaluation of exactly this checkpoint, how to load it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from t2i.flows.config import PipelineConfig
from t2i.flows.plan import Plan

ARCHITECTURES = {"dit": "DiT-I (DiT with cross-attention to T5)", "cad": "CAD-I (RIN-style, text in latents)"}
PAPER = "How far can we go with ImageNet for Text-to-Image generation? (2025)"


def evaluation_of(plan: Plan, checkpoint: str) -> dict[str, Any] | None:
    """The evaluate stage's metrics for this checkpoint, if that run is finished and sampled it."""
    if not plan.evaluation.is_complete():
        return None
    metrics = plan.evaluation.read_manifest()["metrics"]
    if metrics.get("checkpoint") == checkpoint:
        return metrics
    return metrics.get("checkpoints", {}).get(checkpoint)


def header(cfg: PipelineConfig, arch: str) -> list[str]:
    imagenet = "imagenet" in cfg.download.source.lower()
    return [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "license: other",
        f"license_name: {'imagenet-terms-of-access' if imagenet else 'training-data-terms'}",
        "tags: [text-to-image, diffusion, t2i-imagenet, " + arch + "]",
        *(["datasets: [ILSVRC/imagenet-1k]"] if imagenet else []),
        "---",
        "",
    ]


def limitations(cfg: PipelineConfig, run, train: dict[str, Any]) -> list[str]:
    """What the weights were trained on and at which size (an imported run's: the paper's)."""
    size = run.meta["latent_shape"][-1] * 8 if "imported_from" in train else cfg.latents.resolution
    data = (
        "- Trained by the paper's authors on ImageNet and its synthetic captions (see the paper): subjects, "
        "styles and text rendering outside that data are weak."
        if "imported_from" in train
        else "- Trained only on the images above and their synthetic captions: subjects, styles and text "
        "rendering outside that data are weak, and the captioner's mistakes and biases are learned too."
    )
    return [data, f"- {size} px only; no safety filter."]


def imported_rows(run, train: dict[str, Any]) -> list[str]:
    """The card's provenance of a run `t2i import-model` made: the released weights it converted."""
    origin, meta = train["imported_from"], run.meta
    text, vae = meta["text_encoder"], meta.get("vae", {}).get("vae", "?")
    revision = f" (revision `{origin['revision']}`)" if origin.get("revision") else ""
    rows = [
        ("denoiser", f"{ARCHITECTURES['cad']}, {train['parameters']:,} parameters"),
        (
            "weights",
            f"imported from `{origin['source']}`{revision}, the paper's released model; sha256 "
            f"`{origin['weights_sha256'][:16]}…`; not trained by this pipeline",
        ),
        ("text encoder", f"`{text['encoder']}`, up to {text['max_length']} tokens"),
        ("VAE", f"`{vae}`"),
    ]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def training_rows(cfg: PipelineConfig, plan: Plan, train: dict[str, Any]) -> list[str]:
    t = train["config"]["train"]
    images = plan.images.read_manifest() if plan.images.is_complete() else {}
    captions = plan.captions.read_manifest() if plan.captions.is_complete() else {}
    backend = captions.get("backend", cfg.recaption.backend)
    captioner = f"{captions.get('model', cfg.recaption.model)} ({backend})" if backend == "vllm" else backend
    cutmix = f"on: composites in {train.get('cutmix_share', 0):.0%} of samples" if plan.composites else "off"
    text = train["config"]["text"]
    rows = [
        ("denoiser", f"{ARCHITECTURES[t['model']]}, size `{t['size']}`, {train['parameters']:,} parameters"),
        ("objective", f"{t['objective']}, {train['step']:,} steps × global batch {train['global_batch']}"),
        ("optimiser", f"{t['optimizer']}, lr {t['lr']:g}, EMA decay {t['ema_decay']}"),
        ("images", f"`{cfg.download.source}` ({cfg.download.split}): {images.get('rows', '?'):,} images"),
        ("captions", f"{captioner}, {captions.get('rows', '?'):,} captions"),
        ("CutMix", cutmix),
        ("text encoder", f"`{text['encoder']}`, up to {text['max_length']} tokens"),
        ("VAE / resolution", f"`{cfg.latents.vae}`, {cfg.latents.resolution} px"),
    ]
    if init := train["inputs"].get("init"):
        rows.append(("initialised from", f"train run `{init}` (`train.init_from`), then fine-tuned"))
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def evaluation_lines(cfg: PipelineConfig, metrics: dict[str, Any] | None, checkpoint: str) -> list[str]:
    from t2i.tasks.evaluate import fidelity_table, shapes_table

    if metrics is None:
        return [f"Not evaluated: no finished `t2i evaluate` run of checkpoint `{checkpoint}`.", ""]
    from t2i.models.objectives import objective

    e = cfg.evaluate
    sampler = objective(cfg.train.objective, e.sampler).sampler
    lines = [
        f"Prompt set `{e.prompts}` ({e.num_prompts} prompts × {e.images_per_prompt}), sampler {sampler}, "
        f"{e.steps} steps, guidance {e.guidance_scale}, checkpoint `{checkpoint}`.",
        "",
    ]
    lines += shapes_table(metrics) + fidelity_table(metrics)
    if "benchmark_folder" in metrics:
        kind = {"geneval": "GenEval", "dpg": "DPG-Bench"}[e.prompts.partition(":")[0]]
        lines += [f"Samples were written in {kind}'s layout; score them with {kind}'s official scorer.", ""]
    return lines


def example_prompt(cfg: PipelineConfig) -> str:
    if cfg.download.source.startswith("synthetic:shapes"):
        return "a large red circle in the top left"
    return "a photo of a red fox in the snow"


def model_card(cfg: PipelineConfig, run, out: Path, location: str) -> None:
    plan = Plan(cfg)
    train = run.checkpoints.read_manifest()
    arch = train["config"]["train"]["model"]
    metrics = evaluation_of(plan, run.name)
    grid = plan.evaluation.root / "grid.png"
    if metrics is not None and grid.is_file():
        shutil.copyfile(grid, out / "samples.png")
    lines = [
        *header(cfg, arch),
        f"# t2i-imagenet `{cfg.preset}`: {ARCHITECTURES[arch].split(' (')[0]}",
        "",
        f"The released CAD-I of *{PAPER}*, imported by `t2i import-model`."
        if "imported_from" in train
        else f"A text-to-image diffusion model trained with the recipe of *{PAPER}*: long captions written by a "
        "vision-language model, CutMix composites, a diffusion transformer on VAE latents.",
        "",
        "## Training",
        "",
        *(imported_rows(run, train) if "imported_from" in train else training_rows(cfg, plan, train)),
        "",
        "## Evaluation",
        "",
        *evaluation_lines(cfg, metrics, run.name),
        *(["![samples](samples.png)", ""] if (out / "samples.png").is_file() else []),
        "## How to use",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{location}", trust_remote_code=True)',
        f'image = pipe("{example_prompt(cfg)}", generator=torch.Generator().manual_seed(0)).images[0]',
        "```",
        "",
        "`trust_remote_code` runs the architecture's code shipped in this folder (`transformer/`, `scheduler/`,",
        "`t2i_pipeline.py`). Defaults: the sampler, steps and guidance the model was evaluated with.",
        "",
        "## Limitations",
        "",
        *limitations(cfg, run, train),
        "- The training images' terms of use apply to the weights (ImageNet: non-commercial research).",
        "",
        "## Provenance",
        "",
        f"Train run `{run.checkpoints.fingerprint}`, checkpoint `{run.name}`"
        + (f", evaluation `{plan.evaluation.fingerprint}`" if metrics is not None else "")
        + "; versions: "
        + ", ".join(f"{k} {v}" for k, v in sorted(train.get("versions", {}).items()))
        + ".",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
