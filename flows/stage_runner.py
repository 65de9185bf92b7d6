"""The one shard runner: every way a data stage's work is split goes through `run_stage`.

- Several nodes (the nodes of one `t2i run`, or `t2i recaption` started on several machines at once): every
  shard is claimed in the shared workspace before it is computed (`t2i.data.claims`), so each is computed once.
- `--part k/n` and `cluster.parts` child runs: a part is responsible for its interleaved share (`part_shards`).
- The GPUs of one machine: one device process per GPU group (`on_devices`), each taking shards the same way.
- One process: `in_process`, the one-lane case of the same loop (threads for the CPU stages).

A run computes every shard of its share it can claim, waits for those that live processes elsewhere hold
(taking over the claims of dead ones), and the manifest is written once, by the run that claims it; the
others wait for it, and that write is the artifact's materialization as a Prefect asset (`t2i.flows.assets`).
A run that dies loses only its in-flight shards; a rerun finishes them.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from t2i.data.claims import ShardClaims, shard_claim
from t2i.data.store import Artifact, ShardInfo
from t2i.flows.assets import commit, reused
from t2i.tasks.device_processes import run_stage_process
from t2i.tasks.reporting import Progress, run_logger

MANIFEST_CLAIM = "manifest"
WAIT_LOG_SECONDS = 60.0


@dataclass
class ShardSet:
    """One artifact of a sharded stage, the shards of it this run is responsible for, and what they read."""

    label: str
    artifact: Artifact
    num_shards: int
    shards: list[int]
    source: Artifact | None = None
    summary: Callable[[], dict[str, Any]] | None = None  # manifest extras, made by the run that writes it

    def missing(self) -> list[int]:
        """The shards of this run's share not on disk, or unreadable (those are computed again)."""
        return [i for i in self.shards if not self.artifact.has_shard(i)]

    def absent(self) -> list[int]:
        """The shards of this run's share not on disk, from one listing of the folder: cheap enough to poll
        every few seconds on a network filesystem (a visible shard is complete: it appears by a rename)."""
        try:
            names = set(os.listdir(self.artifact.root))
        except FileNotFoundError:
            names = set()
        return [i for i in self.shards if self.artifact.shard_path(i).name not in names]


# (set, shard index, the next shard of the same set this lane will take, for prefetching) → the shard's record
ShardFn = Callable[[ShardSet, int, "int | None"], ShardInfo]
Report = Callable[[str, int, int, int, float], None]  # label, index, rows, rejects, seconds
Compute = Callable[[list[ShardSet], dict[str, ShardClaims], Report], None]


# --- which shard a lane takes -----------------------------------------------------------------------------


class ShardQueue:
    """The shards of `sets` in order; each goes to the first lane that claims it. Shared by the lanes of a
    process (thread-safe); every process walks its own queue over the same claims."""

    def __init__(self, sets: list[ShardSet], claims: dict[str, ShardClaims]) -> None:
        self.claims = claims
        self.items: Iterator[tuple[ShardSet, int]] = iter([(s, i) for s in sets for i in s.shards])
        self.lock = threading.Lock()

    def take(self) -> tuple[ShardSet, int] | None:
        with self.lock:
            for s, i in self.items:
                claims, name = self.claims[s.label], shard_claim(i)
                if s.artifact.has_shard(i) or not claims.take(name):
                    continue
                if s.artifact.has_shard(i):  # written by its last holder, which has exited since
                    claims.release(name)
                    continue
                return s, i
            return None

    def close(self) -> None:
        with self.lock:
            self.items = iter(())


def run_lane(queue: ShardQueue, run: ShardFn, report: Report, lookahead: bool = False) -> None:
    """Take, compute and finish shards until the queue has none left to claim. With `lookahead` the next shard
    is claimed before the current one runs, so its input can be read meanwhile."""
    current = queue.take()
    while current is not None:
        s, i = current
        upcoming = queue.take() if lookahead else None
        started = time.time()
        try:
            info = run(s, i, upcoming[1] if upcoming and upcoming[0] is s else None)
        except BaseException:
            queue.close()  # the other lanes stop taking; their running shards finish
            for held in filter(None, (current, upcoming)):
                queue.claims[held[0].label].release(shard_claim(held[1]))
            raise
        queue.claims[s.label].finish(shard_claim(i))
        report(s.label, i, info.rows, info.rejects, time.time() - started)
        current = upcoming if lookahead else queue.take()


