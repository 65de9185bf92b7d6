"""Arrow schemas of the artifacts, in one place: every reader and writer uses these."""

from __future__ import annotations

import pyarrow as pa

IMAGES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # encoded JPEG/PNG bytes, RGB
        pa.field("label", pa.int32()),  # -1 when the source has no classes
        pa.field("class_name", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("caption_gt", pa.string()),  # ground-truth caption where the source has one (synthetic)
        pa.field("attributes", pa.string()),  # JSON: the source's ground truth (synthetic) or extra fields
    ]
)

CAPTIONS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("model", pa.string()),
        pa.field("tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
    ]
)


def captions_schema(extra_columns: list[str] | None = None) -> pa.Schema:
    """CAPTIONS plus one string column per extra prompt (`caption_<name>`)."""
    schema = CAPTIONS
    for name in extra_columns or []:
        schema = schema.append(pa.field(name, pa.string()))
    return schema


SHAPE_META_KEY = b"t2i.latent_shape"  # a latents shard's metadata: the latent shape [C, H, W] as JSON

LATENTS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("mean", pa.binary(), nullable=False),  # float16, C×H×W, C-contiguous
        pa.field("std", pa.binary(), nullable=False),  # float16, C×H×W
    ]
)

TEXT_EMBEDDINGS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("embedding", pa.binary(), nullable=False),  # tokens × dim in text.dtype, C-contiguous
        pa.field("tokens", pa.int32(), nullable=False),
    ]
)
