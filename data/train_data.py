"""Training data that does not grow with the dataset: latents, captions and stored text embeddings, joined by
key once into memory-mapped files that every rank and every loader process reads through the page cache.

A train table is an artifact of its own (`<workspace>/train-data/<fingerprint>/`, where
`t2i.flows.plan.Plan.train_table_of` puts it), a pure function of its inputs, built once (by the process that
launches training) and then only read:

- `moments.npy`: (N, 2, C, H, W) float16, the VAE posterior mean and std of sample i in row i;
- `keys.npy`, `captions.npy`: every sample's key and caption as one UTF-8 blob, with `*-offsets.npy`;
- `text.npy`: (T, D) the stored text embeddings of all samples, back to back (raw 2- or 4-byte words, viewed
  as the text dtype), with `text-offsets.npy`;
- `manifest.json`, written last: rows, latent shape, text dim/dtype and the empty text's embedding.

Building streams one input shard at a time (two passes: sizes, then rows), so its memory is that of a shard
whatever the dataset's size; reading maps the files for random access.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2i.data.schemas import SHAPE_META_KEY
from t2i.data.store import Artifact, atomic_path
from t2i.data.versions import TRAIN_TABLE

_WORDS = {2: np.uint16, 4: np.uint32}  # numpy has no bfloat16: stored as raw words, viewed by torch


def _joined_rows(latents: Artifact, captions: Artifact, text: Artifact | None, shard: int):
    """(latent row, key, caption, text row) of every latents row whose key has a caption (and embedding):
    one shard's worth, recomputed when needed rather than held for the whole dataset."""
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


def _sizes(latents: Artifact, captions: Artifact, text: Artifact | None, num_shards: int) -> dict[str, Any]:
    """Rows, key and caption bytes and text tokens of the whole table, one shard at a time."""
    sizes = {"rows": 0, "key": 0, "caption": 0, "tokens": 0}
    for shard in range(num_shards):
        rows = _joined_rows(latents, captions, text, shard)
        sizes["rows"] += len(rows)
        sizes["key"] += sum(len(r[1].encode()) for r in rows)
        sizes["caption"] += sum(len(r[2].encode()) for r in rows)
        if text is not None and rows:
            tokens = text.read_shard(shard, columns=["tokens"])["tokens"].to_numpy()
            sizes["tokens"] += int(tokens[[r[3] for r in rows]].sum())
    sizes["shape"] = tuple(json.loads(latents.read_shard(0, columns=["key"]).schema.metadata[SHAPE_META_KEY]))
    return sizes


def build_train_table(
    out: Artifact, latents: Artifact, captions: Artifact, num_shards: int, text: Artifact | None = None
) -> Artifact:
    """Join the inputs into `out` (idempotent: a complete table is returned as it is)."""
    if out.is_complete():
        return out
    sizes = _sizes(latents, captions, text, num_shards)
    if not sizes["rows"]:
        raise RuntimeError("no training samples: latents and captions share no keys")
    meta = text.read_manifest() if text is not None else {}
    Artifact(out.workspace, out.stage, "").clean_stale_temporaries()  # a build that died left its folder
    try:
        with atomic_path(out.root) as tmp:
            tmp.mkdir(parents=True)
            _write_tables(tmp, latents, captions, text, num_shards, sizes, meta)
            text_meta = {k: meta[k] for k in ("dim", "dtype", "null_embedding") if k in meta}
            shape = list(sizes["shape"])
            manifest = {"rows": sizes["rows"], "latent_shape": shape, "version": TRAIN_TABLE, **text_meta}
            (tmp / "manifest.json").write_text(json.dumps(manifest))
    except OSError:
        if not out.is_complete():  # else another node built the same table first: use theirs
            raise
    return out


class _NpyWriter:
    """Appends rows to a `.npy` file of known shape with plain writes: no memory map in the writer, so
    building a table of millions of rows keeps the memory of one shard."""

    def __init__(self, path: Path, dtype, shape: tuple[int, ...]) -> None:
        self.file, self.dtype = open(path, "wb"), np.dtype(dtype)  # noqa: SIM115  (closed by close())
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(self.file, header)

    def write(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())

    def close(self) -> None:
        self.file.close()


class _StringsWriter:
    """Strings as one UTF-8 blob (`<name>.npy`, uint8) and N + 1 offsets (`<name>-offsets.npy`)."""

    def __init__(self, tmp: Path, name: str, rows: int, total_bytes: int) -> None:
        self.blob = _NpyWriter(tmp / f"{name}.npy", np.uint8, (total_bytes,))
        self.offsets = _NpyWriter(tmp / f"{name}-offsets.npy", np.int64, (rows + 1,))
        self.offsets.write(np.zeros(1, np.int64))
        self.end = 0

    def write(self, strings: list[str]) -> None:
        data = [x.encode() for x in strings]
        self.blob.write(np.frombuffer(b"".join(data), np.uint8))
        self.offsets.write(self.end + np.cumsum([len(d) for d in data], dtype=np.int64))
        self.end += sum(len(d) for d in data)

    def close(self) -> None:
        self.blob.close()
        self.offsets.close()


