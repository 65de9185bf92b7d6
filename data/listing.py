"""The source listing, made once and cached in the workspace, so that only `download` ever opens the raw source.

Walking 1.28M ImageNet files (or loading the Hub dataset) for every `t2i status` on every node was slow, and
fingerprinting the folder's absolute path orphaned every artifact when the same data was mounted elsewhere.
A source spec (a folder's path; a dataset, split and revision; WebDataset tars and their class field) is
listed once into

    <workspace>/sources/<spec key>/summary.json     digest, count, classes, ignored files (all the plan reads)
    <workspace>/sources/listings/<digest>.parquet   a folder's files: path, size, label, sorted by path;
                                                    tars' samples: tar, key, image offset and size, label

The download fingerprint takes the digest (what the files are), never where they are. Listings are named by
their digest, so a relist never rewrites one that a running download reads, and moved copies share one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from t2i.data.sources import (
    IMAGE_EXTENSIONS,
    FolderSource,
    HFSource,
    Source,
    WdsSource,
    hf_identity,
    load_hf_dataset,
)
from t2i.data.store import atomic_path, canonical_json
from t2i.data.tar_shards import (
    BAD_CLASS,
    DUPLICATE_KEY,
    TARS_METADATA,
    TarSamples,
    resolve_tars,
    scan_tar,
)

SOURCES_DIR = "sources"
SUMMARY = "summary.json"
SCAN_THREADS = (
    16  # directories (tars) read at once: on NFS/Lustre every readdir and stat is a network round trip
)

log = logging.getLogger(__name__)


def is_listed(source: str) -> bool:
    """Folders, datasets and tars are listed; the generated shapes world is not (its config is its content)."""
    return not source.startswith("synthetic:")


@dataclass(frozen=True)
class SourceSummary:
    """What a source spec held when it was listed: small enough for every `t2i status` to read."""

    kind: str  # "folder" | "hf" | "wds"
    source: str  # the spec as listed (informational: not part of any fingerprint)
    digest: str  # folder: the sorted (path, size) lines; hf: the dataset's identity; wds: the samples' lines
    count: int
    classes: list[str]  # label → class name (folder names, the dataset's ClassLabel names, the class members)
    ignored: int = 0  # files without an image extension; tar members of no sample
    listing: str | None = None  # folder, wds: the listing's path relative to the workspace
    hf: dict[str, Any] | None = None  # hf: name (Hub only), split, revision, dataset fingerprint, rows
    wds: dict[str, Any] | None = None  # wds: class field, tars, unlabelled and rejected samples, damaged tars
    listed_at: float = 0.0
    seconds: float = 0.0

    def identity(self) -> dict[str, Any]:
        """What the download fingerprint takes from the source: its content, never its location."""
        return {"kind": self.kind, "digest": self.digest, "count": self.count}


def num_shards(num_items: int, shard_size: int) -> int:
    return max(1, -(-num_items // shard_size))


def item_order(count: int, seed: int, max_images: int | None, shuffle: bool) -> np.ndarray:
    """Source indices in shard order (shard i holds positions [i·shard_size, (i+1)·shard_size)). A listed
    source is a seeded permutation of its whole listing cut to max_images, so every shard mixes classes and
    max_images is a sample, the same on every node; the shapes world's scenes are already random draws."""
    if not shuffle:
        return np.arange(count)
    order = np.random.default_rng(seed).permutation(count)
    return order[:max_images] if max_images else order


def shard_items(order: np.ndarray, index: int, shard_size: int) -> np.ndarray:
    """Shard `index`'s source indices in listing order, so a folder is read directory by directory."""
    return np.sort(order[index * shard_size : (index + 1) * shard_size])


def spec_dir(workspace: Path, source: str, split: str, revision: str | None, wds_class: str = "cls") -> Path:
    """Where a spec's summary lives: one per folder path, one per dataset × split × revision, one per tar
    spec × class field. The path is made absolute but symlinks are not resolved: a node where the data is
    not mounted finds the same key."""
    kind, _, rest = source.partition(":")
    local = Path(rest).expanduser()
    if kind in ("folder", "wds") or local.is_dir():
        source = f"{kind}:{os.path.abspath(local)}"
    spec = {"folder": [source], "wds": [source, wds_class]}.get(kind, [source, split, revision])
    return Path(workspace) / SOURCES_DIR / hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:16]


