"""CutMix stage unit of work: shard i of the images → its composites (one per base image × multiplier),
stored as JPEG (quality 95) when the base image is a JPEG, PNG otherwise.

Partners come from a pool of the base shard plus a few other shards drawn per shard (reading every shard
for every composite would read the whole dataset per shard); within the pool the partner is uniform among
images of another class. Everything is seeded by (seed, shard, image, copy): a redone shard is identical.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from prefect import task

from t2i.data.cutmix import CutmixBox, compose, plan_composite
from t2i.data.imaging import RejectedImage, decode_image, encode_image
from t2i.data.schemas import IMAGES
from t2i.data.store import Artifact, Reject, ShardInfo
from t2i.tasks.shards import SHARD_TASK_OPTIONS

if TYPE_CHECKING:
    from t2i.flows.config import CutmixConfig


def partner_pool(index: int, num_shards: int, count: int, seed: int) -> list[int]:
    """Shard `index` plus `count` other shards, drawn without replacement and seeded by (seed, index)."""
    others = [i for i in range(num_shards) if i != index]
    rng = np.random.default_rng([seed, index, 7])
    chosen = rng.choice(len(others), size=min(count, len(others)), replace=False) if others else []
    return [index, *sorted(others[int(c)] for c in chosen)]


@task(name="cutmix-shard", **SHARD_TASK_OPTIONS)
def cutmix_shard(
    cfg: CutmixConfig, artifact: Artifact, index: int, images: Artifact, num_shards: int
) -> ShardInfo:
    if artifact.has_shard(index):
        return artifact.shard_info(index)
    pool = [
        row
        for shard in partner_pool(index, num_shards, cfg.partner_shards, cfg.seed)
        for row in images.read_shard(shard, columns=["key", "image", "label", "class_name"]).to_pylist()
    ]
    base_count = images.shard_info(index).rows
    labels = np.array([r["label"] if r["label"] is not None else -1 for r in pool])
    rows, rejects = [], []
    for local in range(base_count):
        base = pool[local]
        try:  # decoded images are not kept: a pool of 5 ImageNet shards would hold gigabytes of pixels
            base_image = decode_image(base["image"])
        except RejectedImage as err:
            rejects += [
                Reject(f"cutmix{c}/{base['key']}", err.reason, err.detail) for c in range(cfg.multiplier)
            ]
            continue
        for copy in range(cfg.multiplier):
            plan = plan_composite(
                local, labels, cfg.resolution, cfg.seed, cfg.layout_weights, copy, shard=index
            )
            layout, box, partner = plan["layout"], CutmixBox(**plan["box"]), plan["partner"]
            key = f"cutmix{copy}/{base['key']}"
            try:
                composite = compose(base_image, decode_image(pool[partner]["image"]), box, cfg.resolution)
            except RejectedImage as err:
                rejects.append(Reject(key, err.reason, f"pasted image {pool[partner]['key']}: {err.detail}"))
                continue
            other = pool[partner]
            rows.append(
                {
                    "key": key,
                    "image": encode_image(composite, "JPEG" if base["image"][:2] == b"\xff\xd8" else "PNG"),
                    "label": base["label"],
                    "class_name": base["class_name"],
                    "width": cfg.resolution,
                    "height": cfg.resolution,
                    "caption_gt": None,
                    "attributes": json.dumps(
                        {
                            "layout": layout,
                            "box": box.as_dict(),
                            "base_key": base["key"],
                            "partner_key": other["key"],
                            "partner_label": other["label"],
                            "partner_class_name": other["class_name"],
                        },
                        sort_keys=True,
                    ),
                }
            )
    return artifact.write_shard(index, pa.Table.from_pylist(rows, schema=IMAGES), rejects)


def layout_counts(artifact: Artifact, num_shards: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(num_shards):
        for attrs in artifact.read_shard(i, columns=["attributes"])["attributes"].to_pylist():
            layout = json.loads(attrs)["layout"]
            counts[layout] = counts.get(layout, 0) + 1
    return dict(sorted(counts.items()))
