"""GPU check: the real training loop, its throughput and MFU, the VAE and T5 encoders, and sampling, on one GPU.

    python tests/gpu/check.py [--peak-tflops N] [--workers N] [--tmp DIR]   # one H100/H200, ≤ 6 min, offline
    python tests/gpu/check.py --smoke                                      # the same code on CPU, tiny sizes

Why one script: a GPU is lent rarely and briefly, so everything that can only be seen on one is measured in one
short run, and the identical code runs on CPU at tiny sizes in `make test` (tests/gpu/test_check_smoke.py), so
the GPU run does not die of a typo. The two runs differ only in `Sizes` (sizes, device, precision, loader
workers, CPU threads). Every model is built from a config with random weights and the data set is made here:
nothing is downloaded (HF_HUB_OFFLINE=1). The legs, in the order they run:

(0) imports, before anything is timed: the packages below, everything this script and the `t2i` modules the
    legs use (`t2i.tasks.train`, `t2i.tasks.text`, `t2i.models.vae`, `t2i.models.architectures`, `t2i.flows.config`,
    …) import, and what those import inside functions (read from their source: accelerate, SummaryWriter, PIL,
    diffusers, transformers, …) are imported and the names looked up, versions printed. A missing module stops
    the run within seconds, naming it and who imports it (exit 2).
(1) the data set as the stages write it: latents, captions of 120–200 T5 tokens, and their stored
    flan-t5-xl-width embeddings (2048 × the caption's tokens, bfloat16); an SD-VAE-config AutoencoderKL and a
    flan-t5-xl-config T5 encoder (random weights) saved with `save_pretrained`, T5 in float32 as on the Hub,
    with a word-level stand-in tokenizer (T5's sentencepiece model cannot be made offline; one token a word,
    `</s>` appended, `<pad>` = 0, as T5's).
(2) T5 loaded the way training loads it (`t2i.tasks.text.load_encoder` → `TextEncoder` →
    `T5EncoderModel.from_pretrained(path, dtype=bfloat16)`): the load time, the dtype its feed-forward output
    projections `wo` end up in, and encode tokens/s on the data set's captions. Whether a bfloat16 load keeps
    `wo` in float32 (T5's `_keep_in_fp32_modules`) has changed between transformers releases (5.19: no, that is
    for float16 loads only), so it is read off the loaded model. It stays in the model cache for the online leg.
(3) per denoiser, DiT-I L and CAD-I L at 256 px shapes (latents 4×32×32), `t2i.tasks.train.train_denoiser`
    (LAMB, EMA, accelerate, bf16, checkpoints), as `t2i train` runs it in-process:
    (a) throughput, usual (fast) kernels: samples/s of the full loop with stored text (text.mode=precomputed),
        steady-state log intervals of a fresh run; for DiT-I (the imagenet256 preset's model) the same with
        text.mode=online (the T5 of (2) encoding each batch's captions inside the step, as the preset trained),
        and the step-time ratio online ÷ precomputed;
    (b) resume: 10 steps, stop, resume to 20, and the raw and EMA weights compared with an uninterrupted 20-step
        run, under `torch.use_deterministic_algorithms(True, warn_only=True)`, deterministic cuDNN and the math
        SDPA backend (flash and memory-efficient SDPA backward are not deterministic). Everything that runs
        attention runs in this process (loader workers only slice tables), so the global SDPA switch covers it.
        warn_only because no GPU run has yet shown that every op of the loop has a deterministic CUDA kernel:
        one without warns rather than killing the leg, and the ops that warned are printed. (warn_only picks
        the same kernels as warn_only=False except in flash and memory-efficient SDPA, which math excludes.);
    (c) sampling with `t2i.models.architectures.sample_latents` from the final EMA weights, as `t2i evaluate` calls
        it, decoded with the VAE: the images must be finite;
    (d) the bare step: the real `Trainer.step` (forward/backward, LAMB, clipping, EMA) on the loader's batches
        taken beforehand and put on the device; MFU from FlopCounterMode's count of one forward+backward
        against the GPU's bf16 dense peak.
(4) AutoencoderKL encode images/s (256 px, bf16, through `t2i.models.vae`).

Figures, one line each (`name: value unit (note)`); <m> stands for dit-L and cad-L (dit-tiny and cad-tiny in
the smoke run), [dit] marks the DiT-I-only ones:
    imports; device; data; t5 load; t5 wo dtype; t5 encode;
    <m> full loop; [dit] <m> full loop online text; [dit] <m> online/precomputed step time;
    <m> resume; <m> resume max|Δw|; <m> resume nondeterministic ops; <m> train (resumed leg);
    <m> training preview; <m> sample; <m> bare step; <m> full/bare; <m> MFU;
    vae encode; wall time; summary.
Indented lines are details (package versions, loader notes), not figures. Exit 1 if a check failed, 2 if the
run could not start (no CUDA device, a module missing); targets missed are reported, not fatal.

Time budget on an H100/H200: 360 s in all, `wall time` prints the split per leg (the figures below are estimates,
not yet measured on a GPU): imports ~10 s; data set, VAE and T5 (4.8 GB in float32) saved ~30 s; T5 load and
encode ~20 s; per denoiser ~120 s (the runs start a fresh accelerate state, model and loader each, and each
resume run writes a ~7 GB checkpoint in the background); DiT's online-text leg ~30 s of it; VAE ~5 s.

Needs, beside a CUDA PyTorch image (torch, transformers + tokenizers, accelerate, safetensors, numpy, pyarrow,
pillow; pyyaml comes with transformers), these wheels, installed with `pip install --no-index --no-deps *.whl`:
  - diffusers (6.4 MB) — AutoencoderKL;
  - pydantic + pydantic-core (for the image's Python) + annotated-types + typing-inspection (2.8 MB), if absent —
    `t2i.flows.config`;
  - tensorboard + protobuf + absl-py (6.0 MB), if absent — the default `train.trackers` opens a SummaryWriter;
  - not prefect: `t2i.tasks.train` and `t2i.tasks.text` import `prefect.task` at module import, but outside a
    flow run `train_denoiser.fn` needs of it only that decorator and a run-logger lookup that falls back to plain
    logging, so this script puts a stand-in `prefect` module in place (`task` returns the function with `.fn`).
    Prefect 3.7 with what it pulls in beyond the image would be ~73 wheels, ~45 MB, and outside a run its
    artifact calls start an ephemeral Prefect server. `--with-prefect` uses the installed prefect instead.
"""

