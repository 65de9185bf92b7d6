"""Every stage's artifact as a Prefect asset: the Prefect server records lineage and manifest summaries.

An artifact `<workspace>/<stage>/<fingerprint>` is the asset `file://<workspace>/<stage>/<fingerprint>`: the
same config over the same inputs names the same asset, whichever machine or run makes it. A workspace path
that is no valid asset key (a space, `%`, `#`, ... or over 512 characters) maps to
`t2i://workspace-<digest of its path>/<stage>/<fingerprint>` instead, its path in the asset's description.

An artifact becomes complete at one moment: when its manifest is written, by exactly one process whatever
splits the stage (parts, nodes, `--part k/n`). `commit` runs that write as a Prefect materializing task, so
the server records one `prefect.asset.materialization.succeeded` event per artifact (or `.failed` when the
write fails), naming the artifacts it was made from as upstream assets and carrying the manifest's summary as
metadata; Prefect adds a `prefect.asset.referenced` event for each upstream asset. The command line, `t2i
serve` and workers run the same stage flows, so they record the same events.

A run that finds an artifact already complete (`reused`) makes nothing new: it records a
`prefect.asset.referenced` event for it, tied to the run, and no materialization (which would claim new data
and set off asset-triggered automations).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from t2i.data.store import Artifact

if TYPE_CHECKING:
    from prefect.assets import Asset

T = TypeVar("T")
SCHEME = "file"
FALLBACK_SCHEME = "t2i"
# Manifest entries left out of the metadata: one record per shard, embeddings, per-rank sums. The manifest
# on disk keeps them; an event carries the summary (shards are counted instead).
UNSUMMARISED = ("shards", "null_embedding", "rank_checksums", "started", "finished")
LARGEST_VALUE = 4096  # characters of JSON one metadata entry may take; longer ones are named in `omitted`


def asset_key(artifact: Artifact) -> str:
    """The artifact's asset key: its folder as a `file://` URI, or the `t2i://` form for a folder path that
    Prefect does not accept in a key."""
    from prefect.assets import Asset

    workspace = Path(artifact.workspace).absolute()
    key = f"{SCHEME}://{workspace.as_posix()}/{artifact.stage}/{artifact.fingerprint}"
    try:
        return Asset(key=key).key
    except ValidationError:
        digest = hashlib.sha256(str(workspace).encode()).hexdigest()[:16]
        return f"{FALLBACK_SCHEME}://workspace-{digest}/{artifact.stage}/{artifact.fingerprint}"


def asset_of(artifact: Artifact, label: str | None = None) -> Asset:
    """The artifact as a Prefect `Asset`; with `label` (the stage's name for it, e.g. `latents-composites`)
    it carries a name and a description. Upstream assets go without, so as not to overwrite their own."""
    from prefect.assets import Asset, AssetProperties

    if label is None:
        return Asset(key=asset_key(artifact))
    props = AssetProperties(
        name=f"{label} {artifact.fingerprint}",
        description=f"The {label} artifact of the t2i pipeline in {artifact.root}",
    )
    return Asset(key=asset_key(artifact), properties=props)


def manifest_summary(artifact: Artifact, manifest: dict[str, Any]) -> dict[str, Any]:
    """What a materialization event carries: the manifest without its per-shard records and large arrays
    (counts, rejects by reason, number of shards, the config and inputs that made it, the stage's own
    statistics), and the artifact's folder."""
    summary: dict[str, Any] = {"path": str(artifact.root)}
    if isinstance(manifest.get("shards"), list):
        summary["shards"] = len(manifest["shards"])
    omitted = []
    for name, value in manifest.items():
        if name in UNSUMMARISED:
            continue
        if len(json.dumps(value, default=str)) > LARGEST_VALUE:
            omitted.append(name)
            continue
        summary[name] = value
    if omitted:
        summary["omitted"] = sorted(omitted)
    return summary


def commit(label: str, artifact: Artifact, upstream: Sequence[Artifact], write: Callable[[], T]) -> T:
    """Run `write` (which ends by writing the artifact's manifest) as the artifact's materialization, with
    `upstream` as its upstream assets and the manifest's summary as metadata. Outside a flow or task run
    (a library call, a unit test) there is no run to record it under, and `write` runs on its own."""
    from prefect.assets import add_asset_metadata, materialize
    from prefect.cache_policies import NO_CACHE
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return write()
    asset = asset_of(artifact, label)

    def materialization() -> T:
        result = write()
        add_asset_metadata(asset, manifest_summary(artifact, artifact.read_manifest()))
        return result

    task = materialize(
        asset,
        asset_deps=[asset_of(a) for a in dict.fromkeys(upstream)],
        name=f"materialize-{label}",
        task_run_name=f"materialize-{label}",
        cache_policy=NO_CACHE,  # a cached state records no materialization
        persist_result=False,
    )(materialization)
    return task()


def reused(label: str, artifact: Artifact) -> None:
    """Record that this run found `artifact` complete and used it as it is: a `prefect.asset.referenced`
    event, related to the run, and no materialization."""
    from prefect.context import AssetContext, FlowRunContext, TaskRunContext
    from prefect.events import emit_event

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    resource = AssetContext.asset_as_resource(asset_of(artifact, label))
    emit_event(event="prefect.asset.referenced", resource=resource, related=[])
