"""A team's Prefect service on this machine: `t2i server` on a non-default port that requires an API auth
string, `t2i deploy` to a process pool (one whole run at a time), and two `t2i worker` "machines" (separate
working directories and sessions, sharing only the workspace). Started once for the tests under
tests/service/."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest

from tests.conftest import SMALL_PIPELINE, T2I, _free_port

PREFECT = str(Path(T2I).with_name("prefect"))
# Debian's chromium, installed by `make test` (no browser download); tests that need it skip without it
CHROMIUM = next(
    (p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "") if Path(p).is_file()), None
)
POOL = "ci"
CRASH_AFTER = 60  # the automation's window in these tests (workers beat every 30 s)
SMALL = SMALL_PIPELINE  # as the single-process reference run, so outputs can be compared


class Service:
    def __init__(self, root: Path, url: str, auth: str, env: dict[str, str]) -> None:
        self.root, self.url, self.auth, self.env = root, url, auth, env
        self.workers: dict[str, subprocess.Popen] = {}

    def api(self, path: str, body: dict | None = None, auth: bool = True):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = "Basic " + b64encode(self.auth.encode()).decode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers)
        # a busy server answers 503 and Prefect's own client retries it: so does this
        for attempt in range(5):
            try:
                with urllib.request.urlopen(req, timeout=20) as r:
                    return json.loads(r.read() or b"null")
            except urllib.error.HTTPError as err:
                if err.code != 503 or attempt == 4:
                    raise
                time.sleep(2 * (attempt + 1))

    def cli(self, args: list[str], timeout: float = 300, check: bool = True, env: dict | None = None):
        proc = subprocess.run(args, env=env or self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args[:4])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc

    def start_worker(self, name: str) -> None:
        cwd = self.root / f"machine-{name}"
        cwd.mkdir(exist_ok=True)
        log = open(cwd / "worker.log", "a")  # noqa: SIM115  (the worker writes to it until it stops)
        self.workers[name] = subprocess.Popen(
            [T2I, "worker", "--pool", POOL, "--name", name], cwd=cwd, env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def kill_machine(self, name: str) -> None:
        """SIGKILL a worker and everything it started (its Prefect workers run in sessions of their own, and
        their runs under them), all frozen first so none outlives the others, as when a node dies."""
        proc = self.workers.pop(name)
        tree = [proc.pid, *descendants(proc.pid)]
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        proc.wait(timeout=30)

    def stop_workers(self) -> None:
        for proc in self.workers.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in list(self.workers.items()):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            del self.workers[name]

    def ui_settings(self) -> dict:
        with urllib.request.urlopen(self.url.removesuffix("/api") + "/ui-settings", timeout=20) as r:
            return json.loads(r.read())

    def flow_runs(self, **flow_runs_filter) -> list[dict]:
        return self.api("/flow_runs/filter", {"flow_runs": flow_runs_filter, "sort": "START_TIME_ASC"})

    def artifacts(self, run_id: str) -> list[dict]:
        return self.api("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})

    def run(self, run_id: str) -> dict:
        return self.api(f"/flow_runs/{run_id}")

    def wait_for(self, run_id: str, states: set[str], timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            run = self.run(run_id)
            if run["state_type"] in states:
                return run
            time.sleep(2)
        raise AssertionError(f"flow run {run['name']} still {run['state_type']} after {timeout:.0f} s")

    def start(self, deployment: str, cfg: dict) -> str:
        """Start a run of a deployment (what the UI's Run button does); returns its id."""
        dep = self.api(f"/deployments/name/{deployment}")
        return self.api(f"/deployments/{dep['id']}/create_flow_run", {"parameters": {"cfg": cfg}})["id"]


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 1000):
    """A page of headless Chromium (Playwright driving Debian's binary), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def descendants(pid: int) -> list[int]:
    """Every process started under `pid`, by walking parent pids in /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found += frontier
    return found


def config(ws: Path, *overrides: str) -> dict:
    from t2i.flows.config import load_config

    return load_config("tiny", [*SMALL, *overrides], str(ws)).model_dump(mode="json")


@pytest.fixture(scope="session")
def service(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("service")
    home, port, auth = root / "prefect-home", _free_port(), f"ci:{secrets.token_hex(8)}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    base.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = open(root / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [T2I, "server", "--port", str(port)], env={**base, "PREFECT_SERVER_API_AUTH_STRING": auth},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    env = {**base, "PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": auth}
    svc = Service(root, url, auth, env)
    deadline = time.time() + 120
    while True:
        try:
            svc.api("/health")
            break
        except (OSError, urllib.error.URLError):
            assert server.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    ws = root / "ws"
    shutil.copytree(tiny_models, ws / "models")
    svc.ws = ws
    svc.cli([T2I, "deploy", "--preset", "tiny", "--pool", POOL, "--workspace", str(ws),
             "--crash-after", str(CRASH_AFTER), "--limit", "1", *[f"--set={o}" for o in SMALL]])  # fmt: skip
    for name in ("a", "b"):
        svc.start_worker(name)
    try:
        yield svc
    finally:
        svc.stop_workers()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
