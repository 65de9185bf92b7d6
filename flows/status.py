"""`t2i status`: what exists on disk for a config, stage by stage (no Prefect needed)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from t2i.data.claims import ShardClaims, shard_claim
from t2i.data.listing import SUMMARY, is_listed, spec_dir
from t2i.data.store import Artifact, checkpoint_dirs
from t2i.flows.config import PipelineConfig
from t2i.flows.plan import Plan


@dataclass(frozen=True)
class StageStatus:
    stage: str
    state: str  # "complete" | "partial" | "not started"
    detail: str
    path: str


def stage_statuses(cfg: PipelineConfig) -> list[StageStatus]:
    plan = Plan(cfg)
    out = []
    for label, stage, art in plan.artifacts():
        if art.is_complete():
            m = art.read_manifest()
            detail = (
                f"{m['rows']} rows, {m['rejects']} rejects" if "rows" in m else f"{m.get('seconds', 0):.0f}s"
            )
            if stage == "train":
                detail = f"{m.get('step')} steps"
            out.append(StageStatus(label, "complete", detail, str(art.root)))
        elif stage in ("download", "cutmix", "recaption", "latents"):
            n = plan.num_shards
            done = art.done_shards(n) if art.root.is_dir() else []
            busy = in_progress(art, [i for i in range(n) if i not in done])
            state = "partial" if done or busy else "not started"
            out.append(StageStatus(label, state, f"{len(done)} of {n} shards{busy}", str(art.root)))
        elif stage == "train":
            ckpts = checkpoint_dirs(art.root)
            last = int(ckpts[-1].name.split("-")[1]) if ckpts else 0
            detail = f"{last} of {cfg.train.steps} steps"
            out.append(StageStatus(label, "partial" if ckpts else "not started", detail, str(art.root)))
        else:
            out.append(
                StageStatus(label, "partial" if art.root.is_dir() else "not started", "", str(art.root))
            )
    return out


def in_progress(art: Artifact, missing: list[int]) -> str:
    """', k in progress (host:pid, ...)' for the missing shards that live processes have claimed."""
    claims = ShardClaims(art.root)
    holders = [c.who() for i in missing if (c := claims.live_holder(shard_claim(i))) is not None]
    if not holders:
        return ""
    who = sorted(set(holders))
    return f", {len(holders)} in progress ({', '.join(who[:3])}{', …' if len(who) > 3 else ''})"


def format_statuses(statuses: list[StageStatus]) -> str:
    width = max(len(s.stage) for s in statuses)
    lines = []
    for s in statuses:
        detail = f" ({s.detail})" if s.detail else ""
        lines.append(f"{s.stage:<{width}}  {s.state + detail:<32}  {s.path}")
    return "\n".join(lines)


# --- precomputed text: the disk it takes, known before any work starts ------------------------------------
#
# The one home of the estimate (`t2i config`, `t2i status` and tests/benchmarks/bench_text_modes.py call it). It
# lives here rather than in `t2i.tasks.text` because `t2i status` must import neither torch nor Prefect.

BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
OFFSET_BYTES = 8  # the train table's text-offsets.npy: one int64 per caption
T5_D_MODEL = {  # published configs; any other encoder's d_model is read from its config.json, never guessed
    f"google/{family}-{size}": dim
    for family in ("flan-t5", "t5-v1_1")
    for size, dim in (("small", 512), ("base", 768), ("large", 1024), ("xl", 2048), ("xxl", 4096))
}
MEASURE_SHARDS = 32  # shards whose `tokens` column a measured mean reads (spread over the artifact)


def text_disk_bytes(captions: float, mean_tokens: float, dim: int, dtype: str) -> float:
    """Bytes of precomputed text: every caption's unpadded T5 last hidden state (mean_tokens × dim elements
    of `dtype`) plus its int64 offset. Raw bytes: the text artifact's zstd Parquet can be somewhat smaller, and
    the train table's text.npy is a second copy of the same size."""
    return captions * (mean_tokens * dim * BYTES_PER_ELEMENT[dtype] + OFFSET_BYTES) + OFFSET_BYTES


