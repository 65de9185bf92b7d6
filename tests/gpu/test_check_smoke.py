"""`tests/gpu/check.py --smoke`: the GPU check's own code on CPU at tiny sizes, so a rare GPU slot is never
spent on a typo. Runs it as `make gpu-check` would (a subprocess), offline."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

CHECK = Path(__file__).with_name("check.py")
FIGURES = [
    "device", "data", "vae encode", "t5 encode",
    *(f"{m}-tiny {figure}" for m in ("dit", "cad") for figure in (
        "full loop", "resume", "resume max|Δw|", "train (resumed leg)", "training preview", "sample",
        "bare step", "full/bare", "MFU",
    )),
]  # fmt: skip


def test_smoke_run_prints_every_figure_with_a_finite_number(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(CHECK), "--smoke"], capture_output=True, text=True, env=env,
                          timeout=900, cwd=CHECK.parents[2])  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    for name in FIGURES:
        assert name in lines, f"no line for {name!r} in:\n{proc.stdout}"
        if name != "device":
            value = lines[name].split()[0]
            assert math.isfinite(float(value)), f"{name}: {lines[name]}"
    assert re.match(r"\d+ of \d+ checks passed", lines["summary"]), lines["summary"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("t2i-gpu-check-")]  # workspace removed
