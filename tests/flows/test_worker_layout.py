"""A machine's GPUs, grouped by one function for every path: the device processes a flow starts (their test:
tests/tasks/test_latents.py) and `t2i worker`'s Prefect workers both use the GPUs a scheduler allocated
(CUDA_VISIBLE_DEVICES), one group each; bad GPU lists fail before anything starts. The GPU count is faked
(torch.cuda.device_count) on this CPU machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from t2i.flows.cli import main
from t2i.flows.service import worker_commands
from t2i.tasks.device_processes import gpu_groups

# The real CLI in a process whose torch reports `n` GPUs (its children, the workers, see the real count: 0).
WITH_GPUS = "import sys, t2i.models, torch; torch.cuda.device_count = lambda: {n}; from t2i.flows.cli import main; sys.exit(main(sys.argv[1:]))"  # noqa: E501


def with_gpus(n: int) -> list[str]:
    return [sys.executable, "-c", WITH_GPUS.format(n=n)]


@pytest.fixture
def gpus(monkeypatch):
    def fake(count: int, visible: str | None = None) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)

    return fake


def test_groups_are_made_of_the_gpus_the_scheduler_allocated(gpus):
    gpus(2, "4,5")
    assert gpu_groups(1) == [["4"], ["5"]]
    assert gpu_groups(2) == [["4", "5"]]
    assert gpu_groups(1, [1]) == [["5"]]  # ordinals among the visible GPUs, as cuda:N counts them
    assert gpu_groups(1, 1) == [["4"]]
    gpus(4)
    assert gpu_groups(2) == [["0", "1"], ["2", "3"]]
    assert gpu_groups(1, limit=3) == [["0"], ["1"], ["2"]]
    gpus(0)
    assert gpu_groups(1) == [None] and gpu_groups(1, limit=2) == [None, None]


def test_gpu_lists_that_cannot_be_honoured_are_refused(gpus, capsys):
    gpus(0)
    with pytest.raises(ValueError, match="GPU 0 is not visible: 0 visible"):
        gpu_groups(1, [0])
    gpus(3)
    with pytest.raises(ValueError, match="does not divide the 3 GPUs 0,1,2"):
        gpu_groups(2, [0, 1, 2])
    with pytest.raises(ValueError, match="4 GPUs asked for, 3 visible"):
        gpu_groups(1, 4)
    assert main(["worker", "--pool", "gpu", "--gpus", "0,1,2", "--gpus-per-part", "2"]) == 2
    assert main(["worker", "--pool", "gpu", "--gpus", "0,x"]) == 2
    err = capsys.readouterr().err
    assert "does not divide" in err and "GPU numbers separated by commas" in err


def test_one_parts_worker_per_gpu_group_and_one_for_whole_runs():
    commands = worker_commands("gpu", [["4"], ["5"]], limit=2, host="node7")
    assert [(name, env) for name, _, env in commands] == [
        ("node7-runs", {}),
        ("node7-gpu4", {"CUDA_VISIBLE_DEVICES": "4"}),
        ("node7-gpu5", {"CUDA_VISIBLE_DEVICES": "5"}),
    ]
    runs, part = commands[0][1], commands[1][1]
    assert runs[runs.index("--work-queue") + 1] == "default" and runs[runs.index("--limit") + 1] == "2"
    assert part[part.index("--work-queue") + 1] == "parts" and part[part.index("--limit") + 1] == "1"
    ((name, _, env),) = worker_commands("gpu", [None], limit=1, host="laptop")[1:]
    assert name == "laptop-cpu" and env == {}


def _children(pid: int) -> list[int]:
    """The children that have started their own program: one caught between fork and exec still shows its
    parent's command line and environment."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    children = [int(c) for c in path.read_text().split()] if path.exists() else []
    parent = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [c for c in children if _cmdline(c) not in (parent, None)]


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:  # gone since it was listed
        return None


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_t2i_worker_pins_its_parts_workers_to_the_allocated_gpus_and_stops_on_ctrl_c(cli_env, tmp_path):
    env = {**cli_env, "CUDA_VISIBLE_DEVICES": "4,5"}
    proc = subprocess.Popen([*with_gpus(2), "worker", "--pool", "layout", "--name", "n"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 60
        while len(children := _children(proc.pid)) < 3 and time.time() < deadline:
            time.sleep(0.2)
        pinned = sorted(_environ(c).get("CUDA_VISIBLE_DEVICES", "-") for c in children)
        assert pinned == ["4", "4,5", "5"]  # the parts workers one GPU each; the whole-runs worker both
        time.sleep(3)  # the workers are up and polling the pool
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
        started = time.time()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.time() - started < 30, out
    assert proc.returncode == 0, out
    for child in children:
        assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()