def source_summary(
    workspace: Path,
    source: str,
    split: str,
    revision: str | None,
    relist: bool = False,
    wds_class: str = "cls",
) -> SourceSummary:
    """The cached summary of a spec; the source is listed when there is none yet, or on `relist`."""
    path = spec_dir(workspace, source, split, revision, wds_class) / SUMMARY
    if not relist and path.is_file():
        return SourceSummary(**json.loads(path.read_text()))
    if source.startswith("folder:"):
        summary = list_folder(Path(workspace), source)
    elif source.startswith("wds:"):
        summary = list_wds(Path(workspace), source, wds_class)
    else:
        summary = list_dataset(source, split, revision)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(asdict(summary), indent=1) + "\n")
    return summary


# --- folders ------------------------------------------------------------------------------------------------


def list_folder(workspace: Path, source: str) -> SourceSummary:
    """Walk the folder once; write its listing (if no listing with its digest exists yet)."""
    root = Path(source.partition(":")[2]).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"download.source: folder {root} does not exist")
    started = time.time()
    table, ignored = walk_folder(root)
    table, classes = with_labels(table)
    digest = listing_digest(table)
    rel = write_listing(workspace, table, digest)
    return SourceSummary(
        kind="folder",
        source=f"folder:{os.path.abspath(root)}",
        digest=digest,
        count=table.num_rows,
        classes=classes,
        ignored=ignored,
        listing=rel,
        listed_at=started,
        seconds=round(time.time() - started, 3),
    )


def walk_folder(root: Path) -> tuple[pa.Table, int]:
    """Every image file under `root` as (path relative to root, size), sorted by path, and the number of other
    files. One `scandir` pass, the directories of a level read in parallel; paths are held once, as a list
    of str, until they become an Arrow column."""
    paths: list[str] = []
    sizes = array("q")
    ignored, level = 0, [""]
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        while level:
            below: list[str] = []
            for names, lengths, dirs, others in pool.map(functools.partial(_scan, root), level):
                paths += names
                sizes += lengths
                below += dirs
                ignored += others
            level = below
    table = pa.table({"path": pa.array(paths, pa.string()), "size": np.frombuffer(sizes, np.int64)})
    del paths
    return table.sort_by("path"), ignored


def _scan(root: Path, rel: str) -> tuple[list[str], array, list[str], int]:
    """One directory: its image files (relative paths, sizes), its subfolders, its count of other files.
    Hidden entries are skipped; symlinked folders are not followed (as `os.walk`), a loop would never end."""
    names, sizes, dirs, others = [], array("q"), [], 0
    with os.scandir(root / rel) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir(follow_symlinks=False):
                dirs.append(path)
            elif entry.is_dir():
                continue
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                names.append(path)
                sizes.append(_size(entry))
            else:
                others += 1
    return names, sizes, dirs, others


def _size(entry: os.DirEntry) -> int:
    """-1 for a file that cannot be stat'ed (a broken link): it is listed, and rejected when read."""
    try:
        return entry.stat().st_size
    except OSError:
        return -1


def with_labels(table: pa.Table) -> tuple[pa.Table, list[str]]:
    """Add `label`: the file's top folder among the sorted class folders when every image sits in one
    (ImageNet's layout), -1 for every file of a flat or mixed folder; and the class names."""
    paths = table["path"]
    nested = table.num_rows > 0 and pc.all(pc.match_substring(paths, "/")).as_py()
    if not nested:
        return table.append_column("label", pa.array(np.full(table.num_rows, -1, np.int32))), []
    top = pc.list_element(pc.split_pattern(paths, "/", max_splits=1), 0)
    classes = sorted(pc.unique(top).to_pylist())
    labels = pc.index_in(top, value_set=pa.array(classes, pa.string())).cast(pa.int32())
    return table.append_column("label", labels), classes


def listing_digest(table: pa.Table) -> str:
    """sha256 of the sorted `path<TAB>size` lines: the same files give the same digest wherever they are."""
    h = hashlib.sha256()
    for batch in table.select(["path", "size"]).to_batches(max_chunksize=1 << 16):
        paths, sizes = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        h.update("".join(f"{p}\t{s}\n" for p, s in zip(paths, sizes, strict=True)).encode())
    return h.hexdigest()[:16]


