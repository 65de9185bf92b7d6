"""Text conditioning, online or precomputed, behind one interface that gives the denoiser identical batches.

* online: the frozen T5 encoder runs in the training process on each batch's captions;
* precomputed: the `latents` stage encodes every caption once into a `text` artifact (one Parquet shard per
  captions shard: the unpadded last hidden state per key, in `text.dtype`); training reads them from its
  memory-mapped train table (`t2i.data.train_data`) and pads them.

Both modes pad to the batch's longest caption, zero the padding, and round embeddings to `text.dtype`, so they
feed the model the same tensors (up to float32 reduction order inside the encoder: ~1e-6). The empty-text
embedding for classifier-free guidance dropout is stored in the artifact's manifest.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch
from prefect import task

from t2i.data.schemas import TEXT_EMBEDDINGS
from t2i.data.store import Artifact, ShardInfo
from t2i.models.conditioning import bucket_length
from t2i.models.loading import resolve_model
from t2i.models.text_encoder import tokenize
from t2i.tasks.model_cache import cached_model, pick_device
from t2i.tasks.shards import SHARD_TASK_OPTIONS

if TYPE_CHECKING:
    from t2i.flows.config import TextConfig

DIM_META_KEY = b"t2i.text_dim"


def load_encoder(cfg: TextConfig, workspace, device: str | None = None):
    return cached_model(
        "text",
        path=resolve_model(cfg.encoder, workspace),
        max_length=cfg.max_length,
        device=device or pick_device(cfg.device),
        dtype=cfg.dtype,
        revision=cfg.revision,
    )


def _to_bytes(row: torch.Tensor) -> bytes:
    return row.contiguous().view(torch.uint8).numpy().tobytes()


def _from_bytes(data: bytes, dtype: str, dim: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(-1, dim)


@task(name="text-shard", **SHARD_TASK_OPTIONS)
def text_shard(cfg: TextConfig, artifact: Artifact, index: int, captions: Artifact) -> ShardInfo:
    """One captions shard → the unpadded embedding of every caption (`tokens` rows of width `dim`)."""
    if artifact.has_shard(index):
        return artifact.shard_info(index)
    encoder = load_encoder(cfg, artifact.workspace)
    table = captions.read_shard(index, columns=["key", "caption"])
    keys, texts = table["key"].to_pylist(), table["caption"].to_pylist()
    rows, lengths = [], []
    for start in range(0, len(texts), cfg.batch_size):
        hidden, mask = encoder.encode(texts[start : start + cfg.batch_size])
        for h, m in zip(hidden.cpu(), mask.cpu(), strict=True):
            n = int(m.sum())
            rows.append(_to_bytes(h[:n].to(getattr(torch, cfg.dtype))))
            lengths.append(n)
    out = pa.Table.from_pydict({"key": keys, "embedding": rows, "tokens": lengths}, schema=TEXT_EMBEDDINGS)
    out = out.replace_schema_metadata({DIM_META_KEY: str(encoder.dim).encode()})
    return artifact.write_shard(index, out)


def null_embedding(cfg: TextConfig, workspace) -> dict[str, Any]:
    """The empty text's embedding (for CFG dropout), as JSON for the artifact's manifest."""
    encoder = load_encoder(cfg, workspace)
    hidden, mask = encoder.encode([""])
    row = hidden[0, : int(mask[0].sum())].cpu().to(getattr(torch, cfg.dtype)).float()
    return {"dim": encoder.dim, "dtype": cfg.dtype, "null_embedding": row.tolist()}


class OnlineText:
    """The encoder in the training process; outputs rounded to `dtype` like stored embeddings are."""

    def __init__(self, encoder, dtype: str) -> None:
        self.encoder, self.dtype = encoder, getattr(torch, dtype)
        self.dim = encoder.dim

    def encode(self, captions: Sequence[str | None], keys: Sequence[str | None] = ()) -> tuple:
        """`None` is the dropped (empty) text."""
        hidden, mask = self.encoder.encode(["" if c is None else c for c in captions])
        return hidden.to(self.dtype).float(), mask

    def embed(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        """Captions tokenized elsewhere (`TextShapes.tokenize`), their ids on the encoder's device."""
        hidden, mask = self.encoder.embed(ids, attention_mask)
        return hidden.to(self.dtype).float(), mask


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str, revision: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, revision=revision)


@dataclass(frozen=True)
class TextShapes:
    """The shape of a training batch's text, decided where the batch is assembled (a loader worker): padded to
    one of `buckets` fixed lengths up to `max_length`; with online text (`tokenizer` set) the captions are
    tokenized there too, so the step only moves ids to the GPU and runs the encoder."""

    max_length: int
    buckets: int
    tokenizer: str | None = None  # path of the encoder's tokenizer (online text)
    revision: str | None = None

    def length(self, longest: int) -> int:
        return bucket_length(max(longest, 1), self.max_length, self.buckets)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize(_tokenizer(self.tokenizer, self.revision), texts, self.max_length, self.buckets)
