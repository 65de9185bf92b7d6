"""`t2i generate`: the request's options, a finished training run's weights (EMA, or a kept checkpoint's),
and PNGs from prompts sampled as `t2i evaluate` samples (`t2i.tasks.sampling`): the preset's sampler, steps
and guidance by default.

Prompt i's `n` images come from one CPU generator seeded `seed + i`, so the same command gives the same
files, on a GPU too, and `pipe(prompt, num_images_per_prompt=n, generator=torch.Generator().manual_seed(
seed + i))` on the exported folder (`t2i export-model`) gives the same images.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from t2i.data.store import Artifact, atomic_path
from t2i.flows.config import ConfigError, PipelineConfig, format_validation_error
from t2i.flows.plan import MissingInput

GRID_IMAGES = 64


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(min_length=1, description="Prompts; each gets `n` images.")
    n: int = Field(4, ge=1, le=64, description="Images per prompt.")
    seed: int = Field(0, ge=0, description="Prompt i's images are drawn from a generator seeded seed + i.")
    guidance: float | None = Field(
        None, ge=0, description="Guidance scale (default: evaluate.guidance_scale)."
    )
    steps: int | None = Field(None, ge=1, le=2000, description="Sampling steps (default: evaluate.steps).")
    checkpoint: str = Field("final", description="'final' (EMA weights) or a kept 'step-NNNNNNNN'.")

    @field_validator("prompts")
    @classmethod
    def _not_blank(cls, v: list[str]) -> list[str]:
        if any(not p.strip() for p in v):
            raise ValueError("a prompt is empty")
        return v


def generate_request(**options) -> GenerateRequest:
    """Validated options; a bad value raises ConfigError naming the field."""
    try:
        return GenerateRequest(**options)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err).replace("configuration", "generate options")) from None


def read_prompts_file(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--prompts-file: {file} does not exist")
    return [line.strip() for line in file.read_text().splitlines() if line.strip()]


class TrainedRun:
    """A finished training run's weights as `t2i evaluate` loads them, with the VAE and the prompt encoder
    it samples with (each loaded when first used: an export needs no prompt encoder)."""

    def __init__(
        self, cfg: PipelineConfig, checkpoints: Artifact, checkpoint: str = "final", device: str | None = None
    ) -> None:
        from t2i.models.loading import checkpoint_names, load_checkpoint
        from t2i.tasks.model_cache import pick_device

        self.cfg, self.checkpoints = cfg, checkpoints
        if not self.checkpoints.is_complete():
            raise MissingInput(
                f"no finished training run for this configuration ({self.checkpoints.root}); "
                f"run `t2i train --preset {cfg.preset}` (or `t2i run`) first"
            )
        self.name = checkpoint_names([checkpoint], self.checkpoints.root)[0]
        self.device = device or pick_device(cfg.evaluate.device)
        self.model, self.meta = load_checkpoint(
            self.checkpoints.root, self.name, self.device, cfg.evaluate.use_ema
        )

    @functools.cached_property
    def vae(self):
        from t2i.tasks.sampling import decoding_vae

        return decoding_vae(self.cfg.latents, self.cfg.workspace_path, self.device, self.meta)

    @functools.cached_property
    def encoder(self):
        from t2i.tasks.sampling import prompt_encoder

        return prompt_encoder(self.meta, self.cfg.workspace_path, self.device)

    def sample(self, texts: list[str], steps: int, guidance: float, generator):
        from t2i.tasks.sampling import sample_images, sampling_options

        args = (sampling_options(self.cfg.evaluate), steps, guidance, generator)
        return sample_images(self.model, self.meta, self.vae, self.encoder, texts, *args)


def sampling_settings(cfg: PipelineConfig, request: GenerateRequest) -> dict:
    """The request with the steps and guidance it leaves to the configuration filled in, and the sampler:
    everything the images depend on besides the weights."""
    from t2i.tasks.sampling import sampling_options

    steps = request.steps or cfg.evaluate.steps
    guidance = cfg.evaluate.guidance_scale if request.guidance is None else request.guidance
    return {**request.model_dump(), "steps": steps, "guidance": guidance, **sampling_options(cfg.evaluate)}


def generate(run: TrainedRun, request: GenerateRequest, settings: dict, out: Path) -> list[Path]:
    """Write `<i:03d>-<k:02d>.png` per prompt and image (and `grid.png`, a row per prompt, when there are
    several) into `out`, sampled with `settings` (`sampling_settings`), and the request as `request.json`."""
    import torch
    from PIL import Image

    from t2i.tasks.sampling import image_grid, save_png

    steps, guidance = settings["steps"], settings["guidance"]
    out.mkdir(parents=True, exist_ok=True)
    paths, shown = [], []  # the grid shows the first GRID_IMAGES (a prompts file may hold thousands)
    for i, prompt in enumerate(request.prompts):
        generator = torch.Generator().manual_seed(request.seed + i)
        for k, px in enumerate(run.sample([prompt] * request.n, steps, guidance, generator)):
            image = Image.fromarray(px)
            paths.append(out / f"{i:03d}-{k:02d}.png")
            save_png(image, paths[-1])
            if len(shown) < GRID_IMAGES:
                shown.append(image)
    if len(paths) > 1:
        save_png(image_grid(shown, columns=request.n, cell=shown[0].width), out / "grid.png")
    record = {**settings, "checkpoint": run.name, "train": str(run.checkpoints.root)}
    with atomic_path(out / "request.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return paths