def write_listing(workspace: Path, table: pa.Table, digest: str) -> str:
    """The listing's path relative to the workspace, written unless one with its digest exists."""
    rel = f"{SOURCES_DIR}/listings/{digest}.parquet"
    if not (workspace / rel).is_file():
        with atomic_path(workspace / rel) as tmp:
            pq.write_table(table, tmp, compression="zstd")
    return rel


def read_listing(workspace: Path, summary: SourceSummary) -> pa.Table:
    path = Path(workspace) / str(summary.listing)
    if not path.is_file():
        raise FileNotFoundError(
            f"the listing of {summary.source} ({path}) is missing; `t2i download --relist` lists it again"
        )
    return pq.read_table(path)


# --- WebDataset tars -----------------------------------------------------------------------------------------


def list_wds(workspace: Path, source: str, class_field: str) -> SourceSummary:
    """Read every tar's headers once, tars in parallel; write the samples' listing (if no listing with its
    digest exists yet). A tar cut short keeps its samples before the cut and is named in the summary."""
    tars = resolve_tars(source)
    started = time.time()
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        scans = list(pool.map(lambda name: scan_tar(tars.path(name), class_field), tars.names))
    table, classes = with_class_labels(samples_table(tars.names, scans))
    table = with_duplicates_rejected(table)
    _check_class_field(table, source, class_field)
    digest = samples_digest(table, classes)
    sizes = {name: scan.size for name, scan in zip(tars.names, scans, strict=True)}
    table = table.replace_schema_metadata({TARS_METADATA: json.dumps(sizes).encode()})
    damaged = [{"tar": n, "detail": s.damage} for n, s in zip(tars.names, scans, strict=True) if s.damage]
    if damaged:
        log.warning(
            "%d of the %d tars of %s end early or break off: %s", len(damaged), len(sizes), source, damaged
        )
    reasons = table["reason"].drop_null().value_counts().to_pylist()
    unlabelled = pc.sum(pc.and_(pc.equal(table["label"], -1), pc.is_null(table["reason"]))).as_py() or 0
    if (
        unlabelled
    ):  # kept (captions need no class), but a class-name captioner or a class count would be wrong
        log.warning(
            "%d of the %d samples of %s have no class where download.wds_class=%s looks (kept, label -1)",
            unlabelled, table.num_rows, source, class_field,
        )  # fmt: skip
    rest = os.path.abspath(os.path.expanduser(source.partition(":")[2]))
    return SourceSummary(
        kind="wds",
        source=f"wds:{rest}",
        digest=digest,
        count=table.num_rows,
        classes=classes,
        ignored=sum(s.ignored for s in scans),
        listing=write_listing(workspace, table, digest),
        wds={
            "class_field": class_field,
            "tars": len(sizes),
            "unlabelled": unlabelled,  # samples kept without a class member
            "rejected": {r["values"]: r["counts"] for r in reasons},
            "damaged": damaged,
        },
        listed_at=started,
        seconds=round(time.time() - started, 3),
    )


def samples_table(names: tuple[str, ...], scans: list[TarSamples]) -> pa.Table:
    """The tars' samples in listing order (tars by name, samples in member order), the tar as a dictionary
    column: what a download shard needs to read each image alone."""
    tar = np.repeat(np.arange(len(names), dtype=np.int32), [len(s.keys) for s in scans])

    def column(name: str, kind: pa.DataType) -> pa.Array:
        return pa.array([v for s in scans for v in getattr(s, name)], kind)

    return pa.table(
        {
            "tar": pa.DictionaryArray.from_arrays(pa.array(tar, pa.int32()), pa.array(names, pa.string())),
            "key": column("keys", pa.string()),
            "offset": column("offsets", pa.int64()),
            "size": column("sizes", pa.int64()),
            "class": column("classes", pa.string()),
            "reason": column("reasons", pa.string()),
            "detail": column("details", pa.string()),
        }
    )


