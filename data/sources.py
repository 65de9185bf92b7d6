"""Image sources for the download stage: the synthetic shapes world, an image folder, a `datasets` dataset.

A source is a deterministic, indexable list of items: `read(start, stop)` yields the same items for the same
range every time, which is what lets a shard be redone alone after a crash. Items carry raw bytes; decoding
(and rejecting bad files) is the download task's job.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"})


@dataclass
class SourceItem:
    key: str
    data: bytes
    label: int = -1
    class_name: str | None = None
    caption_gt: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


class Source(Protocol):
    def __len__(self) -> int: ...

    def identity(self) -> dict[str, Any]:
        """What identifies the source's content, for the download fingerprint."""
        ...

    def read(self, start: int, stop: int) -> Iterator[SourceItem]: ...


class ShapesSource:
    """The embedded default: scenes of coloured shapes rendered on demand; index → image is a pure function."""

    def __init__(self, num_images: int, seed: int = 0, split: str = "train") -> None:
        self.num_images, self.seed, self.split = num_images, seed, split

    def __len__(self) -> int:
        return self.num_images

    def identity(self) -> dict[str, Any]:
        from t2i.data import shapes

        return {"kind": "synthetic:shapes", "seed": self.seed, "split": self.split, "version": shapes.VERSION}

    def read(self, start: int, stop: int) -> Iterator[SourceItem]:
        from t2i.data import shapes

        for i in range(start, min(stop, self.num_images)):
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
    """ImageNet's `class/*.JPEG` layout (labels from sorted class folders) or a flat folder (no labels).

    Files are listed once, sorted, so the same folder always gives the same shards; files without an image
    extension are ignored (counted), files with one are kept even if they turn out not to be images — those
    become rejects with a reason.
    """

    def __init__(self, root: str | Path, max_images: int | None = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"download.source: folder {self.root} does not exist")
        files, self.ignored = [], 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith("."):
                    continue
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(os.path.relpath(os.path.join(dirpath, name), self.root))
                else:
                    self.ignored += 1
        files.sort()
        self.files = files[:max_images] if max_images else files
        nested = [f for f in files if os.sep in f]
        self.classes = sorted({f.split(os.sep, 1)[0] for f in nested}) if len(nested) == len(files) else []
        self.class_index = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.files)

    def identity(self) -> dict[str, Any]:
        listing = hashlib.sha256("\n".join(self.files).encode()).hexdigest()[:16]
        return {
            "kind": "folder",
            "root": str(self.root.resolve()),
            "files": len(self.files),
            "listing": listing,
        }

    def read(self, start: int, stop: int) -> Iterator[SourceItem]:
        for rel in self.files[start:stop]:
            try:
                data = (self.root / rel).read_bytes()
            except OSError as err:  # unreadable file: an empty payload becomes a reject downstream
                data = b""
                attributes = {"read_error": str(err)}
            else:
                attributes = {}
            cls = rel.split(os.sep, 1)[0] if self.classes else None
            yield SourceItem(
                key=rel,
                data=data,
                label=self.class_index.get(cls, -1) if cls else -1,
                class_name=cls,
                attributes=attributes,
            )


class HFSource:
    """A `datasets` dataset: a Hub id (e.g. `ILSVRC/imagenet-1k`, token from $HF_TOKEN) or a local
    `save_to_disk` folder. Images are read undecoded, so bad files become rejects rather than crashes."""

    def __init__(
        self, name: str, split: str = "train", revision: str | None = None, max_images: int | None = None
    ):
        import datasets

        self.name, self.split, self.revision = name, split, revision
        path = Path(name).expanduser()
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), split=split)
        else:
            ds = datasets.load_dataset(name, split=split, revision=revision, token=os.environ.get("HF_TOKEN"))
        self.image_column = next((k for k, f in ds.features.items() if isinstance(f, datasets.Image)), None)
        if self.image_column is None:
            raise ValueError(f"download.source: dataset {name!r} has no Image column ({list(ds.features)})")
        self.label_column = next(
            (k for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), None
        )
        self.label_names = ds.features[self.label_column].names if self.label_column else None
        ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        if max_images:
            ds = ds.select(range(min(max_images, len(ds))))
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "hf",
            "name": self.name,
            "split": self.split,
            "revision": self.revision,
            "rows": len(self.ds),
            "fingerprint": getattr(self.ds, "_fingerprint", None),
        }

    def read(self, start: int, stop: int) -> Iterator[SourceItem]:
        rows = self.ds.select(range(start, min(stop, len(self.ds))))
        for offset, row in enumerate(rows):
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
                key=f"{self.split}/{start + offset:08d}",
                data=data,
                label=label,
                class_name=self.label_names[label] if self.label_names and label >= 0 else None,
                attributes=extra,
            )


def open_source(
    source: str, *, split: str, seed: int, max_images: int | None, revision: str | None
) -> Source:
    kind, _, rest = source.partition(":")
    if source == "synthetic:shapes":
        assert max_images is not None  # enforced by DownloadConfig
        return ShapesSource(max_images, seed=seed, split=split)
    if kind == "folder":
        return FolderSource(rest, max_images=max_images)
    if kind == "hf":
        return HFSource(rest, split=split, revision=revision, max_images=max_images)
    raise ValueError(f"unknown source {source!r}")


def attributes_json(attributes: dict[str, Any]) -> str | None:
    return json.dumps(attributes, sort_keys=True) if attributes else None
