"""The pipeline as a Prefect service: every flow as a deployment, served from one process (`t2i serve`) or
registered on a work pool (`t2i deploy`) whose Prefect workers each machine starts (`t2i worker`).

Each deployment carries the preset's full config as its default parameters, so the UI shows the pipeline's
configuration as a form (from the pydantic models) and `prefect deployment run` can override any field.
`t2i serve` is the laptop way: a running Prefect server (`make server`) and this one process. A team deploys
to a work pool instead.

Pool layout (made by `t2i deploy`, type `process` unless the pool exists):
- queue `default`: whole runs (the pipeline, a stage, an ablation) as started from the UI or the CLI. Its
  concurrency limit (`--limit`) caps how many run at once in the whole pool.
- queue `parts`: the child runs a fanned-out stage starts (`cluster.parts`, see `t2i.flows.parts`).

`t2i worker` starts, on one machine, one worker on `default` (it sees every GPU of the machine: training
uses them all) and one worker per GPU group on `parts`, with `CUDA_VISIBLE_DEVICES` set and one run at a
time. A parent waiting for its parts holds a `default` slot, never a GPU.

Runs started by a worker send a heartbeat every `HEARTBEAT_SECONDS`. The automation `t2i deploy` sets up marks
a run Crashed when its heartbeats stop for `--crash-after` seconds (default 150, five missed heartbeats: an OOM
kill, a dead node), so the UI offers Retry. A worker reports at once a run whose process it saw die.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from t2i.flows.config import PipelineConfig
from t2i.flows.parts import PARTS_QUEUE
from t2i.tasks.device_processes import gpu_groups

DEFAULT_QUEUE = "default"
HEARTBEAT_SECONDS = 30  # Prefect's minimum; its default (180 s) would take 9 minutes to notice a dead run
STOP_GRACE = 20.0  # seconds a stopping worker and its runs get after SIGTERM, before SIGKILL
CRASH_AFTER = 150  # no heartbeat (nor any other event) of a Running run for this long: mark it Crashed
ZOMBIE_AUTOMATION = "t2i: crash runs whose heartbeats stopped"


def flow_deployments(cfg: PipelineConfig, name: str, **options):
    """Every flow of the project as a deployment named `name`, the whole config as its parameter form.
    Module entrypoints (`t2i.flows.pipeline.pipeline_flow`) load the installed package wherever a worker's
    working directory is; a file entrypoint would import the flow's file a second time."""
    from prefect.types.entrypoint import EntrypointType

    from t2i.flows.ablation import ablation_flow
    from t2i.flows.generate import generate_flow
    from t2i.flows.pipeline import STAGE_FLOWS, pipeline_flow

    params = {"cfg": cfg.model_dump(mode="json")}
    return [
        f.to_deployment(
            name=name,
            parameters=params,
            tags=["t2i", name],
            enforce_parameter_schema=True,
            entrypoint_type=EntrypointType.MODULE_PATH,
            **options,
        )
        for f in (pipeline_flow, *STAGE_FLOWS.values(), ablation_flow, generate_flow)
    ]


def serve_flows(cfg: PipelineConfig, name: str | None = None, limit: int | None = 1) -> None:
    """`t2i serve`: publish every flow to a running Prefect server and run them from this process."""
    from prefect import serve

    require_server("t2i serve")
    serve(*flow_deployments(cfg, name or cfg.preset), limit=limit)


def deploy_flows(
    cfg: PipelineConfig, pool: str, name: str, limit: int | None = None, crash_after: int = CRASH_AFTER
) -> list[str]:
    """Create the pool and its queues if missing, register every flow on it, set up crash detection.
    Returns the deployments' names (`flow/name`)."""
    if crash_after < 2 * HEARTBEAT_SECONDS:
        raise ValueError(f"--crash-after must be at least {2 * HEARTBEAT_SECONDS} s (two heartbeats)")
    require_server("t2i deploy")
    asyncio.run(_prepare_pool(pool, limit))
    cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"deployment": name})})
    names = []
    for deployment in flow_deployments(cfg, name, work_queue_name=DEFAULT_QUEUE):
        deployment.apply(work_pool_name=pool)
        names.append(f"{deployment.flow_name}/{name}")
    asyncio.run(_ensure_zombie_automation(crash_after))
    return names


