"""Typed configuration: one pydantic model per stage, composed into `PipelineConfig`, plus YAML presets.

Field descriptions, bounds and `Literal` choices are the documentation: the Prefect UI renders them as a
form and the CLI validates with them, so a bad value fails before any work with the field's name. Defaults
are the paper's recipe (`imagenet256`); the `tiny` preset overrides them for a laptop CPU.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from t2i.models.captioners import CLASS_TEMPLATE

PRESETS_PACKAGE = "t2i.flows.presets"
DEFAULT_WORKSPACE = "workspace"
SOURCE_KINDS = (
    "synthetic:shapes",
    "folder:<path>",
    "hf:<dataset id or saved path>",
    "wds:<.tar file, folder of .tar files or brace-glob like /data/train-{0000..0146}.tar>",
)


class ConfigError(ValueError):
    """A configuration problem found before any work starts; the message names the field."""


class StageConfig(BaseModel):
    """Base for stage configs: unknown fields are errors, and runtime-only fields stay out of fingerprints."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    runtime_fields: ClassVar[frozenset[str]] = frozenset()
    # Fields added after outputs of the stage existed: left out of the fingerprint while at their default
    # (which reproduces the older behaviour), so upgrading never orphans finished or resumable outputs.
    later_fields: ClassVar[frozenset[str]] = frozenset()

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that change the stage's output (not worker counts, devices or batch sizes)."""
        fields = self.model_dump(mode="json", exclude=set(self.runtime_fields))
        for name in self.later_fields:
            if getattr(self, name) == type(self).model_fields[name].default:
                del fields[name]
        return fields


def parse_part(part: str) -> tuple[int, int]:
    """'k/n' → (k, n), with 1 <= k <= n."""
    k, n = (int(x) for x in part.split("/"))
    if not 1 <= k <= n:
        raise ValueError(f"part must be k/n with 1 <= k <= n, got {part!r}")
    return k, n


def _valid_part(part: str) -> str:
    parse_part(part)
    return part


# 'k/n': the k-th of n interleaved shard sets of a sharded stage (recaption, latents), with 1 <= k <= n.
ShardPart = Annotated[str, Field(pattern=r"^\d+/\d+$"), AfterValidator(_valid_part)]


class ClusterConfig(StageConfig):
    """How a stage's work spreads: over a pool's workers (`t2i deploy`, `t2i worker`), and over the nodes and
    runs that share one workspace (every shard is claimed before it is computed, so each is computed once)."""

    parts: int = Field(
        1,
        ge=1,
        le=1024,
        description="Child runs each sharded GPU stage (recaption, latents) starts when run from a deployment, "
        "one per part k/n of the shards, each picked up by a free worker; 1: the run does every shard itself. "
        "Needs `deployment` (set by `t2i deploy`); on the command line, split with --part k/n instead.",
    )
    deployment: str | None = Field(
        None,
        description="Deployment name the parts are started from (set by `t2i deploy`); empty: no fan-out, "
        "every stage runs in-process.",
    )
    claim_timeout: float = Field(
        300.0,
        ge=5.0,
        description="Seconds after which a shard claimed by another machine that stopped refreshing its claim "
        "(a dead node) is taken over. A dead process's claims on this machine are taken over at once. Keep it "
        "well above NFS attribute caching (60 s) and clock skew between nodes.",
    )

    @model_validator(mode="after")
    def _parts_need_a_deployment(self) -> ClusterConfig:
        if self.parts > 1 and not self.deployment:
            raise ValueError(
                f"parts={self.parts} starts child runs of a deployment, and cluster.deployment is not set: "
                "deploy with `t2i deploy --set cluster.parts=N` and start runs there, or split a command-line "
                "run with --part k/n (or run the same command on several machines: they share the shards)"
            )
        return self