from __future__ import annotations

import argparse
import ast
import atexit
import contextlib
import gc
import importlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import types
import warnings
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

    modules = {
        name: types.ModuleType(name)
        for name in (
            "prefect",
            "prefect.exceptions",
            "prefect.logging",
            "prefect.artifacts",
            "prefect.cache_policies",
        )
    }
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
    tokens: tuple[int, int] = (120, 200)  # caption lengths in T5 tokens (`</s>` included), drawn uniformly
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
    online: tuple[str, ...] = ("dit",)  # denoisers that also get the text.mode=online throughput leg
    images: int = 4
    sample_steps: int = 20
    peak_tflops: float | None = None  # None: looked up from the GPU's name
    budget_s: float | None = 360.0  # the whole run; None: no budget (the smoke run)
    threads: int | None = None  # torch's CPU threads; None: its default

    @property
    def pixels(self) -> int:
        return self.latent * 2 ** (len(self.vae_blocks) - 1)

    @property
    def text_dim(self) -> int:  # stored and online text are both the T5's last hidden state
        return self.t5["d_model"]


GPU = Sizes()
SMOKE = Sizes(
    device="cpu",
    precision="no",
    size="tiny",
    latent=8,
    tokens=(6, 16),
    samples=32,
    shard=16,
    batch=8,
    steps=4,
    log_every=1,
    workers=0,
    warmup=1,
    iters=2,
    vae_blocks=(8, 16),
    vae_layers=1,
    vae_groups=4,
    vae_batch=4,
    t5=dict(d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64),
    t5_batch=4,
    images=2,
    sample_steps=3,
    peak_tflops=1.0,
    budget_s=None,
    threads=1,
)
# threads=1: tiny models gain nothing from a second thread, and on a 2-core runner busy with other jobs torch's
# two OpenMP threads waiting on each other made the smoke run 110-500 s instead of ~15 s (13-16 s either way idle).

# bf16 dense tensor-core peaks (TFLOP/s), matched in order against torch.cuda.get_device_name()
PEAKS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0)]


class Report:
    """Figure lines as they come (`name: value unit (target …)`), the tally the summary line gives, and the wall
    time of each leg."""

    def __init__(self) -> None:
        self.t0, self.failed, self.passed, self.missed, self.met = time.time(), [], [], [], []
        self.legs: dict[str, float] = {}
        self.printed: set[str] = set()

    def line(self, name: str, value, unit: str = "", note: str = "") -> None:
        self.printed.add(name)
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

    def guarded(self, figures: list[str], fn, *args) -> None:
        """Run a leg whose failure must not cost the legs after it (the new T5 and online-text legs): on an
        exception its traceback goes to stderr and each of its `figures` not printed yet is reported FAILED."""
        try:
            fn(*args)
        except Exception as err:
            traceback.print_exc()
            for name in figures:
                if name not in self.printed:
                    self.check(name, False, float("nan"), "", f"{type(err).__name__}: {str(err)[:200]}")
            free_memory()

    @contextlib.contextmanager
    def leg(self, name: str):
        t0 = time.time()
        try:
            yield
        finally:
            self.legs[name] = self.legs.get(name, 0.0) + time.time() - t0

    def wall_time(self, budget: float | None) -> None:
        total = time.time() - self.t0
        split = ", ".join(f"{name} {seconds:.0f}" for name, seconds in self.legs.items())
        if budget is None:
            self.line("wall time", total, "s", f"{split}; no budget off the GPU")
            return
        (self.met if total <= budget else self.missed).append("wall time")
        self.line("wall time", total, "s", f"{split}; target ≤ {budget:g} s")

    def summary(self) -> None:
        missed = f" (missed: {', '.join(self.missed)})" if self.missed else ""
        failed = f" (failed: {', '.join(self.failed)})" if self.failed else ""
        print(
            f"summary: {len(self.passed)} of {len(self.passed) + len(self.failed)} checks passed{failed}, "
            f"{len(self.met)} of {len(self.met) + len(self.missed)} targets met{missed}, "
            f"{time.time() - self.t0:.0f} s",
            flush=True,
        )


# --- (0) imports, before the clock starts -----------------------------------------------------------------------