async def _prepare_pool(pool: str, limit: int | None) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    async with get_client() as client:
        try:
            await client.read_work_pool(pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            await client.create_work_pool(
                WorkPoolCreate(name=pool, type="process", base_job_template=template)
            )
        for queue in (DEFAULT_QUEUE, PARTS_QUEUE):
            with contextlib.suppress(ObjectAlreadyExists):
                await client.create_work_queue(name=queue, work_pool_name=pool)
        default = await client.read_work_queue_by_name(DEFAULT_QUEUE, work_pool_name=pool)
        await client.update_work_queue(default.id, concurrency_limit=limit)


async def _ensure_zombie_automation(crash_after: int) -> None:
    """Prefect's documented zombie-run detection, limited to this project's runs (tag `t2i`, which every
    deployment and part carries; other teams' flows on the server keep their own heartbeat settings): after a
    run's heartbeat, expect another event of that run (a heartbeat or a state change) within `crash_after`
    seconds, else set it Crashed. Redeploying replaces it, so a new `--crash-after` takes effect."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    with contextlib.suppress(ValueError):  # ValueError: none yet
        await (await Automation.aread(name=ZOMBIE_AUTOMATION)).adelete()
    await Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification(
                {"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.t2i"}
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=crash_after),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="No heartbeat: the run's process died")],
    ).acreate()


def require_server(command: str) -> None:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise RuntimeError(
            f"{command} needs a Prefect server: start one with `make server` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )


def parse_gpus(gpus: str | None) -> list[int] | None:
    """'0,1,2,3' → [0, 1, 2, 3]: ordinals among the visible GPUs (as `cuda:N` counts them); None: all."""
    if gpus is None:
        return None
    try:
        return [int(g) for g in gpus.split(",") if g.strip()]
    except ValueError:
        raise ValueError(
            f"--gpus takes GPU numbers separated by commas, e.g. 0,1,2,3; got {gpus!r}"
        ) from None


def worker_commands(
    pool: str, groups: list[list[str] | None], limit: int, host: str
) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, argv, extra env) of each Prefect worker this machine runs, named after `host`: one for whole runs,
    one per GPU group for parts (a CPU machine's one group, None, sets no CUDA_VISIBLE_DEVICES)."""
    prefect = str(Path(sys.executable).with_name("prefect"))

    def argv(name: str, queue: str, k: int) -> list[str]:
        start = [prefect, "worker", "start", "--pool", pool, "--type", "process"]
        return [*start, "--work-queue", queue, "--limit", str(k), "--name", name]

    commands = [(f"{host}-runs", argv(f"{host}-runs", DEFAULT_QUEUE, limit), {})]
    for group in groups:
        name = f"{host}-gpu{'+'.join(group)}" if group else f"{host}-cpu"
        env = {"CUDA_VISIBLE_DEVICES": ",".join(group)} if group else {}
        commands.append((name, argv(name, PARTS_QUEUE, 1), env))
    return commands


def run_workers(
    pool: str, gpus: str | None, per_part: int, limit: int, name: str | None = None, grace: float = STOP_GRACE
) -> int:
    """Start this machine's workers and wait. Ctrl-C or SIGTERM stops them all, with the runs they are running:
    each worker's process group (the worker and its runs) gets SIGTERM once, and whatever is left after
    `grace` seconds gets SIGKILL. Each worker runs in a session of its own, so a terminal's Ctrl-C reaches
    only this process, which signals each worker once. Returns the first non-zero exit status, or 0."""
    groups = gpu_groups(per_part, parse_gpus(gpus))  # a bad GPU list fails before anything starts
    require_server("t2i worker")
    env = {**os.environ}
    env.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_SECONDS))
    procs = []
    host = name or socket.gethostname()
    for worker, argv, extra in worker_commands(pool, groups, limit, host):
        print(f"t2i worker: {worker} on pool {pool!r} ({' '.join(argv[2:])})", flush=True)
        procs.append(subprocess.Popen(argv, env={**env, **extra}, start_new_session=True))
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    while not stopping.wait(0.5) and any(p.poll() is None for p in procs):
        pass
    if stopping.is_set():
        print("t2i worker: stopping the workers and their runs", flush=True)
        _stop_groups(procs, grace)
    codes = [p.wait() for p in procs]
    return 0 if stopping.is_set() else next((c for c in codes if c), 0)


def _stop_groups(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM to each worker's process group once; SIGKILL to what is left after `grace` seconds."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:  # the worker, and any run it left behind in its group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)


def run_server(host: str, port: int) -> None:
    """`prefect server start` whose UI calls this server's own API: the UI's API address comes from
    PREFECT_UI_API_URL (default http://127.0.0.1:4200/api whatever --port says), so it is set here unless the
    environment already sets it (a team server behind another name). Replaces this process."""
    env = {**os.environ, "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if "PREFECT_UI_API_URL" not in env:
        public = socket.getfqdn() if host in ("0.0.0.0", "::") else host
        env["PREFECT_UI_API_URL"] = f"http://{public}:{port}/api"
    prefect = str(Path(sys.executable).with_name("prefect"))
    print(f"t2i server: UI on http://{host}:{port}, API at {env['PREFECT_UI_API_URL']}", flush=True)
    os.execve(prefect, [prefect, "server", "start", "--host", host, "--port", str(port)], env)
