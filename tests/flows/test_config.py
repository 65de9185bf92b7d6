import json
import shutil
from pathlib import Path

import pytest
import torch

from t2i.flows.config import ConfigError, available_presets, load_config
from t2i.flows.plan import Plan


def test_presets_validate_and_keep_the_papers_numbers():
    assert {"tiny", "imagenet256"} <= set(available_presets())
    cfg = load_config("imagenet256")
    assert cfg.recaption.model == "llava-hf/llama3-llava-next-8b-hf"
    assert cfg.recaption.max_new_tokens == 200 and cfg.recaption.temperature == 0.0
    assert cfg.latents.vae == "stabilityai/sd-vae-ft-ema" and cfg.latents.resolution == 256
    assert cfg.text.encoder == "google/flan-t5-xl" and cfg.text.max_length == 256
    t = cfg.train
    assert (t.optimizer, t.lr, t.weight_decay, t.warmup_steps, t.final_lr_ratio) == (
        "lamb",
        1e-3,
        0.01,
        5000,
        0.21,
    )
    assert (t.batch_size, t.grad_clip, t.ema_decay, t.cfg_dropout, t.scale_factor) == (
        1024,
        2.0,
        0.9999,
        0.1,
        0.18215,
    )


def test_imagenet256_precomputes_text_in_bfloat16_and_online_stays_an_option():
    """The paper stores the captions' embeddings: the frozen encoder runs once per caption, not ~200 times."""
    text = load_config("imagenet256").text
    assert (text.mode, text.dtype) == ("precomputed", "bfloat16")
    assert load_config("imagenet256", ["text.mode=online"]).text.mode == "online"


def test_overrides_are_typed(tmp_path):
    cfg = load_config("tiny", ["latents.resolution=128", "download.max_side=null", "train.betas=[0.9, 0.99]"])
    assert cfg.latents.resolution == 128 and cfg.download.max_side is None and cfg.train.betas == (0.9, 0.99)


def test_workspace_from_argument_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("T2I_WORKSPACE", str(tmp_path / "env"))
    assert load_config("tiny").workspace == str(tmp_path / "env")
    monkeypatch.delenv("T2I_WORKSPACE")
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny").workspace == str(tmp_path / "workspace")
    assert load_config("tiny", workspace=str(tmp_path / "arg")).workspace == str(tmp_path / "arg")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["latents.resolution=-3"], r"latents\.resolution: Input should be greater than 0"),
        (["latents.resolution=100"], r"latents\.resolution: .*multiple of 8"),
        (["latents.colour=1"], r"latents\.colour: unknown field; allowed fields: .*resolution"),
        (
            ["recaption.backend=clip"],
            r"recaption\.backend: Input should be 'vllm', 'transformers', 'template' or 'import'",
        ),
        (["download.source=s3://bucket"], r"download\.source: .*allowed: synthetic:shapes, folder:<path>"),
        (
            ["nosuchsection.x=1"],
            r"nosuchsection: unknown field; allowed fields: cluster, cutmix, download, evaluate",
        ),
        (["train.steps"], r"expected section\.field=value"),
        (["train.latent_crop=6"], r"train: .*latent_crop \(6\) must be a multiple of patch_size \(4\)"),
        (["download.wds_class=label"], r"download\.wds_class: String should match pattern"),
        (
            ["train.trackers=[neptune]"],
            r"train\.trackers\.0: Input should be 'tensorboard', 'wandb', 'mlflow'",
        ),
        (["train.trackers=[wandb, wandb]"], r"train\.trackers: .*trackers listed twice"),
        (
            ["evaluate.unconditional=noise"],
            r"evaluate\.unconditional: Input should be 'empty' or 'random_words'",
        ),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("tiny", overrides)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'imagenet512'; available: imagenet256, tiny"):
        load_config("imagenet512")


def test_fingerprint_ignores_runtime_fields():
    a = load_config("tiny", ["latents.batch_size=8", "download.workers=1"])
    b = load_config("tiny", ["latents.batch_size=64", "download.workers=8"])
    assert a.latents.fingerprint_fields() == b.latents.fingerprint_fields()
    assert a.download.fingerprint_fields() == b.download.fingerprint_fields()
    c = load_config("tiny", ["recaption.backend=template", "recaption.model=other"])
    d = load_config("tiny", ["recaption.backend=template"])
    assert c.recaption.fingerprint_fields() == d.recaption.fingerprint_fields()


