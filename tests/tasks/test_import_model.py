"""The paper's released CAD-I format entering the pipeline: a randomly initialised official `CAD` (their
`pipe.py` class, `PyTorchModelHubMixin`) saved with `save_pretrained` is imported as a train run, generates,
evaluates on a `file:` prompt set, exports to diffusers (loaded without the project) and to the paper's format
(loaded by their class), and is fine-tuned for a few steps. Skips when the official code is absent."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import t2i.models  # noqa: F401  (the torchvision shim, before the peer's pipe.py imports diffusers)
from t2i.flows.cli import main
from tests.conftest import SMALL_PIPELINE, run_cli
from tests.peer import PeerUnavailable, import_peer_module, official_network_config
from tests.tasks.test_generate_export import _load_in_a_clean_interpreter

# The official CADRINTextCond at a size the tiny preset's data fits: 16×16 latents of 4 channels (shapes VAE
# at 64 px), the tiny T5's 64-wide embeddings.
TINY_OFFICIAL = {
    "data_size": 16,
    "data_dim": 64,
    "num_latents": 32,
    "latents_dim": 128,
    "label_dim": 64,
    "num_processing_layers": 1,
    "num_blocks": 2,
    "read_write_heads": 4,
    "compute_heads": 4,
}
PROMPTS = ["a large red circle in the top left", "two small blue squares"]


def _peer_cad():
    try:
        return import_peer_module("pipe").CAD
    except PeerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def imported(small_pipeline, tmp_path_factory, prefect_server):
    """A random official CAD saved by their class, imported into a copy of the reference workspace."""
    cad_class = _peer_cad()
    root = tmp_path_factory.mktemp("import")
    kwargs = {**official_network_config("base"), **TINY_OFFICIAL}
    del kwargs["_target_"]
    torch.manual_seed(0)
    official = cad_class(**kwargs)
    with torch.no_grad():  # zero-initialised paths (self-conditioning LayerNorm) take part too
        for p in official.parameters():
            if p.dtype.is_floating_point:
                p.add_(0.02 * torch.randn_like(p))
    official.save_pretrained(root / "official")
    ws = root / "ws"
    shutil.copytree(small_pipeline, ws, ignore=shutil.ignore_patterns("evaluate", "generate"))
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server["url"],
        "PREFECT_HOME": str(prefect_server["home"]),
    }
    common = ["--preset", "tiny", "--workspace", str(ws), *(a for o in SMALL_PIPELINE for a in ("--set", o))]
    args = [
        "import-model",
        str(root / "official"),
        *common,
        "--text-encoder",
        "tiny:t5",
        "--vae",
        "tiny:shapes-vae",
    ]
    proc = run_cli(args, env)
    run = Path(proc.stdout.split("as the train run ")[1].split()[0])
    return {
        "root": root,
        "ws": ws,
        "env": env,
        "common": common,
        "run": run,
        "official": official,
        "kwargs": kwargs,
    }


def test_import_writes_a_finished_run_naming_its_source_and_finds_it_again(imported):
    run = imported["run"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["imported_from"]["source"] == str(imported["root"] / "official")
    assert run.parent.name == "train" and (run / "final" / "model.safetensors").is_file()
    again = run_cli(["import-model", str(imported["root"] / "official"), *imported["common"],
                     "--text-encoder", "tiny:t5", "--vae", "tiny:shapes-vae"], imported["env"])  # fmt: skip
    assert f"already imported {imported['root'] / 'official'} as the train run {run}" in again.stdout
    assert "--set evaluate.guidance_scale=16" in again.stdout  # the paper's sampler, as overrides


def test_the_imported_run_computes_what_the_official_network_computes(imported):
    """Our CAD-I loaded from the run equals their network on the same inputs (the converted weights)."""
    from t2i.models.loading import load_final
    from tests.peer import official_batch

    model, meta = load_final(imported["run"])
    official = imported["official"].eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([0.3, 0.8])
    text = torch.randn(2, 5, 64, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        ours = model(x, t, text, mask)
        theirs, _ = official(official_batch(official, x, t, text, mask))
    assert meta["architecture"] == "cad" and meta["model_config"]["coherence"]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_the_imported_run_generates_evaluates_and_exports(imported, tmp_path):
    run, common, env = (
        imported["run"],
        [*imported["common"], "--set", f"evaluate.run={imported['run']}"],
        imported["env"],
    )
    out = tmp_path / "png"
    assert main(["generate", *common, "--prompt", PROMPTS[0], "--n", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["000-00.png", "000-01.png", "grid.png"]
    assert json.loads((out / "request.json").read_text())["train"] == str(run)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    paper = ["evaluate.clamp_x0=1.2", "evaluate.unconditional=random_words", "evaluate.unguided_steps=1"]
    sets = [f"evaluate.prompts=file:{prompts}", "evaluate.num_prompts=2", "evaluate.steps=4", *paper]
    run_cli(["evaluate", *common, *(a for s in sets for a in ("--set", s))], env)
    (evaluation,) = (imported["ws"] / "evaluate").glob("*/manifest.json")
    manifest = json.loads(evaluation.read_text())
    assert manifest["inputs"] == {"train": run.name} and manifest["metrics"]["images"] == 2

    export = tmp_path / "diffusers"
    assert main(["export-model", *common, "--out", str(export)]) == 0
    assert f"`{imported['root'] / 'official'}`" in (export / "README.md").read_text()
    line = _load_in_a_clean_interpreter(export, tmp_path / "clean.npy", tmp_path / "home")
    assert line.split()[:2] == ["T2IPipeline", "T2IDenoiser"] and (tmp_path / "clean.npy").is_file()


def test_export_to_the_paper_format_loads_in_their_class_bit_for_bit(imported, tmp_path):
    out = tmp_path / "paper"
    common = [*imported["common"], "--set", f"evaluate.run={imported['run']}"]
    assert main(["export-model", *common, "--format", "paper", "--out", str(out)]) == 0
    back = _peer_cad().from_pretrained(out)
    theirs = imported["official"].state_dict()
    assert back.state_dict().keys() == theirs.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in theirs.items())
    assert json.loads((out / "config.json").read_text()) == {
        k: v for k, v in json.loads((imported["root"] / "official" / "config.json").read_text()).items()
    }


def test_fine_tuning_starts_from_the_imported_weights_and_is_its_own_run(imported):
    from safetensors.torch import load_file

    common, env = imported["common"], imported["env"]
    sets = [f"train.init_from={imported['run']}", "train.model=cad", "train.steps=2", "train.checkpoint_every=1",
            "train.warmup_steps=0", "train.sample_prompts=0"]  # fmt: skip
    args = [*common, *(a for s in sets for a in ("--set", s))]
    run_cli(["train", *args], env)
    runs = [p.parent for p in (imported["ws"] / "train").glob("*/manifest.json")]
    (tuned,) = [r for r in runs if json.loads((r / "manifest.json").read_text())["inputs"].get("init")]
    manifest = json.loads((tuned / "manifest.json").read_text())
    assert manifest["inputs"]["init"] == imported["run"].name and manifest["step"] == 2
    start = load_file(imported["run"] / "final" / "model.safetensors")
    first = torch.load(tuned / "checkpoints" / "step-00000001" / "state.pt", weights_only=True)["model"]
    assert start.keys() == first.keys()
    moved = [k for k in start if not torch.equal(start[k], first[k])]
    close = all(torch.allclose(start[k], first[k], atol=0.05) for k in start)
    assert moved and close, (
        "one step of fine-tuning moves the imported weights a little, from where they were"
    )

    other = run_cli(["train", *common, "--set", "train.init_from=/nonexistent/run", "--set", "train.model=cad"],
                    env, check=False)  # fmt: skip
    assert (
        other.returncode == 1
        and "train.init_from: '/nonexistent/run' is not a finished train run" in other.stderr
    )