# Checked by name, with their versions: the carried wheels and what the image must provide. Every import this
# script and the t2i modules below make inside functions is found in their source and checked as well.
PACKAGES = [  # (distribution, module, names)
    ("torch", "torch", ("nn", "autocast")),
    ("numpy", "numpy", ()),
    ("pyarrow", "pyarrow", ()),
    ("safetensors", "safetensors.torch", ("save_file", "load_file")),
    ("pillow", "PIL.Image", ("fromarray",)),
    ("PyYAML", "yaml", ("safe_load",)),
    ("transformers", "transformers", ("AutoTokenizer", "T5EncoderModel")),
    ("tokenizers", "tokenizers", ("Tokenizer",)),
    ("accelerate", "accelerate", ("Accelerator",)),
    ("diffusers", "diffusers", ("AutoencoderKL",)),  # carried
    ("pydantic", "pydantic", ("BaseModel", "Field")),  # carried if absent, with the three below
    ("pydantic-core", "pydantic_core", ()),
    ("tensorboard", "tensorboard", ()),  # carried if absent, with the two below
    ("protobuf", "google.protobuf", ()),
    ("absl-py", "absl", ()),
]
# The t2i modules the legs use; their imports inside functions are checked too (and so on, for t2i modules).
T2I_MODULES = (
    "t2i.flows.config",
    "t2i.data.schemas",
    "t2i.data.store",
    "t2i.data.train_data",
    "t2i.tasks.train",
    "t2i.tasks.train_batches",
    "t2i.tasks.train_job",
    "t2i.tasks.checkpoints",
    "t2i.tasks.text",
    "t2i.tasks.model_cache",
    "t2i.tasks.reporting",
    "t2i.models.text_encoder",
    "t2i.models.vae",
    "t2i.models.architectures",
    "t2i.models.objectives",
    "t2i.models.latent_norm",
    "t2i.models.lr_schedule",
    "t2i.models.loading",
    "t2i.models.dit",
    "t2i.models.cad",
    "t2i.models.ema",
    "t2i.models.lamb",
)
NOT_ON_THE_LEGS = {  # imports inside functions of those modules that no leg of this check reaches
    "t2i.models.captioners": "model_cache's captioners (vLLM)",
    "t2i.data.caption_sets": "model_cache's imported caption sets",
    "t2i.tasks.hub": "model_cache's imported caption sets",
    "torch.distributed.run": "train_job's torchrun launch (this check trains in-process)",
    "prefect.artifacts": "shards' Prefect UI artifacts (updated only once created, which takes a flow run)",
}
NOT_SCANNED = {"t2i.models.tiny": "builds `tiny:*` models inside functions; this check's are saved folders"}


def function_imports(path: Path) -> list[tuple[str, tuple[str, ...], int]]:
    """(module, names, line) of every `import m` / `from m import a, b` inside a function of a source file,
    except in the body of a `try` (an import there has a fallback)."""
    found: list[tuple[str, tuple[str, ...], int]] = []
    try_types = tuple(t for t in (ast.Try, getattr(ast, "TryStar", None)) if t is not None)

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, try_types):
                for part in (*child.handlers, *child.orelse, *child.finalbody):
                    visit_node(part, inside)
            else:
                visit_node(child, inside)

    def visit_node(node: ast.AST, inside: bool) -> None:
        inside = inside or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if inside and isinstance(node, ast.Import):
            found.extend((alias.name, (), node.lineno) for alias in node.names)
        elif inside and isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, tuple(alias.name for alias in node.names), node.lineno))
        visit(node, inside)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def import_check(report: Report) -> bool:
    """(0): import everything the legs will import, look up the names they use, and print what was found;
    False (after naming each missing module and who imports it) if anything is missing."""
    from importlib import metadata

    t0 = time.perf_counter()
    names: dict[str, set[str]] = {}  # module → names looked up in it
    failures: dict[str, tuple[str, set[str]]] = {}  # missing module (or module.name) → (error, imported by)
    lazy, skipped, scanned = 0, set(), set()

    def verify(module: str, wanted: tuple[str, ...], where: str) -> bool:
        try:
            mod = importlib.import_module(module)
        except Exception as err:  # ImportError, or whatever the module raises at import
            missing = getattr(err, "name", None) or module
            failures.setdefault(missing, (f"{type(err).__name__}: {err}", set()))[1].add(where)
            return False
        for name in wanted:
            try:
                if not hasattr(mod, name):  # a lazy module's attribute may raise its own import error
                    importlib.import_module(f"{module}.{name}")  # `from package import submodule`
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
                if isinstance(err, ModuleNotFoundError) and err.name == f"{module}.{name}":
                    error = f"ImportError: cannot import name {name!r} from {module!r}"
                failures.setdefault(f"{module}.{name}", (error, set()))[1].add(where)
                continue
            names.setdefault(module, set()).add(name)
        names.setdefault(module, set())
        return True

    def scan(path: Path, label: str) -> None:
        nonlocal lazy
        for module, wanted, line in function_imports(path):
            if module in NOT_ON_THE_LEGS:
                skipped.add(module)
                continue
            lazy += 1
            if verify(module, wanted, f"{label}:{line}") and module.startswith("t2i."):
                # a t2i module imported inside a function: its own imports inside functions too
                queue.extend(m for m in (module, *(f"{module}.{n}" for n in wanted)) if m in sys.modules)

    verify("t2i.models", (), "T2I_MODULES")  # first: its torchvision shim must precede transformers' imports
    for _dist, module, wanted in PACKAGES:
        verify(module, wanted, "PACKAGES")
    if PREFECT_STAND_IN:
        names.setdefault("prefect", set())
    else:
        verify("prefect", ("task",), "--with-prefect")
    queue: list[str] = list(T2I_MODULES)
    scan(Path(__file__).resolve(), "check.py")
    while queue:
        module = queue.pop(0)
        if module in scanned:
            continue
        scanned.add(module)
        if verify(module, (), "T2I_MODULES") and (origin := getattr(sys.modules[module], "__file__", None)):
            scan(Path(origin), module)
        if not queue:  # then every t2i module those imported on the way, but the ones no leg uses inside
            queue = sorted(
                m for m in sys.modules if m.startswith("t2i.") and m not in scanned | NOT_SCANNED.keys()
            )

    dists = {module.split(".")[0]: dist for dist, module, _ in PACKAGES}
    top_dists = metadata.packages_distributions()
    groups: dict[str, set[str]] = {}
    for module, found in names.items():
        top = module.split(".")[0]
        key = "(standard library)" if top in sys.stdlib_module_names else top
        groups.setdefault(key, set()).update(found or {module})
    for top, found in sorted(groups.items(), key=lambda item: item[0].lower()):
        if top == "t2i":
            modules = [m for m in names if m.startswith("t2i.")]
            print(
                f"  t2i (this checkout): {len(modules)} modules, {sum(len(names[m]) for m in modules)} names "
                "ok",
                flush=True,
            )
            continue
        if top == "prefect" and PREFECT_STAND_IN:
            print(f"  prefect (this check's stand-in): {', '.join(sorted(found))} ok", flush=True)
            continue
        if top == "(standard library)":
            print(f"  standard library: {', '.join(sorted(found))} ok", flush=True)
            continue
        dist = dists.get(top) or (top_dists.get(top) or [top])[0]
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = getattr(sys.modules.get(top), "__version__", "(version unknown)")
        print(f"  {dist} {version}: {', '.join(sorted(found))} ok", flush=True)
    if skipped:
        print(
            "  not imported, no leg reaches them: "
            + "; ".join(f"{m} ({NOT_ON_THE_LEGS[m]})" for m in sorted(skipped)),
            flush=True,
        )
    for missing, (error, where) in failures.items():
        label = (
            "MISSING" if error.startswith("ModuleNotFoundError") else "BROKEN"
        )  # absent, or fails to import
        print(f"  {label} {missing}: {error[:300]} (imported by {', '.join(sorted(where))})", flush=True)
    seconds = time.perf_counter() - t0
    report.check(
        "imports",
        not failures,
        len(names),
        "modules",
        f"including what {lazy} imports inside functions of this check and of t2i name; "
        f"{seconds:.1f} s, before any timed leg",
    )
    if failures:
        ours = [m for m in failures if m.startswith("t2i.")]
        theirs = [m for m in failures if m not in ours]
        print(
            f"gpu-check: stopped before any timed leg, {seconds:.0f} s in: cannot import "
            f"{', '.join(failures)}; the MISSING / BROKEN lines above say why and who imports it."
            + (
                f" {', '.join(theirs)}: install the carried wheels (`pip install --no-index --no-deps *.whl`, "
                "see the docstring of tests/gpu/check.py) or what the image lacks."
                if theirs
                else ""
            )
            + (f" {', '.join(ours)}: this checkout's code does not import." if ours else ""),
            file=sys.stderr,
            flush=True,
        )
    return not failures