def test_a_later_field_at_its_default_keeps_the_fingerprint():
    """Runs trained before `train.patch_size` existed keep their fingerprint, so they still resume."""
    default = load_config("tiny", ["train.patch_size=null"]).train.fingerprint_fields()
    assert "patch_size" not in default  # the same fields, so the same fingerprint, as before it existed
    set_to_four = load_config("tiny").train.fingerprint_fields()  # the preset sets 4
    assert set_to_four["patch_size"] == 4
    assert {k: v for k, v in set_to_four.items() if k != "patch_size"} == default


def test_imagenet256_encodes_text_in_bfloat16(workspace):
    """The online encoder runs on every training batch: the preset loads it in bfloat16, not float32."""
    from t2i.tasks.text import load_encoder

    cfg = load_config("imagenet256", ["text.encoder=tiny:t5"], str(workspace))
    encoder = load_encoder(cfg.text, workspace, "cpu")
    assert {p.dtype for p in encoder.model.parameters()} == {torch.bfloat16}
    hidden, mask = encoder.encode(["a red circle"])
    assert hidden.dtype.is_floating_point and mask.any()


def _finished_run(root: Path, architecture: str = "cad", encoder: str = "tiny:t5") -> Path:
    """A train run folder as our loaders see it: a manifest and `final/config.json`."""
    (root / "final").mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"stage": "train", "fingerprint": root.name}))
    meta = {"architecture": architecture, "text_encoder": {"encoder": encoder}}
    (root / "final" / "config.json").write_text(json.dumps(meta))
    return root


def test_a_runs_fingerprint_not_its_path_enters_what_is_made_from_it(tmp_path):
    """`train.init_from` and `evaluate.run` name a run by folder; the run's fingerprint is the input, so the
    same run mounted elsewhere gives the same artifacts, and another run gives other ones."""
    run = _finished_run(tmp_path / "a" / "train" / "0123abcd")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    other = _finished_run(tmp_path / "a" / "train" / "4567ef01")
    base = ["train.model=cad"]
    plans = {
        name: Plan(load_config("tiny", [*base, f"train.init_from={path}", f"evaluate.run={path}"], workspace=str(tmp_path / "ws")))
        for name, path in (("a", run), ("b", tmp_path / "b" / "train" / "0123abcd"), ("other", other))
    }  # fmt: skip
    assert plans["a"].checkpoints.extra["inputs"]["init"] == "0123abcd"
    assert plans["a"].checkpoints.fingerprint == plans["b"].checkpoints.fingerprint
    assert plans["a"].checkpoints.fingerprint != plans["other"].checkpoints.fingerprint
    assert plans["a"].evaluation.extra["inputs"] == {"train": "0123abcd"}
    assert plans["a"].evaluation.fingerprint == plans["b"].evaluation.fingerprint
    unset = Plan(load_config("tiny", base, workspace=str(tmp_path / "ws")))
    assert "init" not in unset.checkpoints.extra["inputs"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.model=dit"], r"train\.init_from: .* is a cad run; set train\.model=cad"),
        (["train.model=cad", "text.encoder=google/flan-t5-xl"], r"reads text from 'tiny:t5'.*set text\.encoder=tiny:t5"),
    ],
)  # fmt: skip
def test_fine_tuning_refuses_a_run_of_another_model_before_any_work(tmp_path, overrides, expected):
    run = _finished_run(tmp_path / "train" / "0123abcd")
    cfg = load_config("tiny", [*overrides, f"train.init_from={run}"], workspace=str(tmp_path / "ws"))
    with pytest.raises(ValueError, match=expected):
        Plan(cfg).checkpoints  # noqa: B018


def test_a_run_folder_must_hold_its_own_train_run(tmp_path):
    """A copied or renamed run folder would pass its folder name off as the run's fingerprint: refused."""
    run = _finished_run(tmp_path / "train" / "0123abcd")
    copy = tmp_path / "train" / "copy-of-run"
    shutil.copytree(run, copy)
    cfg = load_config("tiny", ["train.model=cad", f"train.init_from={copy}"], workspace=str(tmp_path / "ws"))
    with pytest.raises(
        ValueError, match=r"train\.init_from: .*copy-of-run holds the train output '0123abcd'"
    ):
        Plan(cfg).checkpoints  # noqa: B018