def encoder_dim(encoder: str) -> tuple[int | None, str]:
    """(d_model of the T5 encoder, where it was read), or (None, why not) when it cannot be known without
    the model: published Hub ids, the tiny builder, a local folder's or the Hub cache's config.json."""
    if encoder in T5_D_MODEL:
        return T5_D_MODEL[encoder], f"d_model of {encoder}"
    from t2i.models.tiny import TINY_T5_D_MODEL

    if encoder == "tiny:t5":
        return TINY_T5_D_MODEL, f"d_model of {encoder}"
    for path in (Path(encoder).expanduser() / "config.json", *_hub_cached_configs(encoder)):
        try:
            dim = json.loads(path.read_text()).get("d_model")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(dim, int):
            return dim, f"d_model from {path}"
    return None, f"d_model of {encoder} unknown (no config.json here or in the Hugging Face cache)"


def _hub_cached_configs(repo: str) -> list[Path]:
    if repo.count("/") != 1 or Path(repo).exists():
        return []
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not hub:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
        )
        hub = os.path.join(home, "hub")
    return sorted(
        (Path(hub).expanduser() / f"models--{repo.replace('/', '--')}" / "snapshots").glob("*/config.json")
    )


def _tokens(arts: list[Artifact]) -> np.ndarray | None:
    """The `tokens` column of up to MEASURE_SHARDS visible shards spread over `arts` (nulls dropped)."""
    paths = sorted(p for art in arts if art.root.is_dir() for p in art.root.glob("part-*.parquet"))
    if not paths:
        return None
    picked = [
        paths[i * len(paths) // min(len(paths), MEASURE_SHARDS)]
        for i in range(min(len(paths), MEASURE_SHARDS))
    ]
    values = [pq.read_table(p, columns=["tokens"])["tokens"].drop_null().to_numpy() for p in picked]
    values = np.concatenate(values) if values else np.zeros(0)
    return values if len(values) else None


def _count(n: float) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n:,.0f}"


def _size(b: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.2g} {unit}" if b < 10 * scale else f"{b / scale:.0f} {unit}"
    return f"{b:.0f} bytes"


@dataclass(frozen=True)
class TextDisk:
    """What precomputed text takes for a config, and where each factor came from."""

    mode: str
    captions: int | None  # images + composites; None while the source is not listed
    count_from: str
    mean_tokens: float
    tokens_from: str
    dim: int | None
    dim_from: str
    dtype: str
    stored: int = 0  # bytes of text shards already on disk

    @property
    def bytes(self) -> float | None:
        if self.dim is None:
            return None
        return text_disk_bytes(self.captions or 1e6, self.mean_tokens, self.dim, self.dtype)

    def line(self) -> str:
        per = f"for {_count(self.captions)} captions" if self.captions else "per million captions"
        size = f"~{_size(self.bytes)}" if self.bytes is not None else "size unknown"
        tokens = (
            f"{self.mean_tokens:.1f}"
            if self.tokens_from.startswith("measured")
            else f"{self.mean_tokens:.0f}"
        )
        dim = f"{self.dim} ({self.dim_from})" if self.dim else self.dim_from
        element = f"{BYTES_PER_ELEMENT[self.dtype]} bytes ({SHORT_DTYPE[self.dtype]})"
        stored = f"; the text artifacts take {_size(self.stored)} now (zstd Parquet)" if self.stored else ""
        body = (
            f"{size} {per} ({self.count_from}): mean {tokens} tokens × {dim} × {element}, "
            f"tokens {self.tokens_from}; the train table's text.npy holds a second copy{stored}"
        )
        if self.mode == "precomputed":
            return f"precomputed text: {body} — text.mode=online needs none"
        return f"precomputed text: none (text.mode=online); text.mode=precomputed would take {body}"


