"""Training data that does not grow with the dataset: latents, captions and stored text embeddings, joined by
key once into memory-mapped files that every rank and every loader worker reads through the page cache.

A train table is an artifact of its own (`<workspace>/train-data/<fingerprint>/`), a pure function of its
inputs, built once (by the process that launches training) and then only read:

- `moments.npy`: (N, 2, C, H, W) float16, the VAE posterior mean and std of sample i in row i;
- `rows.arrow`: Arrow IPC file with `key` and `caption` per sample (and `text_offset`, `text_tokens`
  when text embeddings are stored);
- `text.npy`: (T, D) the stored text embeddings of all samples, back to back (raw 2- or 4-byte words, viewed
  as `text_dtype`);
- `manifest.json`, written last: rows, latent shape, text dim/dtype and the empty text's embedding.

Building streams one input shard at a time, so its memory is that of a shard whatever the dataset's size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from t2i.data.schemas import SHAPE_META_KEY
from t2i.data.store import Artifact, atomic_path, fingerprint

VERSION = 1
_WORDS = {2: np.uint16, 4: np.uint32}  # numpy has no bfloat16: stored as raw words, viewed by torch


def _joined_rows(latents: Artifact, captions: Artifact, text: Artifact | None, shard: int):
    """(latent row, caption, text row) of every latents row whose key has a caption (and embedding)."""
    lat_keys = latents.read_shard(shard, columns=["key"])["key"].to_pylist()
    cap = captions.read_shard(shard, columns=["key", "caption"])
    by_key = dict(zip(cap["key"].to_pylist(), cap["caption"].to_pylist(), strict=True))
    text_row = {}
    if text is not None:
        text_row = {k: i for i, k in enumerate(text.read_shard(shard, columns=["key"])["key"].to_pylist())}
    return [
        (i, key, by_key[key], text_row.get(key))
        for i, key in enumerate(lat_keys)
        if key in by_key and (text is None or key in text_row)
    ]


def _sizes(latents: Artifact, text: Artifact | None, num_shards: int, rows: list[list]) -> tuple:
    shape = json.loads(latents.read_shard(0, columns=["key"]).schema.metadata[SHAPE_META_KEY])
    tokens = 0
    if text is not None:
        for shard, joined in enumerate(rows):
            counts = text.read_shard(shard, columns=["tokens"])["tokens"].to_numpy()
            tokens += int(sum(counts[r[3]] for r in joined))
    return tuple(shape), tokens


def build_train_table(
    out: Artifact, latents: Artifact, captions: Artifact, num_shards: int, text: Artifact | None = None
) -> Artifact:
    """Join the inputs into `out` (idempotent: a complete table is returned as it is)."""
    if out.is_complete():
        return out
    joined = [_joined_rows(latents, captions, text, s) for s in range(num_shards)]
    n = sum(len(j) for j in joined)
    if not n:
        raise RuntimeError("no training samples: latents and captions share no keys")
    shape, total_tokens = _sizes(latents, text, num_shards, joined)
    meta = text.read_manifest() if text is not None else {}
    Artifact(out.workspace, out.stage, "").clean_stale_temporaries()  # a build that died left its folder
    try:
        with atomic_path(out.root) as tmp:
            tmp.mkdir(parents=True)
            _write_tables(tmp, latents, text, joined, n, shape, total_tokens, meta)
            manifest = {"rows": n, "latent_shape": list(shape), "version": VERSION,
                        **{k: meta[k] for k in ("dim", "dtype", "null_embedding") if k in meta}}  # fmt: skip
            (tmp / "manifest.json").write_text(json.dumps(manifest))
    except OSError:
        if not out.is_complete():  # else another node built the same table first: use theirs
            raise
    return out


def train_table_for(latents: Artifact, captions: Artifact, text: Artifact | None) -> Artifact:
    """Where the table of these inputs lives: its fingerprint is theirs, so it is built once per input set."""
    inputs = {"latents": latents.fingerprint, "captions": captions.fingerprint}
    if text is not None:
        inputs["text"] = text.fingerprint
    return Artifact(latents.workspace, "train-data", fingerprint("train-data", VERSION, {}, inputs))


class _NpyWriter:
    """Appends rows to a `.npy` file of known shape with plain writes: no memory map in the writer, so
    building a table of millions of rows keeps the memory of one shard."""

    def __init__(self, path: Path, dtype, shape: tuple[int, ...]) -> None:
        self.file, self.dtype = open(path, "wb"), np.dtype(dtype)  # noqa: SIM115  (closed by close())
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": shape,
        }
        np.lib.format.write_array_header_2_0(self.file, header)

    def write(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows).tobytes())

    def close(self) -> None:
        self.file.close()


def _write_tables(tmp: Path, latents, text, joined, n: int, shape, total_tokens: int, meta: dict) -> None:
    moments = _NpyWriter(tmp / "moments.npy", np.float16, (n, 2, *shape))
    fields = [("key", pa.string()), ("caption", pa.string())]
    words = None
    if text is not None:
        itemsize = torch.empty((), dtype=getattr(torch, meta["dtype"])).element_size()
        words = _NpyWriter(tmp / "text.npy", _WORDS[itemsize], (total_tokens, meta["dim"]))
        fields += [("text_offset", pa.int64()), ("text_tokens", pa.int32())]
    token = 0
    schema = pa.schema(fields)
    with pa.OSFile(str(tmp / "rows.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for shard, rows in enumerate(joined):
            lat = latents.read_shard(shard, columns=["mean", "std"])
            picks = [r[0] for r in rows]
            mean, std = (
                np.frombuffer(b"".join(lat[c].take(picks).to_pylist()), np.float16).reshape(-1, *shape)
                for c in ("mean", "std")
            )
            moments.write(np.stack([mean, std], axis=1))
            batch = {"key": [r[1] for r in rows], "caption": [r[2] for r in rows]}
            if words is not None:
                emb = text.read_shard(shard, columns=["embedding", "tokens"])
                text_rows = [r[3] for r in rows]
                lengths = emb["tokens"].to_numpy()[text_rows]
                words.write(
                    np.frombuffer(b"".join(emb["embedding"].take(text_rows).to_pylist()), words.dtype)
                )
                batch["text_offset"] = token + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
                batch["text_tokens"] = lengths.astype(np.int32)
                token += int(lengths.sum())
            writer.write_batch(pa.record_batch(batch, schema=schema))
    moments.close()
    if words is not None:
        words.close()


class TrainTable:
    """Read-only view of a built table. Rows are fetched by index; nothing is loaded whole, and the object
    pickles as its path, so loader workers reopen the maps instead of copying them."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.manifest: dict[str, Any] = json.loads((self.root / "manifest.json").read_text())
        self.moments = np.load(self.root / "moments.npy", mmap_mode="r")
        self.rows = pa.ipc.open_file(pa.memory_map(str(self.root / "rows.arrow"))).read_all()
        has_text = (self.root / "text.npy").exists()
        self.words = np.load(self.root / "text.npy", mmap_mode="r") if has_text else None

    def __reduce__(self):
        return (TrainTable, (str(self.root),))

    def __len__(self) -> int:
        return self.manifest["rows"]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["latent_shape"])

    def moments_of(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) float32 (B, C, H, W) of the rows `idx`."""
        rows = torch.from_numpy(np.ascontiguousarray(self.moments[np.asarray(idx)])).float()
        return rows[:, 0], rows[:, 1]

    def column(self, name: str, idx: np.ndarray) -> list:
        return self.rows.column(name).take(pa.array(np.asarray(idx, dtype=np.int64))).to_pylist()

    def embeddings_of(self, idx: np.ndarray) -> list[torch.Tensor]:
        """The stored (unpadded) text embedding of each row, in the stored dtype."""
        dtype = getattr(torch, self.manifest["dtype"])
        offsets, tokens = self.column("text_offset", idx), self.column("text_tokens", idx)
        return [
            torch.from_numpy(np.array(self.words[o : o + n])).view(dtype)
            for o, n in zip(offsets, tokens, strict=True)
        ]

    def null_embedding(self) -> torch.Tensor:
        return torch.tensor(self.manifest["null_embedding"], dtype=getattr(torch, self.manifest["dtype"]))


def pad_rows(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, longest, dim) in the rows' dtype (bf16 text stays bf16 until the GPU) with zeros after each row's
    tokens, and the boolean mask."""
    longest = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), longest, rows[0].shape[1], dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out, mask
