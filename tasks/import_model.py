"""`t2i import-model`: the paper's released CAD-I (its `PyTorchModelHubMixin` folder: `config.json` + weights,
a local folder or a Hub id such as `Lucasdegeorge/CAD-I`) as one of our finished train runs, and the reverse
(`t2i export-model --format paper`).

An imported run is an ordinary train artifact, `<workspace>/train/<fingerprint>/` with `final/` (weights and
the config our loaders read) and a manifest naming the source; its fingerprint is a digest of the weights and
of what samples them (text encoder, VAE), so importing the same weights again finds the same run. It is
sampled with `--set evaluate.run=<folder>` (evaluate, generate, export-model) and fine-tuned with `--set
train.init_from=<folder>`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from t2i.data import versions
from t2i.data.store import Artifact, file_sha256, fingerprint
from t2i.flows.config import ConfigError, PipelineConfig
from t2i.models.cad_official import PICKLE_FILE, SAFETENSORS_FILE

PAPER_TEXT_ENCODER = "google/flan-t5-xl"
PAPER_TEXT_LENGTH = 128  # the paper's tokenizer truncates captions there
PAPER_VAE = "benjamin-paine/stable-diffusion-v1-5/vae"  # the decoder of the paper's pipe.py (SD-1.5's VAE)
PAPER_LATENT_SCALE = 0.18215
WEIGHT_FILES = (SAFETENSORS_FILE, PICKLE_FILE)  # read_official reads the first present


def source_folder(source: str, revision: str | None) -> Path:
    """A local folder as it is; anything else is a Hub id, fetched once into the Hub cache (token: $HF_TOKEN
    or the Prefect Secret `hf-token`)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ConfigError(f"import-model: {source!r} is neither a folder nor a Hub model id (owner/name)")
    from huggingface_hub import snapshot_download

    from t2i.tasks.hub import hub_token

    patterns = ["config.json", *WEIGHT_FILES]
    return Path(snapshot_download(source, revision=revision, allow_patterns=patterns, token=hub_token()))


def weights_digest(folder: Path) -> str:
    """sha256 of the folder's weight file (the first of WEIGHT_FILES present)."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return file_sha256(folder / name)
    raise FileNotFoundError(f"import-model: {folder} holds none of {', '.join(WEIGHT_FILES)}")


def run_meta(config, text_encoder: str, vae: str, source: dict[str, Any]) -> dict[str, Any]:
    """`final/config.json` of an imported run: what our loaders, samplers and exports read."""
    return {
        "architecture": "cad",
        "model_config": asdict(config),
        "objective": "epsilon",  # the paper's ε-prediction on γ(t) = 1 − t, our `epsilon`
        "text_encoder": {
            "encoder": text_encoder,
            "revision": None,
            "max_length": PAPER_TEXT_LENGTH,
            "dtype": "float32",
        },
        "latent_norm": PAPER_LATENT_SCALE,
        "latent_shape": [config.latent_channels, config.latent_size, config.latent_size],
        "vae": {"vae": vae, "revision": None},
        "ema_decay": None,
        "steps": 0,
        "imported_from": source,
    }


def import_paper_model(
    cfg: PipelineConfig,
    source: str,
    revision: str | None = None,
    text_encoder: str = PAPER_TEXT_ENCODER,
    vae: str = PAPER_VAE,
) -> tuple[Artifact, bool]:
    """The released model at `source` as a finished train run of `cfg`'s workspace; (run, imported now).
    The weights are loaded into our CAD-I strictly (every tensor, every shape) before anything is written."""
    from t2i.models.cad import CAD, count_parameters
    from t2i.models.cad_official import read_official
    from t2i.tasks.checkpoints import save_final

    folder = source_folder(source, revision)
    digest = weights_digest(folder)
    settings = {"format": "paper-cad", "weights": digest, "text_encoder": text_encoder, "vae": vae}
    run = Artifact(cfg.workspace_path, "train", fingerprint("train-import", versions.IMPORT, settings, {}))
    if run.is_complete():
        return run, False
    started = time.time()
    config, state = read_official(folder)
    model = CAD(config)
    model.load_state_dict(state)
    origin = {"source": source, "revision": revision, "weights_sha256": digest, "format": "paper-cad"}
    save_final(run.root, model, run_meta(config, text_encoder, vae, origin))
    run.write_manifest(
        config={"train": {"model": "cad", "objective": "epsilon"}, "import": settings},
        inputs={},
        started=started,
        extra={"imported_from": origin, "parameters": count_parameters(model), "step": 0},
    )
    return run, True


def is_paper_folder(folder: Path) -> bool:
    """Whether `folder` holds a model in the paper's format (what an export there may replace)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"latents_dim", "data_dim", "label_dim"} <= config.keys()


def export_paper_model(run, out: Path) -> None:
    """A run's CAD-I in the paper's format (`CAD.from_pretrained(out)` of their `pipe.py` loads it)."""
    from t2i.models.cad import CAD
    from t2i.models.cad_official import write_official

    if not isinstance(run.model, CAD):
        raise ConfigError(
            f"export-model --format paper: the run is a {run.meta.get('architecture')} model; only CAD-I "
            "(train.model=cad) has the paper's format"
        )
    if out.is_dir() and any(out.iterdir()) and not is_paper_folder(out):
        raise ConfigError(f"--out {out} is a non-empty folder that holds no CAD-I in the paper's format")
    write_official(out, run.model.config, run.model.state_dict())
