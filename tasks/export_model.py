"""`t2i export-model`: a finished run as a diffusers folder that loads without this project —
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` — with a model card built from the
run's manifests, optionally pushed to the Hub.

Layout: `model_index.json`; `transformer/` (DiT-I or CAD-I as `T2IDenoiser`, safetensors, and its code);
`vae/` (diffusers AutoencoderKL); `text_encoder/` + `tokenizer/` (transformers T5); `scheduler/` (our time
grid and steps, and its code); `t2i_pipeline.py` (the pipeline); `README.md` (the card); `samples.png`.
Every component is copied in, the public VAE and T5 of `imagenet256` too: the folder works offline and a
Hub repo stands on its own. The code files are this project's own modules, copied with their
`from t2i.models.X import` lines turned into relative imports, so what loads is the code that trained.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from t2i.data.store import Artifact
from t2i.flows.config import ConfigError, PipelineConfig

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
# folder in the export → the project modules it carries, first the one diffusers loads (`check_carried`)
CODE = {
    ".": ["diffusers_pipeline", "latent_norm"],
    "transformer": ["denoiser", "architectures", "dit", "cad", "objectives"],
    "scheduler": ["scheduling", "objectives"],
}
MODULE_FILES = {"diffusers_pipeline": "t2i_pipeline"}  # others: t2i_<name>
IMPORT = re.compile(r"^from t2i\.models\.(\w+) import", re.MULTILINE)


def module_file(name: str) -> str:
    return MODULE_FILES.get(name, f"t2i_{name}")


def imported_modules(name: str) -> set[str]:
    return set(IMPORT.findall((MODELS_DIR / f"{name}.py").read_text()))


def check_carried(folder: str, names: list[str]) -> None:
    """Every module a folder's code imports is in the folder, and its first module imports all the others
    itself (diffusers copies no more)."""
    for name in names:
        if missing := imported_modules(name) - set(names):
            raise RuntimeError(f"models/{name}.py imports {sorted(missing)}, which {folder}/ does not carry")
    if unlisted := set(names[1:]) - imported_modules(names[0]):
        raise RuntimeError(
            f"models/{names[0]}.py must import {sorted(unlisted)} itself for diffusers to copy them"
        )


def copy_code(out: Path) -> None:
    """The modules each folder needs, their project imports made relative; any other project import left
    over would need this project installed, so it is refused."""
    for folder, names in CODE.items():
        check_carried(folder, names)
        for name in names:
            source = (MODELS_DIR / f"{name}.py").read_text()
            code = IMPORT.sub(lambda m: f"from .{module_file(m.group(1))} import", source)
            if re.search(r"^\s*(from|import) t2i\b", code, re.MULTILINE):
                raise RuntimeError(f"models/{name}.py imports from t2i beyond t2i.models: cannot export it")
            (out / folder).mkdir(parents=True, exist_ok=True)
            (out / folder / f"{module_file(name)}.py").write_text(code)


def write_components(cfg: PipelineConfig, run, out: Path) -> None:
    """Denoiser, VAE, text encoder, tokenizer, scheduler and `model_index.json` into `out`."""
    import diffusers
    import torch
    from transformers import AutoTokenizer, T5EncoderModel

    from t2i.models.denoiser import T2IDenoiser
    from t2i.models.latent_norm import per_channel_latent_norm
    from t2i.models.loading import resolve_model
    from t2i.models.objectives import objective
    from t2i.models.scheduling import T2IScheduler

    meta = run.meta
    denoiser = T2IDenoiser(meta.get("architecture", "dit"), meta["model_config"], list(meta["latent_shape"]))
    denoiser.model.load_state_dict(run.model.state_dict())
    denoiser.save_pretrained(out / "transformer")
    run.vae.save_pretrained(out / "vae")
    text_cfg = meta["text_encoder"]
    path, revision = resolve_model(text_cfg["encoder"], cfg.workspace_path), text_cfg.get("revision")
    dtype = getattr(torch, text_cfg.get("dtype", "float32"))  # the dtype training computed embeddings in
    encoder = T5EncoderModel.from_pretrained(path, revision=revision, dtype=dtype)
    encoder.save_pretrained(out / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    tokenizer.save_pretrained(out / "tokenizer")
    sampler = objective(meta.get("objective", "epsilon"), cfg.evaluate.sampler).sampler
    T2IScheduler(sampler=sampler).save_pretrained(out / "scheduler")
    index = {
        "_class_name": [module_file("diffusers_pipeline"), "T2IPipeline"],
        "_diffusers_version": diffusers.__version__,
        "transformer": [module_file("denoiser"), "T2IDenoiser"],
        "scheduler": [module_file("scheduling"), "T2IScheduler"],
        "vae": ["diffusers", type(run.vae).__name__],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "latent_norm": per_channel_latent_norm(meta["latent_norm"], meta["latent_shape"][0]),
        "text_max_length": text_cfg["max_length"],
        "text_dtype": text_cfg.get("dtype", "float32"),
        "default_steps": cfg.evaluate.steps,
        "default_guidance": cfg.evaluate.guidance_scale,
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_model(
    cfg: PipelineConfig,
    checkpoints: Artifact,
    out: Path | None,
    checkpoint: str = "final",
    repo: str | None = None,
    private: bool = False,
) -> None:
    """Write the folder of the training run `checkpoints` and push it when `repo` is given. The folder appears
    complete or not at all; an existing export at `out` is replaced, any other non-empty folder refused."""
    from t2i.tasks.generate import TrainedRun
    from t2i.tasks.hub import hub_token

    if out is None and repo is None:
        raise ConfigError("export-model needs --out and/or --push-to-hub")
    token = hub_token() if repo else None
    if repo and not token:
        raise ConfigError(
            "--push-to-hub needs a Hub token: set $HF_TOKEN or a Prefect Secret named 'hf-token'"
        )
    if out is not None and out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise ConfigError(f"--out {out} is a non-empty folder that holds no exported model; choose another")
    run = TrainedRun(cfg, checkpoints, checkpoint, device="cpu")  # copied to files, never run here
    if out is None:
        with tempfile.TemporaryDirectory(prefix="t2i-export-") as tmp:
            write_export(cfg, run, Path(tmp) / "model", repo)
            push(Path(tmp) / "model", repo, token, private)
        return
    write_export(cfg, run, out, repo)
    if repo:
        push(out, repo, token, private)


def write_export(cfg: PipelineConfig, run, out: Path, repo: str | None) -> None:
    """Built in a sibling folder, then swapped in: a failure leaves the previous export (or nothing)."""
    from t2i.tasks.model_card import model_card

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_components(cfg, run, staging)
        copy_code(staging)
        model_card(cfg, run, staging, repo or str(out.resolve()))
        if out.exists():
            old = out.with_name(f"{staging.name}.old")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def push(folder: Path, repo: str, token: str, private: bool) -> None:
    """Upload the folder; a failure is reported without the token (the exported folder stays)."""
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder), repo_id=repo, commit_message="Upload model exported by t2i"
        )
    except Exception as err:
        message = f"{type(err).__name__}: {err}".replace(token, "***")
        raise RuntimeError(f"push to the Hub repo {repo} failed: {message}") from None