def _is_listed(cfg: PipelineConfig) -> bool:
    """Whether the plan can name the artifacts without listing the source (that may take minutes)."""
    d = cfg.download
    if not is_listed(d.source):
        return True
    return (spec_dir(cfg.workspace_path, d.source, d.split, d.hf_revision, d.wds_class) / SUMMARY).is_file()


def text_disk(cfg: PipelineConfig) -> TextDisk:
    """The disk precomputed text takes for this config: captions (images + composites) × mean T5 tokens ×
    d_model × bytes per element, plus offsets. Never lists the source nor loads a model: the count comes from
    the download output, the cached listing or the config; the mean tokens from the text artifacts' `tokens`,
    else the captions' `tokens` (+ </s>, one T5 token per generated token assumed), else the config."""
    t, r = cfg.text, cfg.recaption
    stored_cfg = cfg.model_copy(update={"text": t.model_copy(update={"mode": "precomputed"})})
    multiplier = cfg.cutmix.multiplier if cfg.cutmix.enabled else 0
    composites = f" + {multiplier} composite{'s' if multiplier > 1 else ''} each" if multiplier else ""
    captions, count_from, plan = None, "", None
    if _is_listed(cfg):
        plan = Plan(stored_cfg)
        images, count_from = plan.num_images, "download.max_images"
        if plan.source_summary is not None:
            count_from = "the download listing"
        if plan.images.is_complete():
            images, count_from = plan.images.read_manifest()["rows"], "the download output"
        n_comp = images * multiplier
        if plan.composites is not None and plan.composites.is_complete():
            n_comp = plan.composites.read_manifest()["rows"]
        if images:
            captions = images + n_comp
            count_from = f"{_count(images)} images from {count_from}"
            if multiplier:
                count_from += f" + {_count(n_comp)} composites"
    if captions is None:
        count_from = (
            f"images unknown until `t2i download` lists {cfg.download.source}; captions = images{composites}"
        )
        if cfg.download.max_images:
            captions = cfg.download.max_images * (1 + multiplier)
            count_from = (
                f"at most: download.max_images={cfg.download.max_images}{composites}; source not listed yet"
            )

    dim, dim_from = encoder_dim(t.encoder)
    stored = 0
    texts = caps = None
    if plan is not None:
        sets = [images for _, images in plan.image_sets()]
        text_arts = [plan.text_of(plan.captions_of(images)) for images in sets]
        stored = sum(
            p.stat().st_size for a in text_arts if a.root.is_dir() for p in a.root.glob("part-*.parquet")
        )
        texts = _tokens(text_arts)
        if texts is None:
            caps = _tokens([plan.captions_of(images) for images in sets])
        complete = [a for a in text_arts if a.is_complete()]
        if complete and texts is not None:
            dim, dim_from = complete[0].read_manifest().get("dim", dim), "d_model stored with the text"
    generated = "generated token" if r.backend in ("vllm", "transformers") else "word"
    if texts is not None:
        mean, tokens_from = float(texts.mean()), f"measured over {len(texts):,} stored embeddings"
    elif caps is not None:
        mean = float(np.minimum(caps + 1, t.max_length).mean())
        tokens_from = (
            f"measured over {len(caps):,} captions' {generated}s (+ </s>, assuming one T5 token per "
            f"{generated}; ≤ text.max_length={t.max_length})"
        )
    elif r.backend in ("vllm", "transformers"):
        mean = min(t.max_length, r.max_new_tokens + 1)
        tokens_from = (
            f"estimated from recaption.max_new_tokens={r.max_new_tokens} (+ </s>, if every caption uses them "
            f"all at one T5 token each), ≤ text.max_length={t.max_length}"
        )
    else:
        mean = t.max_length
        tokens_from = f"at most text.max_length={t.max_length} (no {r.backend} captions yet to measure)"
    return TextDisk(t.mode, captions, count_from, mean, tokens_from, dim, dim_from, t.dtype, stored)


def text_disk_line(cfg: PipelineConfig) -> str:
    return text_disk(cfg).line()