def with_class_labels(table: pa.Table) -> tuple[pa.Table, list[str]]:
    """Replace the class members' text by `label`: the class names are the distinct values, sorted (as numbers
    when every one is a class index, so ImageNet's 0-999 keep their numbering), a label its position; -1
    for a sample without a class member. The same rule as a folder's sorted class folders."""
    values = table["class"]
    distinct = [v for v in pc.unique(values).to_pylist() if v is not None]
    numeric = all(v.isascii() and v.isdecimal() for v in distinct)
    classes = sorted(distinct, key=int if numeric else None)
    labels = pc.index_in(values, value_set=pa.array(classes, pa.string())).fill_null(-1).cast(pa.int32())
    return table.drop_columns(["class"]).append_column("label", labels), classes


def with_duplicates_rejected(table: pa.Table) -> pa.Table:
    """Reject every sample whose key an earlier one already has (a key names one image in every stage's
    output); the first is kept."""
    rows = pa.array(np.arange(table.num_rows, dtype=np.int64))
    first = table.select(["key"]).append_column("row", rows).group_by("key").aggregate([("row", "min")])
    repeated = np.ones(table.num_rows, bool)
    repeated[first["row_min"].to_numpy()] = False
    if not repeated.any():
        return table
    mask = pa.array(repeated)
    detail = pa.scalar("an earlier sample in the listing has this key, and is kept")
    for name, value in (("reason", pa.scalar(DUPLICATE_KEY)), ("detail", detail)):
        column = pc.if_else(mask, value, table[name])
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def _check_class_field(table: pa.Table, source: str, class_field: str) -> None:
    """A class field whose members no sample can read is a config error, not a million rejects (samples
    without any class member are kept unlabelled, with a warning: captions need no class)."""
    bad = pc.equal(table["reason"], BAD_CLASS)
    if pc.any(bad).as_py() and not pc.any(pc.not_equal(table["label"], -1)).as_py():
        example = table.filter(bad).slice(0, 1).to_pylist()[0]
        raise ValueError(
            f"download.wds_class={class_field}: no sample of {source} has a readable class there (e.g. "
            f"{example['key']}: {example['detail']}); allowed: 'cls' (the .cls member) or 'json:<field>'"
        )


def samples_digest(table: pa.Table, classes: list[str]) -> str:
    """sha256 of the class names and the samples' `tar, key, offset, size, label, reason` lines: the same tars
    give the same digest wherever they are mounted."""
    h = hashlib.sha256(canonical_json(classes).encode())
    for batch in table.select(["tar", "key", "offset", "size", "label", "reason"]).to_batches(1 << 16):
        columns = [c.to_pylist() for c in batch.columns]
        h.update("".join("\t".join(map(str, row)) + "\n" for row in zip(*columns, strict=True)).encode())
    return h.hexdigest()[:16]


# --- datasets -----------------------------------------------------------------------------------------------


def list_dataset(source: str, split: str, revision: str | None) -> SourceSummary:
    """Load the dataset once: its identity (the `datasets` fingerprint, not a local path) and its size."""
    import datasets

    started = time.time()
    name = source.partition(":")[2]
    ds, local = load_hf_dataset(name, split, revision)
    identity = hf_identity(ds, name, local, split, revision)
    label = next((f for f in ds.features.values() if isinstance(f, datasets.ClassLabel)), None)
    return SourceSummary(
        kind="hf",
        source=f"hf:{os.path.abspath(Path(name).expanduser())}" if local else source,
        digest=hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16],
        count=len(ds),
        classes=list(label.names) if label else [],
        hf=identity,
        listed_at=started,
        seconds=round(time.time() - started, 3),
    )


# --- reading ------------------------------------------------------------------------------------------------


def open_listed(
    workspace: Path, summary: SourceSummary, source: str, split: str, revision: str | None
) -> Source:
    """The reader the download task uses: files by relative path under the folder's current root, tars'
    images by offset, or the dataset, checked against its summary (a changed dataset must be relisted, not
    mixed into old shards)."""
    name = source.partition(":")[2]
    if summary.kind == "folder":
        return FolderSource(name, read_listing(workspace, summary), summary.classes)
    if summary.kind == "wds":
        return WdsSource(source, read_listing(workspace, summary), summary.classes)
    ds, local = load_hf_dataset(name, split, revision)
    if hf_identity(ds, name, local, split, revision) != summary.hf:
        raise RuntimeError(
            f"download.source: {source} changed since it was listed ({summary.hf}); "
            "`t2i download --relist` lists it again (its outputs get new fingerprints)"
        )
    return HFSource(ds, split, name)
