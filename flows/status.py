"""`t2i status`: what exists on disk for a config, stage by stage (no Prefect needed)."""

from __future__ import annotations

from dataclasses import dataclass

from t2i.data.claims import ShardClaims, shard_claim
from t2i.data.store import Artifact, checkpoint_dirs
from t2i.flows.config import PipelineConfig
from t2i.flows.plan import Plan


@dataclass(frozen=True)
class StageStatus:
    stage: str
    state: str  # "complete" | "partial" | "not started"
    detail: str
    path: str


def stage_statuses(cfg: PipelineConfig) -> list[StageStatus]:
    plan = Plan(cfg)
    out = []
    for label, stage, art in plan.artifacts():
        if art.is_complete():
            m = art.read_manifest()
            detail = (
                f"{m['rows']} rows, {m['rejects']} rejects" if "rows" in m else f"{m.get('seconds', 0):.0f}s"
            )
            if stage == "train":
                detail = f"{m.get('step')} steps"
            out.append(StageStatus(label, "complete", detail, str(art.root)))
        elif stage in ("download", "cutmix", "recaption", "latents"):
            n = plan.num_shards
            done = art.done_shards(n) if art.root.is_dir() else []
            busy = in_progress(art, [i for i in range(n) if i not in done])
            state = "partial" if done or busy else "not started"
            out.append(StageStatus(label, state, f"{len(done)} of {n} shards{busy}", str(art.root)))
        elif stage == "train":
            ckpts = checkpoint_dirs(art.root)
            last = int(ckpts[-1].name.split("-")[1]) if ckpts else 0
            detail = f"{last} of {cfg.train.steps} steps"
            out.append(StageStatus(label, "partial" if ckpts else "not started", detail, str(art.root)))
        else:
            out.append(
                StageStatus(label, "partial" if art.root.is_dir() else "not started", "", str(art.root))
            )
    return out


def in_progress(art: Artifact, missing: list[int]) -> str:
    """', k in progress (host:pid, ...)' for the missing shards that live processes have claimed."""
    claims = ShardClaims(art.root)
    holders = [c.who() for i in missing if (c := claims.live_holder(shard_claim(i))) is not None]
    if not holders:
        return ""
    who = sorted(set(holders))
    return f", {len(holders)} in progress ({', '.join(who[:3])}{', …' if len(who) > 3 else ''})"


def format_statuses(statuses: list[StageStatus]) -> str:
    width = max(len(s.stage) for s in statuses)
    lines = []
    for s in statuses:
        detail = f" ({s.detail})" if s.detail else ""
        lines.append(f"{s.stage:<{width}}  {s.state + detail:<32}  {s.path}")
    return "\n".join(lines)