class DownloadConfig(StageConfig):
    source: str = Field(
        "folder:/data/imagenet/train",
        description="Where images come from: 'synthetic:shapes' (the embedded default), 'folder:<path>' "
        "(ImageNet class/*.JPEG layout or a flat image folder), 'hf:<dataset id or save_to_disk path>' or "
        "'wds:<.tar, folder of .tar or brace-glob>' (WebDataset shards, e.g. 'wds:/data/in1k/train-{0000..1023}.tar').",
    )
    wds_class: str = Field(
        "cls",
        pattern=r"^(cls|json:[A-Za-z_][\w.]*)$",
        description="wds: sources: where a sample's class comes from: 'cls' (its .cls member: a class index "
        "or name) or 'json:<field>' (a field of its .json member, dots for nested fields).",
    )
    split: str = Field("train", description="Dataset split (hf: and synthetic: sources).")
    max_images: int | None = Field(None, ge=1, description="Keep at most this many images (None: all).")
    shard_size: int = Field(2000, ge=1, le=100_000, description="Images per Parquet shard.")
    max_side: int | None = Field(
        512, ge=16, description="Longer side of stored images; larger ones are downscaled (None: keep)."
    )
    min_side: int = Field(8, ge=1, description="Images with a shorter side are rejected.")
    max_pixels: int = Field(
        89_478_485, ge=1, description="Images declaring more pixels are rejected as decompression bombs."
    )
    seed: int = Field(
        0,
        description="Seed of the synthetic generator; for folder and hf sources, of the shuffle that spreads "
        "the listing over the shards (every shard mixes classes) and samples max_images.",
    )
    hf_revision: str | None = Field(None, description="Dataset revision for hf: sources.")
    workers: int = Field(4, ge=1, le=256, description="Shards computed at once (threads).")

    runtime_fields: ClassVar[frozenset[str]] = frozenset({"workers"})

    def fingerprint_fields(self) -> dict[str, Any]:
        """A folder's or dataset's content enters the fingerprint through its listing's digest (the plan adds
        it), never through its path: the same data mounted elsewhere maps to the same artifacts."""
        fields = super().fingerprint_fields()
        if not self.source.startswith("synthetic:"):
            for name in ("source", "split", "hf_revision"):  # in the listing's identity where they matter
                del fields[name]
        if not self.source.startswith("wds:"):
            del fields["wds_class"]
        return fields

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        kind, _, rest = v.partition(":")
        if v == "synthetic:shapes" or (kind in ("folder", "hf", "wds") and rest):
            return v
        raise ValueError(f"unknown source {v!r}; allowed: {', '.join(SOURCE_KINDS)}")

    @model_validator(mode="after")
    def _synthetic_needs_size(self) -> DownloadConfig:
        if self.source.startswith("synthetic:") and self.max_images is None:
            raise ValueError("max_images is required for synthetic sources (they are unbounded)")
        return self