def _write_tables(tmp: Path, latents, captions, text, num_shards: int, sizes: dict, meta: dict) -> None:
    n, shape = sizes["rows"], sizes["shape"]
    moments = _NpyWriter(tmp / "moments.npy", np.float16, (n, 2, *shape))
    keys, texts = (
        _StringsWriter(tmp, "keys", n, sizes["key"]),
        _StringsWriter(tmp, "captions", n, sizes["caption"]),
    )
    words = offsets = None
    if text is not None:
        itemsize = torch.empty((), dtype=getattr(torch, meta["dtype"])).element_size()
        words = _NpyWriter(tmp / "text.npy", _WORDS[itemsize], (sizes["tokens"], meta["dim"]))
        offsets = _NpyWriter(tmp / "text-offsets.npy", np.int64, (n + 1,))
        offsets.write(np.zeros(1, np.int64))
    token = 0
    for shard in range(num_shards):
        rows = _joined_rows(latents, captions, text, shard)
        lat = latents.read_shard(shard, columns=["mean", "std"])
        picks = [r[0] for r in rows]
        mean, std = (
            np.frombuffer(b"".join(lat[c].take(picks).to_pylist()), np.float16).reshape(-1, *shape)
            for c in ("mean", "std")
        )
        moments.write(np.stack([mean, std], axis=1))
        keys.write([r[1] for r in rows])
        texts.write([r[2] for r in rows])
        if words is not None:
            emb = text.read_shard(shard, columns=["embedding", "tokens"])
            text_rows = [r[3] for r in rows]
            lengths = emb["tokens"].to_numpy()[text_rows]
            words.write(np.frombuffer(b"".join(emb["embedding"].take(text_rows).to_pylist()), words.dtype))
            offsets.write(token + np.cumsum(lengths, dtype=np.int64))
            token += int(lengths.sum())
    for writer in (moments, keys, texts, words, offsets):
        if writer is not None:
            writer.close()


def _open_npy(path: Path) -> np.ndarray:
    """A read-only memory map of a `.npy` file, advised for random access: a training batch touches its own
    rows, not the read-ahead around them, so a loader process's memory stays that of its batches."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        shape, fortran, dtype = read_header[version](f)
        offset = f.tell()
        if not np.prod(shape):
            return np.zeros(shape, dtype)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mapped.madvise(mmap.MADV_RANDOM)
    return np.ndarray(shape, dtype, buffer=mapped, offset=offset, order="F" if fortran else "C")


class TrainTable:
    """Read-only view of a built table. Rows are fetched by index; nothing is loaded whole, and the object
    pickles as its path, so loader processes reopen the maps instead of copying them."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.manifest: dict[str, Any] = json.loads((self.root / "manifest.json").read_text())
        self.maps = {p.stem: _open_npy(p) for p in self.root.glob("*.npy")}
        self.moments = self.maps["moments"]
        self.words = self.maps.get("text")

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

    def column(self, name: str, idx) -> list[str]:
        """`key` or `caption` of the rows `idx`."""
        blob, offsets = self.maps[f"{name}s"], self.maps[f"{name}s-offsets"]
        return [bytes(blob[offsets[i] : offsets[i + 1]]).decode() for i in np.asarray(idx)]

    def embeddings_of(self, idx) -> list[torch.Tensor]:
        """The stored (unpadded) text embedding of each row, in the stored dtype."""
        dtype, offsets = getattr(torch, self.manifest["dtype"]), self.maps["text-offsets"]
        return [
            torch.from_numpy(np.array(self.words[offsets[i] : offsets[i + 1]])).view(dtype)
            for i in np.asarray(idx)
        ]

    def null_embedding(self) -> torch.Tensor:
        return torch.tensor(self.manifest["null_embedding"], dtype=getattr(torch, self.manifest["dtype"]))


def collate_text_rows(
    rows: Sequence[torch.Tensor], length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored text rows of different lengths, (tokens, dim) each, collated into one batch: (B, length or the
    longest, dim) in the rows' dtype (bf16 text stays bf16 until the GPU) with zeros after each row's tokens, and
    the boolean mask. A loader process does this on the CPU for rows read one by one from the table; it is not
    `t2i.models.objectives.pad_text`, which pads a batch that already exists, (B, L, D), to a bucket length."""
    longest = max([r.shape[0] for r in rows] + [length or 0])
    out = torch.zeros(len(rows), longest, rows[0].shape[1], dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out, mask
