"""GPU check: the real training loop, its throughput and MFU, the VAE and T5 encoders, and sampling, on one GPU.

    python tests/gpu/check.py [--peak-tflops N] [--workers N] [--tmp DIR]   # one H100/H200, ≤ 6 min, offline
    python tests/gpu/check.py --smoke                                      # the same code on CPU, tiny sizes

Why one script: a GPU is lent rarely and briefly, so everything that can only be seen on one is measured in one
short run, and the identical code runs on CPU at tiny sizes in `make test` (tests/gpu/test_check_smoke.py), so
the GPU run does not die of a typo. The two runs differ only in `Sizes` (sizes, device, precision, loader
workers). Every model is built from a config with random weights and the data set is made here: nothing is
downloaded (HF_HUB_OFFLINE=1).

(a) `t2i.tasks.train.train_denoiser` (LAMB, EMA, accelerate, bf16, checkpoints) on DiT-I L and CAD-I L at 256 px
    shapes (latents 4×32×32, stored flan-t5-xl-width text: 2048 × 128 tokens): 10 steps, stop, resume to 20, and
    the raw and EMA weights compared with an uninterrupted 20-step run (deterministic kernels for these legs).
(b) samples/s of the full loop (a separate run with the usual kernels, steady-state log intervals) and of the
    bare forward/backward/LAMB/EMA step on tensors already on the GPU; MFU from FlopCounterMode's count of one
    forward+backward against the GPU's bf16 dense peak.
(c) SD-VAE-config AutoencoderKL encode images/s (256 px, bf16, through `t2i.models.vae`) and flan-t5-xl-config
    T5 encoder tokens/s (128 tokens, bf16, `wo` kept in float32 as from_pretrained does).
(d) sampling with `t2i.models.sampling.sample_latents` from the final EMA weights, as `t2i evaluate` calls it,
    decoded with the VAE: the images must be finite.

Output: one line per figure, `name: value unit (target …)`, the last a summary; exit 1 if a check failed
(targets missed are reported, not fatal).

Needs, beside a CUDA PyTorch image (torch, transformers, accelerate, safetensors, numpy, pyarrow, pillow; pyyaml
comes with transformers), these wheels, installed with `pip install --no-index --no-deps *.whl`:
  - diffusers (6.4 MB) — AutoencoderKL;
  - pydantic + pydantic-core (for the image's Python) + annotated-types + typing-inspection (2.8 MB), if absent —
    `t2i.flows.config`;
  - tensorboard + protobuf + absl-py (6.0 MB), if absent — `train_denoiser` always opens a SummaryWriter;
  - not prefect: `t2i.tasks.train` and `t2i.tasks.text` import `prefect.task` at module import, but outside a
    flow run `train_denoiser.fn` needs of it only that decorator and a run-logger lookup that falls back to plain
    logging, so this script puts a stand-in `prefect` module in place (`task` returns the function with `.fn`).
    Prefect 3.7 with what it pulls in beyond the image would be ~73 wheels, ~45 MB, and outside a run its
    artifact calls start an ephemeral Prefect server. `--with-prefect` uses the installed prefect instead.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field, replace
from importlib import util as importlib_util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the resume legs


def _make_t2i_importable() -> None:
    """A bare copy of the repository (the GPU machine's) has no `pip install -e .`: map `t2i.<folder>` onto the
    folders through symlinks on sys.path and PYTHONPATH, so loader workers (forkserver) import it too."""
    try:
        if importlib_util.find_spec("t2i.tasks") is not None:
            return
    except ModuleNotFoundError:
        pass
    links = Path(tempfile.mkdtemp(prefix="t2i-src-"))
    (links / "t2i").mkdir()
    for name in ("flows", "tasks", "models", "data"):
        (links / "t2i" / name).symlink_to(REPO / name)
    sys.path.insert(0, str(links))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(links), os.environ.get("PYTHONPATH")]))
    atexit.register(shutil.rmtree, links, True)


def _prefect_stand_in(force: bool = False) -> bool:
    """Outside a flow run the training code needs of prefect only `task(...)(fn).fn` and a logger lookup that
    fails over to plain logging; this provides exactly that when prefect is not installed (or `force`)."""
    if not force and importlib_util.find_spec("prefect") is not None:
        return False

    class MissingContextError(RuntimeError):
        pass

    def task(fn=None, **_options):
        if fn is None:
            return task
        fn.fn = fn
        return fn

    def get_run_logger():
        raise MissingContextError("no Prefect run context (stand-in)")

    modules = {name: types.ModuleType(name) for name in ("prefect", "prefect.exceptions", "prefect.logging",
                                                         "prefect.artifacts", "prefect.cache_policies")}  # fmt: skip
    modules["prefect"].task = task
    modules["prefect.cache_policies"].NO_CACHE = None
    modules["prefect.exceptions"].MissingContextError = MissingContextError
    modules["prefect.logging"].get_run_logger = get_run_logger
    sys.modules.update(modules)
    return True


_make_t2i_importable()
if "--with-prefect" in sys.argv:
    os.environ["T2I_CHECK_WITH_PREFECT"] = "1"  # loader workers re-run this module: the same choice there
PREFECT_STAND_IN = _prefect_stand_in(force=os.environ.get("T2I_CHECK_WITH_PREFECT") != "1")


@dataclass(frozen=True)
class Sizes:
    """Everything the GPU run and the CPU smoke run differ in."""

    device: str = "cuda"
    precision: str = "bf16"  # train.mixed_precision; bf16 autocast in the bare step too
    size: str = "L"
    latent: int = 32  # latent side: 256 px through the SD VAE's factor 8
    text_dim: int = 2048  # flan-t5-xl
    tokens: int = 128
    samples: int = 512
    shard: int = 128
    batch: int = 128
    steps: int = 20  # resume check: stop at steps / 2, resume to steps
    log_every: int = 5  # full-loop samples/s: the log intervals after the first
    workers: int = 4
    warmup: int = 3  # bare step, VAE, T5: untimed iterations, then `iters` timed ones
    iters: int = 10
    vae_blocks: tuple[int, ...] = (128, 256, 512, 512)
    vae_layers: int = 2
    vae_groups: int = 32
    vae_batch: int = 32
    t5: dict = field(
        default_factory=lambda: dict(d_model=2048, num_layers=24, num_heads=32, d_kv=64, d_ff=5120)
    )
    t5_batch: int = 64
    images: int = 4
    sample_steps: int = 20
    peak_tflops: float | None = None  # None: looked up from the GPU's name

    @property
    def pixels(self) -> int:
        return self.latent * 2 ** (len(self.vae_blocks) - 1)


GPU = Sizes()
SMOKE = Sizes(device="cpu", precision="no", size="tiny", latent=8, text_dim=32, tokens=16, samples=32, shard=16,
              batch=8, steps=4, log_every=1, workers=0, warmup=1, iters=2, vae_blocks=(8, 16), vae_layers=1,
              vae_groups=4, vae_batch=4, t5=dict(d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64),
              t5_batch=4, images=2, sample_steps=3, peak_tflops=1.0)  # fmt: skip

# bf16 dense tensor-core peaks (TFLOP/s), matched in order against torch.cuda.get_device_name()
PEAKS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0)]


class Report:
    """Figure lines as they come (`name: value unit (target …)`), and the tally the summary line gives."""

    def __init__(self) -> None:
        self.t0, self.failed, self.passed, self.missed, self.met = time.time(), [], [], [], []

    def line(self, name: str, value, unit: str = "", note: str = "") -> None:
        text = str(value)
        if isinstance(value, float):
            text = f"{value:.0f}" if math.isfinite(value) and abs(value) >= 1000 else f"{value:.4g}"
        print(f"{name}: {text}{' ' + unit if unit else ''}{f' ({note})' if note else ''}", flush=True)

    def check(self, name: str, ok: bool, value, unit: str = "", note: str = "") -> None:
        (self.passed if ok else self.failed).append(name)
        self.line(name, value, unit, f"{'ok' if ok else 'FAILED'}{'; ' + note if note else ''}")

    def target(self, name: str, value: float, unit: str, at_least: float, note: str = "") -> None:
        (self.met if value >= at_least else self.missed).append(name)
        self.line(name, value, unit, f"{note + '; ' if note else ''}target ≥ {at_least:g} {unit}")

    def summary(self) -> None:
        missed = f" (missed: {', '.join(self.missed)})" if self.missed else ""
        failed = f" (failed: {', '.join(self.failed)})" if self.failed else ""
        print(f"summary: {len(self.passed)} of {len(self.passed) + len(self.failed)} checks passed{failed}, "
              f"{len(self.met)} of {len(self.met) + len(self.missed)} targets met{missed}, "
              f"{time.time() - self.t0:.0f} s", flush=True)  # fmt: skip


# --- the data set: what the latents stage would write ---------------------------------------------------------


@dataclass(frozen=True)
class Data:
    latents: object
    captions: object
    text: object
    shards: int
    table_root: Path


def make_dataset(ws: Path, s: Sizes) -> Data:
    """Latents (random moments), captions and stored text embeddings (`text.mode: precomputed`) written as the
    stages write them, so training needs no VAE and no T5-XL; every caption has `s.tokens` tokens."""
    import numpy as np
    import pyarrow as pa
    import torch

    from t2i.data.schemas import CAPTIONS, LATENTS, SHAPE_META_KEY, TEXT_EMBEDDINGS
    from t2i.data.store import Artifact
    from t2i.data.train_data import train_table_for

    rng, shape = np.random.default_rng(0), (4, s.latent, s.latent)
    latents, captions, text = (Artifact(ws, stage, "gpu-check") for stage in ("latents", "recaption", "text"))
    shards = -(-s.samples // s.shard)
    for i in range(shards):
        keys = [f"k{j}" for j in range(i * s.shard, min(s.samples, (i + 1) * s.shard))]
        mean = rng.standard_normal((len(keys), *shape)).astype(np.float16)
        std = (0.1 + 0.05 * rng.random((len(keys), *shape))).astype(np.float16)
        latents.write_shard(i, pa.Table.from_pydict(
            {"key": keys, "mean": [m.tobytes() for m in mean], "std": [d.tobytes() for d in std]}, schema=LATENTS,
        ).replace_schema_metadata({SHAPE_META_KEY: json.dumps(list(shape)).encode()}))  # fmt: skip
        captions.write_shard(i, pa.Table.from_pylist(
            [{"key": k, "caption": f"caption {k}", "model": "gpu-check", "tokens": s.tokens, "finish_reason": "stop"}
             for k in keys], schema=CAPTIONS))  # fmt: skip
        emb = torch.randn(len(keys), s.tokens, s.text_dim, generator=torch.Generator().manual_seed(i))
        words = emb.to(torch.bfloat16).view(torch.uint8).numpy()
        text.write_shard(i, pa.Table.from_pydict(
            {"key": keys, "embedding": [w.tobytes() for w in words], "tokens": [s.tokens] * len(keys)},
            schema=TEXT_EMBEDDINGS))  # fmt: skip
    null = torch.randn(1, s.text_dim).to(torch.bfloat16).float().tolist()
    text.write_manifest(config={}, inputs={}, started=time.time(),
                        extra={"dim": s.text_dim, "dtype": "bfloat16", "null_embedding": null})  # fmt: skip
    return Data(latents, captions, text, shards, train_table_for(latents, captions, text).root)


def save_vae(ws: Path, s: Sizes) -> str:
    """An AutoencoderKL of stabilityai/sd-vae-ft-ema's layout (random weights), saved so that training's
    previews, the encode figure and sampling all load it through `t2i.models.vae.load_vae`, like the stages."""
    from diffusers import AutoencoderKL

    n = len(s.vae_blocks)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=s.vae_blocks,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        layers_per_block=s.vae_layers, norm_num_groups=s.vae_groups, sample_size=s.pixels)  # fmt: skip
    vae.save_pretrained(ws / "vae")
    return str(ws / "vae")


# --- training runs --------------------------------------------------------------------------------------------


def configs(ws: Path, s: Sizes, model: str):
    """The imagenet256 recipe (LAMB, lr, warmup, EMA 0.9999, grad clip, CFG dropout, bf16) at this check's sizes;
    checkpoints and previews only at the last step of a run."""
    from t2i.flows.config import load_config

    sets = {"model": model, "size": s.size, "batch_size": s.batch, "steps": s.steps, "log_every": s.log_every,
            "checkpoint_every": 10 * s.steps, "sample_every": 10 * s.steps, "sample_prompts": s.images,
            "loader_workers": s.workers, "mixed_precision": s.precision, "device": s.device}  # fmt: skip
    overrides = [f"train.{k}={json.dumps(v)}" for k, v in sets.items()]  # JSON is YAML: "no" stays a string
    overrides += ["text.mode=precomputed", "text.dtype=bfloat16", f"text.max_length={s.tokens}"]
    cfg = load_config("imagenet256", overrides, str(ws))
    return cfg.train, cfg.text


class LogCapture(logging.Handler):
    """The train loop's log lines (plain logging outside a Prefect run): the `[train] step N/M … R samples/s`
    intervals are synchronised at both ends (the loss is read on the host), so they time the real loop."""

    PATTERN = re.compile(r"\[train\] step (\d+)/\d+ .* ([0-9.]+) samples/s")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def steady_rate(self) -> float:
        """samples/s over the log intervals after the first (which holds the start-up), equal-sized intervals:
        the harmonic mean of their rates."""
        rates = [float(m.group(2)) for m in map(self.PATTERN.search, self.messages) if m]
        rates = rates[1:] or rates
        return len(rates) / sum(1 / r for r in rates) if rates and min(rates) > 0 else float("nan")


def run_training(ws: Path, name: str, train_cfg, text_cfg, data: Data, stop_after=None, vae_path=None):
    """One call of the train stage's task body, as `t2i train` runs it in-process; (result, log, root)."""
    from t2i.data.store import Artifact
    from t2i.tasks.train import train_denoiser
    from t2i.tasks.train_job import TrainJob

    logger, capture = logging.getLogger("t2i"), LogCapture()
    logger.setLevel(logging.INFO)
    logger.addHandler(capture)
    artifact = Artifact(ws, "train", name)
    try:
        job = TrainJob(train=train_cfg, text=text_cfg, checkpoints=artifact, latents=data.latents,
                       captions=data.captions, num_shards=data.shards, latent_norm=train_cfg.scale_factor,
                       vae_path=vae_path, text_embeddings=(data.text,), stop_after=stop_after)  # fmt: skip
        result = train_denoiser.fn(job)
    finally:
        logger.removeHandler(capture)
        free_memory()
    return result, capture, artifact.root


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def deterministic_kernels():
    """Bitwise resume equality needs kernels that do not reorder sums between runs (cuBLAS, cuDNN, SDPA
    backward); off again afterwards, so the timed runs use the usual kernels."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, bench = True, torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, bench


def state_difference(root_a: Path, root_b: Path, step: int) -> float:
    """Largest |Δ| over the raw and EMA weights of two runs' checkpoints of `step` (memory-mapped reads)."""
    import torch

    def weights(root: Path):
        state = torch.load(root / "checkpoints" / f"step-{step:08d}" / "state.pt", map_location="cpu",
                           weights_only=True, mmap=True)  # fmt: skip
        return {**{f"model.{k}": v for k, v in state["model"].items()}, **state["ema"]["shadow"]}

    a, b = weights(root_a), weights(root_b)
    if a.keys() != b.keys():
        return float("inf")
    return max(
        0.0 if torch.equal(a[k], b[k]) else float((a[k].double() - b[k].double()).abs().max()) for k in a
    )


def resume_check(report: Report, s: Sizes, ws: Path, data: Data, name: str, train_cfg, text_cfg, vae_path):
    """(a): stop at half, resume, and compare with an uninterrupted run; returns the uninterrupted run's root
    (its final EMA weights are what `t2i evaluate` samples). That run also draws the training preview grid."""
    half = s.steps // 2
    with deterministic_kernels():
        _, _, resumed = run_training(ws, f"{name}-resumed", train_cfg, text_cfg, data, stop_after=half)
        result, log, _ = run_training(ws, f"{name}-resumed", train_cfg, text_cfg, data)
        _, _, straight = run_training(ws, f"{name}-straight", train_cfg, text_cfg, data, vae_path=vae_path)
    resumed_at = any(f"resuming from step-{half:08d}" in m for m in log.messages)
    report.check(f"{name} resume", resumed_at and result["step"] == s.steps, half if resumed_at else "no", "step",
                 f"resumed at step {half} and finished at {result['step']} of {s.steps}")  # fmt: skip
    delta = state_difference(resumed, straight, s.steps)
    report.check(f"{name} resume max|Δw|", delta == 0.0, delta, "",
                 f"raw + EMA weights at step {s.steps} vs an uninterrupted run, deterministic kernels; "
                 "target 0 = bitwise equal")  # fmt: skip
    report.line(f"{name} train (resumed leg)", log.steady_rate(), "samples/s", "deterministic kernels")
    preview = sorted((straight / "samples").glob("*.png")) if (straight / "samples").is_dir() else []
    report.check(f"{name} training preview", bool(preview), len(preview), "grid",
                 f"SamplePreview at step {s.steps} from the saved VAE")  # fmt: skip
    shutil.rmtree(resumed, ignore_errors=True)
    return straight


# --- (b) the bare step and its FLOPs ------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, s: Sizes) -> float:
    """Seconds for `s.iters` calls of fn(i) after `s.warmup` untimed ones, the device drained at both ends."""
    for i in range(s.warmup):
        fn(i)
    synchronize(s.device)
    t0 = time.perf_counter()
    for i in range(s.iters):
        fn(s.warmup + i)
    synchronize(s.device)
    return time.perf_counter() - t0


def bare_step(s: Sizes, train_cfg) -> tuple[float, float]:
    """(samples/s, FLOPs of one forward+backward) of the training step without the loop around it: the same
    model, LAMB, clipping and EMA (and CAD-I's self-conditioning coin) on tensors already on the device. The
    FLOPs are the model's (one forward and backward, no self-conditioning pass), counted by FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from t2i.models.cad import self_conditioned_forward
    from t2i.models.ema import EMA
    from t2i.tasks.train import build_denoiser, make_optimizer, objective_for
    from t2i.tasks.train_batches import SHARED_STREAM, step_generator

    cfg, dev = train_cfg, torch.device(s.device)
    torch.manual_seed(cfg.seed)
    model = build_denoiser(cfg.model, cfg.size, latent_channels=4, latent_size=s.latent, text_dim=s.text_dim,
                           patch_size=cfg.patch_size).to(dev)  # fmt: skip
    optimizer, ema, objective = make_optimizer(model, cfg), EMA(model, cfg.ema_decay), objective_for(cfg)
    z, eps = (torch.randn(s.batch, 4, s.latent, s.latent, device=dev) for _ in range(2))
    text, mask = torch.randn(s.batch, s.tokens, s.text_dim, device=dev), torch.ones(s.batch, s.tokens, dtype=bool, device=dev)  # fmt: skip
    t = objective.sample_t(s.batch).to(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")

    def denoiser(step: int):
        if cfg.model != "cad" or cfg.self_condition == 0:
            return model
        shared = step_generator(cfg.seed, step, SHARED_STREAM)
        return lambda *a: self_conditioned_forward(model, *a, cfg.self_condition, generator=shared)

    def step(i: int, fn=None) -> None:
        with autocast:
            loss, _ = objective.loss(fn or denoiser(i), z, text, mask, t=t, eps=eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)

    counter = FlopCounterMode(display=False)
    with counter:
        step(0, fn=model)
    seconds = timed(step, s)
    return s.batch * s.iters / seconds, float(counter.get_total_flops())


def peak_tflops(s: Sizes, override: float | None) -> tuple[float, str]:
    """bf16 dense peak of this device: --peak-tflops, else looked up from the GPU's name; the CPU smoke run
    has no meaningful peak and uses a nominal one."""
    import torch

    if override:
        return override, "given by --peak-tflops"
    if s.peak_tflops:
        return s.peak_tflops, "nominal CPU peak, not a hardware figure"
    name = torch.cuda.get_device_name()
    for key, peak in PEAKS:
        if key in name:
            return peak, f"{name} bf16 dense"
    return float("nan"), f"{name}: peak unknown, pass --peak-tflops"


def denoiser_figures(report: Report, s: Sizes, ws: Path, data: Data, model: str, peak, vae_path: str) -> None:
    """(a), (b) and (d) for one denoiser."""
    name = f"{model}-{s.size}"
    train_cfg, text_cfg = configs(ws, s, model)
    longer = train_cfg.model_copy(update={"steps": s.steps + 1})  # stops at s.steps: no final weights to save
    _, log, root = run_training(ws, f"{name}-timed", longer, text_cfg, data, stop_after=s.steps)
    full = log.steady_rate()
    shutil.rmtree(root, ignore_errors=True)
    report.line(f"{name} full loop", full, "samples/s",
                f"batch {s.batch}, steps {s.log_every + 1}-{s.steps} of a fresh run, {s.workers} loader workers")  # fmt: skip
    straight = resume_check(report, s, ws, data, name, train_cfg, text_cfg, vae_path)
    sample_check(report, s, name, straight, vae_path, data)
    free_memory()
    shutil.rmtree(straight, ignore_errors=True)
    bare, flops = bare_step(s, train_cfg)
    free_memory()
    report.line(f"{name} bare step", bare, "samples/s", "model + LAMB + clip + EMA on device tensors")
    report.target(f"{name} full/bare", full / bare, "x", 0.9)
    mfu = 100 * flops * bare / s.batch / (peak[0] * 1e12)
    note = (f"{flops / 1e12:.3g} TFLOP per fwd+bwd of {s.batch}, bare step, peak {peak[0]:g} TFLOP/s ({peak[1]}); "
            f"full loop {mfu * full / bare:.3g} %")  # fmt: skip
    if model == "dit":
        report.target(f"{name} MFU", mfu, "%", 40, note)
    else:
        report.line(f"{name} MFU", mfu, "%", note + "; self-conditioning pass not counted")


# --- (d) sampling, (c) the encoders --------------------------------------------------------------------------------


def sample_check(report: Report, s: Sizes, name: str, root: Path, vae_path: str, data: Data) -> None:
    """(d): the final EMA weights sampled as `t2i evaluate` does (`load_final`, `sample_latents` with its
    generator, `to_vae_latents`, the VAE in float32), on stored caption embeddings; every image must be finite.
    If evaluate's own generator cannot drive this device, that is reported and a device generator used."""
    import numpy as np
    import torch

    from t2i.data.train_data import TrainTable, pad_rows
    from t2i.models.sampling import sample_latents
    from t2i.models.vae import decode_latents, load_vae
    from t2i.tasks.checkpoints import load_final
    from t2i.tasks.train import to_vae_latents
    from t2i.tasks.train_batches import step_generator

    model, meta = load_final(root, device=s.device)
    vae = load_vae(vae_path, device=s.device, dtype="float32")
    table = TrainTable(data.table_root)
    text, mask = pad_rows(table.embeddings_of(np.arange(s.images)))
    text, mask = text.float().to(s.device), mask.to(s.device)
    null = table.null_embedding().float()[None].to(s.device)
    null_mask = torch.ones(null.shape[:2], dtype=torch.bool, device=s.device)

    def sample(generator):
        return sample_latents(meta["objective"], "auto", model, (s.images, *meta["latent_shape"]), text, mask,
                              null, null_mask, steps=s.sample_steps, guidance_scale=4.0, generator=generator)  # fmt: skip

    note = f"{meta['objective']} sampler, {s.sample_steps} steps, guidance 4, decoded at {s.pixels} px"
    try:
        z, evaluate_generator = sample(step_generator(0, 0)), True  # what evaluate passes
    except RuntimeError as err:
        z, evaluate_generator = sample(torch.Generator(s.device).manual_seed(0)), False
        note += f"; evaluate's generator (step_generator, CPU) fails on {s.device}: {str(err)[:120]}"
    latents = to_vae_latents(z, meta["latent_norm"])
    with torch.inference_mode():
        pixels = vae.decode(latents).sample
    finite = int((torch.isfinite(z).flatten(1).all(1) & torch.isfinite(pixels).flatten(1).all(1)).sum())
    images = decode_latents(vae, latents)  # the uint8 images evaluate writes
    report.check(f"{name} sample", finite == s.images and evaluate_generator and images.shape[0] == s.images,
                 finite, f"of {s.images} images finite", note)  # fmt: skip


def vae_figure(report: Report, s: Sizes, vae_path: str) -> None:
    """(c): images/s of the latents stage's encode (`encode_moments`: posterior mean and std to the host)."""
    import numpy as np

    from t2i.models.vae import encode_moments, load_vae

    dtype = "bfloat16" if s.precision == "bf16" else "float32"
    vae = load_vae(vae_path, device=s.device, dtype=dtype)
    images = np.random.default_rng(0).uniform(-1, 1, (s.vae_batch, 3, s.pixels, s.pixels)).astype(np.float32)
    seconds = timed(lambda _: encode_moments(vae, images), s)
    report.line("vae encode", s.vae_batch * s.iters / seconds, "images/s",
                f"sd-vae-ft-ema layout, random weights, {s.pixels} px, {dtype}, batch {s.vae_batch}")  # fmt: skip


def t5_figure(report: Report, s: Sizes) -> None:
    """(c): tokens/s of a flan-t5-xl-shaped encoder (random weights, built on the device), cast as
    `from_pretrained(dtype=bfloat16)` casts it: `wo` stays float32 (T5's _keep_in_fp32_modules)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    dtype = torch.bfloat16 if s.precision == "bf16" else torch.float32
    config = T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=False, **s.t5)
    with torch.device(s.device):
        model = T5EncoderModel(config).to(dtype).eval().requires_grad_(False)
    for module_name, module in model.named_modules():
        if module_name.rsplit(".", 1)[-1] in (model._keep_in_fp32_modules or []):
            module.float()
    ids = torch.randint(0, config.vocab_size, (s.t5_batch, s.tokens), device=s.device)
    attention = torch.ones_like(ids)

    def encode(_):
        with torch.no_grad():  # as TextEncoder.encode
            return model(input_ids=ids, attention_mask=attention).last_hidden_state

    seconds = timed(encode, s)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    report.line("t5 encode", s.t5_batch * s.tokens * s.iters / seconds, "tokens/s",
                f"flan-t5-xl layout ({params:.0f}M), random weights, {s.tokens} tokens, batch {s.t5_batch}, "
                f"{str(dtype).removeprefix('torch.')}")  # fmt: skip


# --- main --------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--smoke", action="store_true", help="the same code on CPU at tiny sizes (for `make test`)"
    )
    ap.add_argument("--peak-tflops", type=float, help="the GPU's bf16 dense peak, if its name is not known")
    ap.add_argument("--workers", type=int, help="train.loader_workers (default 4 on GPU, 0 in the smoke run)")
    ap.add_argument("--tmp", help="folder for the temporary workspace (checkpoints: ~20 GB at peak on GPU)")
    ap.add_argument("--with-prefect", action="store_true", help="the installed prefect, not the stand-in")
    return ap.parse_args(argv)


def loader_workers(s: Sizes) -> int:
    """Loader workers hand batches over through /dev/shm (at GPU sizes ~130 MB of float32 text each, 4 in
    flight per worker); a container's default 64 MB would kill them, so then load in-process, and say so."""
    need = s.workers * 4 * s.batch * s.tokens * s.text_dim * 4 * 2
    free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
    if s.workers and free < need:
        print(f"loader: /dev/shm has {free / 2**30:.1f} GiB free, {s.workers} workers need ~{need / 2**30:.1f}: "
              "training loads in-process (0 workers)", flush=True)  # fmt: skip
        return 0
    return s.workers


def describe(s: Sizes, peak) -> str:
    import torch

    where = (
        torch.cuda.get_device_name()
        if s.device.startswith("cuda")
        else f"cpu, {torch.get_num_threads()} threads"
    )
    return (f"{where}; torch {torch.__version__}; {s.precision} mixed precision; peak {peak[0]:g} TFLOP/s "
            f"({peak[1]}); prefect {'stand-in' if PREFECT_STAND_IN else 'installed'}; {s.workers} loader workers")  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    s = SMOKE if args.smoke else GPU
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; `--smoke` runs the same code on CPU", file=sys.stderr)
        return 2
    s = replace(s, workers=loader_workers(s) if args.workers is None else args.workers)
    if s.workers:  # workers fork from a server that has torch and the batch code loaded: seconds, not tens
        import multiprocessing

        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["__main__", "t2i.tasks.train_batches"]
        )
    report, peak = Report(), peak_tflops(s, args.peak_tflops)
    report.line("device", s.device, "", describe(s, peak))
    with tempfile.TemporaryDirectory(prefix="t2i-gpu-check-", dir=args.tmp) as tmp:
        ws = Path(tmp)
        t0 = time.perf_counter()
        data, vae_path = make_dataset(ws, s), save_vae(ws, s)
        report.line("data", s.samples, "samples", f"latents 4×{s.latent}×{s.latent}, text {s.tokens}×{s.text_dim} "
                    f"bfloat16, made in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        for model in ("dit", "cad"):
            denoiser_figures(report, s, ws, data, model, peak, vae_path)
        vae_figure(report, s, vae_path)
        free_memory()
        t5_figure(report, s)
    report.summary()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
