"""The experiment trackers of a train run (`train.trackers`), through accelerate: TensorBoard in the run folder
by default, W&B, MLflow, Aim and trackio when their extras are installed. Only the main process logs, at the
true global step: the scalars of each log step (`train/loss`, `train/lr`, `train/grad_norm`,
`train/samples_per_second`) and each sample grid (`samples`).

A train run keeps one tracker run through every restart (torchrun, a Prefect retry, another node): the run
folder's `trackers.json` holds a key made at its first start (its fingerprint and a random suffix, so the same
config trained again in another workspace is another run), and each start continues the tracker run of that key:
W&B by id (resume "allow"), MLflow by the run tagged `t2i.run` with it, trackio by name, Aim by the run hash the
file stores. A resumed run replays the steps after its checkpoint, with the same values (the replay is exact), so
the steps logged between that checkpoint and a kill are logged again: TensorBoard hides the killed run's events
from the resumed step on (purge_step), W&B keeps the first values (it ignores steps below the resumed run's
next one), MLflow's history holds both.

Credentials and servers come only from each tracker's own environment variables (WANDB_API_KEY,
MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME/PASSWORD, ...): nothing here reads them into a config, a file or a
message. Local files go under the run folder unless the environment says where: `wandb/` (unless WANDB_DIR),
`mlflow/` (an SQLite store and its artifacts, unless MLFLOW_TRACKING_URI), `.aim` (Aim's repository),
`tensorboard/`; trackio keeps its own folder (TRACKIO_DIR), which its dashboard reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from t2i.data.store import atomic_path
from t2i.flows.config import ConfigError

TRACKERS_FILE = "trackers.json"
BOARD_DIR = "tensorboard"
RUN_TAG = "t2i.run"
# what installs each tracker: tensorboard is a dependency of the package, the others are its extras
INSTALL = {
    "tensorboard": "tensorboard",
    "wandb": "t2i-imagenet[wandb]",
    "mlflow": "t2i-imagenet[mlflow]",
    "aim": "t2i-imagenet[aim]",
    "trackio": "t2i-imagenet[trackio]",
}
_SECRET_NAME = re.compile(r"(KEY|TOKEN|PASSWORD|SECRET)$", re.IGNORECASE)
_URL_USER = re.compile(r"(?<=://)[^/@\s]+@")


def require_trackers(names: list[str]) -> None:
    """Fail before any work when a listed tracker is not installed (accelerate would skip it silently),
    naming the field and what to install."""
    if not names:
        return
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = [name for name in names if name not in available]
    if missing:
        fixes = "; ".join(f"{name} is not installed: pip install '{INSTALL[name]}'" for name in missing)
        raise ConfigError(f"train.trackers: {fixes} (or leave it out of train.trackers)")


def accelerate_trackers(names: list[str], root: Path) -> list[Any] | None:
    """`Accelerator(log_with=...)` for these trackers: TensorBoard writes `<run>/tensorboard/` as it always
    has (accelerate's own choice would be `<run>/<project>/`), the others are named."""
    from accelerate.tracking import TensorBoardTracker

    trackers = [TensorBoardTracker(BOARD_DIR, str(root)) if n == "tensorboard" else n for n in names]
    return trackers or None


def redact(text: str) -> str:
    """`text` without the values of secret-looking environment variables or the user part of URLs (an
    error message of a tracker's client can quote its server's URL)."""
    text = _URL_USER.sub("***@", text)
    for name, value in os.environ.items():
        if _SECRET_NAME.search(name) and len(value) >= 6:
            text = text.replace(value, "***")
    return text


@dataclass
class TrackerRun:
    """Who a train run is to its trackers, the same at every start: `name` is what their UIs show, `key` finds
    the run to continue, `ids` what the trackers assigned (for reference; Aim resumes by its hash)."""

    name: str
    key: str
    ids: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, root: Path) -> TrackerRun:
        """The run folder's tracker identity, made (and written) at its first start."""
        path = root / TRACKERS_FILE
        if path.is_file():
            return cls(**json.loads(path.read_text()))
        run = cls(name=f"{root.parent.name}-{root.name}", key=f"{root.name}-{secrets.token_hex(4)}")
        run.save(root)
        return run

    def save(self, root: Path) -> None:
        with atomic_path(root / TRACKERS_FILE) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")


def run_config(job, run: TrackerRun) -> dict[str, bool | int | float | str]:
    """The flat config the trackers record: the fields that make the run (its fingerprint's), which are the
    same at every restart (MLflow refuses a parameter whose value changes), lists as JSON."""
    flat: dict[str, Any] = {"run": run.name, "fingerprint": job.checkpoints.fingerprint}
    for section, cfg in (("train", job.train), ("text", job.text)):
        for name, value in cfg.fingerprint_fields().items():
            scalar = isinstance(value, (bool, int, float, str))
            flat[f"{section}.{name}"] = value if scalar else json.dumps(value)
    return flat


