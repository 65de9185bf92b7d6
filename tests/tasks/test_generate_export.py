"""Using the trained model: `t2i generate` (same command, same files), and `t2i export-model` folders that a
separate interpreter without this project loads with diffusers and samples to the same images (DiT-I and
CAD-I), with a model card that carries the evaluation the export came from."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i.flows.cli import main
from tests.conftest import SMALL_PIPELINE, run_cli

PROMPT = "a large red circle in the top left"
SETS = [a for o in SMALL_PIPELINE for a in ("--set", o)]


def _copy(workspace: Path, to: Path) -> Path:
    shutil.copytree(workspace, to, symlinks=True)
    return to


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.mark.slow
def test_the_same_generate_command_twice_writes_identical_images(small_pipeline, tmp_path, cli_env):
    ws = _copy(small_pipeline, tmp_path / "ws")
    args = ["generate", "--preset", "tiny", "--workspace", str(ws), *SETS, "--prompt", PROMPT]
    first, second = (run_cli([*args, "--out", str(tmp_path / name)], cli_env) for name in ("a", "b"))
    printed = first.stdout.splitlines()
    assert printed[:4] == [str(tmp_path / "a" / f"000-{k:02d}.png") for k in range(4)]
    assert printed[4] == str(tmp_path / "a" / "grid.png")
    assert _pngs(tmp_path / "a") == _pngs(tmp_path / "b") and len(_pngs(tmp_path / "a")) == 5
    assert "4 images" in second.stdout
    pixels = np.asarray(Image.open(tmp_path / "a" / "000-00.png"))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 1  # an image, not a constant
    other_seed = run_cli([*args, "--seed", "1", "--out", str(tmp_path / "c")], cli_env)
    assert (
        other_seed.returncode == 0
        and _pngs(tmp_path / "c")["000-00.png"] != _pngs(tmp_path / "a")["000-00.png"]
    )


def test_generate_names_what_is_missing_or_wrong(tiny_models, tmp_path, capsys):
    ws = tmp_path / "ws"
    shutil.copytree(tiny_models, ws / "models")
    base = ["generate", "--preset", "tiny", "--workspace", str(ws), *SETS]
    assert main([*base, "--prompt", PROMPT]) == 1
    assert "run `t2i train --preset tiny` (or `t2i run`) first" in capsys.readouterr().err
    assert main([*base, "--prompt", PROMPT, "--n", "0"]) == 2
    assert "n: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert main(base) == 2
    assert "prompts: List should have at least 1 item" in capsys.readouterr().err
    assert main([*base, "--prompts-file", str(tmp_path / "none.txt")]) == 2
    assert "--prompts-file" in capsys.readouterr().err


CLEAN_LOAD = """
import json, sys
sys.path[:] = [p for p in sys.path if p] + {site}
import importlib.util, types
from importlib import metadata
assert importlib.util.find_spec("t2i") is None, "the project is importable"
if metadata.version("torch").endswith("+cpu") and not metadata.version("torchvision").endswith("+cpu"):
    # this machine's CPU torch beside PyPI's CUDA torchvision (nothing to do with the export; see
    # models/torchvision_shim.py): import torchvision's pure-Python parts, hide the ABI-incompatible audio
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    sys.modules.update(torchaudio=None, torchcodec=None)
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({folder!r}, trust_remote_code=True)
out = pipe({prompt!r}, num_images_per_prompt=2, generator=torch.Generator().manual_seed(3), output_type="np")
np.save({target!r}, out.images)
print(type(pipe).__name__, type(pipe.transformer).__name__, pipe.transformer.config.architecture)
"""


def _load_in_a_clean_interpreter(folder: Path, target: Path, home: Path) -> str:
    """`python -S`: no site hooks, so neither the editable install of this project nor its .pth files; the
    site-packages folder alone gives torch, diffusers and transformers."""
    site = [sysconfig.get_paths()["purelib"]]
    code = CLEAN_LOAD.format(site=site, folder=str(folder), prompt=PROMPT, target=str(target))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "T2I"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    home.mkdir()
    command = [sys.executable, "-S", "-c", textwrap.dedent(code)]
    proc = subprocess.run(command, cwd=home, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def exports(small_pipeline, tmp_path_factory, prefect_server):
    """The reference run's DiT-I and a CAD-I trained on the same data, each exported and generated from."""
    root = tmp_path_factory.mktemp("exports")
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server["url"],
        "PREFECT_HOME": str(prefect_server["home"]),
    }
    ws = _copy(small_pipeline, root / "ws")
    runs = {}
    for arch in ("dit", "cad"):
        common = ["--preset", "tiny", "--workspace", str(ws), *SETS, "--set", f"train.model={arch}"]
        if arch == "cad":
            run_cli(["train", *common], env)
        assert main(["export-model", *common, "--out", str(root / arch)]) == 0
        out = str(root / f"{arch}-png")
        assert main(["generate", *common, "--prompt", PROMPT, "--n", "2", "--seed", "3", "--out", out]) == 0
        runs[arch] = root / arch
    return root, runs


