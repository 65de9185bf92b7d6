"""`t2i`: run the pipeline or one stage from the command line, show status, serve flows to Prefect.

t2i run --preset tiny [--workspace DIR] [--set section.field=value ...]
t2i download|recaption|latents|train|evaluate --preset P [...]
t2i download --relist ...       (list a folder/dataset source again after its content changed)
t2i status --preset P [--workspace DIR]
t2i server [--host H] [--port P]   (a Prefect server and its UI; `make server`)
t2i serve --preset P            (needs a Prefect server: `make server`)
t2i deploy --preset P --pool NAME [--limit K]   (every flow as a deployment on a work pool)
t2i worker --pool NAME [--gpus 0,1,...] [--gpus-per-part G] [--limit K]   (this machine's workers)
t2i ablate --preset tiny [--seeds 0 1 2]   (class vs vlm vs vlm+cutmix captions, shapes scorer)
t2i generate --preset P --prompt TEXT [--prompt ...] [--n 4] [--seed 0]   (PNGs from the trained model)
t2i export-model --preset P --out DIR [--push-to-hub REPO [--private]]   (a diffusers folder + model card)
t2i export-model --preset P --format paper --out DIR                     (CAD-I in the paper's format)
t2i import-model SOURCE --preset P                  (the paper's released CAD-I as a finished train run)
t2i train-shapes-models captioner vae [--out DIR]   (retrain the tiny preset's trained models)

Each sub-command's parser names the function that runs it (`set_defaults(func=...)`); the commands that take
a preset get its config through `configured`, which turns a bad config or a missing input into a message and
an exit code (2: the command line or config is wrong, 1: the work could not be done).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from t2i.flows.config import ConfigError, PipelineConfig, available_presets, load_config

STAGE_COMMANDS = ("download", "cutmix", "recaption", "latents", "train", "evaluate")

Command = Callable[[PipelineConfig, argparse.Namespace], int]


def _quiet_defaults() -> None:
    """Readable output by default; every setting can still be overridden from the environment."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# --- the commands that take a preset ----------------------------------------------------------------------


def _load_config(args: argparse.Namespace) -> PipelineConfig:
    """The preset with `--set` overrides, and the flags that are config fields (`--part`, `--gpus`, ...)."""
    overrides = list(args.overrides)
    for flag in ("part", "gpus", "workers"):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{args.command}.{flag}={getattr(args, flag)}")
    if args.command == "deploy":  # the runs its deployments start fan out over them (cluster.parts)
        overrides.append(f"cluster.deployment={args.name or args.preset}")
    return load_config(args.preset, overrides, args.workspace)


def configured(command: Command) -> Callable[[argparse.Namespace], int]:
    """`command` run on the config the arguments describe; its errors become a message and an exit code."""

    def run(args: argparse.Namespace) -> int:
        from t2i.flows.plan import MissingInput

        try:
            return command(_load_config(args), args)
        except ConfigError as err:
            print(f"t2i: {err}", file=sys.stderr)
            return 2
        except (MissingInput, FileNotFoundError, RuntimeError, ValueError) as err:
            print(f"t2i: {err}", file=sys.stderr)
            return 1

    return run


def _print_outputs(cfg: PipelineConfig) -> None:
    from t2i.flows.status import format_statuses, stage_statuses

    print("\nOutputs:\n" + format_statuses(stage_statuses(cfg)))