def _local_mlflow(root: Path) -> str | None:
    """Without MLFLOW_TRACKING_URI, an SQLite store in the run folder (not the working directory, mlflow's
    default); its artifact location, else None (the server's or the store's own)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    import mlflow

    folder = root / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    return (folder / "artifacts").as_uri()


def mlflow_run_id(project: str, run: TrackerRun, artifacts: str | None) -> str | None:
    """The MLflow run tagged with this run's key in the experiment (created when missing), or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", project)  # accelerate's tracker gives it precedence too
    if client.get_experiment_by_name(name) is None:
        with contextlib.suppress(MlflowException):  # another run may create it meanwhile
            client.create_experiment(name, artifact_location=artifacts)
    experiment = client.get_experiment_by_name(name)
    found = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run.key}'", max_results=1
    )
    return found[0].info.run_id if found else None


def init_kwargs(names: list[str], run: TrackerRun, root: Path, project: str) -> dict[str, dict[str, Any]]:
    """What each tracker is started with so that it continues this run's tracker run."""
    kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in names:
        kwargs["wandb"] = {"id": run.key, "name": run.name, "resume": "allow", "job_type": "train"}
        if not os.environ.get("WANDB_DIR"):
            kwargs["wandb"]["dir"] = str(root)
    if "mlflow" in names:
        artifacts = _local_mlflow(root)
        kwargs["mlflow"] = {
            "run_name": run.name,
            "run_id": mlflow_run_id(project, run, artifacts),
            "tags": {RUN_TAG: run.key},
        }
    if "aim" in names:
        kwargs["aim"] = {"experiment": project, "run_hash": run.ids.get("aim")}
    if "trackio" in names:
        kwargs["trackio"] = {"name": f"{run.name}-{run.key.rsplit('-', 1)[-1]}", "resume": "allow"}
    return kwargs


def start_trackers(accelerator, job, step: int, log) -> Trackers:
    """Start (or continue) the run's tracker runs on the main process; `step` is the one it resumes from."""
    cfg, root = job.train, job.checkpoints.root
    run = TrackerRun.of(root)
    for tracker in accelerator.log_with:
        if getattr(tracker, "name", None) == "tensorboard" and step > 0:
            tracker.init_kwargs["purge_step"] = step + 1  # the killed run's events after the checkpoint
    try:
        accelerator.init_trackers(
            cfg.tracker_project,
            config=run_config(job, run),
            init_kwargs=init_kwargs(cfg.trackers, run, root, cfg.tracker_project),
        )
        started = {t.name for t in accelerator.trackers}
        if missing := [name for name in cfg.trackers if name not in started]:
            raise RuntimeError(f"accelerate did not start {', '.join(missing)}")
    except Exception:
        for tracker in accelerator.trackers:  # those that started; the others have nothing to end
            with contextlib.suppress(Exception):
                _finish(tracker, failed=True)
        raise
    ids = dict(run.ids)
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            ids["wandb"] = tracker.tracker.id
        elif tracker.name == "mlflow":
            ids["mlflow"] = tracker.tracker.info.run_id
        elif tracker.name == "aim":
            tracker.tracker.name = run.name  # accelerate names it after the project
            ids["aim"] = tracker.tracker.hash
    if ids != run.ids:
        run.ids = ids
        run.save(root)
    return Trackers(accelerator.trackers, log)


def _log_image(tracker, key: str, image, step: int) -> None:
    """A PIL image through the tracker's own image call."""
    if tracker.name == "tensorboard":
        tracker.log_images({key: np.asarray(image)[None]}, step=step, dataformats="NHWC")
    elif tracker.name == "wandb":
        tracker.log_images({key: [image]}, step=step)
    elif tracker.name == "aim":
        tracker.log_images({key: image}, step=step)
    elif tracker.name == "mlflow":
        import mlflow

        mlflow.log_image(image, key=key, step=step)
    elif tracker.name == "trackio":
        import trackio

        tracker.log({key: trackio.Image(image)}, step=step)


def _finish(tracker, failed: bool) -> None:
    if failed and tracker.name == "wandb":
        tracker.tracker.finish(exit_code=1)
    elif failed and tracker.name == "mlflow":
        import mlflow

        mlflow.end_run(status="FAILED")
    else:
        tracker.finish()


class Trackers:
    """The started trackers of the main process. A tracker whose call fails (its server away) is named in a
    warning and the run goes on: days of training never stop for a lost log line."""

    def __init__(self, trackers: list[Any], log) -> None:
        self.trackers, self.log = list(trackers), log

    def _each(self, what: str, call: Callable[[Any], None]) -> None:
        for tracker in self.trackers:
            try:
                call(tracker)
            except Exception as exc:
                self.log.warning(
                    f"[train] {tracker.name} could not {what}: {redact(f'{type(exc).__name__}: {exc}')}"
                )

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._each(f"log step {step}", lambda t: t.log(values, step=step))

    def image(self, key: str, image, step: int) -> None:
        self._each(f"log the {key} of step {step}", lambda t: _log_image(t, key, image, step))

    def finish(self, failed: bool) -> None:
        """End the tracker runs (marked failed when the run stopped on an error); once."""
        self._each("finish", lambda t: _finish(t, failed))
        self.trackers = []
