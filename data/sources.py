"""Image sources for the download stage: the synthetic shapes world, an image folder, WebDataset tar shards,
a `datasets` dataset.

A source is a deterministic, indexable list of items: `read(indices)` yields the same items for the same
indices every time, which is what lets a shard be redone alone after a crash. Folders, tars and datasets are
indexed through their listing, made once (`t2i.data.listing`). Items carry raw bytes; decoding (and rejecting
bad files) is the download task's job.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from t2i.data.tar_shards import TARS_METADATA, read_at, resolve_tars

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"})


@dataclass
class SourceItem:
    key: str
    data: bytes
    label: int = -1
    class_name: str | None = None
    caption_gt: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    rejected: tuple[str, str] | None = None  # (reason, detail) when the source already knows it is no image


class Source(Protocol):
    def read(self, indices: Sequence[int]) -> Iterator[SourceItem]:
        """The items at these indices (of the generator, the folder's listing or the dataset), in order."""
        ...


class ShapesSource:
    """The embedded default: scenes of coloured shapes rendered on demand; index → image is a pure function."""

    def __init__(self, num_images: int, seed: int = 0, split: str = "train") -> None:
        self.num_images, self.seed, self.split = num_images, seed, split

    def identity(self) -> dict[str, Any]:
        from t2i.data.versions import SHAPES_WORLD

        return {"kind": "synthetic:shapes", "seed": self.seed, "split": self.split, "version": SHAPES_WORLD}

    def read(self, indices: Sequence[int]) -> Iterator[SourceItem]:
        from t2i.data import shapes

        for i in map(int, indices):
            scene = shapes.scene(i, seed=self.seed, split=self.split)
            buf = io.BytesIO()
            shapes.render(scene).save(buf, format="PNG")
            yield SourceItem(
                key=f"shapes-{self.split}-{i:08d}",
                data=buf.getvalue(),
                label=scene.label,
                class_name=scene.class_name,
                caption_gt=scene.caption,
                attributes=scene.attributes(),
            )


class FolderSource:
    """ImageNet's `class/*.JPEG` layout (labels from sorted class folders) or a flat folder (no labels), read
    through its listing (`t2i.data.listing`): files are opened by relative path under wherever the folder is
    mounted now, and the folder is never walked again. Listed files that turn out not to be images become
    rejects with a reason."""

    def __init__(self, root: str | Path, listing: pa.Table, classes: Sequence[str]) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"download.source: folder {self.root} does not exist")
        # one contiguous table: `take` on a chunked one re-concatenates it, once per shard
        self.listing, self.classes = listing.combine_chunks(), list(classes)

    def read(self, indices: Sequence[int]) -> Iterator[SourceItem]:
        rows = self.listing.take(pa.array(indices, pa.int64())).select(["path", "label"])
        for rel, label in zip(*(rows[c].to_pylist() for c in ("path", "label")), strict=True):
            try:
                data, rejected = (self.root / rel).read_bytes(), None
            except OSError as err:  # unreadable or vanished
                data, rejected = b"", ("unreadable", str(err))
            yield SourceItem(
                key=rel,
                data=data,
                label=label,
                class_name=self.classes[label] if label >= 0 else None,
                rejected=rejected,
            )