class RecaptionConfig(StageConfig):
    backend: Literal["vllm", "transformers", "template", "import"] = Field(
        "vllm",
        description="vllm: batched offline inference; transformers: generate(); template: class names; "
        "import: bring your own captions from `captions_source`.",
    )
    model: str = Field(
        "llava-hf/llama3-llava-next-8b-hf",
        description="VLM: a Hub id, a local path, or 'tiny:llava' (built locally, for CPU runs).",
    )
    revision: str | None = Field(None, description="Model revision (Hub), recorded in the manifest.")
    prompt: str = Field(
        "Describe this image", description="User turn sent with the image (column `caption`)."
    )
    extra_prompts: dict[str, str] = Field(
        default_factory=dict,
        description="More prompts per image, each its own column `caption_<name>`, e.g. {short: 'Describe this "
        "image in one sentence'}; all go through the engine in the same pass.",
    )
    template: str = Field(
        CLASS_TEMPLATE, description="Caption of the template backend; {class_name} is filled in."
    )
    max_new_tokens: int = Field(200, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy (the paper).")
    image_max_side: int | None = Field(
        1024,
        ge=16,
        description="Images are downscaled so their longer side is at most this before captioning.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("bfloat16")
    max_model_len: int = Field(4096, ge=64, description="vLLM context length (prompt + image + caption).")
    seed: int = Field(0)
    captions_source: str | None = Field(
        None,
        description="import backend: a .parquet/.csv/.tsv/.jsonl file or 'hf:<dataset>' of key → caption; keys "
        "match image keys exactly, by file name, or by file name without extension.",
    )
    key_column: str | None = Field(None, description="import backend: key column (default: detected).")
    caption_column: str | None = Field(
        None, description="import backend: caption column (default: detected)."
    )
    # runtime: how the work is spread, never what it produces
    max_num_seqs: int | None = Field(
        None,
        ge=1,
        description="vLLM: sequences decoded concurrently. None: vLLM's own offline default (1024 on an H100/H200, "
        "256 on smaller GPUs and on CPU), which the KV cache then limits; set it only to cap memory.",
    )
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="vLLM: share of GPU memory.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs per engine.")
    limit_mm_per_prompt: int = Field(1, ge=1, description="vLLM: images per prompt.")
    batch_size: int = Field(16, ge=1, description="transformers backend: images per generate() call.")
    gpus: int | None = Field(
        None,
        ge=1,
        description="GPUs to use (default: all visible); one engine per tensor_parallel_size GPUs.",
    )
    workers: int | None = Field(
        None, ge=1, description="Engine processes (default: one per GPU group; 1 on CPU)."
    )
    part: ShardPart = Field(
        "1/1",
        description="k/n: this run captions the k-th of n interleaved shard sets "
        "(split across machines, SLURM arrays, several Prefect workers).",
    )
    device: str = Field("auto", description="transformers backend: 'auto', 'cpu', 'cuda', ...")

    runtime_fields: ClassVar[frozenset[str]] = frozenset(
        {
            "max_num_seqs",
            "gpu_memory_utilization",
            "tensor_parallel_size",
            "limit_mm_per_prompt",
            "batch_size",
            "gpus",
            "workers",
            "part",
            "device",
        }
    )

    def fingerprint_fields(self) -> dict[str, Any]:
        if self.backend == "template":  # the model settings do not touch template captions
            return {
                "backend": "template",
                "template": self.template,
                "extra_prompts": sorted(self.extra_prompts),
            }
        if self.backend == "import":
            keep = ("backend", "captions_source", "key_column", "caption_column")
            return {k: getattr(self, k) for k in keep}
        return super().fingerprint_fields()

    @property
    def part_index(self) -> tuple[int, int]:
        return parse_part(self.part)

    @field_validator("template")
    @classmethod
    def _has_placeholder(cls, v: str) -> str:
        if "{class_name}" not in v:
            raise ValueError("template must contain '{class_name}'")
        return v

    @field_validator("extra_prompts")
    @classmethod
    def _column_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
                raise ValueError(f"extra prompt name {name!r} must be lowercase letters, digits, underscores")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RecaptionConfig:
        if self.backend == "import" and not self.captions_source:
            raise ValueError("the import backend needs captions_source (a caption file or hf:<dataset>)")
        return self


class CutmixConfig(StageConfig):
    enabled: bool = Field(
        True, description="Make CutMix composites (recaptioned and encoded like any image)."
    )
    multiplier: int = Field(1, ge=1, le=16, description="Composites per base image.")
    layout_weights: dict[str, float] | None = Field(
        None,
        description="Relative weights of the layouts half, quarter, ninth, sixteenth (default: uniform).",
    )
    resolution: int = Field(256, ge=16, le=4096, description="Side of the square composites.")
    partner_shards: int = Field(4, ge=1, description="Other shards a shard draws its pasted images from.")
    seed: int = Field(0)
    workers: int = Field(2, ge=1, le=256, description="Shards computed at once (threads).")

    runtime_fields: ClassVar[frozenset[str]] = frozenset({"workers"})

    @field_validator("layout_weights")
    @classmethod
    def _known_layouts(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        allowed = ("half", "quarter", "ninth", "sixteenth")
        for name, weight in v.items():
            if name not in allowed:
                raise ValueError(f"unknown layout {name!r}; allowed: {', '.join(allowed)}")
            if weight < 0:
                raise ValueError(f"layout weight of {name!r} must be >= 0")
        if not sum(v.values()) > 0:
            raise ValueError("layout weights must not all be 0")
        return v


class LatentsConfig(StageConfig):
    vae: str = Field(
        "stabilityai/sd-vae-ft-ema", description="diffusers AutoencoderKL: Hub id, local path or 'tiny:vae'."
    )
    revision: str | None = Field(None)
    resolution: int = Field(256, gt=0, le=4096, description="Center crop + resize to this square size.")
    batch_size: int = Field(32, ge=1, description="Images per VAE forward.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="VAE compute precision.")
    device: str = Field(
        "auto", description="'auto' (every visible GPU, one VAE each; else the CPU), 'cpu', 'cuda:1', ..."
    )
    gpus: int | None = Field(None, ge=1, description="GPUs to use with device 'auto' (default: all visible).")
    workers: int | None = Field(
        None, ge=1, description="VAE processes (default: one per GPU; 1 on CPU, in the flow's process)."
    )

    part: ShardPart = Field(
        "1/1",
        description="k/n: this run encodes the k-th of n interleaved shard sets (several machines or Prefect workers).",
    )

    runtime_fields: ClassVar[frozenset[str]] = frozenset({"batch_size", "device", "gpus", "workers", "part"})

    @property
    def part_index(self) -> tuple[int, int]:
        return parse_part(self.part)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"resolution must be a multiple of 8 (VAE downsampling), got {v}")
        return v


class TextConfig(StageConfig):
    encoder: str = Field(
        "google/flan-t5-xl", description="T5 encoder: Hub id, local path or 'tiny:t5' (built locally)."
    )
    revision: str | None = Field(None)
    max_length: int = Field(256, ge=1, le=4096, description="Text tokens kept (with a padding mask).")
    mode: Literal["online", "precomputed"] = Field(
        "online",
        description="online: the frozen encoder runs in the training process on every batch; precomputed: the "
        "latents stage stores every caption's unpadded embedding once (tokens × d_model in `dtype`: for "
        "flan-t5-xl in bfloat16 ~4 kB a token, ~0.8 MB for a 200-token caption), memory-mapped when training; "
        "the train table keeps a second copy. `t2i config` and `t2i status` print the disk it takes.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Encoder precision; embeddings are rounded to it in both modes."
    )
    batch_size: int = Field(64, ge=1, description="Captions per encoder forward when precomputing.")
    device: str = Field("auto", description="Where the latents stage runs the encoder when precomputing.")

    runtime_fields: ClassVar[frozenset[str]] = frozenset({"batch_size", "device"})


class TrainConfig(StageConfig):
    model: Literal["dit", "cad"] = Field("dit", description="Denoiser: DiT-I, or CAD-I (RIN-style).")
    objective: Literal["epsilon", "rectified_flow"] = Field(
        "epsilon", description="epsilon: the paper's ε-prediction, γ(t) = 1 − t; rectified_flow: SD3-style."
    )
    size: Literal["tiny", "base", "L"] = Field("L", description="Denoiser size preset.")
    patch_size: int | None = Field(
        None,
        ge=1,
        description="Side of the latent patch each token covers (None: the size's own, 2). Tokens, and so "
        "compute, fall with its square: 4 trains a 16×16 latent grid ~2× faster per sample than 2.",
    )
    steps: int = Field(500_000, ge=1)
    batch_size: int = Field(1024, ge=1, description="Global batch size.")
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = Field((0.9, 0.999))
    weight_decay: float = Field(0.01, ge=0)
    optimizer: Literal["lamb", "adamw"] = Field("lamb")
    warmup_steps: int = Field(5000, ge=0)
    final_lr_ratio: float = Field(0.21, ge=0, le=1, description="Cosine decay ends at lr × this.")
    grad_clip: float = Field(2.0, gt=0)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    cfg_dropout: float = Field(0.1, ge=0, le=1, description="Share of samples trained with the empty text.")
    cutmix_threshold: float = Field(
        0.4, ge=0, le=1, description="Composites replace samples only above this t."
    )
    cutmix_p: float = Field(0.5, ge=0, le=1, description="Probability of the swap above the threshold.")
    latent_crop: int | None = Field(None, ge=1, description="Random crops of the latent grid to this size.")
    self_condition: float = Field(0.9, ge=0, le=1, description="CAD-I: self-conditioning rate (RIN).")
    scale_factor: float | Literal["auto"] = Field(
        0.18215,
        description="Latent scale (0.18215 for the SD VAE): the model sees (z − shift_factor) × scale_factor. "
        "'auto': per-channel shift and scale from the mean/std the latents stage measured (unit variance).",
    )
    shift_factor: float = Field(0.0, description="Latent shift (0 for the SD VAE; e.g. 0.0609 for SD3's).")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("bf16")
    checkpoint_every: int = Field(5000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(
        100,
        ge=1,
        description="Log loss, lr, grad norm, samples/s (to the log and train.trackers) every N steps.",
    )
    sample_every: int = Field(5000, ge=1, description="Sample a grid with the EMA weights every N steps.")
    sample_prompts: int = Field(8, ge=0, description="Training captions sampled in each grid (0: no grids).")
    seed: int = Field(0)
    grad_accumulation: int = Field(1, ge=1, description="Micro-batches per step (global batch is unchanged).")
    text_buckets: int = Field(
        4,
        ge=1,
        le=64,
        description="Text lengths a batch is padded to: this many even steps up to text.max_length (4 and 256: "
        "64, 128, 192, 256), so a compiled denoiser sees a few shapes; 1 pads every batch to max_length.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the denoiser (inductor, static shapes): one compile per text-length bucket at "
        "the start (minutes on a GPU), then faster steps.",
    )
    gradient_compression: Literal["auto", "bf16", "none"] = Field(
        "auto",
        description="Gradients all-reduced in bf16 (half the bytes) or float32; auto: bf16 when "
        "mixed_precision is bf16. Multi-GPU runs only (torch compresses on NCCL; CPU runs reduce float32).",
    )
    loader_workers: int = Field(
        4,
        ge=0,
        le=64,
        description="Processes per rank that assemble batches from the memory-mapped tables ahead of the "
        "step (0: in the training process).",
    )
    processes: int | None = Field(
        None,
        ge=1,
        description="Training processes on this machine (DDP; default: one per visible GPU, 1 on CPU).",
    )
    nodes: int = Field(
        1, ge=1, description="Machines in the job; each runs the train stage with its node_rank."
    )
    node_rank: int = Field(0, ge=0, description="This machine's rank among `nodes` (0 writes the manifest).")
    master_addr: str = Field("127.0.0.1", description="Address of node 0 (multi-node jobs).")
    master_port: int = Field(
        29500, ge=1, le=65535, description="Rendezvous port on node 0 (multi-node jobs)."
    )
    max_restarts: int = Field(
        3,
        ge=0,
        le=100,
        description="Times torchrun restarts a job whose rank or node failed, each time from the newest good "
        "checkpoint (multi-process jobs).",
    )
    rendezvous_timeout: int = Field(
        1800, ge=60, description="Seconds the nodes of a job wait for each other to start (multi-node jobs)."
    )
    collective_timeout: int = Field(
        300,
        ge=30,
        description="Seconds a rank waits in a collective for a lost rank before the job fails and restarts.",
    )
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda'.")
    init_from: str | None = Field(
        None,
        description="Fine-tune: start from the final weights (EMA too) of another train run, given by its "
        "folder (e.g. one `t2i import-model` wrote from the paper's released CAD-I); that run's fingerprint, "
        "not its path, enters this run's. train.model and text.encoder must match it; its model config (size, "
        "patch size, widths) is taken as it is, whatever train.size says. None: random initialisation.",
    )
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "aim", "trackio"]] = Field(
        ["tensorboard"],
        description="Experiment trackers (through accelerate) that receive the logged scalars and sample "
        "grids: tensorboard (in the run folder), wandb, mlflow, aim, trackio (extras: `pip install "
        "'t2i-imagenet[wandb]'`, [mlflow], [aim], [trackio]). Credentials and servers come from their own environment variables "
        "(WANDB_API_KEY, WANDB_MODE, MLFLOW_TRACKING_URI, ...); [] logs to none.",
    )
    tracker_project: str = Field(
        "t2i-imagenet",
        min_length=1,
        description="Project (wandb, trackio, aim) or experiment (mlflow) the run is logged under; the run is "
        "named after its artifact folder.",
    )

    later_fields: ClassVar[frozenset[str]] = frozenset({"patch_size"})
    runtime_fields: ClassVar[frozenset[str]] = frozenset(
        {
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "sample_every",
            "sample_prompts",
            "device",
            "grad_accumulation",
            "loader_workers",
            "text_buckets",
            "compile",
            "gradient_compression",
            "processes",
            "nodes",
            "node_rank",
            "master_addr",
            "master_port",
            "max_restarts",
            "rendezvous_timeout",
            "collective_timeout",
            "trackers",
            "tracker_project",
        }
    )

    def fingerprint_fields(self) -> dict[str, Any]:
        """`init_from` enters as an input of the train artifact (the initial run's fingerprint, see
        `Plan.checkpoints`), never as a path: the same run mounted elsewhere gives the same artifact."""
        fields = super().fingerprint_fields()
        del fields["init_from"]
        return fields

    @field_validator("trackers")
    @classmethod
    def _trackers_once(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"trackers listed twice: {v}")
        return v

    @model_validator(mode="after")
    def _node_rank_in_range(self) -> TrainConfig:
        if self.node_rank >= self.nodes:
            raise ValueError(f"node_rank must be below nodes ({self.nodes}), got {self.node_rank}")
        return self

    @model_validator(mode="after")
    def _crop_fits_patches(self) -> TrainConfig:
        if self.latent_crop and self.patch_size and self.latent_crop % self.patch_size:
            raise ValueError(
                f"latent_crop ({self.latent_crop}) must be a multiple of patch_size ({self.patch_size})"
            )
        return self


class EvaluateConfig(StageConfig):
    prompts: str = Field(
        "shapes:val",
        description="Prompt set: 'shapes:<split>' (shapes world captions, scored from pixels), "
        "'shapes-class:<split>' (its class names in the template captioner's words), 'heldout:<recaption "
        "artifact folder>' (captions of held-out images, which are the FID reference), 'file:<path>' (one prompt "
        "per line), 'geneval:<evaluation_metadata.jsonl>' or 'dpg:<prompts folder>' (written in the layouts "
        "the official scorers read).",
    )
    num_prompts: int = Field(64, ge=1, description="Prompts taken from the set.")
    images_per_prompt: int = Field(1, ge=1, le=64)
    sampler: Literal["auto", "ddim", "ddpm", "euler"] = Field(
        "auto", description="auto: DDIM for the ε objective, Euler for rectified flow."
    )
    steps: int = Field(50, ge=1, le=2000)
    guidance_scale: float = Field(
        4.0,
        ge=0,
        description="Classifier-free guidance w: uncond + w·(cond − uncond); 1: none. The paper's sampler "
        "writes cond·(1 + cfg) − uncond·cfg with cfg 15, which is w = 16 here.",
    )
    clamp_x0: float | None = Field(
        None,
        gt=0,
        description="ddim/ddpm: clamp the predicted clean latent to ±this at every step (the paper's "
        "sampler: 1.2, on SD-VAE latents × 0.18215); None: no clamp.",
    )
    unconditional: Literal["empty", "random_words"] = Field(
        "empty",
        description="The guidance's unconditional text: 'empty' (what training drops captions to) or "
        "'random_words' (3-6 random lowercase words per image, the paper's sampler), seeded by `seed`.",
    )
    gamma_min: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="ε objective: the signal level γ = 1 − t of the first sampling step (None: γ = 1e-3, "
        "t = 0.999; the paper's sampler: 1e-9, from pure noise).",
    )
    unguided_steps: int = Field(
        0,
        ge=0,
        description="First sampling steps taken without guidance (the paper's sampler: 1, it guides from its "
        "second step).",
    )
    batch_size: int = Field(16, ge=1)
    seed: int = Field(0)
    use_ema: bool = Field(True, description="Sample with the EMA weights.")
    run: str | None = Field(
        None,
        description="The train run evaluate, generate and export-model sample from, instead of the one this "
        "config trains: its folder (`<workspace>/train/<fingerprint>`) or fingerprint, e.g. the run `t2i "
        "import-model` wrote from the paper's released CAD-I. None: this config's own train output.",
    )
    checkpoints: list[str] = Field(
        ["final"],
        min_length=1,
        description="Checkpoints to evaluate: 'final', kept 'step-NNNNNNNN' names, or 'all'; the first is the "
        "headline, several give a comparison table.",
    )
    feature_extractor: Literal["inception", "small", "none"] = Field(
        "inception",
        description="FID/KID/IS/precision-recall features (when the prompt set has real images: shapes, "
        "heldout): 'inception' (TF-FID weights from inception_weights), 'small' (a fixed random conv net: "
        "compares runs of this pipeline only), 'none'.",
    )
    inception_weights: str = Field(
        "~/.cache/t2i/weights-inception-2015-12-05-6726825d.pth",
        description="Local file of torch-fidelity's InceptionV3 (TF-FID) weights; never downloaded at "
        "evaluation time (see the README for the one-time download).",
    )
    clip_model: str | None = Field(
        None,
        description="CLIP for CLIPScore (Hub id or local path, e.g. openai/clip-vit-large-patch14); None: skip.",
    )
    device: str = Field("auto")

    # `run` enters the evaluation as its input (that run's fingerprint, `Plan.sampled`), not as a path.
    runtime_fields: ClassVar[frozenset[str]] = frozenset({"batch_size", "device", "inception_weights", "run"})
    later_fields: ClassVar[frozenset[str]] = frozenset(
        {"clamp_x0", "unconditional", "gamma_min", "unguided_steps"}
    )

    @field_validator("prompts")
    @classmethod
    def _known_prompts(cls, v: str) -> str:
        kind, _, rest = v.partition(":")
        if kind in ("shapes", "shapes-class", "heldout", "file", "geneval", "dpg") and rest:
            return v
        raise ValueError(
            f"unknown prompt set {v!r}; allowed: 'shapes:<split>', 'shapes-class:<split>', "
            "'heldout:<recaption artifact folder>', 'file:<path>', "
            "'geneval:<evaluation_metadata.jsonl>', 'dpg:<prompts folder>'"
        )


