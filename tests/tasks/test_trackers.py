"""Experiment trackers through accelerate (`train.trackers`), as a user meets them: a tiny run, stopped after a
checkpoint and resumed, logs one loss curve and its sample grids to TensorBoard, W&B (offline) and MLflow (a
local store), each read back with the library's own reader; the resumed run continues the same tracker runs; the
secrets in the environment reach none of their files; a listed tracker that is not installed stops the run
before it starts."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from t2i.data.store import checkpoint_dirs
from t2i.flows.config import ConfigError, load_config
from t2i.flows.download import download_flow
from t2i.flows.latents import latents_flow
from t2i.flows.plan import Plan
from t2i.flows.recaption import recaption_flow
from t2i.flows.train import run_train
from t2i.tasks.train import TrackersUnavailable

SECRET = "t2i-test-secret-7f3a9c1e5b2d4f6a8c0e"
DATA = [
    "cutmix.enabled=false",
    "download.max_images=16",
    "download.shard_size=16",
    "recaption.backend=template",
    "text.mode=online",
]
TRAIN = [
    *DATA,
    "train.steps=4",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.sample_every=4",
    "train.sample_prompts=1",
    "train.loader_workers=0",
]
SCALARS = {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_second"}


@pytest.fixture(scope="module")
def data_workspace(tmp_path_factory, tiny_models, prefect_harness) -> Path:
    ws = tmp_path_factory.mktemp("trackers") / "ws"
    shutil.copytree(tiny_models, ws / "models")
    cfg = load_config("tiny", DATA, str(ws))
    download_flow(cfg)
    recaption_flow(cfg)
    latents_flow(cfg)
    return ws


@pytest.fixture
def tracker_env(tmp_path, monkeypatch) -> Path:
    """W&B offline, MLflow on an SQLite store under tmp_path, and secrets in their credential variables; the
    working directory is tmp_path, where mlflow puts the artifacts of an SQLite store."""
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "mlflow"
    store.mkdir()
    for name in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "researcher")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    return store


def reported_losses(text: str) -> dict[int, list[float]]:
    """The losses the run's own log reports, by step (a step logged again after a resume twice)."""
    losses: dict[int, list[float]] = {}
    for step, loss in re.findall(r"\[train\] step (\d+)/\d+ loss ([-0-9.naif]+)", text):
        losses.setdefault(int(step), []).append(float(loss))
    return losses


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of an offline W&B run's transaction log, as wandb's own reader prints them."""
    (log,) = run_dir.glob("run-*.wandb")
    wandb = Path(sys.executable).with_name("wandb")
    command = [str(wandb), "leet", "inspect", "--json", str(log)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


Curve = dict[int, list[float]]  # step → the losses a tracker holds at it


def board_curve(root: Path) -> tuple[Curve, set[int]]:
    """The loss curve and the steps of sample grids TensorBoard shows for the run folder `root`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(root / "tensorboard"))
    board.Reload()
    assert set(board.Tags()["scalars"]) >= SCALARS
    curve: Curve = {}
    for event in board.Scalars("train/loss"):
        curve.setdefault(event.step, []).append(event.value)
    return curve, {event.step for event in board.Images("samples")}


def mlflow_curve(run) -> tuple[Curve, set[int]]:
    """The loss history and the steps of sample grids of an MLflow run."""
    from mlflow import MlflowClient

    client = MlflowClient()
    assert set(run.data.metrics) >= SCALARS
    curve: Curve = {}
    for metric in client.get_metric_history(run.info.run_id, "train/loss"):
        curve.setdefault(metric.step, []).append(metric.value)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    grids = [re.search(r"samples\W+step\W+0*(\d+)\W.*\.png$", path) for path in images]
    return curve, {int(m.group(1)) for m in grids if m}


def wandb_curve(segments: list[Path], run_id: str, name: str) -> tuple[Curve, set[int]]:
    """The loss history and the steps of sample grids of W&B offline runs, each the run `run_id`."""
    curve: Curve = {}
    grids = set()
    for segment in segments:
        records = wandb_records(segment)
        (start,) = [r["run"] for r in records if r["type"] == "run"]
        assert start["run_id"] == run_id and start["display_name"] == name
        for record in (r["history"] for r in records if r["type"] == "history"):
            step, item = int(record["step"]["num"]), record["item"]
            if "train/loss" in item:
                curve.setdefault(step, []).append(item["train/loss"])
            if "samples._type" in item:  # the grid's file is in the run's media
                assert all((segment / "files" / f).is_file() for f in item["samples.filenames"])
                grids.add(step)
    return curve, grids


def assert_curve(curve: Curve, reported: Curve, twice: tuple[int, ...] = ()) -> None:
    """`curve` holds the loss the log last reported at every reported step, once (or twice at `twice`)."""
    assert {step: len(values) for step, values in curve.items()} == {s: 1 + (s in twice) for s in reported}
    for step, values in curve.items():
        assert values == pytest.approx([reported[step][-1]] * len(values), abs=1e-4), step


