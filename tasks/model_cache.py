"""Models loaded once per process and reused by every shard it processes; the device a stage runs on."""

from __future__ import annotations

import functools
import json
from typing import Any


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@functools.lru_cache(maxsize=4)
def _cached(kind: str, key: str) -> Any:
    spec = json.loads(key)
    if kind == "captioner":
        from t2i.models.captioners import TemplateCaptioner, TransformersCaptioner, VLLMCaptioner

        backend = spec.pop("backend")
        if backend == "template":
            return TemplateCaptioner(spec["template"])
        common = dict(
            max_new_tokens=spec["max_new_tokens"],
            temperature=spec["temperature"],
            dtype=spec["dtype"],
            seed=spec["seed"],
            revision=spec["revision"],
        )
        if backend == "vllm":
            return VLLMCaptioner(
                spec["path"],
                max_model_len=spec["max_model_len"],
                max_num_seqs=spec["max_num_seqs"],
                gpu_memory_utilization=spec["gpu_memory_utilization"],
                tensor_parallel_size=spec["tensor_parallel_size"],
                limit_mm_per_prompt=spec["limit_mm_per_prompt"],
                cache_root=spec["cache_root"],
                **common,
            )
        return TransformersCaptioner(
            spec["path"], batch_size=spec["batch_size"], device=spec["device"], **common
        )
    if kind == "imported":
        from t2i.data.caption_sets import CaptionLookup, load_caption_table
        from t2i.tasks.hub import hub_token

        table = load_caption_table(spec["source"], spec["key_column"], spec["caption_column"], hub_token())
        return CaptionLookup(table)
    if kind == "vae":
        from t2i.models.vae import load_vae

        return load_vae(spec["path"], device=spec["device"], dtype=spec["dtype"], revision=spec["revision"])
    if kind == "text":
        from t2i.models.text_encoder import TextEncoder

        return TextEncoder(
            spec["path"],
            max_length=spec["max_length"],
            device=spec["device"],
            dtype=spec.get("dtype", "float32"),
            revision=spec["revision"],
        )
    raise ValueError(kind)


def cached_model(kind: str, **spec: Any) -> Any:
    return _cached(kind, json.dumps(spec, sort_keys=True))


def release_models() -> None:
    """Drop every cached model, the captioner's vLLM engine included, and return their memory: the pipeline
    calls this between stages that share a process (and, with one GPU, the device)."""
    import gc
    import sys

    _cached.cache_clear()
    if "t2i.models.captioners" in sys.modules:  # nothing to release if no captioner was ever loaded
        sys.modules["t2i.models.captioners"].release_engine()
    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()
