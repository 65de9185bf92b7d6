"""The paper's two claims as one flow: the same denoiser trained three ways on the same budget.

* class:      class-name captions ("An image of red circle": the template backend), no composites;
* vlm:        the captioner's long captions, no composites;
* vlm+cutmix: long captions, plus CutMix composites (themselves re-captioned) as the CutMix stream.

Each variant is trained and evaluated with several seeds (train.seed and evaluate.seed); every run is an
ordinary pipeline run, so shared stages (images, captions, latents) are made once and a rerun skips all
finished work. The shapes scorer grades each run's samples; the report gives mean ± sample standard
deviation over seeds per category, next to the chance levels.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from prefect import flow

from t2i.data.shapes import GENERATION_CATEGORIES
from t2i.data.store import atomic_path
from t2i.flows.config import ConfigError, PipelineConfig, with_overrides
from t2i.flows.pipeline import pipeline_flow
from t2i.flows.plan import Plan
from t2i.tasks.reporting import publish_markdown, run_logger

VARIANTS: dict[str, list[str]] = {
    "class": ["recaption.backend=template", "cutmix.enabled=false"],
    "vlm": ["cutmix.enabled=false"],
    "vlm+cutmix": ["cutmix.enabled=true"],
}
CATEGORIES = ("overall", "colour_shape", *GENERATION_CATEGORIES)


def variant_config(cfg: PipelineConfig, variant: str, seed: int) -> PipelineConfig:
    return with_overrides(cfg, [*VARIANTS[variant], f"train.seed={seed}", f"evaluate.seed={seed}"])


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant and category: mean, sample standard deviation and the seeds' values."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for variant, scores in runs.items():
        out[variant] = {}
        for key in CATEGORIES:
            values = [s[key] for s in scores if key in s]
            if values:
                out[variant][key] = {
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                    "values": values,
                }
    return out


def ablation_markdown(table: dict, chance: dict[str, float], seeds: list[int], cfg: PipelineConfig) -> str:
    variants = list(table)
    lines = [
        "# Ablation: caption source and CutMix",
        "",
        f"Denoiser `{cfg.train.model}-{cfg.train.size}`, {cfg.train.steps} steps × batch {cfg.train.batch_size}, "
        f"{cfg.download.max_images} images; evaluated on `{cfg.evaluate.prompts}` ({cfg.evaluate.num_prompts} "
        f"prompts, {cfg.evaluate.steps} sampling steps, guidance {cfg.evaluate.guidance_scale}); seeds {seeds}. "
        "Shares of samples correct (shapes scorer), mean ± sample standard deviation over seeds.",
        "",
        "| category | " + " | ".join(variants) + " | chance |",
        "|---|" + "---|" * (len(variants) + 1),
    ]
    for key in CATEGORIES:
        cells = [
            f"{table[v][key]['mean']:.3f} ± {table[v][key]['std']:.3f}" if key in table[v] else "n/a"
            for v in variants
        ]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {chance.get(key, float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def last_line(table: dict) -> str:
    return ", ".join(f"{v}: {table[v]['overall']['mean']:.3f}" for v in table)


@flow(name="ablation", description="Train and evaluate class / vlm / vlm+cutmix over several seeds.")
def ablation_flow(cfg: PipelineConfig, seeds: list[int] | None = None) -> dict[str, Any]:
    seeds = list(seeds or [0, 1, 2])
    log = run_logger()
    if not cfg.evaluate.prompts.startswith("shapes:"):
        raise ConfigError(
            f"the ablation grades with the shapes scorer: evaluate.prompts must be 'shapes:<split>', got {cfg.evaluate.prompts!r}"
        )
    runs: dict[str, list[dict[str, float]]] = {}
    chance: dict[str, float] = {}
    evaluations: dict[str, str] = {}
    for variant in VARIANTS:
        runs[variant] = []
        for seed in seeds:
            vcfg = variant_config(cfg, variant, seed)
            evaluation = Plan(vcfg).evaluation
            if not evaluation.is_complete():  # a finished run is read, not walked through again
                pipeline_flow(vcfg)
            evaluations[f"{variant}/{seed}"] = evaluation.fingerprint
            metrics = json.loads((evaluation.root / "metrics.json").read_text())
            runs[variant].append(metrics["shapes"]["scores"])
            chance = metrics["shapes"]["chance"]
            log.info(
                f"[ablation] {variant} seed {seed}: overall {metrics['shapes']['scores']['overall']:.3f}"
            )
    table = summarise(runs)
    report = ablation_markdown(table, chance, seeds, cfg)
    root = Plan(cfg).ablation_dir(evaluations)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(root / "report.md") as tmp:
        tmp.write_text(report + "\n" + last_line(table) + "\n")
    with atomic_path(root / "results.json") as tmp:
        tmp.write_text(json.dumps({"seeds": seeds, "table": table, "chance": chance, "runs": runs}, indent=1))
    publish_markdown(report, key="ablation-report", description="Ablation: class vs vlm vs vlm+cutmix")
    return {
        "path": str(root),
        "table": table,
        "chance": chance,
        "summary": last_line(table),
        "report": report,
    }