# --- (1) the data set, as the stages write it, and the saved VAE and T5 ----------------------------------------

WORDS = 32000  # the stand-in tokenizer's words w0 … w31999, one T5 token each (flan-t5's vocabulary: 32,100)
T5_VOCAB = 32128  # flan-t5-xl's embedding rows


@dataclass(frozen=True)
class Data:
    latents: object
    captions: object
    text: object
    shards: int
    table: object  # the Artifact where the train table joining latents, captions and text is built
    texts: list[str]  # every caption, in key order
    lengths: list[int]  # its T5 tokens, `</s>` included


def make_dataset(ws: Path, s: Sizes) -> Data:
    """Latents (random moments), captions of `s.tokens` T5 tokens and their stored embeddings (`text.mode:
    precomputed`, one row per token as the latents stage stores them) written as the stages write them, so the
    precomputed legs need no VAE and no T5, and the online leg encodes the same captions."""
    import numpy as np
    import pyarrow as pa
    import torch

    from t2i.data.schemas import CAPTIONS, LATENTS, SHAPE_META_KEY, TEXT_EMBEDDINGS
    from t2i.data.store import Artifact

    rng, shape = np.random.default_rng(0), (4, s.latent, s.latent)
    lengths = [int(n) for n in rng.integers(s.tokens[0], s.tokens[1] + 1, s.samples)]
    texts = [" ".join(f"w{w}" for w in rng.integers(0, WORDS, n - 1)) for n in lengths]  # + `</s>`
    latents, captions, text = (Artifact(ws, stage, "gpu-check") for stage in ("latents", "recaption", "text"))
    shards = -(-s.samples // s.shard)
    for i in range(shards):
        rows = range(i * s.shard, min(s.samples, (i + 1) * s.shard))
        keys, n = [f"k{j}" for j in rows], [lengths[j] for j in rows]
        mean = rng.standard_normal((len(keys), *shape)).astype(np.float16)
        std = (0.1 + 0.05 * rng.random((len(keys), *shape))).astype(np.float16)
        latents.write_shard(
            i,
            pa.Table.from_pydict(
                {"key": keys, "mean": [m.tobytes() for m in mean], "std": [d.tobytes() for d in std]},
                schema=LATENTS,
            ).replace_schema_metadata({SHAPE_META_KEY: json.dumps(list(shape)).encode()}),
        )
        captions.write_shard(
            i,
            pa.Table.from_pylist(
                [
                    {
                        "key": k,
                        "caption": texts[j],
                        "model": "gpu-check",
                        "tokens": lengths[j],
                        "finish_reason": "stop",
                    }
                    for k, j in zip(keys, rows, strict=True)
                ],
                schema=CAPTIONS,
            ),
        )
        emb = torch.randn(sum(n), s.text_dim, generator=torch.Generator().manual_seed(i))
        words = emb.to(torch.bfloat16).view(torch.uint8).numpy()
        ends = np.cumsum(n)
        text.write_shard(
            i,
            pa.Table.from_pydict(
                {
                    "key": keys,
                    "embedding": [words[e - k : e].tobytes() for e, k in zip(ends, n, strict=True)],
                    "tokens": n,
                },
                schema=TEXT_EMBEDDINGS,
            ),
        )
    null = torch.randn(1, s.text_dim).to(torch.bfloat16).float().tolist()
    text.write_manifest(
        config={},
        inputs={},
        started=time.time(),
        extra={"dim": s.text_dim, "dtype": "bfloat16", "null_embedding": null},
    )
    table = Artifact(ws, "train-data", "gpu-check")
    return Data(latents, captions, text, shards, table, texts, lengths)


def save_vae(ws: Path, s: Sizes) -> str:
    """An AutoencoderKL of stabilityai/sd-vae-ft-ema's layout (random weights), saved so that training's
    previews, the encode figure and sampling all load it through `t2i.models.vae.load_vae`, like the stages."""
    from diffusers import AutoencoderKL

    n = len(s.vae_blocks)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=s.vae_blocks,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=s.vae_layers,
        norm_num_groups=s.vae_groups,
        sample_size=s.pixels,
    )
    vae.save_pretrained(ws / "vae")
    return str(ws / "vae")


