"""The entry point of a stage's device process (`python -m t2i.tasks.stage_process`, started by
`t2i.tasks.device_processes.run_stage_process`): reads its job (stage, config, shard sets, claim timeout) as
JSON on stdin, loads its model once on the GPUs it was given, takes shards through the stage's claims until
none is left (`t2i.flows.stage_runner.drain`, the loop every split shares), and reports each finished shard on
stdout. It exits if the process that started it dies, so a killed run leaves no process holding a GPU or a
claim."""

from __future__ import annotations

import json
import os
import sys

from t2i.data.claims import ShardClaims
from t2i.data.store import exit_with
from t2i.tasks.device_processes import READY, REPORT


def shard_runner(stage: str, cfg_json: dict):
    """`run(shard_set, index, next_index)` for one shard of `stage`."""
    if stage == "recaption":
        from t2i.flows.config import RecaptionConfig
        from t2i.tasks.recaption import caption_shard

        cfg = RecaptionConfig.model_validate(cfg_json)
        return lambda s, i, nxt: caption_shard(cfg, s.artifact, i, s.source, next_index=nxt)
    if stage == "latents":
        from t2i.flows.config import LatentsConfig
        from t2i.tasks.latents import latents_shard

        cfg = LatentsConfig.model_validate(cfg_json)
        return lambda s, i, nxt: latents_shard.fn(cfg, s.artifact, i, s.source)
    raise ValueError(f"no device process for stage {stage!r}")


def report(label: str, index: int, rows: int, rejects: int, seconds: float) -> None:
    line = {"label": label, "index": index, "rows": rows, "rejects": rejects, "seconds": seconds}
    print(REPORT + json.dumps(line), flush=True)


def main() -> int:
    from t2i.flows.stage_runner import drain, set_from_ref  # the shard loop, shared with in-process runs

    exit_with(os.getppid())
    print(
        READY + json.dumps({"pid": os.getpid(), "devices": os.environ.get("CUDA_VISIBLE_DEVICES")}),
        flush=True,
    )
    spec = json.loads(sys.stdin.read())
    sets = [set_from_ref(ref) for ref in spec["sets"]]
    claims = {s.label: ShardClaims(s.artifact.root, spec["claim_timeout"]) for s in sets}
    run = shard_runner(spec["stage"], spec["cfg"])
    drain(sets, claims, run, report, lookahead=spec["stage"] == "recaption")
    return 0


if __name__ == "__main__":
    sys.exit(main())