class WdsSource:
    """WebDataset tar shards read through their listing (`t2i.data.tar_shards`): each image is one `pread` at
    the offset the listing recorded, so a shard reads its own images and nothing else of the tars. Tars are
    found by relative name under wherever the spec points now, and must be the size they were when listed.
    Samples the listing rejected (no image, cut by a truncated tar, unreadable class, repeated key) come out
    as rejects with the listing's reason."""

    COLUMNS = ("tar", "key", "offset", "size", "label", "reason", "detail")

    def __init__(self, source: str, listing: pa.Table, classes: Sequence[str]) -> None:
        self.tars = resolve_tars(source)
        self.listing, self.classes = listing.combine_chunks(), list(classes)
        self._check_tars(source, json.loads((listing.schema.metadata or {}).get(TARS_METADATA, b"{}")))

    def _check_tars(self, source: str, sizes: dict[str, int]) -> None:
        """Every listed tar is there, as large as it was: a rewritten tar must be relisted, never read at
        offsets that no longer hold its images."""
        missing, changed = [], []
        for name, size in sizes.items():
            path = self.tars.path(name)
            if not path.is_file():
                missing.append(str(path))
            elif path.stat().st_size != size:
                changed.append(f"{path} ({size} -> {path.stat().st_size} bytes)")
        if missing:
            raise FileNotFoundError(
                f"download.source: {len(missing)} listed tars of {source} are missing: "
                f"{', '.join(missing[:3])}"
            )
        if changed:
            raise RuntimeError(
                f"download.source: {len(changed)} tars of {source} changed since they were listed: "
                f"{', '.join(changed[:3])}; `t2i download --relist` lists them again (new fingerprints)"
            )

    def read(self, indices: Sequence[int]) -> Iterator[SourceItem]:
        rows = self.listing.take(pa.array(indices, pa.int64())).select(list(self.COLUMNS))
        fd, opened, open_error = -1, None, None
        try:
            for tar, key, offset, size, label, reason, detail in zip(
                *(rows[c].to_pylist() for c in self.COLUMNS), strict=True
            ):
                item = SourceItem(key, b"", label, self.classes[label] if label >= 0 else None)
                if reason is not None:
                    item.rejected = (reason, detail or "")
                    yield item
                    continue
                if tar != opened:  # a shard's indices are in listing order: each tar is opened once
                    if fd >= 0:
                        os.close(fd)
                    fd, opened, open_error = -1, tar, None
                    try:
                        fd = os.open(self.tars.path(tar), os.O_RDONLY)
                    except OSError as err:
                        open_error = str(err)
                if open_error is None:
                    item.data = read_at(fd, size, offset)
                if len(item.data) != size:
                    item.rejected = ("unreadable", open_error or f"{tar} ends before byte {offset + size}")
                yield item
        finally:
            if fd >= 0:
                os.close(fd)


def load_hf_dataset(name: str, split: str, revision: str | None) -> tuple[Any, bool]:
    """(the split of a Hub dataset or of a local `save_to_disk`/data folder, whether it is local)."""
    import datasets

    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        return (ds[split] if isinstance(ds, datasets.DatasetDict) else ds), True
    if path.is_dir():
        return datasets.load_dataset(str(path), split=split), True
    token = os.environ.get("HF_TOKEN")
    return datasets.load_dataset(name, split=split, revision=revision, token=token), False


def hf_identity(ds: Any, name: str, local: bool, split: str, revision: str | None) -> dict[str, Any]:
    """What identifies a dataset's content: its own fingerprint and size, and for the Hub its id and revision
    (a local copy's path is left out, so a moved copy keeps its artifacts)."""
    return {
        "name": None if local else name,
        "split": split,
        "revision": None if local else revision,
        "fingerprint": getattr(ds, "_fingerprint", None),
        "rows": len(ds),
    }


class HFSource:
    """A `datasets` dataset: a Hub id (e.g. `ILSVRC/imagenet-1k`, token from $HF_TOKEN) or a local
    `save_to_disk` folder. Images are read undecoded, so bad files become rejects rather than crashes."""

    def __init__(self, ds: Any, split: str = "train", name: str = "") -> None:
        import datasets

        self.split = split
        self.image_column = next((k for k, f in ds.features.items() if isinstance(f, datasets.Image)), None)
        if self.image_column is None:
            raise ValueError(f"download.source: dataset {name!r} has no Image column ({list(ds.features)})")
        self.label_column = next(
            (k for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), None
        )
        self.label_names = ds.features[self.label_column].names if self.label_column else None
        self.ds = ds.cast_column(self.image_column, datasets.Image(decode=False))

    def read(self, indices: Sequence[int]) -> Iterator[SourceItem]:
        indices = [int(i) for i in indices]
        for index, row in zip(indices, self.ds.select(indices), strict=True):
            image = row[self.image_column] or {}
            data = image.get("bytes") or b""
            if not data and image.get("path") and os.path.isfile(image["path"]):
                data = Path(image["path"]).read_bytes()
            label = (
                int(row[self.label_column])
                if self.label_column and row[self.label_column] is not None
                else -1
            )
            extra = {
                k: v
                for k, v in row.items()
                if k not in (self.image_column, self.label_column) and isinstance(v, (str, int, float, bool))
            }
            yield SourceItem(
                key=f"{self.split}/{index:08d}",
                data=data,
                label=label,
                class_name=self.label_names[label] if self.label_names and label >= 0 else None,
                attributes=extra,
            )


def attributes_json(attributes: dict[str, Any]) -> str | None:
    return json.dumps(attributes, sort_keys=True) if attributes else None