def test_a_resumed_run_logs_one_curve_and_its_grid_to_each_tracker(data_workspace, tracker_env, caplog):
    """Stopped after step 3, its step-3 checkpoint lost (a kill before it reached the disk), resumed from step
    2 to the end: each tracker holds the losses the log reports at steps 1-4 and the grid of step 4, in
    one tracker run; TensorBoard shows each step once, W&B's two segments are one run id, MLflow's history
    has step 3 twice with the same value (the replay is exact)."""
    from mlflow import MlflowClient

    cfg = load_config("tiny", [*TRAIN, "train.trackers=[tensorboard, wandb, mlflow]"], str(data_workspace))
    root = Plan(cfg).checkpoints.root
    with caplog.at_level("INFO", logger="t2i"):
        assert run_train(cfg, stop_after=3)["step"] == 3
        shutil.rmtree(root / "checkpoints" / "step-00000003")
        assert run_train(cfg)["step"] == 4
    assert "resuming from step-00000002" in caplog.text
    reported = reported_losses(caplog.text)
    assert sorted(reported) == [1, 2, 3, 4] and reported[3][0] == pytest.approx(reported[3][1], abs=1e-4)
    identity = json.loads((root / "trackers.json").read_text())
    assert identity["name"] == f"train-{root.name}" and identity["key"].startswith(root.name)

    curve, grids = board_curve(
        root
    )  # where TensorBoard always wrote; the resumed step 3 hides the killed one
    assert_curve(curve, reported)
    assert grids == {4}

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.train.tracker_project).experiment_id])
    assert run.info.run_name == identity["name"] and run.data.tags["t2i.run"] == identity["key"]
    assert run.info.run_id == identity["ids"]["mlflow"] and run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "4" and run.data.params["fingerprint"] == root.name
    curve, grids = mlflow_curve(run)
    assert_curve(curve, reported, twice=(3,))
    assert grids == {4}

    segments = sorted((root / "wandb").glob("offline-run-*"))  # one folder per start, one run id
    curve, grids = wandb_curve(segments, identity["key"], identity["name"])
    assert len(segments) == 2 and grids == {4}
    assert_curve(curve, reported, twice=(3,))  # offline, each start's file keeps its own step 3

    # no secret in any file of the run folder (wandb/ included), the MLflow store and its artifacts, the log
    files = [p for folder in (root, tracker_env, tracker_env.parent / "mlruns") for p in folder.rglob("*")]
    assert [p for p in files if p.is_file() and SECRET.encode() in p.read_bytes()] == []
    assert SECRET not in caplog.text


def test_a_listed_tracker_that_is_not_installed_stops_the_run_before_it_starts(data_workspace):
    missing = next((name for name in ("aim", "trackio") if importlib.util.find_spec(name) is None), None)
    if missing is None:
        pytest.skip("aim and trackio are both installed")
    cfg = load_config(
        "tiny", [*TRAIN, "train.seed=1", f"train.trackers=[tensorboard, {missing}]"], str(data_workspace)
    )
    expected = rf"train\.trackers: {missing} is not installed: pip install 't2i-imagenet\[{missing}\]'"
    with pytest.raises((ConfigError, TrackersUnavailable), match=expected):
        run_train(cfg)
    assert not (Plan(cfg).checkpoints.root / "checkpoints").exists()


def test_a_tracker_that_cannot_start_stops_the_run_before_its_first_step_and_keeps_its_secret(
    data_workspace, tracker_env, monkeypatch, caplog
):
    """An MLflow server that refuses the connection, reached with a password in its URL (mlflow's own error
    quotes the URL): the run stops before any step, with an error naming the field and the cause, and the
    password is in neither the error nor the log."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://researcher:{SECRET}@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = load_config(
        "tiny", [*TRAIN, "train.seed=3", "train.trackers=[tensorboard, mlflow]"], str(data_workspace)
    )
    with caplog.at_level("INFO", logger="t2i"), pytest.raises(TrackersUnavailable) as stopped:
        run_train(cfg)
    message = str(stopped.value)
    assert "train.trackers (tensorboard, mlflow) could not start: MlflowException" in message
    assert "Connection refused" in message and "http://***@127.0.0.1:9" in message
    assert SECRET not in message and SECRET not in caplog.text and "[train] step" not in caplog.text
    assert checkpoint_dirs(Plan(cfg).checkpoints.root) == []


@pytest.mark.slow
def test_only_the_main_process_of_a_distributed_run_logs(data_workspace, tracker_env, caplog):
    """Two processes (torchrun): one W&B run and one MLflow run, holding the losses rank 0 reports."""
    from mlflow import MlflowClient

    overrides = [*TRAIN, "train.seed=4", "train.steps=2", "train.processes=2", "train.sample_prompts=0"]
    cfg = load_config("tiny", [*overrides, "train.trackers=[wandb, mlflow]"], str(data_workspace))
    with caplog.at_level("INFO", logger="t2i"):
        assert run_train(cfg)["step"] == 2
    reported = reported_losses(caplog.text)
    assert sorted(reported) == [1, 2]
    root = Plan(cfg).checkpoints.root
    key, name = (json.loads((root / "trackers.json").read_text())[k] for k in ("key", "name"))
    (segment,) = (root / "wandb").glob("offline-run-*")
    assert_curve(wandb_curve([segment], key, name)[0], reported)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.train.tracker_project).experiment_id])
    assert run.data.tags["t2i.run"] == key
    assert_curve(mlflow_curve(run)[0], reported)
