"""Two CPU processes (torchrun, gloo) train one model: same weights on both ranks, the configured global batch."""

import pytest
import torch

from t2i.data.store import checkpoint_dirs
from t2i.flows.config import load_config
from t2i.flows.download import download_flow
from t2i.flows.latents import latents_flow
from t2i.flows.plan import Plan
from t2i.flows.recaption import recaption_flow
from t2i.flows.train import train_flow
from t2i.tasks.checkpoints import load_final, load_state

OVERRIDES = [
    "text.mode=online",
    "cutmix.enabled=false",
    "download.max_images=32",
    "download.shard_size=16",
    "recaption.backend=template",
    "train.steps=4",
    "train.batch_size=8",
    "train.checkpoint_every=2",
    "train.processes=2",
    "train.grad_accumulation=4",
]


def test_two_processes_train_identical_weights_with_the_global_batch(prefect_harness, workspace):
    cfg = load_config("tiny", OVERRIDES, str(workspace))
    download_flow(cfg)
    recaption_flow(cfg)
    latents_flow(cfg)
    summary = train_flow(cfg)
    manifest = Plan(cfg).checkpoints.read_manifest()
    assert summary["processes"] == 2 and manifest["processes"] == 2
    assert manifest["global_batch"] == 8 and manifest["step"] == 4
    checksums = manifest["rank_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert manifest["gradient_syncs_per_step"] == 1  # 4 micro-batches, one all-reduce
    root = Plan(cfg).checkpoints.root
    state = load_state(checkpoint_dirs(root)[-1])
    assert state["step"] == 4
    model, _ = load_final(root)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_two_processes_train_cad_with_self_conditioning_to_the_end(prefect_harness, workspace):
    """At rate 0.5 several steps skip the self-conditioning pass: DDP must still reduce every parameter."""
    cfg = load_config("tiny", [*OVERRIDES, "train.model=cad", "train.self_condition=0.5", "train.steps=6",
                               "train.grad_accumulation=1"], str(workspace))  # fmt: skip
    download_flow(cfg)
    recaption_flow(cfg)
    latents_flow(cfg)
    train_flow(cfg)
    manifest = Plan(cfg).checkpoints.read_manifest()
    assert manifest["step"] == 6 and manifest["processes"] == 2
    assert manifest["rank_checksums"][0] == manifest["rank_checksums"][1]
    model, _ = load_final(Plan(cfg).checkpoints.root)
    assert type(model).__name__ == "CAD"


def test_batch_must_split_evenly_over_processes_and_micro_batches(prefect_harness, workspace):
    cfg = load_config("tiny", ["cutmix.enabled=false", *OVERRIDES[:-3], "train.batch_size=6", "train.processes=1", "train.grad_accumulation=4"],
                      str(workspace))  # fmt: skip
    download_flow(cfg)
    recaption_flow(cfg)
    latents_flow(cfg)
    with pytest.raises(
        ValueError, match=r"train.batch_size 6 is not divisible by 1 processes × 4 accumulation steps"
    ):
        train_flow(cfg)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_equal_one_node_of_two(prefect_harness, workspace, tmp_path, monkeypatch):
    """The multi-node launch (static rendezvous at master_addr:port), run as two "nodes" on this machine.

    torchrun gives each of several local processes one intra-op thread but leaves a lone process all cores;
    the thread count changes float summation order, so both layouts are pinned to one thread to compare bits.
    """
    import shutil
    import threading

    from t2i.flows.train import resolve_scale_factor
    from t2i.tasks.train import launch_distributed

    cfg = load_config("tiny", OVERRIDES, str(workspace))
    download_flow(cfg)
    recaption_flow(cfg)
    latents_flow(cfg)
    other = tmp_path / "other"
    shutil.copytree(workspace, other)
    train_flow(cfg)  # one node, two processes

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    port = _free_port()
    results: dict[int, dict] = {}

    def node(rank: int) -> None:
        node_cfg = load_config(
            "tiny",
            [
                *OVERRIDES,
                "train.processes=1",
                "train.nodes=2",
                f"train.node_rank={rank}",
                f"train.master_port={port}",
            ],
            str(other),
        )
        plan = Plan(node_cfg)
        results[rank] = launch_distributed.fn(
            node_cfg.train, node_cfg.text, plan.checkpoints, plan.latents, plan.captions, plan.num_shards,
            resolve_scale_factor(node_cfg, plan), 1,
        )  # fmt: skip

    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert results[0]["processes"] == 2 and results[0]["global_batch"] == 8 and results[0]["step"] == 4
    assert results[1] == {"node_rank": 1, "processes": 2}
    one_node = load_final(Plan(cfg).checkpoints.root)[0].state_dict()
    two_nodes = load_final(Plan(load_config("tiny", OVERRIDES, str(other))).checkpoints.root)[0].state_dict()
    assert all(torch.equal(one_node[k], two_nodes[k]) for k in one_node)
