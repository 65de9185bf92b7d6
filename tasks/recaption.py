"""Recaption stage unit of work: one image shard → one caption shard with the same keys in the same order."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
from PIL import Image
from prefect import task

from data.imaging import RejectedImage, decode_image
from data.schemas import CAPTIONS
from data.store import Artifact, Reject, ShardInfo
from models.captioners import Caption, Captioner
from models.tiny import resolve_model
from tasks.model_cache import cached_model
from tasks.shards import SHARD_TASK_OPTIONS

if TYPE_CHECKING:
    from flows.config import RecaptionConfig

VERSION = 1


def load_captioner(cfg: RecaptionConfig, workspace: Path) -> Captioner:
    spec = cfg.model_dump(mode="json")
    spec["path"] = resolve_model(cfg.model, workspace) if cfg.backend != "template" else None
    spec["cache_root"] = str(workspace / ".cache" / "vllm")
    return cached_model("captioner", **spec)


def caption_isolating_failures(
    captioner: Captioner, images: Sequence[Image.Image], class_names: Sequence[str]
) -> list[Caption]:
    """Caption a batch; if the backend raises, split the batch and retry, so only the failing items are lost."""
    try:
        return captioner.caption(images, class_names)
    except Exception as err:  # the backend's errors are many and untyped; each is contained to its items
        if len(images) == 1:
            return [Caption(text=None, finish_reason="error", error=f"{type(err).__name__}: {err}")]
        mid = len(images) // 2
        return caption_isolating_failures(
            captioner, images[:mid], class_names[:mid]
        ) + caption_isolating_failures(captioner, images[mid:], class_names[mid:])


@task(name="recaption-shard", **SHARD_TASK_OPTIONS)
def recaption_shard(cfg: RecaptionConfig, artifact: Artifact, index: int, images: Artifact) -> ShardInfo:
    if artifact.has_shard(index):
        return artifact.shard_info(index)
    captioner = load_captioner(cfg, artifact.workspace)
    table = images.read_shard(index, columns=["key", "image", "class_name"]).to_pylist()
    keys, pils, names, rejects = [], [], [], []
    for row in table:
        try:
            image = decode_image(row["image"]) if cfg.backend != "template" else None
        except RejectedImage as err:
            rejects.append(Reject(row["key"], err.reason, err.detail))
            continue
        keys.append(row["key"])
        pils.append(image)
        names.append(row["class_name"] or "")
    captions = caption_isolating_failures(captioner, pils, names)
    rows = []
    for key, cap in zip(keys, captions, strict=True):
        if cap.error is not None or cap.text is None:
            rejects.append(Reject(key, "generation failed", cap.error or "no text"))
            continue
        rows.append(
            {
                "key": key,
                "caption": cap.text,
                "model": cfg.model
                if cfg.backend != "template"
                else "template",  # the reference, not a local path
                "tokens": cap.tokens,
                "finish_reason": cap.finish_reason,
            }
        )
    return artifact.write_shard(index, pa.Table.from_pylist(rows, schema=CAPTIONS), rejects)


def caption_summary(artifact: Artifact, num_shards: int, cfg: RecaptionConfig) -> dict:
    """Manifest summary: model, how many captions were cut by max_new_tokens, caption lengths in words."""
    import numpy as np

    words, truncated, total = [], 0, 0
    for i in range(num_shards):
        table = artifact.read_shard(i, columns=["caption", "finish_reason"])
        for caption, reason in zip(
            table["caption"].to_pylist(), table["finish_reason"].to_pylist(), strict=True
        ):
            words.append(len(caption.split()))
            truncated += reason == "length"
            total += 1
    lengths = np.array(words or [0])
    return {
        "backend": cfg.backend,
        "model": cfg.model if cfg.backend != "template" else "template",
        "revision": cfg.revision,
        "sampling": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": cfg.seed},
        "truncated": truncated,
        "truncated_share": truncated / max(total, 1),
        "caption_words": {
            "mean": float(lengths.mean()),
            "p5": float(np.percentile(lengths, 5)),
            "p50": float(np.percentile(lengths, 50)),
            "p95": float(np.percentile(lengths, 95)),
        },
    }
