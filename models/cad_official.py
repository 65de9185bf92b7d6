"""The paper's released CAD-I format and its sampler's settings, for importing and exporting our CAD-I.

The official code (lucasdegeorge/T2I-ImageNet) saves its network with huggingface_hub's
`PyTorchModelHubMixin` (`pipe.py`: `class CAD(CADRINTextCond, PyTorchModelHubMixin)`): a folder holding
`config.json` (the constructor's keyword arguments) and `model.safetensors` (its `state_dict`), which
`CAD.from_pretrained(folder)` loads. Our `t2i.models.cad.CAD` computes the same function with its own
parameter names, so converting weights is renaming alone: exact, and the round trip is bitwise. The
official state also holds a few tensors that are not weights (boolean all-True masks registered as frozen
parameters, the time sinusoid's frequencies); they are checked on the way in and rebuilt on the way out.

`PAPER_SAMPLING` is the paper's sampler (`pipe.py`'s `T2IPipeline` defaults: DDIM on the linear schedule,
250 steps, cfg 15, x0 clamp 1.2, random-word unconditional prompts, guidance from the second step) in our
`evaluate` settings; `paper_unconditional_prompts` draws its unconditional prompts, seeded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import string
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from t2i.models.cad import CAD, CADConfig, CrossAttentionLayer, SelfAttentionLayer, sinusoid_frequencies

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"  # what PyTorchModelHubMixin.save_pretrained writes
PICKLE_FILE = "pytorch_model.bin"  # what older saves hold, and from_pretrained falls back to on the Hub

# The paper's sampler as `evaluate` settings (`--set evaluate.<key>=<value>`). Its guidance
# cond·(1 + 15) − uncond·15 is our uncond + 16·(cond − uncond); its linear schedule γ_i = max(i/N, 1e-9)
# is our ε objective's grid with gamma_min 1e-9; it samples the conditional model alone at its first step
# (`step > guidance_start_step`, with 0); the unconditional branch gets coherence 0 (our CAD-I sampling
# does that for every coherence model).
PAPER_SAMPLING: dict[str, Any] = {
    "sampler": "ddim",
    "steps": 250,
    "guidance_scale": 16.0,
    "clamp_x0": 1.2,
    "unconditional": "random_words",
    "unguided_steps": 1,
    "gamma_min": 1e-9,
}

# Official constructor argument → CADConfig field.
RENAMED_ARGUMENTS = {
    "num_input_channels": "latent_channels",
    "data_size": "latent_size",
    "path_size": "patch_size",
    "data_dim": "data_width",
    "latents_dim": "width",
    "num_latents": "num_latents",
    "num_blocks": "blocks",
    "num_processing_layers": "layers_per_block",
    "compute_heads": "heads",
    "read_write_heads": "read_write_heads",
    "latent_mlp_multiplier": "mlp_ratio",
    "data_mlp_multiplier": "data_mlp_ratio",
    "label_dim": "text_dim",
    "num_text_registers": "num_registers",
    "time_scaling": "time_scale",
    "use_cond_rin_block": "cond_per_block",
    "concat_cond_token_to_latents": "cond_in_latents",
    "num_cond_tokens": "num_cond_tokens",
}
# Arguments without a default in the official constructor.
REQUIRED_ARGUMENTS = (
    "data_size",
    "data_dim",
    "num_input_channels",
    "num_latents",
    "latents_dim",
    "label_dim",
    "num_processing_layers",
    "num_blocks",
    "path_size",
    "num_cond_tokens",
)
# The official defaults of the renamed arguments that have one (they differ from ours for two flags).
OFFICIAL_DEFAULTS = {
    "read_write_heads": 16,
    "compute_heads": 16,
    "latent_mlp_multiplier": 4,
    "data_mlp_multiplier": 4,
    "time_scaling": 1000.0,
    "use_cond_rin_block": False,
    "concat_cond_token_to_latents": True,
    "num_text_registers": 16,
}
# Arguments the network we compute needs at exactly these values (the official defaults); the first four
# are written, as the paper's training configs hold them, the last two only read.
FIXED_ARGUMENTS = {
    "noise_embedding_type": "positional",
    "data_positional_embedding_type": "learned",
    "use_cond_token": True,
    "use_biases": True,
    "retrieve_attention_scores": False,
    "modulate_conditioning": False,
}
UNWRITTEN_ARGUMENTS = ("retrieve_attention_scores", "modulate_conditioning")
# Arguments that do not change the function: training-time regularisers (identities at inference),
# the initialisation, and which LayerNorm class computes in 16 bits under autocast. Any value is read;
# these are written.
INERT_ARGUMENTS = {
    "rw_dropout": 0.0,
    "compute_dropout": 0.0,
    "rw_stochastic_depth": 0.0,
    "compute_stochastic_depth": 0.0,
    "weight_init": "xavier_uniform",
    "bias_init": "zeros",
    "use_16_bits_layer_norm": False,
}
OFFICIAL_CLASSES = {"RINTextCond": False, "CADRINTextCond": True}  # class name → coherence


def official_to_config(kwargs: dict[str, Any]) -> CADConfig:
    """Our config for the official network built with `kwargs` (its `config.json`, or a training config's
    `model.network` node with its `_target_`). Without `_target_` the class is `pipe.py`'s `CAD`, i.e.
    `CADRINTextCond` (coherence). Arguments we cannot represent are refused, naming the key and value."""
    kwargs = dict(kwargs)
    target = kwargs.pop("_target_", "CADRINTextCond")
    class_name = str(target).rpartition(".")[2]
    if class_name not in OFFICIAL_CLASSES:
        raise ValueError(f"_target_: {target!r}; allowed: classes named {', '.join(OFFICIAL_CLASSES)}")
    missing = [key for key in REQUIRED_ARGUMENTS if key not in kwargs]
    if missing:
        raise ValueError(f"official CAD-I config lacks {', '.join(missing)}")
    types = {f.name: f.type for f in fields(CADConfig)}
    values: dict[str, Any] = {"coherence": OFFICIAL_CLASSES[class_name]}
    for key, value in {**OFFICIAL_DEFAULTS, **kwargs}.items():
        if key in RENAMED_ARGUMENTS:
            field = RENAMED_ARGUMENTS[key]
            values[field] = _typed(key, value, types[field])
        elif key in FIXED_ARGUMENTS:
            if value != FIXED_ARGUMENTS[key] or type(value) is not type(FIXED_ARGUMENTS[key]):
                raise ValueError(
                    f"official CAD-I config {key}={value!r} is not supported; only {FIXED_ARGUMENTS[key]!r}"
                )
        elif key not in INERT_ARGUMENTS:
            raise ValueError(f"official CAD-I config {key}={value!r}: unknown argument")
    if "modulate_conditioning" in kwargs and not values["coherence"]:
        raise ValueError(f"official CAD-I config modulate_conditioning: not an argument of {class_name}")
    try:
        return CADConfig(**values)
    except ValueError as exc:
        raise ValueError(f"official CAD-I config does not make a valid network: {exc}") from exc


def _typed(key: str, value: Any, kind: str) -> Any:
    """`value` as the CADConfig field type `kind` ("int", "float", "bool"), or a ValueError naming `key`."""
    if kind == "bool" and isinstance(value, bool):
        return value
    if (
        kind == "int"
        and not isinstance(value, bool)
        and isinstance(value, int | float)
        and value == int(value)
    ):
        return int(value)
    if kind == "float" and not isinstance(value, bool) and isinstance(value, int | float):
        return float(value)
    raise ValueError(f"official CAD-I config {key}={value!r}: expected {kind}")


def config_to_official(config: CADConfig) -> dict[str, Any]:
    """The official constructor's keyword arguments for `config`, the keys of the paper's training configs'
    `model.network` node (what `config.json` holds; no `_target_`: the class is `CADRINTextCond` when
    `config.coherence`, else `RINTextCond`)."""
    fields_to_arguments = {field: key for key, field in RENAMED_ARGUMENTS.items()}
    kwargs: dict[str, Any] = {key: getattr(config, field) for field, key in fields_to_arguments.items()}
    kwargs.update({k: v for k, v in FIXED_ARGUMENTS.items() if k not in UNWRITTEN_ARGUMENTS})
    kwargs.update(INERT_ARGUMENTS)
    return kwargs


# ------------------------------------------------------------------------------------------------ weights

# Our module path → theirs, first match wins; `{n}` are the matched layer indices.
MODULE_NAMES = [
    (r"blocks\.(\d+)\.cond_read", "rin_blocks.{0}.retrieve_cond"),
    (r"blocks\.(\d+)\.read", "rin_blocks.{0}.retriever_ca"),
    (r"blocks\.(\d+)\.process\.(\d+)", "rin_blocks.{0}.processer_sa.{1}"),
    (r"blocks\.(\d+)\.write", "rin_blocks.{0}.writer_ca"),
    (r"text_tower\.layers\.(\d+)", "transformers_blocks.{0}"),
    (r"text_tower\.proj", "map_text_tokens"),
    (r"text_tower\.registers", "text_registers"),
    (r"text_tower\.coherence_embedder\.mlp", "coherence_embedder.map_time"),
    (r"text_tower\.coherence_pos", "coherence_positional_embedding"),
    (r"time_embedder\.mlp", "time_embedder.map_time"),
    (r"self_cond\.norm_in", "linear_previous.0"),
    (r"self_cond\.mlp\.fc1", "linear_previous.1.0"),
    (r"self_cond\.mlp\.fc2", "linear_previous.1.3"),
    (r"self_cond\.norm_out", "ln_previous"),
    (r"patch_embed", "patch_extractor"),
    (r"data_norm", "data_ln"),
    (r"pos_embed", "data_pos_embedding"),
    (r"latents", "latents"),
    (r"out_norm", "map_tokens_to_patches.0"),
    (r"out_proj", "map_tokens_to_patches.1"),
]
# Inside a layer: ours → theirs, for cross-attention (`CrossAttentionBlock`) and self-attention layers.
CROSS_LAYER_NAMES = {
    "norm": "initial_to_ln",
    "attn.q": "ca.q",
    "attn.kv": "ca.kv",
    "attn.proj": "ca.out",
    "norm_mlp": "middle_ln",
    "mlp.fc1": "ffn.0",
    "mlp.fc2": "ffn.3",
}
SELF_LAYER_NAMES = {
    "norm": "initial_ln",
    "attn.qkv": "sa.qkv",
    "attn.proj": "sa.out",
    "norm_mlp": "middle_ln",
    "mlp.fc1": "ffn.0",
    "mlp.fc2": "ffn.3",
    "scale_attn": "layer_scale_1",
    "scale_mlp": "layer_scale_2",
}


def official_name(key: str) -> str:
    """The official state_dict key of our `key`."""
    for pattern, replacement in MODULE_NAMES:
        match = re.match(pattern + r"(?:\.|$)", key)
        if not match:
            continue
        prefix = replacement.format(*match.groups())
        rest = key[match.end() :]
        if not rest:
            return prefix
        layers = SELF_LAYER_NAMES if re.match(r"blocks\.\d+\.process|text_tower\.layers", key) else None
        if layers is None and re.match(r"blocks\.\d+\.(cond_read|read|write)\.", key):
            layers = CROSS_LAYER_NAMES
        if layers is None:
            return f"{prefix}.{rest}"
        for ours, theirs in layers.items():
            if rest == ours or rest.startswith(ours + "."):
                return f"{prefix}.{theirs}{rest[len(ours) :]}"
    raise KeyError(f"no official name for {key!r}")


def _skeleton(config: CADConfig) -> CAD:
    with torch.device("meta"):
        return CAD(config)


def official_names(config: CADConfig) -> dict[str, str]:
    """Our state_dict keys → the official ones, for the network `config` describes."""
    names = {key: official_name(key) for key in _skeleton(config).state_dict()}
    if len(set(names.values())) != len(names):
        raise AssertionError("two of our parameters map to one official name")
    return names


def official_constants(config: CADConfig) -> dict[str, Tensor]:
    """The official state's tensors that are not weights, as its constructor builds them: an all-True
    (1, 1) `attention_mask_dummy` per attention layer, the coherence model's all-True register masks, and
    the time (and coherence) sinusoid frequencies."""
    model = _skeleton(config)
    constants = {}
    for name, module in model.named_modules():
        if isinstance(module, CrossAttentionLayer | SelfAttentionLayer):
            layer = official_name(f"{name}.norm.weight").rsplit(".", 2)[0]
            constants[f"{layer}.attention_mask_dummy"] = torch.ones(1, 1, dtype=torch.bool)
    frequencies = sinusoid_frequencies(config.width // 4)
    constants["time_embedder.encode_time.freqs"] = frequencies
    if config.coherence:
        constants["coherence_embedder.encode_time.freqs"] = frequencies.clone()
        constants["registers_coherence_mask"] = torch.ones(config.num_registers + 1, dtype=torch.bool)
        constants["cond_mask"] = torch.ones(config.num_registers + 2, dtype=torch.bool)
    return constants


def state_to_official(state_dict: dict[str, Tensor], config: CADConfig) -> dict[str, Tensor]:
    """Our `state_dict` as the official network's (the same tensors, renamed, plus its constants)."""
    names = official_names(config)
    _check_keys(set(state_dict), set(names), "our CAD-I state")
    official = {names[key]: value for key, value in state_dict.items()}
    official.update(official_constants(config))
    return official


