"""`t2i ablate`: three caption regimes × seeds through the real pipeline, one table, shared stages made once."""

import json
import re
from pathlib import Path

import pytest

from t2i.flows.ablation import VARIANTS, summarise
from t2i.flows.cli import main

SMALL = [
    "download.max_images=48",
    "download.shard_size=24",
    "train.steps=3",
    "train.batch_size=8",
    "train.sample_prompts=0",
    "evaluate.num_prompts=6",
    "evaluate.steps=2",
]


@pytest.mark.slow
def test_ablate_trains_each_variant_per_seed_and_ends_with_the_summary_line(
    prefect_harness, workspace, capsys
):
    args = ["ablate", "--preset", "tiny", "--workspace", str(workspace), "--seeds", "0", "1"]
    args += [f"--set={o}" for o in SMALL]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"class: \d\.\d{3}, vlm: \d\.\d{3}, vlm\+cutmix: \d\.\d{3}", lines[-1])
    report_line = next(ln for ln in lines if ln.startswith("report: "))
    root = Path(report_line.removeprefix("report: ")).parent
    results = json.loads((root / "results.json").read_text())
    assert results["seeds"] == [0, 1] and set(results["runs"]) == set(VARIANTS)
    assert all(len(runs) == 2 for runs in results["runs"].values())
    assert "| overall |" in (root / "report.md").read_text()
    # 3 variants × 2 seeds = 6 trainings; images made once, captions twice (template, vlm) + composites once
    assert len(list((workspace / "train").iterdir())) == 6
    assert len(list((workspace / "download").iterdir())) == 1
    assert len(list((workspace / "recaption").iterdir())) == 3

    # a rerun finds every run finished and writes the same table
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == lines[-1]


def test_spread_is_the_sample_standard_deviation_over_seeds():
    table = summarise({"vlm": [{"overall": 0.2}, {"overall": 0.4}, {"overall": 0.6}]})
    assert abs(table["vlm"]["overall"]["mean"] - 0.4) < 1e-12
    assert abs(table["vlm"]["overall"]["std"] - 0.2) < 1e-12


def test_ablate_needs_shapes_prompts(prefect_harness, workspace, capsys):
    code = main(["ablate", "--workspace", str(workspace), "--set", "evaluate.prompts=file:/x.txt"])
    assert code == 2 and "evaluate.prompts must be 'shapes:<split>'" in capsys.readouterr().err