def drain(
    sets: list[ShardSet],
    claims: dict[str, ShardClaims],
    run: ShardFn,
    report: Report,
    lanes: int = 1,
    lookahead: bool = False,
) -> None:
    """Compute every shard of `sets` this process can claim, on `lanes` threads (each in the caller's Prefect
    context, so their task runs belong to its flow run)."""
    queue = ShardQueue(sets, claims)
    if lanes == 1:
        return run_lane(queue, run, report, lookahead)
    with ThreadPoolExecutor(lanes, thread_name_prefix="shard-lane") as pool:
        futures = [
            pool.submit(contextvars.copy_context().run, run_lane, queue, run, report, lookahead)
            for _ in range(lanes)
        ]
        for future in futures:
            future.result()


def in_process(run: ShardFn, lanes: int = 1, lookahead: bool = False) -> Compute:
    return lambda sets, claims, report: drain(sets, claims, run, report, lanes, lookahead)


def on_devices(stage: str, cfg: Any, groups: list[list[str] | None]) -> Compute:
    """One device process per device group, each loading its model once and taking shards of every set
    (images and composites in one launch) through the same claims."""

    def compute(sets: list[ShardSet], claims: dict[str, ShardClaims], report: Report) -> None:
        timeout = claims[sets[0].label].timeout
        run_logger().info(f"[{stage}] {len(groups)} device processes: {groups}")
        futures = [
            run_stage_process.with_options(task_run_name=f"{stage}-process-{w}").submit(
                stage, cfg, [_set_ref(s) for s in sets], gpus, w, timeout, report
            )
            for w, gpus in enumerate(groups)
        ]
        for future in futures:
            future.result()

    return compute


def _set_ref(s: ShardSet) -> dict[str, Any]:
    source = s.source.ref() if s.source is not None else None
    refs = {"artifact": s.artifact.ref(), "source": source}
    return {"label": s.label, **refs, "num_shards": s.num_shards, "shards": s.shards}


def set_from_ref(ref: dict[str, Any]) -> ShardSet:
    source = Artifact.from_ref(ref["source"]) if ref["source"] is not None else None
    return ShardSet(
        ref["label"], Artifact.from_ref(ref["artifact"]), ref["num_shards"], ref["shards"], source
    )


# --- a stage: its sets computed, waited for, finalized once --------------------------------------------------


def run_stage(sets: list[ShardSet], compute: Compute, claim_timeout: float) -> list[dict[str, Any]]:
    """Bring every set to complete (or, for a part, its share to on-disk) and return one summary per set."""
    pending = [s for s in sets if not s.artifact.is_complete()]
    started = time.time()
    missing = {s.label: _prepare(s) for s in pending}
    claims = {s.label: ShardClaims(s.artifact.root, claim_timeout, run_logger()) for s in pending}
    report = _progress(pending, missing)
    while todo := [s for s in pending if s.missing()]:
        compute(todo, claims, report)
        wait_for_others(todo, claims)
    finalizers = [f for s in pending if (f := _finalizer(s, claims[s.label], started))]
    for finalize in finalizers:  # first the manifests nobody is writing yet, then wait for the others'
        finalize(wait=False)
    for finalize in finalizers:
        finalize(wait=True)
    return [_summary(s) if s in pending else skipped_summary(s.label, s.artifact) for s in sets]


def _progress(sets: list[ShardSet], missing: dict[str, list[int]]) -> Report:
    """A progress bar per set (log lines and a Prefect progress artifact), advanced by finished shards."""
    bars = {
        s.label: Progress(s.label, len(s.shards), done=len(s.shards) - len(missing[s.label])) for s in sets
    }
    lock = threading.Lock()

    def report(label: str, index: int, rows: int, rejects: int, seconds: float) -> None:
        with lock:
            bars[label].advance(
                f"(shard {index:05d}: {rows} rows, {rejects} rejects, {seconds:.1f}s, "
                f"{rows / max(seconds, 1e-9):.0f}/s)"
            )

    return report


def _prepare(s: ShardSet) -> list[int]:
    """The set's folder made and cleared of dead writers' temporaries; returns its missing shards."""
    s.artifact.root.mkdir(parents=True, exist_ok=True)
    s.artifact.clean_stale_temporaries()
    missing = s.missing()
    run_logger().info(
        f"[{s.label}] {len(s.shards) - len(missing)} of {len(s.shards)} shards already done, "
        f"{len(missing)} to run → {s.artifact.root}"
    )
    return missing