def state_from_official(state_dict: dict[str, Tensor], config: CADConfig) -> dict[str, Tensor]:
    """The official network's `state_dict` as ours (the same tensors, renamed). Its constants are checked
    (absent is fine: the official constructor builds them) and dropped; missing or unknown weights and
    shapes that do not fit `config` are refused, by name."""
    ours = {theirs: key for key, theirs in official_names(config).items()}
    constants = official_constants(config)
    for key, expected in constants.items():
        if key in state_dict and not torch.equal(state_dict[key].cpu(), expected.to(state_dict[key].dtype)):
            raise ValueError(f"official CAD-I weights: {key} differs from what the official network builds")
    _check_keys(set(state_dict) - set(constants), set(ours), "the official CAD-I weights")
    shapes = {key: tuple(value.shape) for key, value in _skeleton(config).state_dict().items()}
    wrong = [
        f"{theirs} {tuple(state_dict[theirs].shape)} (config wants {shapes[key]})"
        for theirs, key in ours.items()
        if tuple(state_dict[theirs].shape) != shapes[key]
    ]
    if wrong:
        raise ValueError(f"official CAD-I weights do not fit their config: {'; '.join(wrong[:5])}")
    return {key: state_dict[theirs] for theirs, key in ours.items()}


def _check_keys(present: set[str], expected: set[str], what: str) -> None:
    missing, unknown = sorted(expected - present), sorted(present - expected)
    if missing or unknown:
        raise ValueError(
            f"{what} do not match the network of its config: missing {missing[:8] or 'none'}"
            f"{' …' if len(missing) > 8 else ''}, unknown {unknown[:8] or 'none'}{' …' if len(unknown) > 8 else ''}"
        )


