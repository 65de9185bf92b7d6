"""Bring your own captions, and take ours away: caption sets as files or `datasets` datasets.

Import reads a key → caption table (Parquet, CSV, TSV, JSON lines, or a Hub / saved dataset) and matches
its keys to image keys exactly, by file name, or by file name without extension — ImageNet keys are
`class/file.JPEG` here and usually bare file names or ids elsewhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from typing import Any

KEY_CANDIDATES = ("key", "image_id", "id", "file_name", "filename", "image", "path", "name")
CAPTION_CANDIDATES = ("caption", "text", "long_caption", "description", "prompt")


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str) -> str:
    if wanted:
        if wanted not in columns:
            raise ValueError(
                f"recaption.{what}_column: {wanted!r} is not a column; columns: {', '.join(columns)}"
            )
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise ValueError(
        f"recaption.{what}_column: none of {', '.join(candidates)} found; columns: {', '.join(columns)}"
    )


def source_identity(source: str) -> dict[str, Any]:
    """Content identity of a caption source for the fingerprint: a file's hash, a dataset's id."""
    if source.startswith("hf:"):
        return {"kind": "hf", "name": source[3:]}
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"recaption.captions_source: {path} does not exist")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return {"kind": "file", "name": path.name, "sha256": h.hexdigest()[:16]}


def load_caption_table(
    source: str, key_column: str | None, caption_column: str | None, token: str | None = None
) -> dict[str, str]:
    import pyarrow as pa

    if source.startswith("hf:"):
        import datasets

        name = source[3:]
        if Path(name).expanduser().is_dir():
            ds = datasets.load_from_disk(str(Path(name).expanduser()))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[next(iter(ds))]
        else:
            ds = datasets.load_dataset(name, split="train", token=token)
        table = ds.data.table if hasattr(ds.data, "table") else pa.Table.from_pylist(list(ds))
    else:
        path = Path(source).expanduser()
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif suffix in (".csv", ".tsv"):
            from pyarrow import csv

            table = csv.read_csv(
                path, parse_options=csv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            )
        elif suffix in (".jsonl", ".json"):
            from pyarrow import json as pajson

            table = pajson.read_json(path)
        else:
            raise ValueError(
                f"recaption.captions_source: unsupported file type {suffix!r} (.parquet .csv .tsv .jsonl)"
            )
    key = _pick(table.column_names, key_column, KEY_CANDIDATES, "key")
    caption = _pick(table.column_names, caption_column, CAPTION_CANDIDATES, "caption")
    return {
        str(k): c
        for k, c in zip(table[key].to_pylist(), table[caption].to_pylist(), strict=True)
        if c is not None
    }


class CaptionLookup:
    """Key matching: exact, then file name, then file name without extension."""

    def __init__(self, captions: dict[str, str]) -> None:
        self.exact = captions
        self.by_name: dict[str, str] = {}
        self.by_stem: dict[str, str] = {}
        for k, v in captions.items():
            p = PurePosixPath(k.replace("\\", "/"))
            self.by_name.setdefault(p.name, v)
            self.by_stem.setdefault(p.stem, v)

    def get(self, key: str) -> str | None:
        if key in self.exact:
            return self.exact[key]
        p = PurePosixPath(key.replace("\\", "/"))
        return self.by_name.get(p.name, self.by_stem.get(p.stem))


def export_captions(
    captions,
    images,
    num_shards: int,
    out: str | None,
    push_to_hub: str | None = None,
    token: str | None = None,
) -> str:
    """Our captions (with class labels) as a `datasets` dataset: a file by extension, a saved dataset folder
    otherwise, and pushed (private) to the Hub when a repo is named and a token is given."""
    import datasets
    import pyarrow as pa

    tables = []
    for i in range(num_shards):
        cap = captions.read_shard(i)
        meta = images.read_shard(i, columns=["key", "label", "class_name"])
        joined = cap.join(meta, "key", join_type="left outer")
        order = {k: j for j, k in enumerate(cap["key"].to_pylist())}
        idx = sorted(range(joined.num_rows), key=lambda r: order[joined["key"][r].as_py()])
        tables.append(joined.take(idx))
    ds = datasets.Dataset(pa.concat_tables(tables).replace_schema_metadata(None))
    if out:
        suffix = Path(out).suffix.lower()
        if suffix == ".parquet":
            ds.to_parquet(out)
        elif suffix in (".csv", ".tsv"):
            ds.to_csv(out, sep="\t" if suffix == ".tsv" else ",", index=False)
        elif suffix == ".jsonl":
            ds.to_json(out, lines=True)
        else:
            ds.save_to_disk(out)
    if push_to_hub:
        if not token:
            raise RuntimeError(
                "push_to_hub needs a Hub token: set $HF_TOKEN or a Prefect Secret named 'hf-token'"
            )
        ds.push_to_hub(push_to_hub, token=token, private=True)
    return out or push_to_hub or ""
