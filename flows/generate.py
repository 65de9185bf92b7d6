"""The `generate` flow: prompts typed into the deployment's form become images in the run's artifacts; and
`generate_images`, which `t2i generate` and the flow share: the plan's training run and output folder."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from prefect import flow

from t2i.flows.config import PipelineConfig
from t2i.flows.plan import Plan
from t2i.tasks.generate import GenerateRequest, TrainedRun, generate, sampling_settings
from t2i.tasks.reporting import publish_markdown, run_logger

DEFAULT_PROMPTS = ["a large red circle in the top left"]
ARTIFACT_PROMPTS = 16  # image artifacts live in the server's database: the rest are on disk only


def generate_images(cfg: PipelineConfig, request: GenerateRequest, out: Path | None = None) -> list[Path]:
    """The request's images from the training run `cfg` names (`evaluate.run`, else its own), in `out` (default: the plan's folder for
    this run and request, `<workspace>/generate/<digest>`)."""
    plan = Plan(cfg)
    run = TrainedRun(cfg, plan.sampled, request.checkpoint)
    settings = sampling_settings(cfg, request)
    return generate(run, request, settings, out or plan.generation(settings))


def data_url(image) -> str:
    """A PNG as a `data:` URL: the UI shows it without the server having to serve files."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@flow(
    name="generate", description="Images from prompts with the trained model, shown in the run's artifacts."
)
def generate_flow(
    cfg: PipelineConfig,
    prompts: list[str] = DEFAULT_PROMPTS,  # noqa: B006  (Prefect's form needs the literal default)
    n: int = 4,
    seed: int = 0,
    guidance: float | None = None,
    steps: int | None = None,
    checkpoint: str = "final",
) -> list[str]:
    """Images from the training run that `cfg` names (its EMA weights), sampled as `evaluate` samples.

    Args:
        cfg: The configuration whose finished training run draws the images.
        prompts: The prompts; each gets its own row of images.
        n: Images per prompt.
        seed: Prompt i's images are drawn with seed + i: the same values give the same images.
        guidance: Guidance scale; None: the configuration's evaluate.guidance_scale.
        steps: Sampling steps; None: the configuration's evaluate.steps.
        checkpoint: 'final', or a kept 'step-NNNNNNNN' checkpoint.
    """
    from PIL import Image
    from prefect.artifacts import create_image_artifact

    from t2i.tasks.generate import generate_request
    from t2i.tasks.sampling import image_grid

    request = generate_request(
        prompts=prompts, n=n, seed=seed, guidance=guidance, steps=steps, checkpoint=checkpoint
    )
    paths = generate_images(cfg, request)
    for i, prompt in enumerate(request.prompts[:ARTIFACT_PROMPTS]):
        images = [Image.open(p).convert("RGB") for p in paths[i * request.n : (i + 1) * request.n]]
        grid = image_grid(images, columns=request.n, cell=max(images[0].width, 128))
        create_image_artifact(image_url=data_url(grid), description=prompt)
    folder = paths[0].parent
    rows = "\n".join(
        f"| {i} | {p.replace('|', '/')} | `{i:03d}-*.png` |" for i, p in enumerate(request.prompts)
    )
    table = f"# Generated\n\nFolder: `{folder}`\n\n| # | prompt | files |\n|---|---|---|\n{rows}\n"
    publish_markdown(table, key="generate", description="Generated images")
    shown = min(len(request.prompts), ARTIFACT_PROMPTS)
    run_logger().info(f"[generate] {len(paths)} images in {folder}; artifacts for {shown} prompt(s)")
    return [str(p) for p in paths]
