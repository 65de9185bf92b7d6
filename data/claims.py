"""Claims in a shared workspace: which process computes which shard of a stage (and who writes its manifest),
so that every shard is computed once however many nodes, GPUs and parts work on the stage.

A claim is a small file `<artifact>/.claims/<name>.<generation>`, created with O_CREAT | O_EXCL (atomic on a
local disk, NFSv3 and later, Lustre, GPFS) and holding who made it: host, pid, process start time, GPUs. Its
holder refreshes its mtime every `heartbeat` seconds from a background thread. A claim is stale when its holder
is gone:

- made on this machine: its process no longer exists (seen at once, so a rerun on the node where a run was
  killed takes its shards back immediately);
- made on another machine: its mtime is older than `timeout` (the node died, or lost the filesystem). Clocks
  must agree to well within the timeout (NTP); the default, 5 minutes, also covers NFS attribute caching.

A stale claim of generation g is taken over by creating generation g + 1, again with O_EXCL, so of several
processes that see it stale at once exactly one wins. A finished shard's claim stays as the record of who
computed it; a failed one is removed, so any node may retry the shard at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2i.data.store import host_tag, pid_alive

CLAIMS_DIR = ".claims"
DEFAULT_TIMEOUT = 300.0


def shard_claim(index: int) -> str:
    return f"part-{index:05d}"


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the claimer."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def holder_alive(record: dict[str, Any]) -> bool:
    """Whether the process that made a claim on this machine still runs (a reused pid does not count)."""
    if not pid_alive(record["pid"]):
        return False
    start = process_start(record["pid"])
    return record.get("start") is None or start is None or start == record["start"]


@dataclass(frozen=True)
class Claim:
    """The newest generation of a claim as read from disk; `record` is None while its maker writes it."""

    name: str
    generation: int
    path: Path
    record: dict[str, Any] | None
    mtime: float

    def who(self) -> str:
        r = self.record or {}
        gpus = f" GPUs {r['devices']}" if r.get("devices") else ""
        return f"{r.get('host', '?')}:{r.get('pid', '?')}{gpus}"


class ShardClaims:
    """The claims of one artifact folder, as seen and held by this process."""

    def __init__(self, root: Path, timeout: float = DEFAULT_TIMEOUT, logger: Any = None) -> None:
        self.dir = Path(root) / CLAIMS_DIR
        self.timeout = float(timeout)
        self.log = logger or logging.getLogger("t2i")
        self.held: dict[str, Path] = {}

    # --- reading -------------------------------------------------------------------------------------------
    def current(self, name: str) -> Claim | None:
        """The newest generation of `name`, or None if nobody ever claimed it. Generations are made in order;
        a released one leaves a gap of one."""
        newest, generation = None, 0
        while True:
            path = self.dir / f"{name}.{generation}"
            if path.exists():
                newest = path
            elif not (self.dir / f"{name}.{generation + 1}").exists():
                break
            generation += 1
        if newest is None:
            return None
        try:
            mtime = newest.stat().st_mtime
        except FileNotFoundError:  # released just now: free
            return None
        return Claim(name, int(newest.suffix[1:]), newest, _read_record(newest), mtime)

    def is_stale(self, claim: Claim) -> bool:
        """Its holder is gone: a process of this machine that no longer runs (or this process, which no
        longer holds it: it finished or gave it up), or another machine that stopped refreshing it."""
        record = claim.record
        if record is not None and record.get("tag") == host_tag():
            if record["pid"] == os.getpid():
                return not _HEARTBEAT.holds(claim.path)
            return not holder_alive(record)
        return time.time() - claim.mtime > self.timeout

    def live_holder(self, name: str) -> Claim | None:
        """The claim of `name` if a live process (or another object of this one) holds it, else None."""
        claim = self.current(name)
        if claim is None or name in self.held or self.is_stale(claim):
            return None
        return claim

    # --- holding -------------------------------------------------------------------------------------------
    def take(self, name: str) -> bool:
        """Claim `name` unless a live process holds it; a stale claim is taken over (one taker wins)."""
        if name in self.held:
            return True
        claim = self.current(name)
        if claim is not None and not self.is_stale(claim):
            return False
        path = self.dir / f"{name}.{claim.generation + 1 if claim else 0}"
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(_own_record()))
            f.flush()
            os.fsync(f.fileno())
        if claim is not None and claim.record and claim.record.get("pid") != os.getpid():
            self.log.warning(f"took over {name} of {self.dir.parent} from {claim.who()}: its holder is gone")
        self.held[name] = path
        _HEARTBEAT.add(path, self)
        return True

    def finish(self, name: str) -> None:
        """Our work on `name` is on disk: stop refreshing; the claim stays as the record of who did it."""
        path = self.held.pop(name, None)
        if path is not None:
            _HEARTBEAT.remove(path)

    def release(self, name: str) -> None:
        """Give `name` up without finishing it (a failure): remove our claim so anyone may take it at once."""
        path = self.held.pop(name, None)
        if path is not None:
            _HEARTBEAT.remove(path)
            path.unlink(missing_ok=True)

    def release_all(self) -> None:
        for name in list(self.held):
            self.release(name)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _own_record() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "tag": host_tag(),
        "pid": pid,
        "start": process_start(pid),
        "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "claimed": time.time(),
    }


class _Heartbeat:
    """The claims this process holds (of every artifact), refreshed by one daemon thread while it runs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: dict[Path, ShardClaims] = {}
        self.thread: threading.Thread | None = None

    def add(self, path: Path, owner: ShardClaims) -> None:
        with self.lock:
            self.held[path] = owner
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="claims-heartbeat", daemon=True)
                self.thread.start()

    def remove(self, path: Path) -> None:
        with self.lock:
            self.held.pop(path, None)

    def holds(self, path: Path) -> bool:
        with self.lock:
            return path in self.held

    def _run(self) -> None:
        while True:
            with self.lock:
                held = list(self.held.items())
            interval = min((owner.timeout / 5 for _, owner in held), default=30.0)
            time.sleep(max(0.2, min(interval, 30.0)))
            for path, owner in held:
                try:
                    os.utime(path)
                except FileNotFoundError:
                    if self.holds(path):
                        owner.log.warning(f"the claim {path} vanished: another process may compute it too")
                        self.remove(path)
                except OSError:  # a filesystem hiccup: the next beat tries again
                    pass


_HEARTBEAT = _Heartbeat()
