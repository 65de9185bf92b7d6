"""`tests/gpu/check.py --smoke`: the GPU check's own code on CPU at tiny sizes, so a rare GPU slot is never
spent on a typo. Runs it as `make gpu-check` would (a subprocess), offline."""

import ast
import importlib.util
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

CHECK = Path(__file__).with_name("check.py")
# Every figure a run prints, named as the check's docstring names them: <m> is each denoiser (dit-tiny and
# cad-tiny here), [dit] marks those DiT-I alone has. A renamed, missing or unlisted figure fails the test.
FIGURES = [
    "imports",
    "device",
    "data",
    "t5 load",
    "t5 wo dtype",
    "t5 encode",
    "<m> full loop",
    "[dit] <m> full loop online text",
    "[dit] <m> online/precomputed step time",
    "<m> resume",
    "<m> resume max|Δw|",
    "<m> resume nondeterministic ops",
    "<m> train (resumed leg)",
    "<m> training preview",
    "<m> sample",
    "<m> bare step",
    "<m> full/bare",
    "<m> MFU",
    "vae encode",
    "wall time",
]
WORDS = {"device", "t5 wo dtype"}  # figures whose value is a word, not a number
MODELS = ("dit-tiny", "cad-tiny")


def expected_names() -> list[str]:
    names = []
    for figure in FIGURES:
        dit_only, figure = figure.startswith("[dit] "), figure.removeprefix("[dit] ")
        models = [m for m in MODELS if m.startswith("dit") or not dit_only]
        names += [figure.replace("<m>", m) for m in models] if "<m>" in figure else [figure]
    return names


def run_check(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TMPDIR": str(tmp_path), **env}
    return subprocess.run(
        [sys.executable, str(CHECK), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=CHECK.parents[2],
    )


def test_the_docstring_names_every_figure():
    doc = " ".join(ast.get_docstring(ast.parse(CHECK.read_text(encoding="utf-8"))).split())
    assert not [f for f in FIGURES if f not in doc], doc


def test_smoke_run_prints_every_figure_with_a_finite_number(tmp_path):
    proc = run_check(tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # figures start at the line's start; indented lines are details (package versions, loader notes)
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line and line[:1] != " ")
    for name in expected_names():
        assert name in lines, f"no line for {name!r} in:\n{proc.stdout}"
        if name not in WORDS:
            value = lines[name].split()[0]
            assert math.isfinite(float(value)), f"{name}: {lines[name]}"
    unlisted = [n for n in lines if n.startswith(MODELS) and n not in expected_names()]
    assert not unlisted, f"figures missing from FIGURES and the check's docstring: {unlisted}"
    assert lines["t5 wo dtype"].split()[0] in ("bfloat16", "float32", "bfloat16+float32"), lines[
        "t5 wo dtype"
    ]
    assert re.match(r"\d+ of \d+ checks passed", lines["summary"]), lines["summary"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("t2i-gpu-check-")]  # workspace removed


def test_a_missing_module_stops_the_check_before_any_leg(tmp_path):
    """A carried wheel left out (diffusers here, shadowed by a package that cannot be imported) ends the run in
    the import check, naming the module, before the data set or any leg."""
    shadow = tmp_path / "shadow" / "diffusers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'diffusers'\", name='diffusers')\n"
    )
    path = os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))
    t0 = time.monotonic()
    proc = run_check(tmp_path, PYTHONPATH=path)
    assert proc.returncode == 2, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "stopped before any timed leg" in proc.stderr and "diffusers" in proc.stderr, proc.stderr
    assert re.search(r"^  MISSING diffusers: .*t2i\.models\.vae", proc.stdout, re.M), proc.stdout
    assert "imports: " in proc.stdout and "FAILED" in proc.stdout
    assert "data: " not in proc.stdout and "device: " not in proc.stdout
    assert time.monotonic() - t0 < 120  # seconds on a GPU machine; generous for a loaded 2-core runner


def test_the_bare_step_times_the_training_step(tmp_path, monkeypatch):
    """The bare step is `Trainer.step` itself (the counted step, the warm-up and the timed ones), not a copy of
    it: here in this process, at the smoke run's sizes, with the installed prefect."""
    from t2i.tasks.train import Trainer

    monkeypatch.setenv("T2I_CHECK_WITH_PREFECT", "1")
    spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
    check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", check)
    spec.loader.exec_module(check)
    steps, training_step = [], Trainer.step

    def counted_step(trainer, step, batches):
        steps.append(step)
        return training_step(trainer, step, batches)

    monkeypatch.setattr(Trainer, "step", counted_step)
    s = check.SMOKE
    data = check.make_dataset(tmp_path, s)
    train_cfg, text_cfg = check.configs(tmp_path, s, "dit")
    rate, flops = check.bare_step(s, tmp_path, "dit-tiny", train_cfg, text_cfg, data)
    assert len(steps) == 1 + s.warmup + s.iters and rate > 0 and flops > 0