def wait_for_others(sets: list[ShardSet], claims: dict[str, ShardClaims]) -> None:
    """Wait while live processes elsewhere hold every missing shard; return once all are on disk or one of them
    can be claimed (its holder died, or failed and let it go)."""

    def holders() -> list[str] | None:
        held = []
        for s in sets:
            for i in s.absent():
                claim = claims[s.label].live_holder(shard_claim(i))
                if claim is None:
                    return None
                held.append(f"{s.label} shard {i:05d} ({claim.who()})")
        return held or None

    poll_until(
        lambda: holders() is None, lambda: f"shards other processes are computing: {_short(holders())}"
    )


def _finalizer(s: ShardSet, claims: ShardClaims, started: float) -> Callable[[bool], bool] | None:
    """`finalize(wait)`: write the set's manifest once, or wait for another process to; None when shards of
    the stage are still missing (a part's share is done, other parts' are not)."""
    art, logger = s.artifact, run_logger()
    present = len(art.done_shards(s.num_shards))
    if present < s.num_shards:
        logger.info(
            f"[{s.label}] this run's shards are done; {present} of {s.num_shards} shards on disk, "
            "the manifest is written by the run that completes the last one"
        )
        return None

    def write() -> None:
        manifest = art.finalize_shards(
            num_shards=s.num_shards,
            config=art.extra.get("config", {}),
            inputs=art.extra.get("inputs", {}),
            started=started,
            extra=s.summary() if s.summary else None,
        )
        logger.info(
            f"[{s.label}] complete: {manifest['rows']} rows, {manifest['rejects']} rejects "
            f"{manifest['rejects_by_reason'] or ''} in {manifest['seconds']:.1f}s → {art.root}"
        )

    def materialize() -> None:  # the set's source is the one artifact it is made from
        commit(s.label, art, [s.source] if s.source is not None else [], write)

    return lambda wait: write_once(art, claims, materialize, f"{s.label} manifest", wait)


def _summary(s: ShardSet) -> dict[str, Any]:
    art = s.artifact
    if not art.is_complete():
        return {"stage": s.label, "path": str(art.root), "skipped": False, "complete": False}
    counts = _counts(art.read_manifest())
    return {"stage": s.label, "path": str(art.root), "skipped": False, "complete": True, **counts}


def write_once(
    artifact: Artifact,
    claims: ShardClaims,
    write: Callable[[], Any],
    label: str,
    wait: bool = True,
    name: str = MANIFEST_CLAIM,
) -> bool:
    """Run `write` (which ends by writing the artifact's manifest) in exactly one process: this one, unless
    another live process claimed `name` first, in which case wait for its manifest (or, without `wait`,
    return at once). True if this process wrote it."""
    while not artifact.is_complete():
        if claims.take(name):
            if artifact.is_complete():  # written by a holder that has exited since
                claims.release(name)
                break
            try:
                write()
            except BaseException:
                claims.release(name)
                raise
            claims.finish(name)
            return True
        if not wait:
            return False

        def done_or_free() -> bool:
            return artifact.is_complete() or claims.live_holder(name) is None

        def waiting_for() -> str:
            holder = claims.live_holder(name)
            return f"the {label}, written by {holder.who() if holder else 'another process'}"

        poll_until(done_or_free, waiting_for)
    return False


def poll_until(done: Callable[[], bool], what: Callable[[], str], longest: float = 5.0) -> None:
    """Poll `done` (from every 0.25 s up to every `longest` s), saying every minute what is awaited."""
    delay, said = 0.25, time.time()
    if not done():
        run_logger().info(f"waiting for {what()}")
    while not done():
        time.sleep(delay)
        delay = min(delay * 1.5, longest)
        if time.time() - said > WAIT_LOG_SECONDS:
            run_logger().info(f"still waiting for {what()}")
            said = time.time()


def _short(items: list[str] | None, most: int = 4) -> str:
    items = items or []
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def skipped_summary(stage: str, artifact: Artifact) -> dict[str, Any]:
    """The summary of a complete artifact this run leaves as it is (recorded as a referenced asset)."""
    run_logger().info(f"[{stage}] already complete: {artifact.root}")
    reused(stage, artifact)
    counts = _counts(artifact.read_manifest())
    return {"stage": stage, "path": str(artifact.root), "skipped": True, "complete": True, **counts}


def _counts(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest[k] for k in ("rows", "rejects", "rejects_by_reason") if k in manifest}