def save_t5(ws: Path, s: Sizes) -> str:
    """A T5 encoder of google/flan-t5-xl's layout (random weights, built on the device) saved with
    `save_pretrained` in float32, as the Hub's checkpoint is stored, beside a stand-in tokenizer: T5's own
    (sentencepiece) cannot be made offline, so one token per word `w0` … `w31999`, `</s>` appended and `<pad>`
    id 0 as in T5's. `text.encoder` names this folder; the project's loader loads it."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    transformers.utils.logging.disable_progress_bar()  # "Writing model shards", "Loading weights"
    out = ws / "t5"
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": 3 + i for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", model_max_length=512
    ).save_pretrained(out)
    config = T5Config(vocab_size=T5_VOCAB, feed_forward_proj="gated-gelu", is_encoder_decoder=False, **s.t5)
    with torch.device(s.device):
        model = T5EncoderModel(config).float()
    model.save_pretrained(out)
    del model
    free_memory()
    return str(out)


# --- (2) T5 as training loads it ----------------------------------------------------------------------------------


def t5_figures(report: Report, s: Sizes, ws: Path, data: Data, text_cfg) -> None:
    """(2): the encoder of the online-text config loaded as training loads it (`load_encoder` → the model cache →
    `TextEncoder` → `from_pretrained(path, dtype=text.dtype)`): load time, the dtypes it got, and tokens/s of
    `TextEncoder.encode` on data-set captions (tokenizer included). It stays cached for the online leg."""
    import torch
    import transformers

    from t2i.tasks.text import load_encoder

    t0 = time.perf_counter()
    encoder = load_encoder(text_cfg, ws, s.device)
    synchronize(s.device)
    seconds, model = time.perf_counter() - t0, encoder.model
    params = sum(p.numel() for p in model.parameters()) / 1e6
    report.line(
        "t5 load",
        seconds,
        "s",
        f"t2i.tasks.text.load_encoder → TextEncoder → T5EncoderModel.from_pretrained(dtype={text_cfg.dtype}) "
        f"of the float32 save, flan-t5-xl layout ({params:.0f}M), onto {s.device}",
    )

    def dtype_names(tensors) -> str:
        return "+".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors})) or "none"

    wo = [m.wo.weight for m in model.modules() if isinstance(getattr(m, "wo", None), torch.nn.Linear)]
    others = [p for n, p in model.named_parameters() if ".wo." not in n]
    keep = getattr(model, "_keep_in_fp32_modules", None)
    strict = getattr(model, "_keep_in_fp32_modules_strict", None)
    why = (
        f"transformers {transformers.__version__}: _keep_in_fp32_modules {sorted(keep or [])}, "
        f"_keep_in_fp32_modules_strict {sorted(strict or [])}"
    )
    if dtype_names(wo) != text_cfg.dtype:
        why += f"; wo not in the requested {text_cfg.dtype}"
    report.line(
        "t5 wo dtype",
        dtype_names(wo),
        "",
        f"{len(wo)} feed-forward output projections; all other weights {dtype_names(others)}; {why}",
    )

    batch = data.texts[: s.t5_batch]
    tokens = sum(data.lengths[: s.t5_batch])
    seconds = timed(lambda _: encoder.encode(batch), s)
    report.line(
        "t5 encode",
        tokens * s.iters / seconds,
        "tokens/s",
        f"TextEncoder.encode of {len(batch)} data-set captions, {s.tokens[0]}–{s.tokens[1]} tokens padded "
        f"to the longest, real tokens counted, {text_cfg.dtype}, wo {dtype_names(wo)}",
    )


# --- (3) training runs ----------------------------------------------------------------------------------------------


def configs(ws: Path, s: Sizes, model: str, encoder: str | None = None):
    """The imagenet256 recipe (LAMB, lr, warmup, EMA 0.9999, grad clip, CFG dropout, bf16, T5 in bfloat16) at
    this check's sizes; text.mode precomputed, or online with the T5 saved at `encoder`. Checkpoints and
    previews only at the last step of a run."""
    from t2i.flows.config import load_config

    sets = {
        "model": model,
        "size": s.size,
        "batch_size": s.batch,
        "steps": s.steps,
        "log_every": s.log_every,
        "checkpoint_every": 10 * s.steps,
        "sample_every": 10 * s.steps,
        "sample_prompts": s.images,
        "loader_workers": s.workers,
        "mixed_precision": s.precision,
        "device": s.device,
    }
    overrides = [f"train.{k}={json.dumps(v)}" for k, v in sets.items()]  # JSON is YAML: "no" stays a string
    overrides += ["text.dtype=bfloat16"]
    if encoder is None:
        overrides += ["text.mode=precomputed"]
    else:
        overrides += ["text.mode=online", f"text.encoder={json.dumps(encoder)}"]
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
        job = TrainJob(
            train=train_cfg,
            text=text_cfg,
            checkpoints=artifact,
            latents=data.latents,
            captions=data.captions,
            num_shards=data.shards,
            latent_norm=train_cfg.scale_factor,
            vae_path=vae_path,
            text_embeddings=(data.text,),
            train_tables=(data.table,),
            stop_after=stop_after,
        )
        result = train_denoiser.fn(job)
    finally:
        logger.removeHandler(capture)
        free_memory()
    return result, capture, artifact.root


def full_loop_rate(ws: Path, s: Sizes, name: str, train_cfg, text_cfg, data: Data) -> float:
    """(3a): steady samples/s of a fresh run, stopped at `s.steps` of `s.steps + 1` (no final weights to save)."""
    longer = train_cfg.model_copy(update={"steps": s.steps + 1})
    _, log, root = run_training(ws, name, longer, text_cfg, data, stop_after=s.steps)
    shutil.rmtree(root, ignore_errors=True)
    return log.steady_rate()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# "<op> does not have a deterministic implementation, but you set …" (an op without a deterministic kernel);
# "<kernel> defaults to a non-deterministic algorithm. …" (flash / memory-efficient SDPA backward, warned once)
NONDETERMINISTIC = re.compile(
    r"^(.+?) (?:does not have a deterministic implementation|defaults to a non-deterministic)"
)


@contextlib.contextmanager
def deterministic_kernels(warned: dict[str, int]):
    """Bitwise resume equality needs kernels that do not reorder sums between runs: deterministic algorithms
    (cuBLAS with its workspace config, index ops), deterministic cuDNN, and the math SDPA backend (the flash and
    memory-efficient backward kernels accumulate in a varying order). All off again afterwards, so the timed runs
    use the usual kernels. The SDPA switch is process-global and no other process runs attention. Warnings
    naming a non-deterministic op are counted into `warned`; others are shown once each afterwards. Yields the
    SDPA backends enabled inside."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, bench = True, torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    others: dict[tuple, warnings.WarningMessage] = {}
    try:
        with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backends = [
                name
                for name, on in (
                    ("flash", torch.backends.cuda.flash_sdp_enabled()),
                    ("memory-efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                    ("cuDNN", torch.backends.cuda.cudnn_sdp_enabled()),
                    ("math", torch.backends.cuda.math_sdp_enabled()),
                )
                if on
            ]
            try:
                yield backends
            finally:
                for w in caught:
                    if m := NONDETERMINISTIC.match(str(w.message)):
                        warned[m.group(1)] = warned.get(m.group(1), 0) + 1
                    else:
                        others.setdefault((str(w.message), w.category, w.filename, w.lineno), w)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, bench
        for w in others.values():
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def state_difference(root_a: Path, root_b: Path, step: int) -> float:
    """Largest |Δ| over the raw and EMA weights of two runs' checkpoints of `step` (memory-mapped reads)."""
    import torch

    def weights(root: Path):
        state = torch.load(
            root / "checkpoints" / f"step-{step:08d}" / "state.pt",
            map_location="cpu",
            weights_only=True,
            mmap=True,
        )
        return {**{f"model.{k}": v for k, v in state["model"].items()}, **state["ema"]["shadow"]}

    a, b = weights(root_a), weights(root_b)
    if a.keys() != b.keys():
        return float("inf")
    return max(
        0.0 if torch.equal(a[k], b[k]) else float((a[k].double() - b[k].double()).abs().max()) for k in a
    )


def resume_check(report: Report, s: Sizes, ws: Path, data: Data, name: str, train_cfg, text_cfg, vae_path):
    """(3b): stop at half, resume, and compare with an uninterrupted run; returns the uninterrupted run's root
    (its final EMA weights are what `t2i evaluate` samples). That run also draws the training preview grid."""
    half, warned = s.steps // 2, {}
    with deterministic_kernels(warned) as backends:
        _, _, resumed = run_training(ws, f"{name}-resumed", train_cfg, text_cfg, data, stop_after=half)
        result, log, _ = run_training(ws, f"{name}-resumed", train_cfg, text_cfg, data)
        _, _, straight = run_training(ws, f"{name}-straight", train_cfg, text_cfg, data, vae_path=vae_path)
    kernels = f"deterministic algorithms (warn_only), cuDNN deterministic, SDPA {'+'.join(backends)} only"
    resumed_at = any(f"resuming from step-{half:08d}" in m for m in log.messages)
    report.check(
        f"{name} resume",
        resumed_at and result["step"] == s.steps,
        half if resumed_at else "no",
        "step",
        f"resumed at step {half} and finished at {result['step']} of {s.steps}",
    )
    delta = state_difference(resumed, straight, s.steps)
    report.check(
        f"{name} resume max|Δw|",
        delta == 0.0,
        delta,
        "",
        f"raw + EMA weights at step {s.steps} vs an uninterrupted run; {kernels}; target 0 = bitwise equal",
    )
    ops = ", ".join(f"{op} ×{n}" for op, n in sorted(warned.items()))
    report.line(
        f"{name} resume nondeterministic ops",
        len(warned),
        "ops",
        ops or "none warned under torch.use_deterministic_algorithms(True, warn_only=True) in the 3 runs",
    )
    report.line(f"{name} train (resumed leg)", log.steady_rate(), "samples/s", kernels)
    preview = sorted((straight / "samples").glob("*.png")) if (straight / "samples").is_dir() else []
    report.check(
        f"{name} training preview",
        bool(preview),
        len(preview),
        "grid",
        f"SamplePreview at step {s.steps} from the saved VAE",
    )
    shutil.rmtree(resumed, ignore_errors=True)
    return straight


def online_figures(
    report: Report, s: Sizes, ws: Path, data: Data, name: str, model: str, t5_path: str, precomputed: float
) -> None:
    """(3a), online: the full loop with text.mode=online, the T5 encoding each batch's kept captions inside the
    step (loaded by the leg through the model cache, which holds it since `t5 load`); then the cache is
    released."""
    from t2i.tasks import model_cache

    train_cfg, text_cfg = configs(ws, s, model, encoder=t5_path)
    info = getattr(getattr(model_cache, "_cached", None), "cache_info", None)  # functools.lru_cache's
    hits = info().hits if info else 0
    try:
        online = full_loop_rate(ws, s, f"{name}-online", train_cfg, text_cfg, data)
        cached = "model cache not inspectable" if info is None else "T5 loaded again by the leg"
        if info is not None and info().hits > hits:
            cached = "the T5 of `t5 load`, from the model cache"
    finally:
        model_cache.release_models()
        free_memory()
    report.line(
        f"{name} full loop online text",
        online,
        "samples/s",
        f"text.mode online: {text_cfg.dtype} T5 encodes each batch's captions ({s.tokens[0]}–{s.tokens[1]} "
        f"tokens) in the step; {cached}; otherwise as the full loop",
    )
    extra = s.batch / online - s.batch / precomputed
    report.line(
        f"{name} online/precomputed step time",
        precomputed / online,
        "x",
        f"full-loop step time, online text ÷ stored embeddings; T5 adds {extra:.3g} s a step",
    )


# --- (3d) the bare step and its FLOPs -----------------------------------------------------------------------------


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


def bare_step(s: Sizes, ws: Path, name: str, train_cfg, text_cfg, data: Data) -> tuple[float, float]:
    """(samples/s, FLOPs of one forward+backward) of the training step without the loop around it: the real
    `Trainer.step` of a fresh run (`open_run`: the model, LAMB, clipping, the schedule, EMA, CAD-I's
    self-conditioning coin) on the loader's batches of the first steps, taken beforehand and put on the
    device, so no step waits for the loader. The FLOPs are the model's, one forward and backward (the counted
    step takes no self-conditioning pass), counted by FlopCounterMode."""
    import itertools

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from t2i.data.store import Artifact
    from t2i.tasks.train import open_run
    from t2i.tasks.train_job import TrainJob

    cfg = train_cfg.model_copy(update={"loader_workers": 0})  # the batches are taken before the clock starts
    job = TrainJob(
        train=cfg,
        text=text_cfg,
        checkpoints=Artifact(ws, "train", f"{name}-bare"),
        latents=data.latents,
        captions=data.captions,
        num_shards=data.shards,
        latent_norm=cfg.scale_factor,
        text_embeddings=(data.text,),
        train_tables=(data.table,),
        stop_after=s.warmup + s.iters + 1,
    )
    run = open_run(job, logging.getLogger("t2i"))
    trainer, device = run.trainer, run.trainer.accelerator.device
    micro = [
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        for batch in run.batches
    ]
    one_pass = [{**b, "self_condition": False} if "self_condition" in b else b for b in micro]
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.step(0, iter(one_pass[: cfg.grad_accumulation]))
    batches = itertools.cycle(micro)
    seconds = timed(lambda i: trainer.step(1 + i, batches), s)
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


def denoiser_figures(
    report: Report, s: Sizes, ws: Path, data: Data, model: str, peak, vae_path: str, t5_path: str
) -> None:
    """(3) for one denoiser."""
    name = f"{model}-{s.size}"
    train_cfg, text_cfg = configs(ws, s, model)
    full = full_loop_rate(ws, s, f"{name}-timed", train_cfg, text_cfg, data)
    report.line(
        f"{name} full loop",
        full,
        "samples/s",
        f"text.mode precomputed, batch {s.batch}, steps {s.log_every + 1}-{s.steps} of a fresh run, "
        f"{s.workers} loader workers",
    )
    if model in s.online:
        with report.leg(f"{name} online-text leg (in {name})"):
            figures = [f"{name} full loop online text", f"{name} online/precomputed step time"]
            report.guarded(figures, online_figures, report, s, ws, data, name, model, t5_path, full)
    straight = resume_check(report, s, ws, data, name, train_cfg, text_cfg, vae_path)
    sample_check(report, s, name, straight, vae_path, data)
    free_memory()
    shutil.rmtree(straight, ignore_errors=True)
    bare, flops = bare_step(s, ws, name, train_cfg, text_cfg, data)
    free_memory()
    report.line(
        f"{name} bare step", bare, "samples/s", "Trainer.step on the loader's batches, already on the device"
    )
    report.target(f"{name} full/bare", full / bare, "x", 0.9)
    mfu = 100 * flops * bare / s.batch / (peak[0] * 1e12)
    note = (
        f"{flops / 1e12:.3g} TFLOP per fwd+bwd of {s.batch}, bare step, peak {peak[0]:g} TFLOP/s ({peak[1]}); "
        f"full loop {mfu * full / bare:.3g} %"
    )
    if model == "dit":
        report.target(f"{name} MFU", mfu, "%", 40, note)
    else:
        report.line(f"{name} MFU", mfu, "%", note + "; self-conditioning pass not counted")


# --- (3c) sampling, (4) the VAE ------------------------------------------------------------------------------------


def sample_check(report: Report, s: Sizes, name: str, root: Path, vae_path: str, data: Data) -> None:
    """(3c): the final EMA weights sampled as `t2i evaluate` does (`load_final`, `sample_latents` with its
    generator, `to_vae_latents`, the VAE in float32), on stored caption embeddings; every image must be finite.
    If evaluate's own generator cannot drive this device, that is reported and a device generator used."""
    import numpy as np
    import torch

    from t2i.data.train_data import TrainTable, collate_text_rows
    from t2i.models.architectures import sample_latents
    from t2i.models.latent_norm import to_vae_latents
    from t2i.models.loading import load_final
    from t2i.models.vae import decode_latents, load_vae
    from t2i.tasks.train_batches import step_generator

    model, meta = load_final(root, device=s.device)
    vae = load_vae(vae_path, device=s.device, dtype="float32")
    table = TrainTable(data.table.root)
    text, mask = collate_text_rows(table.embeddings_of(np.arange(s.images)))
    text, mask = text.float().to(s.device), mask.to(s.device)
    null = table.null_embedding().float()[None].to(s.device)
    null_mask = torch.ones(null.shape[:2], dtype=torch.bool, device=s.device)

    def sample(generator):
        return sample_latents(
            meta["objective"],
            "auto",
            model,
            (s.images, *meta["latent_shape"]),
            text,
            mask,
            null,
            null_mask,
            steps=s.sample_steps,
            guidance_scale=4.0,
            generator=generator,
        )

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
    report.check(
        f"{name} sample",
        finite == s.images and evaluate_generator and images.shape[0] == s.images,
        finite,
        f"of {s.images} images finite",
        note,
    )


def vae_figure(report: Report, s: Sizes, vae_path: str) -> None:
    """(4): images/s of the latents stage's encode (`encode_moments`: posterior mean and std to the host)."""
    import numpy as np

    from t2i.models.vae import encode_moments, load_vae

    dtype = "bfloat16" if s.precision == "bf16" else "float32"
    vae = load_vae(vae_path, device=s.device, dtype=dtype)
    images = np.random.default_rng(0).uniform(-1, 1, (s.vae_batch, 3, s.pixels, s.pixels)).astype(np.float32)
    seconds = timed(lambda _: encode_moments(vae, images), s)
    report.line(
        "vae encode",
        s.vae_batch * s.iters / seconds,
        "images/s",
        f"sd-vae-ft-ema layout, random weights, {s.pixels} px, {dtype}, batch {s.vae_batch}",
    )


# --- main ----------------------------------------------------------------------------------------------------------


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
    """Loader workers hand batches over through /dev/shm (at GPU sizes ~200 MB of float32 text each, 4 in
    flight per worker); a container's default 64 MB would kill them, so then load in-process, and say so."""
    need = s.workers * 4 * s.batch * s.tokens[1] * s.text_dim * 4 * 2
    free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
    if s.workers and free < need:
        print(
            f"  loader: /dev/shm has {free / 2**30:.1f} GiB free, {s.workers} workers need ~{need / 2**30:.1f}: "
            "training loads in-process (0 workers)",
            flush=True,
        )
        return 0
    return s.workers


def describe(s: Sizes, peak) -> str:
    import torch

    where = (
        torch.cuda.get_device_name()
        if s.device.startswith("cuda")
        else f"cpu, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}"
    )
    return (
        f"{where}; torch {torch.__version__}; {s.precision} mixed precision; peak {peak[0]:g} TFLOP/s "
        f"({peak[1]}); prefect {'stand-in' if PREFECT_STAND_IN else 'installed'}; {s.workers} loader workers"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report()
    with report.leg("imports"):
        if not import_check(report):
            return 2
    import torch

    s = SMOKE if args.smoke else GPU
    if s.threads:
        torch.set_num_threads(s.threads)
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; `--smoke` runs the same code on CPU", file=sys.stderr)
        return 2
    s = replace(s, workers=loader_workers(s) if args.workers is None else args.workers)
    if s.workers:  # workers fork from a server that has torch and the batch code loaded: seconds, not tens
        import multiprocessing

        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["__main__", "t2i.tasks.train_batches"]
        )
    peak = peak_tflops(s, args.peak_tflops)
    report.line("device", s.device, "", describe(s, peak))
    with tempfile.TemporaryDirectory(prefix="t2i-gpu-check-", dir=args.tmp) as tmp:
        ws = Path(tmp)
        with report.leg("data"):
            t0 = time.perf_counter()
            data, vae_path, t5_path = make_dataset(ws, s), save_vae(ws, s), save_t5(ws, s)
            seconds = time.perf_counter() - t0
            report.line(
                "data",
                s.samples,
                "samples",
                f"latents 4×{s.latent}×{s.latent}, captions of {s.tokens[0]}–{s.tokens[1]} T5 tokens, "
                f"stored text {s.text_dim} wide in bfloat16; VAE and T5 saved; {seconds:.1f} s",
            )
        with report.leg("t5"):
            text_cfg = configs(ws, s, "dit", t5_path)[1]
            report.guarded(["t5 load", "t5 wo dtype", "t5 encode"], t5_figures, report, s, ws, data, text_cfg)
        for model in ("dit", "cad"):
            with report.leg(f"{model}-{s.size}"):
                denoiser_figures(report, s, ws, data, model, peak, vae_path, t5_path)
        from t2i.tasks.model_cache import release_models

        release_models()  # the T5 is still cached if no denoiser had an online leg
        with report.leg("vae"):
            vae_figure(report, s, vae_path)
    report.wall_time(s.budget_s)
    report.summary()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