def _run_stages(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """`t2i run` (every stage) or `t2i <stage>` (one stage, its inputs already there)."""
    from t2i.flows.pipeline import STAGE_FLOWS, pipeline_flow
    from t2i.flows.plan import Plan

    started = time.time()
    if args.command in ("run", "recaption", "latents"):
        from t2i.flows.parts import check_fan_out

        check_fan_out(cfg)  # before a temporary server starts or any stage runs
    if args.command == "run":
        pipeline_flow(cfg)
    else:
        Plan(cfg).require_inputs(args.command)
        STAGE_FLOWS[args.command](cfg, **({"relist": True} if getattr(args, "relist", False) else {}))
    _print_outputs(cfg)
    print(f"\nt2i {args.command}: done in {time.time() - started:.1f}s")
    return 0


def _export_captions(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from t2i.data.caption_sets import export_captions
    from t2i.flows.plan import Plan
    from t2i.tasks.hub import hub_token

    out, repo = args.out, args.push_to_hub
    if not out and not repo:
        print("t2i: export-captions needs --out and/or --push-to-hub", file=sys.stderr)
        return 2
    plan = Plan(cfg)
    images, captions = plan.require("download"), plan.require("recaption")
    export_captions(
        captions, images, plan.num_shards, out, push_to_hub=repo, token=hub_token() if repo else None
    )
    where = f"{out or ''}{' and ' if out and repo else ''}{repo or ''}"
    print(f"exported {captions.read_manifest()['rows']} captions to {where}")
    return 0


def _status(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from t2i.flows.status import format_statuses, stage_statuses, text_disk_line

    print(format_statuses(stage_statuses(cfg)))
    print(text_disk_line(cfg))
    return 0


def _config(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    import json

    import yaml

    from t2i.flows.status import text_disk_line

    data = cfg.model_dump(mode="json")
    print(json.dumps(data) if args.json else yaml.safe_dump(data, sort_keys=False), end="\n")
    # the disk precomputed text takes, known before any work: a YAML comment, or beside the JSON
    print(f"# {text_disk_line(cfg)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _serve(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from t2i.flows.service import serve_flows

    serve_flows(cfg, name=args.name, limit=args.limit)
    return 0


def _deploy(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from t2i.flows.service import deploy_flows

    names = deploy_flows(cfg, args.pool, args.name or cfg.preset, args.limit, args.crash_after)
    print(f"deployed to work pool {args.pool!r}: {', '.join(names)}")
    print(f"start workers with: t2i worker --pool {args.pool}")
    return 0


def _generate(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from t2i.flows.generate import generate_images
    from t2i.tasks.generate import generate_request, read_prompts_file

    prompts = list(args.prompts) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    options = {k: getattr(args, k) for k in ("n", "seed", "guidance", "steps", "checkpoint")}
    request = generate_request(prompts=prompts, **options)
    started = time.time()
    paths = generate_images(cfg, request, Path(args.out) if args.out else None)
    print("\n".join(str(p) for p in paths))
    if len(paths) > 1:
        print(paths[0].parent / "grid.png")
    print(f"t2i generate: {len(paths)} images in {time.time() - started:.1f}s")
    return 0


def _export_model(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from t2i.flows.plan import Plan
    from t2i.tasks.export_model import export_model

    out = Path(args.out) if args.out else None
    if args.format == "paper":
        from t2i.tasks.generate import TrainedRun
        from t2i.tasks.import_model import export_paper_model

        if out is None or args.push_to_hub:
            raise ConfigError(
                "export-model --format paper writes a folder: give --out (and no --push-to-hub)"
            )
        export_paper_model(TrainedRun(cfg, Plan(cfg).sampled, args.checkpoint, device="cpu"), out)
    else:
        export_model(cfg, Plan(cfg).sampled, out, args.checkpoint, args.push_to_hub, args.private)
    for where in filter(None, (out, args.push_to_hub)):
        print(f"exported the {cfg.preset} model to {where} ({args.format} format)")
    return 0


def _import_model(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from t2i.models.cad_official import PAPER_SAMPLING
    from t2i.tasks.import_model import import_paper_model

    run, imported = import_paper_model(cfg, args.source, args.revision, args.text_encoder, args.vae)
    print(f"{'imported' if imported else 'already imported'} {args.source} as the train run {run.root}")
    print(f"sample it:    --set evaluate.run={run.root}")
    print(f"fine-tune it: --set train.init_from={run.root} --set train.model=cad")
    print("the paper's sampler: " + " ".join(f"--set evaluate.{k}={v}" for k, v in PAPER_SAMPLING.items()))
    return 0


def _ablate(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from t2i.flows.ablation import ablation_flow

    started = time.time()
    result = ablation_flow(cfg, seeds=args.seeds)
    print(f"\n{result['report']}\nreport: {result['path']}/report.md")
    print(f"t2i ablate: done in {time.time() - started:.1f}s")
    print(result["summary"])  # last line: class: A, vlm: B, vlm+cutmix: C
    return 0


# --- the commands without a preset ------------------------------------------------------------------------


def _server(args: argparse.Namespace) -> int:
    from t2i.flows.service import run_server

    run_server(args.host, args.port)  # replaces this process
    return 0


def _worker(args: argparse.Namespace) -> int:
    from t2i.flows.service import run_workers

    try:
        return run_workers(args.pool, args.gpus, args.gpus_per_part, args.limit, args.name)
    except (RuntimeError, ValueError) as err:
        print(f"t2i: {err}", file=sys.stderr)
        return 2


def _train_shapes_models(args: argparse.Namespace) -> int:
    from t2i.models.shapes_models import WEIGHTS_DIR, retrain

    for name in args.which:
        retrain(name, Path(args.out) if args.out else WEIGHTS_DIR, steps=args.steps)
    return 0


# --- the parser -------------------------------------------------------------------------------------------


def _preset_command(sub, name: str, command: Command, summary: str) -> argparse.ArgumentParser:
    """A sub-command that runs `command` on a preset's config (`--preset`, `--workspace`, `--set`)."""
    p = sub.add_parser(name, help=summary)
    p.add_argument("--preset", default="tiny", help=f"config preset ({', '.join(available_presets())})")
    p.add_argument("--workspace", default=None, help="artifact root (default: $T2I_WORKSPACE or ./workspace)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field, e.g. --set latents.resolution=128 (repeatable)",
    )
    p.set_defaults(func=configured(command))
    return p


def _add_pipeline_commands(sub) -> None:
    _preset_command(sub, "run", _run_stages, "run every stage (finished ones are skipped)")
    for stage in STAGE_COMMANDS:
        p = _preset_command(sub, stage, _run_stages, f"run the {stage} stage")
        if stage == "download":
            p.add_argument(
                "--relist",
                action="store_true",
                help="list the source again (its content changed): new listing → new fingerprints",
            )
        if stage in ("recaption", "latents"):
            p.add_argument("--part", default=None, metavar="K/N", help="run only the k-th of n shard sets")
            p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
            p.add_argument(
                "--workers", type=int, default=None, help="worker processes (default: one per GPU)"
            )
    p = _preset_command(
        sub,
        "export-captions",
        _export_captions,
        "export captions as a datasets dataset (file, folder or Hub)",
    )
    p.add_argument("--out", default=None, help=".parquet/.csv/.tsv/.jsonl file, or a folder (save_to_disk)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="push to a private Hub dataset repo")
    _preset_command(sub, "status", _status, "show each stage's state and path")
    p = _preset_command(sub, "config", _config, "print the resolved config (YAML, or JSON for --params)")
    p.add_argument(
        "--json", action="store_true", help="print JSON (e.g. for prefect deployment run --params)"
    )


def _add_service_commands(sub) -> None:
    p = _preset_command(
        sub, "serve", _serve, "publish the flows as deployments to a Prefect server and serve them"
    )
    p.add_argument("--name", default=None, help="deployment name (default: the preset name)")
    p.add_argument(
        "--limit", type=int, default=1, help="runs at once (default 1: two GPU runs never share a GPU)"
    )
    p = sub.add_parser("server", help="start a Prefect server whose UI talks to its own port")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine)")
    p.add_argument("--port", type=int, default=4200)
    p.set_defaults(func=_server)
    p = _preset_command(
        sub, "deploy", _deploy, "register every flow on a Prefect work pool (created if missing)"
    )
    p.add_argument("--pool", required=True, help="work pool name")
    p.add_argument("--name", default=None, help="deployment name (default: the preset name)")
    p.add_argument(
        "--limit", type=int, default=None, help="whole runs at once in the pool (default: no limit)"
    )
    p.add_argument(
        "--crash-after",
        type=int,
        default=150,
        help="seconds without a heartbeat after which a run is marked Crashed (workers beat every 30 s)",
    )
    p = sub.add_parser("worker", help="start this machine's Prefect workers for a pool (one per GPU group)")
    p.add_argument("--pool", required=True, help="work pool name (made by t2i deploy)")
    p.add_argument("--gpus", default=None, metavar="0,1,...", help="GPUs to use (default: all visible)")
    p.add_argument("--gpus-per-part", type=int, default=1, help="GPUs each part runs on (default 1)")
    p.add_argument("--name", default=None, help="prefix of the workers' names (default: the host name)")
    p.add_argument("--limit", type=int, default=1, help="whole runs this machine takes at once (default 1)")
    p.set_defaults(func=_worker)


def _add_model_commands(sub) -> None:
    p = _preset_command(
        sub, "generate", _generate, "images from prompts with the trained model (EMA weights)"
    )
    p.add_argument("--prompt", dest="prompts", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="a text file, one prompt per line")
    p.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="prompt i is drawn with seed + i (default 0)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: evaluate's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: evaluate's)")
    p.add_argument("--checkpoint", default="final", help="final (default) or a kept step-NNNNNNNN")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: <workspace>/generate/<digest>)")
    p = _preset_command(
        sub, "export-model", _export_model, "the trained model as a diffusers folder with a model card"
    )
    p.add_argument("--out", default=None, help="folder to write (an earlier export there is replaced)")
    p.add_argument("--checkpoint", default="final", help="final (default) or a kept step-NNNNNNNN")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="also push to this Hub model repo")
    p.add_argument("--private", action="store_true", help="make the Hub repo private")
    p.add_argument(
        "--format",
        choices=("diffusers", "paper"),
        default="diffusers",
        help="diffusers (default: a pipeline folder with a model card) or paper (CAD-I in the paper's "
        "PyTorchModelHubMixin format: config.json + model.safetensors)",
    )
    p = _preset_command(
        sub,
        "import-model",
        _import_model,
        "the paper's released CAD-I (folder or Hub id) as a finished train run of this workspace",
    )
    p.add_argument(
        "source", help="a folder with config.json + weights, or a Hub id (e.g. Lucasdegeorge/CAD-I)"
    )
    p.add_argument("--revision", default=None, help="Hub revision (default: main)")
    p.add_argument(
        "--text-encoder",
        default="google/flan-t5-xl",
        help="the T5 the model reads (Hub id, folder or tiny:t5; default google/flan-t5-xl, the paper's)",
    )
    p.add_argument(
        "--vae",
        default="benjamin-paine/stable-diffusion-v1-5/vae",
        help="the VAE that decodes its latents (default: SD-1.5's, the paper's decoder; owner/name/subfolder)",
    )
    p = _preset_command(
        sub,
        "ablate",
        _ablate,
        "train and evaluate class / vlm / vlm+cutmix captions over several seeds (shapes world)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training/evaluation seeds")
    p = sub.add_parser(
        "train-shapes-models",
        help="retrain the tiny preset's shapes captioner / VAE (2 CPU cores: ~20 / ~13 min)",
    )
    p.add_argument("which", nargs="+", choices=("captioner", "vae"))
    p.add_argument("--out", default=None, help="folder for shapes-<which>/ (default: models/weights)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="override the recipe's steps (the VAE's two phases keep their ratio)",
    )
    p.set_defaults(func=_train_shapes_models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i", description="ImageNet-only text-to-image pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pipeline_commands(sub)
    _add_service_commands(sub)
    _add_model_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_defaults()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