# ------------------------------------------------------------------------------------------------ folders


def read_official(folder: str | Path) -> tuple[CADConfig, dict[str, Tensor]]:
    """A released CAD-I folder (`config.json` and `model.safetensors`, else `pytorch_model.bin`) as our
    config and state_dict."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} holds no {CONFIG_FILE}: not a released CAD-I folder")
    config = official_to_config(json.loads(config_path.read_text()))
    if (folder / SAFETENSORS_FILE).is_file():
        state = load_file(folder / SAFETENSORS_FILE)
    elif (folder / PICKLE_FILE).is_file():
        state = torch.load(folder / PICKLE_FILE, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} holds neither {SAFETENSORS_FILE} nor {PICKLE_FILE}")
    return config, state_from_official(state, config)


def write_official(folder: str | Path, config: CADConfig, state_dict: dict[str, Tensor]) -> None:
    """Our CAD-I as a folder `CAD.from_pretrained(folder)` of the paper's `pipe.py` loads (`config.json`,
    `model.safetensors`). Written to a temporary sibling, then renamed into place; an existing folder is
    replaced as a whole. Only coherence models have that format: `pipe.py`'s `CAD` is `CADRINTextCond`."""
    from safetensors.torch import save_file

    from t2i.data.store import atomic_path

    if not config.coherence:
        raise ValueError(
            "the paper's format holds a coherence model (pipe.py's CAD is CADRINTextCond); this CAD-I has "
            "coherence=False (RINTextCond, the paper's training configs), which that class cannot load"
        )
    folder = Path(folder)
    official = state_to_official(state_dict, config)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in official.items()}
    previous = None
    try:
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            save_file(tensors, tmp / SAFETENSORS_FILE, metadata={"format": "pt"})
            (tmp / CONFIG_FILE).write_text(json.dumps(config_to_official(config), sort_keys=True, indent=2))
            if folder.exists():  # moved aside so the new folder can take its name in one rename
                previous = tmp.with_name(tmp.name + "-previous")
                os.replace(folder, previous)
    except BaseException:
        if previous is not None and not folder.exists():
            os.replace(previous, folder)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def paper_unconditional_prompts(n: int, seed: int) -> list[str]:
    """`n` unconditional prompts as the paper's sampler draws them (`pipe.py`'s `generate_negative_prompts`:
    3–6 words of 3–7 random lowercase letters), from a generator seeded with `seed`: the same prompts as
    theirs after `random.seed(seed)`."""
    rng = random.Random(seed)

    def prompt() -> str:
        words = []
        for _ in range(rng.randint(3, 6)):
            words.append("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7))))
        return " ".join(words)

    return [prompt() for _ in range(n)]