class PipelineConfig(BaseModel):
    """The whole pipeline; every stage command reads the same object, so inputs are found, not passed."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: str = Field("custom", description="Name of the preset this config came from (informational).")
    workspace: str = Field(DEFAULT_WORKSPACE, description="Root folder of all artifacts.")
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    cutmix: CutmixConfig = Field(default_factory=CutmixConfig)
    recaption: RecaptionConfig = Field(default_factory=RecaptionConfig)
    latents: LatentsConfig = Field(default_factory=LatentsConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @property
    def workspace_path(self) -> Path:
        return Path(self.workspace).expanduser().resolve()


# --- presets and overrides --------------------------------------------------------------------------------


def available_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(PRESETS_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def preset_dict(name: str) -> dict[str, Any]:
    presets = available_presets()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(presets)}")
    data = yaml.safe_load(resources.files(PRESETS_PACKAGE).joinpath(f"{name}.yaml").read_text()) or {}
    data["preset"] = name
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """'section.field=value' → (['section', 'field'], value); the value is read as YAML (numbers, null, lists)."""
    key, sep, raw = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key.strip()):
        raise ConfigError(f"bad --set {item!r}: expected section.field=value, e.g. latents.resolution=256")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"bad --set {item!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def with_overrides(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """A validated copy of `cfg` with `--set`-style overrides applied."""
    try:
        return PipelineConfig.model_validate(apply_overrides(cfg.model_dump(mode="json"), overrides))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            section = _section_model(e["loc"][:-1])
            allowed = ", ".join(sorted(section.model_fields)) if section else ""
            msg = f"unknown field; allowed fields: {allowed}"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {loc or '(config)'}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if (
            field is None
            or not isinstance(field.annotation, type)
            or not issubclass(field.annotation, BaseModel)
        ):
            return None
        model = field.annotation
    return model


def load_config(
    preset: str = "tiny", overrides: list[str] | None = None, workspace: str | None = None
) -> PipelineConfig:
    """Preset + `--set` overrides + workspace (argument, then $T2I_WORKSPACE, then ./workspace), validated."""
    data = apply_overrides(preset_dict(preset), list(overrides or []))
    ws = workspace or os.environ.get("T2I_WORKSPACE") or data.get("workspace") or DEFAULT_WORKSPACE
    data["workspace"] = str(Path(ws).expanduser().resolve())  # absolute: deployments run elsewhere
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
