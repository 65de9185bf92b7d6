"""Ctrl-C of `t2i worker` with a run in flight, N times in a row (default 10): the seconds until it exits each
time, and what is left of its workers and their runs.

A local Prefect server, the tiny preset deployed to a pool of its own, then per round: a `download` run that
takes minutes, `t2i worker` started in a session of its own (as from a terminal), SIGINT to its process group
once the run is Running (what the terminal's Ctrl-C sends), and the time until `t2i worker` exits.

    python tests/benchmarks/bench_worker_stop.py [--rounds 10]

The last line is the slowest exit in seconds."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
T2I, PREFECT = str(BIN / "t2i"), str(BIN / "prefect")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path, database: str | None) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
        self.env = {**base, "PREFECT_HOME": str(root / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        if database:
            self.env["PREFECT_API_DATABASE_CONNECTION_URL"] = database
        self.start()

    def start(self) -> None:
        argv = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(argv, env={k: v for k, v in self.env.items() if k != "PREFECT_API_URL"},
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.env["PREFECT_API_URL"] = self.url
        deadline = time.time() + 120
        while True:
            try:
                self.api("/health")
                return
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    def api(self, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=20) as r:
            return json.loads(r.read() or b"null")

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


def long_run(server: Server, ws: Path) -> str:
    """A download run of 400k synthetic images: minutes of work, cut short each round."""
    cfg = subprocess.check_output([T2I, "config", "--json", "--preset", "tiny", "--workspace", str(ws), "--set",
                                   "download.max_images=400000", "--set", "cluster.deployment=stop"], text=True)  # fmt: skip
    dep = server.api("/deployments/name/download/stop")
    return server.api(f"/deployments/{dep['id']}/create_flow_run", {"parameters": {"cfg": json.loads(cfg)}})[
        "id"
    ]


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,sid="], capture_output=True, text=True).stdout.split(
        "\n"
    )
    rows = [tuple(int(x) for x in line.split()) for line in out if line.strip()]
    found, frontier = [], {pid}
    while frontier:
        kids = {p for p, pp, _ in rows if pp in frontier}
        found += kids
        frontier = kids
    return found


def one_round(server: Server, ws: Path, root: Path, k: int) -> tuple[float, int]:
    run = long_run(server, ws)
    env = {**server.env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    with open(root / f"worker-{k}.log", "w") as log:
        worker = subprocess.Popen([T2I, "worker", "--pool", "stop", "--name", f"r{k}"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.time() + 180
    while server.api(f"/flow_runs/{run}")["state_type"] != "RUNNING":
        if time.time() > deadline:
            raise RuntimeError(f"round {k}: the run never started; see {root}/worker-{k}.log")
        time.sleep(0.3)
    time.sleep(2)
    tree = descendants(worker.pid)
    os.killpg(worker.pid, signal.SIGINT)
    started = time.time()
    try:
        worker.wait(timeout=120)
        seconds = time.time() - started
    except subprocess.TimeoutExpired:
        seconds = float("inf")
        os.killpg(worker.pid, signal.SIGKILL)
    time.sleep(0.5)
    left = [p for p in tree if Path(f"/proc/{p}").exists()]
    for pid in left:  # not part of the measurement: leave the next round a clean machine
        os.kill(pid, signal.SIGKILL)
    return seconds, len(left)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--database", default=None, help="the server's database URL (default: SQLite), e.g. "
                        "postgresql+asyncpg://user:pass@host:5432/prefect")  # fmt: skip
    parser.add_argument("--restart", action="store_true", help="restart the server once before the rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = Server(root, args.database)
        try:
            ws = root / "ws"
            subprocess.run([T2I, "deploy", "--preset", "tiny", "--pool", "stop", "--name", "stop", "--workspace",
                            str(ws)], env=server.env, check=True, capture_output=True)  # fmt: skip
            if args.restart:
                server.close()
                server.start()
            times = []
            for k in range(args.rounds):
                seconds, left = one_round(server, ws, root, k)
                times.append(seconds)
                print(f"round {k + 1}: t2i worker exited {seconds:.1f} s after Ctrl-C; processes left: {left}",
                      flush=True)  # fmt: skip
        finally:
            server.close()
    print(f"slowest exit over {args.rounds} rounds (s): {max(times):.1f}")


if __name__ == "__main__":
    main()
