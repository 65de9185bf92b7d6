"""CAD-I L against the paper's official network: our `build_cad("L")` (`models/cad.py`) beside the official
`RINTextCond` (`t2i_imagenet/training/cad/models/networks/rin.py` of the peer release) configured as the
paper's ImageNet-256 L text-to-image model (`configs/overrides/imagenet_256_rin_L_text_ldm.yaml`, composed
from the peer's own config files at run time by `tests/peer.py`: latent 4×32×32, patch 2, data width 256,
256 latents of width 1024, 4 blocks × 4 processing layers, flan-t5-xl width 2048, 16 text registers).

Ours computes the same function: the official network is built randomly initialised by its own constructor
(float32, CPU), and ours gets its weights through `t2i.models.cad_official` (renaming only); the first
lines report both parameter counts and the largest relative difference of the two outputs on the batch
below (float32; 0 on the CPU, where both run the same operations in the same order). One batch
(`--batch` latents, `--text-len` T5 tokens with a realistic padding mask: per-sample lengths drawn between 8
and the full length, padded positions zero as the peer's collate leaves them) is run forward + backward
(loss = mean squared output) in two conditions: without self-conditioning latents (ours: `latents_prev=None`;
official: zeros, as its `DDPMPrecond` passes) and with them (the same random latents to both). Timing: one
untimed warm-up step per model (also counting matmul/attention FLOPs with `torch.utils.flop_counter`, a
figure no load disturbs), then `--reps` repetitions of each condition, the two models alternating (A B, then
B A, ...); medians are taken. Every step is timed by the wall clock and by this process's CPU time (all
threads): the table shows both; the last line's R uses the wall time unless `--clock cpu`. On a shared
machine the CPU time is often the steadier (at load 8–10 on 2 CPUs one model's step took 25–52 s of wall
time while its CPU time stayed within ±7%), though at load ~5 both still varied ±15%; on an idle machine
the two should agree (both models are matmul-bound, both threads busy). `--profile` adds a torch.profiler table of
each model's heaviest ops over one more step.

    python tests/benchmarks/bench_cad_vs_rin.py [--batch 2] [--reps 2] [--text-len 128] [--clock wall|cpu]
        [--profile]

Last line: `CAD-I L ÷ official RIN L forward+backward: R (params X.XM vs Y.YM, Δ Z%)` — R: median time of
ours over median time of the official network, both conditions pooled; Δ: our parameter count relative
to theirs (targets: R ≤ 1.0, Δ = 0). At the defaults: 2 + 8 model steps of ~1 TFLOP each (batch 2),
about 2–3 minutes on 2 idle cores; on a busy machine much longer (raise `--reps` there: each one adds 4
steps). Prints one line saying why and exits 0 when the official code is absent
(`../shared/peer/T2I-ImageNet`, or `$T2I_PEER_ROOT`) or cannot be imported. Run it alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's `tests`, not site-packages'

from t2i.models.cad import CAD, count_parameters  # noqa: E402
from t2i.models.cad_official import official_to_config, state_from_official  # noqa: E402
from tests.peer import (  # noqa: E402
    OFFICIAL_OVERRIDES,
    PeerUnavailable,
    build_official_network,
    official_batch,
    official_network_config,
)

CONDITIONS = ("no self-cond", "self-cond")
CLOCKS = ("wall", "cpu")


def trainable(model: torch.nn.Module) -> int:
    """Parameters that train (the official network also holds a few frozen boolean mask parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_inputs(batch: int, text_len: int, text_dim: int, channels: int, size: int, latents: tuple[int, int]):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, text_len + 1, (batch,), generator=g)
    mask = torch.arange(text_len)[None, :] < lengths[:, None]
    text = torch.randn(batch, text_len, text_dim, generator=g) * mask[..., None]
    return {
        "x": torch.randn(batch, channels, size, size, generator=g),
        "t": torch.rand(batch, generator=g),
        "text": text,
        "mask": mask,
        "latents_prev": torch.randn(batch, *latents, generator=g),
        "lengths": lengths.tolist(),
    }


def step_fns(ours: torch.nn.Module, theirs: torch.nn.Module, inp: dict) -> dict[str, dict]:
    """{model: {condition: () -> output}}: one forward each, in our call convention and in theirs."""
    x, t, text, mask, prev = inp["x"], inp["t"], inp["text"], inp["mask"], inp["latents_prev"]
    return {
        "ours": {
            "no self-cond": lambda: ours(x, t, text, mask),
            "self-cond": lambda: ours(x, t, text, mask, latents_prev=prev),
        },
        "official": {
            "no self-cond": lambda: theirs(official_batch(theirs, x, t, text, mask))[0],
            "self-cond": lambda: theirs(official_batch(theirs, x, t, text, mask, latents_prev=prev))[0],
        },
    }


