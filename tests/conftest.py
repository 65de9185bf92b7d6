"""Shared fixtures: tiny models built once per session, a Prefect test harness, a Prefect server for CLI runs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on a 2-core machine: one compute thread each (their subprocesses inherit
    # it), or torch's thread pools oversubscribe the cores and every training test runs several times slower
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import t2i.models  # noqa: E402,F401  (applies the torchvision shim before anything imports torch)

REPO = Path(__file__).resolve().parents[1]
T2I = str(Path(sys.executable).with_name("t2i"))
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: a minute or more on 2 cores (whole pipelines, several processes); not in `make test-fast`",
    )


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks to group the tests
def pytest_collection_modifyitems(items):
    """Under `pytest -n N --dist loadgroup` (make test), the tests of the service (server, pool, workers) run
    on one worker and the other users of the reference pipeline run on one worker, so each session fixture
    is built once per group, and the two groups can run side by side.

    The longest work goes first (the modules of the two groups, then those with a test marked slow; a
    module's tests stay together, in order, so its fixtures are built once), so the short tests fill the gaps
    at the end instead of one long test starting last and running alone."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if "service" in names:
            item.add_marker(pytest.mark.xdist_group("service"))
        elif names & {"small_pipeline", "small_pipeline_run"}:
            item.add_marker(pytest.mark.xdist_group("pipeline"))

    def weight(item) -> int:
        return 2 * bool(item.get_closest_marker("xdist_group")) + bool(item.get_closest_marker("slow"))

    heaviest: dict[str, int] = {}
    for item in items:
        heaviest[item.module.__name__] = max(heaviest.get(item.module.__name__, 0), weight(item))
    items.sort(key=lambda item: -heaviest[item.module.__name__])  # stable: a module's tests stay together


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A workspace-shaped folder holding the three tiny models, built once; copy it into test workspaces."""
    from t2i.models.loading import resolve_model

    root = tmp_path_factory.mktemp("tiny-models")
    for ref in ("tiny:llava", "tiny:vae", "tiny:t5"):
        resolve_model(ref, root)
    return root / "models"


@pytest.fixture
def workspace(tmp_path, tiny_models) -> Path:
    """An empty workspace with the tiny models already in place (building them is not what tests test)."""
    ws = tmp_path / "ws"
    shutil.copytree(tiny_models, ws / "models")
    return ws


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server` on 127.0.0.1 for subprocess runs (CLI, serve); yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",  # its UI calls this server, not port 4200
    }
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")  # noqa: SIM115  (outlives this block: the server writes to it)
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("prefect")),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
    else:
        proc.kill()
        raise RuntimeError("prefect server did not become healthy in 120 s")
    yield {"url": url, "home": home}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def cli_env(prefect_server, tmp_path) -> dict[str, str]:
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server["url"],
        "PREFECT_HOME": str(prefect_server["home"]),
    }
    env.pop("T2I_WORKSPACE", None)
    return env


def wait_until(check, timeout: float, what: str, poll: float = 0.3):
    """Poll `check` until it returns something true, and return that; fail naming `what` after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if result := check():
            return result
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600, check: bool = True):
    proc = subprocess.run([T2I, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"t2i {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


SMALL_PIPELINE = [
    "download.max_images=192", "download.shard_size=48", "train.steps=20", "train.checkpoint_every=10",
    "evaluate.num_prompts=8", "evaluate.steps=8",
]  # fmt: skip


@pytest.fixture(scope="session")
def small_pipeline_run(tmp_path_factory, tiny_models, prefect_server):
    """The tiny pipeline at small settings, run once by `t2i run` in one process: the reference that resumed,
    parted and served runs are compared with. Tests must not change it. Yields (workspace, process)."""
    ws = tmp_path_factory.mktemp("pipeline") / "ws"
    shutil.copytree(tiny_models, ws / "models")
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server["url"],
        "PREFECT_HOME": str(prefect_server["home"]),
    }
    args = [a for o in SMALL_PIPELINE for a in ("--set", o)]
    return ws, run_cli(["run", "--preset", "tiny", "--workspace", str(ws), *args], env)


@pytest.fixture(scope="session")
def small_pipeline(small_pipeline_run) -> Path:
    return small_pipeline_run[0]
