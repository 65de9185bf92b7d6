"""Scaling with the dataset: the real stages, through the `t2i` command line, on an ImageNet-like folder of
N and of 4N images, each on a fresh workspace with the `tiny` preset. Time per image should not grow with
the dataset, training memory should not grow with it at all, and `t2i status` should stay instant.

    python tests/benchmarks/bench_scale.py [--n 10000] [--classes 100] [--steps 50] [--keep DIR]

What it does, for N and 4N:
  * writes `class/*.JPEG` (48×48, a few random shapes on a random background; a few hundred variants are
    encoded once with Pillow and their bytes written, so 50k files take seconds) — not timed;
  * starts one `prefect server` on 127.0.0.1 before anything is timed, and runs every stage as
    `.venv/bin/t2i <stage> --preset tiny --workspace WS --set ...` against it: download (folder source,
    listing included) → cutmix → recaption (`template` backend: captions cost nothing, but latents and train
    need them) → latents (tiny shapes VAE at 32×32, plus the captions' tiny-T5 embeddings:
    `text.mode=precomputed`, the tiny preset's default, chosen because it is the path whose artifacts and
    train table grow with the data, so it is the harder test of training memory) → train (`--steps`
    steps, one process, no preview grids, one checkpoint at the end);
  * times each stage's subprocess (wall), then runs the same command again, which finds the stage complete
    and skips it: the median of a size's skipped reruns is the fixed cost of a command (imports, Prefect
    flow run, planning), and `net = wall − that` is the stage's own work. Seconds per 1,000 images are per
    1,000 *source* images for every stage (cutmix makes N composites, latents encodes 2N images). Below
    N ≈ 10k the fixed cost dominates and T is mostly noise: use the default N (about 15 min on 2 cores);
  * training peak RSS: the `t2i train` process is polled (`VmHWM` in /proc, every 0.1 s) and reaped with
    `wait4` (`ru_maxrss`). With one process the train table (latents + captions + text embeddings joined by
    key, memory-mapped) is built in that same process before the first step, so the peak covers imports,
    the Prefect flow run, building/opening the train table, the model, `--steps` steps and the checkpoint.
    The loader workers (`train.loader_workers`, separate processes) are reported as the peak summed RSS
    of the whole process tree;
  * `t2i status` wall time at 4N (best of 2; the server is already running), beside the same at N, the
    in-process `stage_statuses` time and a bare `python -c "import t2i.flows.status"`, which separate the
    command's import cost from the status logic.

Last line: `rss 4N/N: R, per-image time 4N/N: T, status: S s` — R: training peak RSS ratio (the train
process's VmHWM), T: total net per-image time of download + cutmix + latents at 4N over N, S: `t2i status`
seconds at 4N (targets: R ≤ 1.1, T ≤ 1.15, S ≤ 2). Run it alone: it is meant to be timed on an idle machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import t2i.models  # noqa: E402,F401  (torchvision shim)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
T2I = str(BIN / "t2i")
DATA_STAGES = ("download", "cutmix", "latents")
STAGES = ("download", "cutmix", "recaption", "latents", "train")
TARGETS = {"rss": 1.1, "time": 1.15, "status": 2.0}


# ---------------------------------------------------------------------------------------------- dataset


def jpeg_variants(count: int, side: int, seed: int = 0) -> list[bytes]:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        img = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 4)):
            x0, y0 = rng.randrange(side - 8), rng.randrange(side - 8)
            box = (x0, y0, rng.randint(x0 + 6, side), rng.randint(y0 + 6, side))
            colour = tuple(rng.randrange(256) for _ in range(3))
            kind = rng.randrange(3)
            if kind == 0:
                draw.ellipse(box, fill=colour)
            elif kind == 1:
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon(
                    [(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=colour
                )
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_imagenet_folder(root: Path, n: int, classes: int, variants: list[bytes], seed: int) -> float:
    """`root/n0000XXXX/n0000XXXX_<i>.JPEG`, n images spread evenly over `classes` folders; returns seconds."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    names = [f"n{c:08d}" for c in range(classes)]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = names[i % classes]
        (root / name / f"{name}_{i}.JPEG").write_bytes(variants[rng.randrange(len(variants))])
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------- prefect server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str, float]:
    port, t0 = _free_port(), time.perf_counter()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")  # noqa: SIM115  (the server writes to it until it stops)
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url, time.perf_counter() - t0
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
    proc.kill()
    raise RuntimeError("prefect server did not become healthy in 180 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------------ running


def _kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = [int(k) for k in (task / "children").read_text().split()]
                out += kids
                todo += kids
        except (OSError, ValueError):
            pass
    return out


class Runner:
    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env, self.logdir, self.count = env, logdir, 0
        self.current: subprocess.Popen | None = None

    def run(self, args: list[str], watch: bool = False) -> dict:
        """Run `t2i args`; wall seconds, and with `watch` the peak RSS (KiB) of the process and its tree."""
        self.count += 1
        log = self.logdir / f"{self.count:02d}-{args[0]}.log"
        with open(log, "w") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [T2I, *args], env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
            )
            self.current = proc
            peak = {"hwm": 0, "tree": 0}
            done = threading.Event()

            def poll() -> None:
                while not done.is_set():
                    hwm = _kib(proc.pid, "VmHWM")
                    tree = _kib(proc.pid, "VmRSS") + sum(_kib(k, "VmRSS") for k in _descendants(proc.pid))
                    peak["hwm"], peak["tree"] = max(peak["hwm"], hwm), max(peak["tree"], tree)
                    done.wait(0.1)

            poller = threading.Thread(target=poll, daemon=True)
            if watch:
                poller.start()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            done.set()
            if watch:
                poller.join()
            proc.returncode = os.waitstatus_to_exitcode(status)
            self.current = None
        if proc.returncode != 0:
            raise RuntimeError(f"t2i {' '.join(args)} failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
        return {
            "wall": wall,
            "hwm": peak["hwm"],
            "tree": peak["tree"],
            "maxrss": usage.ru_maxrss,
            "log": str(log),
        }


def stage_overrides(args, source: Path) -> list[str]:
    sets = [
        f"download.source=folder:{source}",
        "download.max_images=null",  # the tiny preset keeps 512
        f"download.shard_size={args.shard_size}",
        "download.workers=2",
        "cutmix.resolution=32",
        "cutmix.workers=2",
        "recaption.backend=template",
        "latents.resolution=32",
        "latents.batch_size=64",
        f"text.mode={args.text_mode}",
        f"train.steps={args.steps}",
        "train.batch_size=32",
        "train.warmup_steps=5",
        "train.processes=1",
        f"train.loader_workers={args.loader_workers}",
        "train.sample_prompts=0",
        f"train.checkpoint_every={args.steps}",
        f"train.sample_every={args.steps}",
        f"train.log_every={args.steps}",
    ]
    return [x for s in sets for x in ("--set", s)]


def manifest_seconds(ws: Path, stage: str) -> float | None:
    """The stage manifest's own `seconds` (first shard started → manifest), summed over its artifacts."""
    total, found = 0.0, False
    for m in (ws / stage).glob("*/manifest.json"):
        total += json.loads(m.read_text()).get("seconds", 0.0)
        found = True
    return total if found else None


def run_size(args, n: int, root: Path, runner: Runner, models: Path, variants: list[bytes]) -> dict:
    source, ws = root / f"imagenet-{n}", root / f"ws-{n}"
    made = make_imagenet_folder(source, n, args.classes, variants, seed=n)
    shutil.copytree(models, ws / "models")  # building the tiny models is not what this measures
    common = ["--preset", "tiny", "--workspace", str(ws), *stage_overrides(args, source)]
    out = {"n": n, "made": made, "stages": {}}
    print(f"[{n}] wrote {n} JPEGs in {args.classes} classes in {made:.1f}s", flush=True)
    for stage in STAGES:
        first = runner.run([stage, *common], watch=stage == "train")
        again = runner.run([stage, *common])
        first["rerun"] = again["wall"]
        first["manifest"] = manifest_seconds(ws, "train" if stage == "train" else stage)
        out["stages"][stage] = first
        print(f"[{n}] {stage}: {first['wall']:.1f}s (rerun, skipped: {again['wall']:.1f}s)", flush=True)
    # a command's fixed cost: the median of this size's skipped reruns (one rerun alone is noisy)
    out["overhead"] = statistics.median(r["rerun"] for r in out["stages"].values())
    for r in out["stages"].values():
        r["net"] = max(r["wall"] - out["overhead"], 0.0)
    walls = [runner.run(["status", *common])["wall"] for _ in range(2)]
    out["status"] = min(walls)
    t0 = time.perf_counter()  # what a bare `import` of the status module costs, for comparison
    subprocess.run([sys.executable, "-c", "import t2i.flows.status"], env=runner.env, cwd=REPO, check=True)
    out["status_import"] = time.perf_counter() - t0
    from t2i.flows.config import load_config
    from t2i.flows.status import stage_statuses

    cfg = load_config("tiny", common[5::2], str(ws))
    t0 = time.perf_counter()
    states = stage_statuses(cfg)
    out["status_inproc"] = time.perf_counter() - t0
    rows = {s: json.loads(next((ws / s).glob("*/manifest.json")).read_text())["rows"] for s in DATA_STAGES}
    out["rows"] = rows
    if rows["download"] != n:
        raise RuntimeError(f"download kept {rows['download']} of {n} images: {rows}")
    incomplete = [s.stage for s in states if s.state != "complete" and s.stage != "evaluate"]
    if incomplete:
        raise RuntimeError(f"stages not complete after the run: {incomplete}")
    out["disk"] = {
        s: _du(ws / s) for s in ("download", "cutmix", "recaption", "latents", "text", "train-data")
    }
    return out


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# ------------------------------------------------------------------------------------------------- report


def report(small: dict, big: dict) -> None:
    n, m = small["n"], big["n"]
    print(
        f"\nper stage, seconds per 1,000 source images (wall = the command; net = wall − a command's fixed cost, "
        f"the median skipped rerun: {small['overhead']:.1f}s at N, {big['overhead']:.1f}s at 4N):"
    )
    print(f"{'stage':<10} {'wall N':>8} {'wall 4N':>8} {'net N':>8} {'net 4N':>8} {'ratio':>6} "
          f"{'manifest N':>11} {'manifest 4N':>12} {'rerun N':>8} {'rerun 4N':>9}")  # fmt: skip
    for stage in STAGES:
        a, b = small["stages"][stage], big["stages"][stage]
        per = lambda r, k, count: 1000 * r[k] / count  # noqa: E731
        ma = f"{1000 * a['manifest'] / n:.2f}" if a["manifest"] is not None else "-"
        mb = f"{1000 * b['manifest'] / m:.2f}" if b["manifest"] is not None else "-"
        ratio = f"{per(b, 'net', m) / per(a, 'net', n):.2f}" if a["net"] > 0 and b["net"] > 0 else "-"
        print(f"{stage:<10} {per(a, 'wall', n):8.2f} {per(b, 'wall', m):8.2f} {per(a, 'net', n):8.2f} "
              f"{per(b, 'net', m):8.2f} {ratio:>6} {ma:>11} {mb:>12} {a['rerun']:7.1f}s {b['rerun']:8.1f}s")  # fmt: skip
    net_n = sum(small["stages"][s]["net"] for s in DATA_STAGES) / n
    net_m = sum(big["stages"][s]["net"] for s in DATA_STAGES) / m
    wall_n = sum(small["stages"][s]["wall"] for s in DATA_STAGES) / n
    wall_m = sum(big["stages"][s]["wall"] for s in DATA_STAGES) / m
    t_ratio = net_m / net_n if net_n > 0 else float("nan")
    print(f"data stages (download+cutmix+latents): net {1000 * net_n:.2f} → {1000 * net_m:.2f} s/1k images "
          f"(ratio {t_ratio:.2f}); wall {1000 * wall_n:.2f} → {1000 * wall_m:.2f} (ratio {wall_m / wall_n:.2f})")  # fmt: skip

    ta, tb = small["stages"]["train"], big["stages"]["train"]
    mib = lambda k: k / 1024  # noqa: E731
    print("\ntraining (`t2i train`, one process: imports, Prefect flow run, train table build, model, steps, "
          "checkpoint):")  # fmt: skip
    print(f"  peak RSS of the train process (VmHWM): {mib(ta['hwm']):8.1f} MiB at N, {mib(tb['hwm']):8.1f} MiB "
          f"at 4N (ratio {tb['hwm'] / ta['hwm']:.3f})")  # fmt: skip
    print(f"  wait4 ru_maxrss (process or a descendant): {mib(ta['maxrss']):8.1f} MiB at N, "
          f"{mib(tb['maxrss']):8.1f} MiB at 4N (ratio {tb['maxrss'] / ta['maxrss']:.3f})")  # fmt: skip
    print(f"  peak summed RSS of the process tree (+ loader workers): {mib(ta['tree']):8.1f} MiB at N, "
          f"{mib(tb['tree']):8.1f} MiB at 4N (ratio {tb['tree'] / ta['tree']:.3f})")  # fmt: skip
    print(f"  wall: {ta['wall']:.1f}s at N, {tb['wall']:.1f}s at 4N (skipped rerun {ta['rerun']:.1f}s / "
          f"{tb['rerun']:.1f}s)")  # fmt: skip
    print("\ndisk (MiB):  " + ", ".join(
        f"{k} {small['disk'][k] / 2**20:.1f} → {big['disk'][k] / 2**20:.1f}" for k in small["disk"]))  # fmt: skip
    print(f"\n`t2i status`: {small['status']:.2f}s at N, {big['status']:.2f}s at 4N (best of 2, server up); "
          f"in-process stage_statuses: {small['status_inproc']:.3f}s at N, {big['status_inproc']:.3f}s at 4N; "
          f"`python -c 'import t2i.flows.status'`: {big['status_import']:.2f}s")  # fmt: skip
    r_ratio = tb["hwm"] / ta["hwm"]
    print(f"rss 4N/N: {r_ratio:.2f}, per-image time 4N/N: {t_ratio:.2f}, status: {big['status']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="images at the small size (the big one is 4N)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--shard-size", type=int, default=1000, help="download.shard_size")
    ap.add_argument("--text-mode", default="precomputed", choices=("precomputed", "online"))
    ap.add_argument("--loader-workers", type=int, default=2, help="train.loader_workers")
    ap.add_argument("--keep", default=None, help="keep datasets, workspaces and logs in this folder")
    args = ap.parse_args()

    print(f"bench_scale: N={args.n} and 4N={4 * args.n} images, {args.classes} classes, {args.steps} train steps, "
          f"shard_size {args.shard_size}, text.mode={args.text_mode}, loader_workers {args.loader_workers}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print(f"targets: training peak RSS 4N/N ≤ {TARGETS['rss']}, per-image time 4N/N (download+cutmix+latents) "
          f"≤ {TARGETS['time']}, `t2i status` at 4N ≤ {TARGETS['status']} s")  # fmt: skip

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill PID` still stops the server (finally)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    server = runner = None
    try:
        from t2i.models.loading import resolve_model

        holder = root / "tiny-models"
        for ref in ("tiny:t5", "tiny:vae", "tiny:llava"):
            resolve_model(ref, holder)
        t0 = time.perf_counter()
        variants = jpeg_variants(256, 48)
        print(f"encoded 256 JPEG variants in {time.perf_counter() - t0:.1f}s", flush=True)
        home = root / "prefect-home"
        home.mkdir(exist_ok=True)
        server, url, started = start_prefect_server(home)
        print(f"prefect server up in {started:.1f}s (not timed): {url}", flush=True)
        env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home)}
        env.pop("T2I_WORKSPACE", None)
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        runner = Runner(env, logs)
        small = run_size(args, args.n, root, runner, holder / "models", variants)
        big = run_size(args, 4 * args.n, root, runner, holder / "models", variants)
        report(small, big)
    finally:
        if runner is not None and runner.current is not None:  # interrupted mid-command
            runner.current.terminate()
            os.waitpid(runner.current.pid, 0)
        if server is not None:
            stop(server)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