def forward_backward(model: torch.nn.Module, forward) -> dict[str, float]:
    """Seconds of one forward + backward (gradients cleared first, outside the timing): wall time, and CPU
    time of this process (all its threads)."""
    model.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    forward().float().square().mean().backward()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def profile_table(model: torch.nn.Module, forward, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward().float().square().mean().backward()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions per model and condition")
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--profile", action="store_true", help="also print each model's heaviest ops")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="which time the last line's ratio uses (cpu: this process's CPU time, often steadier when busy)",
    )
    args = parser.parse_args()

    try:
        config = official_network_config("L")
        torch.manual_seed(0)
        theirs = build_official_network("L")
    except PeerUnavailable as exc:
        print(f"skipped: official network unavailable: {exc}")
        return
    ours_config = official_to_config(config)
    ours = CAD(ours_config)
    ours.load_state_dict(state_from_official(theirs.state_dict(), ours_config))
    ours.train(), theirs.train()
    cfg = ours.config
    print(
        f"official: {config['_target_']} from configs/overrides/{OFFICIAL_OVERRIDES['L']}.yaml — "
        + ", ".join(
            f"{k}={config[k]}"
            for k in (
                "data_size",
                "num_input_channels",
                "path_size",
                "data_dim",
                "num_latents",
                "latents_dim",
                "num_blocks",
                "num_processing_layers",
                "read_write_heads",
                "compute_heads",
                "data_mlp_multiplier",
                "label_dim",
                "num_text_registers",
            )
        )
    )
    print(
        f"ours:     CAD-I L — latent_size={cfg.latent_size}, latent_channels={cfg.latent_channels}, "
        f"patch_size={cfg.patch_size}, data_width={cfg.data_width}, num_latents={cfg.num_latents}, "
        f"width={cfg.width}, blocks={cfg.blocks}, layers_per_block={cfg.layers_per_block}, heads={cfg.heads}, "
        f"read_write_heads={cfg.read_write_heads}, text_dim={cfg.text_dim}, num_registers={cfg.num_registers}"
    )
    if (cfg.latent_channels, cfg.latent_size, cfg.text_dim) != (
        config["num_input_channels"],
        config["data_size"],
        config["label_dim"],
    ):
        print("warning: input shapes differ between the two configurations; timing ours on the official ones")

    n_ours, n_theirs = count_parameters(ours), trainable(theirs)
    delta = 100.0 * (n_ours - n_theirs) / n_theirs
    print(f"parameters: ours {n_ours / 1e6:.2f}M, official {n_theirs / 1e6:.2f}M, Δ {delta:+.2f}%")

    inp = make_inputs(
        args.batch,
        args.text_len,
        config["label_dim"],
        config["num_input_channels"],
        config["data_size"],
        (config["num_latents"], config["latents_dim"]),
    )
    fns = step_fns(ours, theirs, inp)
    with torch.no_grad():
        for condition in CONDITIONS:
            a, b = fns["ours"][condition](), fns["official"][condition]()
            difference = ((a - b).abs().max() / b.abs().max()).item()
            print(f"same function, {condition}: max relative difference {difference:.2e} (float32)")
    models = {"ours": ours, "official": theirs}
    print(
        f"batch {args.batch}, text {args.text_len} tokens (real lengths {inp['lengths']}), "
        f"{torch.get_num_threads()} threads, float32 CPU; warm-up, then {args.reps} × {len(CONDITIONS)} "
        f"conditions × 2 models, interleaved"
    )

    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for name in models:  # warm-up (allocator, first-call costs), counting FLOPs on the way
        with FlopCounterMode(display=False) as counter:
            forward_backward(models[name], fns[name]["self-cond"])
        flops[name] = counter.get_total_flops()
    print(
        "GFLOP per forward+backward (matmul/attention): "
        + ", ".join(f"{name} {flops[name] / 1e9:.1f}" for name in models)
        + f" (ours ÷ official {flops['ours'] / flops['official']:.4f})"
    )

    times = {clock: {n: {c: [] for c in CONDITIONS} for n in models} for clock in CLOCKS}
    pair_ratios: dict[str, list[float]] = {clock: [] for clock in CLOCKS}
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    for rep in range(args.reps):
        for ci, condition in enumerate(CONDITIONS):
            order = ("ours", "official") if (rep + ci) % 2 == 0 else ("official", "ours")
            pair = {name: forward_backward(models[name], fns[name][condition]) for name in order}
            for clock in CLOCKS:
                for name in models:
                    times[clock][name][condition].append(pair[name][clock])
                pair_ratios[clock].append(pair["ours"][clock] / pair["official"][clock])
    elapsed, load_after = time.perf_counter() - started, os.getloadavg()[0]

    print(
        f"\nms per forward+backward, median of {args.reps} (both conditions: of {2 * args.reps}); timed part "
        f"{elapsed:.0f} s, load average {load_before:.1f} → {load_after:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"  {'':14s} {'wall: ours':>10s} {'official':>9s} {'ratio':>6s}   {'CPU: ours':>10s} {'official':>9s} {'ratio':>6s}"
    )
    ratios = {}
    for condition in (*CONDITIONS, "both"):
        cells = []
        for clock in CLOCKS:
            a, b = (
                statistics.median(
                    [s for c in CONDITIONS for s in times[clock][n][c]]
                    if condition == "both"
                    else times[clock][n][condition]
                )
                * 1e3
                for n in models
            )
            ratios[clock] = a / b
            cells.append(f"{a:10.0f} {b:9.0f} {a / b:6.3f}")
        print(f"  {condition:14s} " + "   ".join(cells))
    for clock in CLOCKS:
        r = pair_ratios[clock]
        print(
            f"  {clock} ratio of each interleaved pair: median {statistics.median(r):.3f}, "
            f"range {min(r):.3f}–{max(r):.3f}"
        )
    ratio = ratios[args.clock]

    if args.profile:
        for name in models:
            print(f"\n{name}: heaviest ops over one forward+backward (self CPU time)")
            print(profile_table(models[name], fns[name]["self-cond"], rows=15))

    print(
        f"CAD-I L ÷ official RIN L forward+backward: {ratio:.2f} "
        f"(params {n_ours / 1e6:.1f}M vs {n_theirs / 1e6:.1f}M, Δ {delta:+.1f}%)"
    )


if __name__ == "__main__":
    main()
