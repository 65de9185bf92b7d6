"""Recaption stage units of work: one image shard → one caption shard with the same keys in the same order.

Runs in-process (one Prefect task per shard) or as engine worker processes (one Prefect task per worker,
each walking its own shards) when several GPUs are used. Decoding the next shard overlaps with generating
the current one, and a failing item never costs the rest of its shard.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image
from prefect import task

from t2i.data.imaging import RejectedImage, decode_image
from t2i.data.schemas import captions_schema
from t2i.data.store import Artifact, Reject, ShardInfo
from t2i.models.captioners import Caption, Captioner
from t2i.models.loading import resolve_model
from t2i.tasks.device_processes import gpu_groups
from t2i.tasks.model_cache import cached_model
from t2i.tasks.shards import SHARD_TASK_OPTIONS

if TYPE_CHECKING:
    from t2i.flows.config import RecaptionConfig


def caption_columns(cfg: RecaptionConfig) -> dict[str, str]:
    """Column name → prompt: `caption` for the main prompt, `caption_<name>` for each extra prompt."""
    return {"caption": cfg.prompt, **{f"caption_{k}": v for k, v in sorted(cfg.extra_prompts.items())}}


def load_captioner(cfg: RecaptionConfig, workspace: Path) -> Any:
    if cfg.backend == "import":
        spec = {
            "source": cfg.captions_source,
            "key_column": cfg.key_column,
            "caption_column": cfg.caption_column,
        }
        return cached_model("imported", **spec)
    spec = cfg.model_dump(mode="json", exclude={"part", "workers", "gpus", "extra_prompts", "prompt"})
    spec["path"] = resolve_model(cfg.model, workspace) if cfg.backend != "template" else None
    spec["cache_root"] = str(workspace / ".cache" / "vllm")
    return cached_model("captioner", **spec)


# --- decoding, overlapped with generation -----------------------------------------------------------------


@dataclass
class DecodedShard:
    keys: list[str] = field(default_factory=list)
    images: list[Image.Image | None] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def decode_shard(images: Artifact, index: int, max_side: int | None, pixels: bool = True) -> DecodedShard:
    columns = ["key", "image", "class_name"] if pixels else ["key", "class_name"]
    out = DecodedShard()
    for row in images.read_shard(index, columns=columns).to_pylist():
        image = None
        if pixels:
            try:
                image = decode_image(row["image"])
            except RejectedImage as err:
                out.rejects.append(Reject(row["key"], err.reason, err.detail))
                continue
            if max_side and max(image.size) > max_side:
                image.thumbnail((max_side, max_side), Image.LANCZOS)
        out.keys.append(row["key"])
        out.images.append(image)
        out.class_names.append(row["class_name"] or "")
    return out


class ShardPrefetcher:
    """Decodes upcoming shards on a background thread while the engine generates the current one."""

    def __init__(self, images: Artifact, max_side: int | None, pixels: bool) -> None:
        self.images, self.max_side, self.pixels = images, max_side, pixels
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self.pending: dict[int, Future] = {}
        self.lock = threading.Lock()

    def prefetch(self, index: int) -> None:
        with self.lock:
            if index not in self.pending:
                self.pending[index] = self.pool.submit(
                    decode_shard, self.images, index, self.max_side, self.pixels
                )

    def take(self, index: int) -> DecodedShard:
        self.prefetch(index)
        with self.lock:
            future = self.pending.pop(index)
        return future.result()


_prefetchers: dict[tuple[str, int | None, bool], ShardPrefetcher] = {}


def prefetcher_for(images: Artifact, cfg: RecaptionConfig) -> ShardPrefetcher:
    pixels = cfg.backend in ("vllm", "transformers")
    key = (str(images.root), cfg.image_max_side, pixels)
    if key not in _prefetchers:
        _prefetchers[key] = ShardPrefetcher(images, cfg.image_max_side, pixels)
    return _prefetchers[key]


# --- one shard --------------------------------------------------------------------------------------------


def caption_isolating_failures(
    captioner: Captioner,
    images: Sequence[Image.Image],
    class_names: Sequence[str],
    prompts: Mapping[str, str],
) -> dict[str, list[Caption]]:
    """Caption a batch; if the backend raises, split the batch and retry, so only the failing items are lost."""
    try:
        return captioner.caption(images, class_names, prompts)
    except Exception as err:  # the backend's errors are many and untyped; each is contained to its items
        if len(images) <= 1:
            failed = Caption(text=None, finish_reason="error", error=f"{type(err).__name__}: {err}"[:500])
            return {col: [failed] * len(images) for col in prompts}
        mid = len(images) // 2
        left = caption_isolating_failures(captioner, images[:mid], class_names[:mid], prompts)
        right = caption_isolating_failures(captioner, images[mid:], class_names[mid:], prompts)
        return {col: left[col] + right[col] for col in prompts}


def caption_shard(
    cfg: RecaptionConfig, artifact: Artifact, index: int, images: Artifact, next_index: int | None = None
) -> ShardInfo:
    """Caption shard `index` (a no-op if it is on disk); start decoding `next_index` meanwhile."""
    if artifact.has_shard(index):
        return artifact.shard_info(index)
    captioner = load_captioner(cfg, artifact.workspace)
    prefetcher = prefetcher_for(images, cfg)
    shard = prefetcher.take(index)
    if next_index is not None:
        prefetcher.prefetch(next_index)
    columns = caption_columns(cfg)
    rejects = list(shard.rejects)
    started = time.time()
    if cfg.backend == "import":
        found = [captioner.get(k) for k in shard.keys]
        results = {
            col: [Caption(text=t, tokens=len(t.split())) if t else None for t in found] for col in columns
        }
    else:
        results = caption_isolating_failures(captioner, shard.images, shard.class_names, columns)
    errors = [c.error for c in results["caption"] if c is not None and c.error is not None]
    if len(errors) > 1 and len(errors) == len(shard.keys):
        # every item failing is the engine, not the data: fail the shard (a rerun retries it) instead of
        # writing a shard of rejects that a rerun would then skip
        raise RuntimeError(f"recaption: every item of shard {index} failed; first error: {errors[0]}")
    model = {"template": "template", "import": f"import:{Path(str(cfg.captions_source)).name}"}.get(
        cfg.backend, cfg.model
    )
    rows = []
    for j, key in enumerate(shard.keys):
        caps = {col: results[col][j] for col in columns}
        if any(c is None for c in caps.values()):
            rejects.append(Reject(key, "no caption", "the imported caption set has no entry for this key"))
            continue
        failed = [c for c in caps.values() if c.error is not None or c.text is None]
        if failed:
            rejects.append(Reject(key, "generation failed", failed[0].error or "no text"))
            continue
        main = caps["caption"]
        row = {"key": key, "model": model, "tokens": main.tokens, "finish_reason": main.finish_reason}
        row.update({col: c.text for col, c in caps.items()})
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=captions_schema(list(columns)[1:]))
    seconds = time.time() - started
    meta = dict(table.schema.metadata or {})
    meta[b"t2i.generate_seconds"] = f"{seconds:.4f}".encode()
    return artifact.write_shard(index, table.replace_schema_metadata(meta), rejects)


recaption_shard = task(caption_shard, name="recaption-shard", **SHARD_TASK_OPTIONS)


# --- shards of this part, engines, workers ----------------------------------------------------------------


def engine_groups(cfg: RecaptionConfig) -> list[list[str] | None]:
    """GPU ids of each engine (tensor_parallel_size each); on CPU, `workers` engines without GPUs."""
    if cfg.backend in ("template", "import"):
        return [None]
    return gpu_groups(cfg.tensor_parallel_size, cfg.gpus, cfg.workers)


# --- the stage summary ------------------------------------------------------------------------------------


def ground_truth_accuracy(captions: Artifact, images: Artifact, num_shards: int) -> dict | None:
    """Captions graded against the source's ground truth, where it has one (the shapes world does).

    Shapes scenes are graded per attribute (`t2i.data.shapes.caption_scores`); other ground-truth captions by
    exact word match. None when no image has ground truth (ImageNet).
    """
    from t2i.data import shapes

    totals: dict[str, float] = {}
    graded = 0
    for i in range(num_shards):
        truth = {
            row["key"]: row
            for row in images.read_shard(i, columns=["key", "caption_gt", "attributes"]).to_pylist()
            if row["caption_gt"]
        }
        if not truth:
            continue
        table = captions.read_shard(i, columns=["key", "caption"])
        for key, caption in zip(table["key"].to_pylist(), table["caption"].to_pylist(), strict=True):
            if key not in truth:
                continue
            row = truth[key]
            scene = shapes.Scene.from_attributes(json.loads(row["attributes"] or "{}"))
            if scene is not None:
                scores = shapes.caption_scores(caption, scene)
            else:
                scores = {"exact": float(shapes.words(caption) == shapes.words(row["caption_gt"]))}
            for name, value in scores.items():
                totals[name] = totals.get(name, 0.0) + value
            graded += 1
    if not graded:
        return None
    return {"images": graded, **{name: value / graded for name, value in totals.items()}}


def caption_summary(artifact: Artifact, num_shards: int, cfg: RecaptionConfig, images: Artifact) -> dict:
    """Manifest summary: model and sampling, truncated captions, caption lengths, throughput, and the
    accuracy against ground truth where the source has it."""
    words, truncated, total, seconds = [], 0, 0, 0.0
    for i in range(num_shards):
        table = artifact.read_shard(i, columns=["caption", "finish_reason"])
        seconds += float((table.schema.metadata or {}).get(b"t2i.generate_seconds", b"0"))
        for caption, reason in zip(
            table["caption"].to_pylist(), table["finish_reason"].to_pylist(), strict=True
        ):
            words.append(len(caption.split()))
            truncated += reason == "length"
            total += 1
    lengths = np.array(words or [0])
    summary = {
        "backend": cfg.backend,
        "model": {"template": "template", "import": cfg.captions_source}.get(cfg.backend, cfg.model),
        "revision": cfg.revision,
        "prompts": caption_columns(cfg),
        "sampling": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": cfg.seed},
        "captioned": total,
        "truncated": truncated,
        "truncated_share": truncated / max(total, 1),
        "caption_words": {
            "mean": float(lengths.mean()),
            **{f"p{q}": float(np.percentile(lengths, q)) for q in (5, 25, 50, 75, 95)},
        },
        "images_per_second_per_engine": total / seconds if seconds > 0 else None,
        "ground_truth": ground_truth_accuracy(artifact, images, num_shards),
    }
    return summary


def summary_markdown(manifest: dict) -> str:
    w = manifest["caption_words"]
    rate = manifest.get("images_per_second_per_engine")
    lines = [
        f"# Recaption: {manifest['model']}",
        "",
        "| | |",
        "|---|---|",
        f"| images captioned | {manifest['captioned']} |",
        f"| rejects | {manifest['rejects']} {manifest['rejects_by_reason'] or ''} |",
        f"| truncated by max_new_tokens | {manifest['truncated']} ({100 * manifest['truncated_share']:.1f}%) |",
        f"| caption words (mean, p5/p50/p95) | {w['mean']:.1f} ({w['p5']:.0f} / {w['p50']:.0f} / {w['p95']:.0f}) |",
        f"| images per second per engine | {rate:.1f} |" if rate else "| images per second | n/a |",
        f"| path | `{manifest.get('path', '')}` |",
    ]
    truth = manifest.get("ground_truth")
    if truth:
        lines += [
            "",
            f"Against ground truth ({truth['images']} images):",
            "",
            "| | share correct |",
            "|---|---|",
        ]
        lines += [f"| {name} | {100 * truth[name]:.1f}% |" for name in truth if name != "images"]
    return "\n".join(lines) + "\n"
