"""Model loading: any model reference to a loadable path (`resolve_model`), a finished train run by folder or
fingerprint (`train_run`), and a run's denoiser from its `final/` weights or a kept checkpoint's EMA or raw
weights (`load_checkpoint`).

A `tiny:*` reference is built on first use under `<workspace>/models/` (or is a committed trained model, see
`t2i.models.tiny`); a Hub id or a local path is returned unchanged, so the loading code is the real one either
way. Checkpoints load with `torch.load(weights_only=True)`: opening one never runs code from the file. torch
is imported when a denoiser is loaded, so resolving a reference stays cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from t2i.data.store import CHECKPOINTS, FINAL, MANIFEST, Artifact, atomic_path, checkpoint_dirs
from t2i.data.versions import TINY_MODELS
from t2i.models.tiny import BUILDERS, TINY_PREFIX, TRAINED, WEIGHTS_DIR, is_tiny

if TYPE_CHECKING:
    import torch


def resolve_model(ref: str, workspace: str | Path) -> str:
    """Return a loadable path or Hub id for `ref`, building a `tiny:*` model on first use."""
    if not is_tiny(ref):
        return ref
    name = ref[len(TINY_PREFIX) :]
    if name in TRAINED:
        path = WEIGHTS_DIR / TRAINED[name]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{ref}: no trained weights at {path}; make them with "
                f"`t2i train-shapes-models {name.removeprefix('shapes-')} --out {WEIGHTS_DIR}`"
            )
        return str(path)
    if name not in BUILDERS:
        available = ", ".join("tiny:" + n for n in [*BUILDERS, *TRAINED])
        raise ValueError(f"unknown tiny model {ref!r}; available: {available}")
    out = Path(workspace) / "models" / f"tiny-{name}-v{TINY_MODELS}"
    if (out / "config.json").is_file():
        return str(out)
    try:
        with atomic_path(out) as tmp:
            BUILDERS[name](tmp)
    except OSError:
        if not (out / "config.json").is_file():  # lost a race with another builder: theirs is as good
            raise
    return str(out)


def load_final(root: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The finished run's EMA weights (`final/`) in the architecture its `config.json` names, in eval mode."""
    from safetensors.torch import load_file

    from t2i.models.architectures import denoiser_from_config

    meta = json.loads((root / FINAL / "config.json").read_text())
    model = denoiser_from_config(meta.get("architecture", "dit"), meta["model_config"])
    model.load_state_dict(load_file(root / FINAL / "model.safetensors"))
    return model.to(device).eval(), meta


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
    import torch

    from t2i.models.ema import EMA

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
            ema = EMA(model)
            ema.load_state_dict(state["ema"])
            ema.copy_to(model)
        else:
            model.load_state_dict(state["model"])
    return model.eval(), meta


def train_run(ref: str, workspace: str | Path, field: str) -> Artifact:
    """A finished train run, given as its folder (`<workspace>/train/<fingerprint>`, any workspace) or as a
    fingerprint under this `workspace`; `field` names the config field in errors."""
    path = Path(ref).expanduser()
    if not path.is_dir() and (Path(workspace) / "train" / ref).is_dir():
        path = Path(workspace) / "train" / ref
    path = path.resolve()
    if not (path / MANIFEST).is_file() or not (path / FINAL / "config.json").is_file():
        raise FileNotFoundError(
            f"{field}: {ref!r} is not a finished train run (a folder with {MANIFEST} and {FINAL}/config.json, "
            "as `t2i train` or `t2i import-model` write; `t2i status` prints the train folder)"
        )
    manifest = json.loads((path / MANIFEST).read_text())
    if (manifest.get("stage"), manifest.get("fingerprint")) != ("train", path.name):
        raise ValueError(
            f"{field}: {path} holds the {manifest.get('stage')} output {manifest.get('fingerprint')!r}, not a "
            "train run in its own folder (`<workspace>/train/<fingerprint>`): pass the run's folder as written"
        )
    return Artifact(path.parents[1], "train", path.name)


def initial_run_meta(run: Artifact, architecture: str, text_encoder: str) -> dict[str, Any]:
    """`final/config.json` of the run a fine-tuning run starts from (`train.init_from`); refused before any
    work when its denoiser or text encoder is not the one this config trains with."""
    meta = json.loads((run.root / FINAL / "config.json").read_text())
    if meta.get("architecture", "dit") != architecture:
        raise ValueError(
            f"train.init_from: {run.root} is a {meta.get('architecture', 'dit')} run; "
            f"set train.model={meta.get('architecture', 'dit')} to fine-tune it"
        )
    if meta["text_encoder"]["encoder"] != text_encoder:
        raise ValueError(
            f"train.init_from: {run.root} reads text from {meta['text_encoder']['encoder']!r}, this config "
            f"from {text_encoder!r}; set text.encoder={meta['text_encoder']['encoder']}"
        )
    return meta
