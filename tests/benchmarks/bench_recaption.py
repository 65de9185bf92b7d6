"""Captioning throughput, vLLM vs transformers, on the same random LLaVA with the same greedy settings.

A ~30M-parameter LLaVA (CLIP 64 px / patch 8 → 64 image tokens, Llama 8 × 512) is built locally; both
backends caption the same images, exactly `--tokens` new tokens each (EOS ignored), after a warm-up call.

    python tests/benchmarks/bench_recaption.py [--images 128] [--tokens 64] [--hf-batch 32]

Last line: `vllm/transformers: R`. Run it alone: another process on the same cores distorts both numbers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import t2i.models  # noqa: E402,F401  (torchvision shim)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from t2i.models.captioners import TransformersCaptioner, VLLMCaptioner
    from t2i.models.tiny import build_tiny_llava

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(args.images)]
    names = [""] * len(images)
    prompts = {"caption": "describe the image"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llava"
        build_tiny_llava(
            path,
            image_size=64,
            patch=8,
            vision_width=256,
            vision_layers=4,
            text_width=512,
            text_layers=8,
            head_dim=64,
        )
        from transformers import AutoConfig

        params = sum(
            p.numel()
            for p in __import__("transformers")
            .LlavaForConditionalGeneration(AutoConfig.from_pretrained(path))
            .parameters()
        )
        print(f"model: random LLaVA, {params / 1e6:.1f}M parameters; {args.images} images × {args.tokens} new tokens, "
              f"{args.dtype}, {torch.get_num_threads()} threads")  # fmt: skip

        vllm = VLLMCaptioner(str(path), max_new_tokens=args.tokens, dtype=args.dtype, max_model_len=512,
                             max_num_seqs=256, cache_root=str(Path(tmp) / "vllm"), ignore_eos=True)  # fmt: skip
        vllm.caption(images[:8], names[:8], prompts)
        t0 = time.perf_counter()
        out_v = vllm.caption(images, names, prompts)["caption"]
        v_rate = len(images) / (time.perf_counter() - t0)
        assert all(c.tokens == args.tokens for c in out_v)
        print(f"vllm:         {v_rate:8.1f} images/s")

        hf = TransformersCaptioner(str(path), max_new_tokens=args.tokens, dtype=args.dtype,
                                   batch_size=args.hf_batch, ignore_eos=True)  # fmt: skip
        hf.caption(images[: args.hf_batch], names[: args.hf_batch], prompts)
        t0 = time.perf_counter()
        out_h = hf.caption(images, names, prompts)["caption"]
        h_rate = len(images) / (time.perf_counter() - t0)
        assert all(c.tokens == args.tokens for c in out_h)
        print(f"transformers: {h_rate:8.1f} images/s (batch {args.hf_batch})")
        same = sum(a.text == b.text for a, b in zip(out_v, out_h, strict=True))
        print(f"identical captions: {same}/{len(images)}")
    print(f"vllm/transformers: {v_rate / h_rate:.2f}")


if __name__ == "__main__":
    main()
