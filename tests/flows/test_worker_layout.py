"""`t2i worker`'s layout on a machine: one worker for whole runs, one per GPU group for parts, each group's
GPUs in its CUDA_VISIBLE_DEVICES; bad GPU lists fail before anything starts."""

import pytest

from t2i.flows.cli import main
from t2i.flows.service import gpu_groups, worker_commands


def test_one_parts_worker_per_gpu_group_and_one_for_whole_runs():
    assert gpu_groups("0,1,2,3", 2) == ["0,1", "2,3"]
    commands = worker_commands("gpu", gpu_groups("4,5", 1), limit=2, host="node7")
    assert [(name, env) for name, _, env in commands] == [
        ("node7-runs", {}),
        ("node7-gpu4", {"CUDA_VISIBLE_DEVICES": "4"}),
        ("node7-gpu5", {"CUDA_VISIBLE_DEVICES": "5"}),
    ]
    runs, part = commands[0][1], commands[1][1]
    assert runs[runs.index("--work-queue") + 1] == "default" and runs[runs.index("--limit") + 1] == "2"
    assert part[part.index("--work-queue") + 1] == "parts" and part[part.index("--limit") + 1] == "1"


def test_a_cpu_machine_runs_one_parts_worker_without_cuda_settings():
    ((name, _, env),) = worker_commands("gpu", gpu_groups("", 1), limit=1, host="laptop")[1:]
    assert name == "laptop-cpu" and env == {}


def test_gpus_that_do_not_split_into_groups_are_refused(capsys):
    with pytest.raises(ValueError, match="does not divide the 3 GPUs"):
        gpu_groups("0,1,2", 2)
    assert main(["worker", "--pool", "gpu", "--gpus", "0,1,2", "--gpus-per-part", "2"]) == 2
    assert "does not divide" in capsys.readouterr().err
