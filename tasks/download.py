"""Download stage unit of work: one shard of a source → decoded-safe, RGB, size-capped images in Parquet."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from prefect import task

from t2i.data.imaging import RejectedImage, prepare_image_bytes
from t2i.data.schemas import IMAGES
from t2i.data.sources import Source, attributes_json
from t2i.data.store import Artifact, Reject, ShardInfo
from t2i.tasks.shards import SHARD_TASK_OPTIONS

if TYPE_CHECKING:  # configs are defined with the flows; tasks only receive them
    from t2i.flows.config import DownloadConfig


@task(name="download-shard", **SHARD_TASK_OPTIONS)
def download_shard(
    cfg: DownloadConfig, artifact: Artifact, index: int, source: Source, items: np.ndarray
) -> ShardInfo:
    if artifact.has_shard(index):
        return artifact.shard_info(index)
    rows, rejects = [], []
    for item in source.read(items):
        if item.rejected is not None:
            rejects.append(Reject(item.key, *item.rejected))
            continue
        try:
            data, width, height = prepare_image_bytes(
                item.data, max_side=cfg.max_side, max_pixels=cfg.max_pixels, min_side=cfg.min_side
            )
        except RejectedImage as err:
            rejects.append(Reject(item.key, err.reason, err.detail))
            continue
        rows.append(
            {
                "key": item.key,
                "image": data,
                "label": item.label,
                "class_name": item.class_name,
                "width": width,
                "height": height,
                "caption_gt": item.caption_gt,
                "attributes": attributes_json(item.attributes),
            }
        )
    return artifact.write_shard(index, pa.Table.from_pylist(rows, schema=IMAGES), rejects)
