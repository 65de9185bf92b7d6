"""WebDataset tar shards as a source (`download.source=wds:...`): which tars a spec names, and their samples,
read from the tar headers.

A sample is a run of consecutive members sharing a key, split from each member's name by webdataset's own
rule (`dir/key.ext`, `base_plus_ext`); its class comes from its `.cls` member or a field of its `.json`
member. Listing reads each member's header (and the small class members) and jumps over the data, so ~1 GB
tars of ~1,280 ImageNet samples cost about one 8 KiB read per sample, never an image. webdataset's own
iterator (`tarfile` in stream mode) reads every byte of every tar; `tarfile`'s seekable mode skips the data
but parses a header five times slower than `TarHeaders`, which reads the POSIX, GNU and pax headers that
webdataset and GNU tar write. A sample's image is then (tar, offset, size): all a download shard needs to
read it alone.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The member that is a sample's image, most preferred first, when a sample holds several (a jpg and a png mask).
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "jfif")
TARS_METADATA = b"t2i.tar_sizes"  # a tars listing's schema metadata: JSON {tar: size in bytes when listed}
# webdataset's metadata members (`__meta__`, `__index__/...`), which belong to no sample
META_MEMBER = re.compile(r"__[^/]*__($|/)")

# Reasons of the samples the listing rejects, without their image ever being decoded.
NO_IMAGE = "no image"  # no member with an image suffix
TRUNCATED = "truncated"  # a member cut by the end of a truncated tar (the same reason decoding gives)
BAD_CLASS = "bad class"  # a class member that cannot be read as a class index or name
DUPLICATE_KEY = "duplicate key"  # a key an earlier sample already has; the first one is kept

FORMS = "one .tar file, a folder of .tar files, or a brace-glob like /data/train-{0000..1023}.tar"


@dataclass(frozen=True)
class TarSet:
    """The tars of a spec as paths relative to `root` (the deepest folder holding them all): the listing
    records the relative names, so the same tars mounted elsewhere list the same."""

    root: Path
    names: tuple[str, ...]  # sorted

    def path(self, name: str) -> Path:
        return self.root / name


def resolve_tars(source: str) -> TarSet:
    """The tars `wds:<rest>` names: one .tar, every .tar directly in a folder, or a brace-glob expanded as
    webdataset expands shard URLs. A missing one is an error naming download.source, before anything is read."""
    from webdataset.shardlists import expand_urls

    rest = os.path.expanduser(source.partition(":")[2])
    if os.path.isdir(rest):
        root = Path(os.path.abspath(rest))
        with os.scandir(root) as entries:
            names = sorted(
                e.name
                for e in entries
                if e.name.endswith(".tar") and not e.name.startswith(".") and e.is_file()
            )
        if not names:
            raise FileNotFoundError(f"download.source: folder {root} holds no .tar file (wds: takes {FORMS})")
        return TarSet(root, tuple(names))
    paths = [os.path.abspath(os.path.expanduser(p)) for p in expand_urls(rest)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"download.source: {len(missing)} of the {len(paths)} tars of {source} do not exist: {shown} "
            f"(wds: takes {FORMS})"
        )
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return TarSet(Path(root), tuple(sorted({os.path.relpath(p, root) for p in paths})))


BLOCK = 512
WINDOW = 8192  # bytes read at a header: an ImageNet sample's small members and the image's header in one read


@dataclass(frozen=True)
class Member:
    """A regular file in a tar: its name and where its data is."""

    name: str
    offset: int
    size: int


class TarHeaders:
    """The regular members of a tar, from its headers, and how the headers ended: `end` is None at the
    end-of-archive block, else what broke them off (a header cut by the end of the file, a corrupt one)."""

    def __init__(self, path: Path) -> None:
        self.path, self.size = path, path.stat().st_size
        self.end: str | None = None
        self._fd, self._start, self._buf = -1, 0, b""

    def __enter__(self) -> TarHeaders:
        self._fd = os.open(self.path, os.O_RDONLY)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def read(self, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` (fewer at the end of the file), from the window of the last read if there."""
        if not (self._start <= offset and offset + size <= self._start + len(self._buf)):
            self._start, self._buf = offset, read_at(self._fd, max(size, WINDOW), offset)
        return self._buf[offset - self._start : offset - self._start + size]

    def __iter__(self) -> Iterator[Member]:
        offset, extended = 0, {}
        while True:
            block = self.read(offset, BLOCK)
            if len(block) < BLOCK:
                self.end = (
                    f"the tar ends inside a member header at byte {offset}"
                    if block
                    else f"the tar ends at byte {self.size}, without its end-of-archive block"
                )
                return
            if not block.strip(b"\0"):  # the end-of-archive marker is two zero blocks, then only padding
                if self.read(offset + BLOCK, BLOCK).strip(b"\0") or offset == 0:
                    self.end = f"a zero block at byte {offset} before the end of the archive"
                return
            try:
                name, size, kind = _header(block)
            except ValueError as err:
                if offset == 0:
                    raise ValueError(
                        f"download.source: {self.path} is not an uncompressed tar ({err}); wds: reads images "
                        "by their offset in the tar, which needs plain .tar shards"
                    ) from None
                self.end = f"unreadable member header at byte {offset} ({err}): the rest is not listed"
                return
            data = offset + BLOCK
            if kind in (b"x", b"L"):  # pax attributes or a GNU long name, for the member that follows
                record = self.read(data, size)
                if len(record) < size:
                    self.end = f"the tar ends inside the extended header at byte {offset}"
                    return
                try:
                    extended.update(_pax(record) if kind == b"x" else {"path": record.split(b"\0", 1)[0]})
                except ValueError as err:
                    self.end = f"unreadable extended header at byte {offset} ({err}): the rest is not listed"
                    return
            else:
                if kind in (b"0", b"\0", b"7"):  # a regular file (others: folders, links, global pax)
                    size = extended.get("size", size)
                    yield Member(extended.get("path", name).decode("utf-8", "replace"), data, size)
                extended = {}
            offset = data + -(-size // BLOCK) * BLOCK


def _header(block: bytes) -> tuple[bytes, int, bytes]:
    """(name, size, type flag) of a POSIX, GNU or v7 header block; ValueError for a corrupt one."""
    stored = _number(block[148:156])
    if stored != sum(block) - sum(block[148:156]) + 256 and stored != _signed_checksum(block):
        raise ValueError("bad checksum")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0" and (prefix := block[345:500].split(b"\0", 1)[0]):
        name = prefix + b"/" + name
    return name, _number(block[124:136]), block[156:157]


def _number(field: bytes) -> int:
    """A header number: octal text, or GNU's base-256 for large ones."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise ValueError(f"not a number: {field!r}") from None


def _signed_checksum(block: bytes) -> int:
    return sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 256


def _pax(record: bytes) -> dict[str, bytes | int]:
    """The `path` and `size` of pax records (`<length> <key>=<value>\\n`); ValueError for a corrupt one."""
    out, pos = {}, 0
    while pos < len(record) and record[pos] != 0:
        space = record.index(b" ", pos)
        length = int(record[pos:space])
        if length <= space - pos:
            raise ValueError(f"pax record length {length}")
        key, _, value = record[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            out["path"] = value
        elif key == b"size":
            out["size"] = int(value)
        pos += length
    return out


def read_at(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset`, fewer only at the end of the file."""
    chunks, got = [], 0
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@dataclass
class TarSamples:
    """One tar's samples in member order, as columns: where each image is, the text of its class member
    (None without one), and the listing's reject reason (None for a sample to read)."""

    keys: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # of the image's data; -1 for a rejected sample
    sizes: list[int] = field(default_factory=list)
    classes: list[str | None] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    details: list[str | None] = field(default_factory=list)
    ignored: int = 0  # members of no sample: without an extension, webdataset's metadata
    damage: str | None = None  # how the tar ends early or breaks off, if it does
    size: int = 0  # of the tar file, to tell a rewritten tar from the listed one

    def add(self, key: str, image: Member | None, klass: str | None) -> None:
        self.keys.append(key)
        self.offsets.append(image.offset if image else -1)
        self.sizes.append(image.size if image else -1)
        self.classes.append(klass)
        self.reasons.append(None)
        self.details.append(None)

    def reject(self, key: str, reason: str, detail: str) -> None:
        self.add(key, None, None)
        self.reasons[-1], self.details[-1] = reason, detail


def scan_tar(path: Path, class_field: str) -> TarSamples:
    """Every sample of one tar, from its headers. A member cut by the end of the file rejects its sample as
    truncated; every complete sample before it is kept. A tar that ends early in a header, or breaks off at
    a corrupt one, keeps what came before (its last sample is rejected if it lacks what the others have) and
    says so in `damage`."""
    from webdataset.tariterators import base_plus_ext

    with TarHeaders(path) as tar:
        out = TarSamples(size=tar.size)
        key, members, cut, labelled = None, {}, None, False
        for member in tar:
            base, suffix = base_plus_ext(member.name)
            if base is None or META_MEMBER.match(member.name):
                out.ignored += 1
                continue
            suffix = suffix.lower()
            if base != key or suffix in members:
                if key is not None:
                    labelled |= _finish(out, tar, key, members, class_field, None)
                key, members = base, {}
            members[suffix] = member
            if member.offset + member.size > tar.size:
                got = max(tar.size - member.offset, 0)
                cut = f"the tar ends inside {member.name} ({got} of {member.size} bytes)"
                break
        out.damage = cut or tar.end
        if key is not None:
            if cut is None and tar.end is not None and not _complete(members, class_field, labelled):
                cut = f"the last sample before the tar breaks off: {tar.end}"
            _finish(out, tar, key, members, class_field, cut)
    return out


def _complete(members: dict[str, Member], class_field: str, labelled: bool) -> bool:
    """Whether a sample holds what its tar's samples hold: an image, and a class member if the others had one."""
    has_image = any(s in members for s in IMAGE_SUFFIXES)
    return has_image and (not labelled or class_field.partition(":")[0] in members)


def _finish(
    out: TarSamples,
    tar: TarHeaders,
    key: str,
    members: dict[str, Member],
    class_field: str,
    cut: str | None,
) -> bool:
    """Record one sample (or its reject); whether it had a class member."""
    if cut is not None:
        out.reject(key, TRUNCATED, cut)
        return False
    image = next((members[s] for s in IMAGE_SUFFIXES if s in members), None)
    if image is None:
        out.reject(key, NO_IMAGE, f"members: {', '.join(sorted(members))}")
        return False
    try:
        klass = class_value(tar, members, class_field)
    except ValueError as err:
        out.reject(key, BAD_CLASS, str(err))
        return True
    out.add(key, image, klass)
    return klass is not None


def class_value(tar: TarHeaders, members: dict[str, Member], class_field: str) -> str | None:
    """A sample's class as text: its `.cls` member (`cls`), or a field of its `.json` (`json:<field>`, dots for
    nested fields). None when the sample has no such member (an unlabelled sample); ValueError when the
    member is there but holds no class index or name."""
    suffix, _, path = class_field.partition(":")
    member = members.get(suffix)
    if member is None:
        return None
    text = tar.read(member.offset, member.size).decode("utf-8").strip()  # UnicodeDecodeError is a ValueError
    if suffix == "cls":
        if not text:
            raise ValueError("empty .cls member")
        return text
    value = json.loads(text)
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f".json member has no field {path!r}")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise ValueError(f".json field {path!r} is {value!r}, not a class index or name")
    return str(value)