@pytest.mark.parametrize("arch", ["dit", "cad"])
def test_an_export_loads_in_diffusers_without_the_project_and_draws_the_same_images(exports, arch):
    root, runs = exports
    folder = runs[arch]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["t2i_pipeline", "T2IPipeline"] and index["vae"] == [
        "diffusers",
        "AutoencoderKL",
    ]
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir(), part
    assert list((folder / "transformer").glob("*.safetensors"))
    described = _load_in_a_clean_interpreter(folder, root / f"{arch}.npy", root / f"home-{arch}")
    assert described == f"T2IPipeline T2IDenoiser {arch}"
    theirs = np.load(root / f"{arch}.npy").astype(int)
    ours = np.stack(
        [np.asarray(Image.open(root / f"{arch}-png" / f"000-{k:02d}.png")) for k in range(2)]
    ).astype(int)
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() <= 2, np.abs(theirs - ours).max()


def test_the_model_card_carries_the_evaluation_it_was_exported_from(exports, small_pipeline):
    root, runs = exports
    card = (runs["dit"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\npipeline_tag: text-to-image\nlicense: other\n")
    evaluation = next((small_pipeline / "evaluate").glob("*/manifest.json"))
    metrics = json.loads(evaluation.read_text())["metrics"]
    scores, chance = metrics["shapes"]["scores"], metrics["shapes"]["chance"]
    for key, value in scores.items():
        assert f"| {key} | {value:.3f} | {chance[key]:.3f} |" in card, key
    assert f"| FID (small) | {metrics['fidelity']['fid']:.3f} |" in card
    assert re.search(r"\| denoiser \| DiT-I .*, size `tiny`, [\d,]+ parameters \|", card)
    assert "| CutMix | on: composites in" in card
    assert "![samples](samples.png)" in card and (runs["dit"] / "samples.png").is_file()
    assert f'DiffusionPipeline.from_pretrained("{runs["dit"].resolve()}", trust_remote_code=True)' in card
    # the CAD-I run was never evaluated: its card says so instead of showing another run's numbers
    cad_card = (runs["cad"] / "README.md").read_text()
    assert "Not evaluated" in cad_card and "| overall |" not in cad_card


def test_a_failed_push_keeps_the_export_and_never_shows_the_token(
    small_pipeline, tmp_path, prefect_harness, monkeypatch, capsys
):
    """The token comes from the Prefect Secret `hf-token`; there is no Hub here, so the push fails."""
    from prefect.blocks.system import Secret

    monkeypatch.delenv("HF_TOKEN", raising=False)
    ws, out = _copy(small_pipeline, tmp_path / "ws"), tmp_path / "export"
    args = ["export-model", "--preset", "tiny", "--workspace", str(ws), *SETS, "--push-to-hub", "me/tiny"]
    assert main(args) == 2  # no token: refused before any work
    assert "needs a Hub token" in capsys.readouterr().err and not out.exists()
    token = "hf_" + "x" * 30
    Secret(value=token).save("hf-token", overwrite=True)
    try:
        assert main([*args, "--out", str(out)]) == 1
    finally:
        Secret(value="").save("hf-token", overwrite=True)
    captured = capsys.readouterr()
    assert "push to the Hub repo me/tiny failed" in captured.err
    assert token not in captured.out + captured.err
    assert (out / "model_index.json").is_file() and (out / "README.md").is_file()
    assert not any(token in p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
