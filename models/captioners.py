"""Captioner backends behind one small interface: vLLM (batched offline inference), transformers
`generate` (fallback, and the reference for tests) and the paper's class-name template baseline.

`caption(images, class_names, prompts)` takes RGB images, their class names and a mapping of column name →
prompt (several prompts per image, e.g. a short and a long description, in one pass) and returns, for each
column, one `Caption` per image. A backend may raise for a whole batch; the recaption task then splits the
batch to isolate the items that fail.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image


@dataclass(frozen=True)
class Caption:
    text: str | None
    tokens: int = 0
    finish_reason: str = "stop"  # "stop" | "length" | "error"
    error: str | None = None


class Captioner(Protocol):
    model_id: str

    def caption(
        self, images: Sequence[Image.Image], class_names: Sequence[str], prompts: Mapping[str, str]
    ) -> dict[str, list[Caption]]: ...


def postprocess_caption(text: str) -> str:
    """The paper's cleaning: one line, and cut after the last full stop (drops a half-finished sentence)."""
    text = re.sub(r"\s*\n+\s*", " ", text).strip()
    cut = text.rfind(".")
    if cut > 0:
        text = text[: cut + 1]
    return text


CLASS_TEMPLATE = "An image of {class_name}"  # the paper's class-name caption; `{class_name}` is filled in


class TemplateCaptioner:
    """The paper's baseline: "An image of <class>" (the same text for every prompt column)."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.model_id = "template"

    def caption(
        self, images: Sequence[Image.Image | None], class_names: Sequence[str], prompts: Mapping[str, str]
    ) -> dict[str, list[Caption]]:
        texts = [self.template.format(class_name=name) for name in class_names]
        return {col: [Caption(text=t, tokens=len(t.split())) for t in texts] for col in prompts}


def chat_prompt(processor, prompt: str) -> str:
    """The model's own chat template renders the turn, so any Hub VLM works by changing its id."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def configure_vllm_for_cpu(cache_root: str | None = None) -> None:
    """vLLM's CPU backend defaults suit a server, not a laptop: a KV cache of 92% of RAM and an engine
    subprocess. Without CUDA, take a small cache and keep the engine in-process (unless already set)."""
    import torch

    if torch.cuda.is_available():
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if cache_root:
        os.environ.setdefault("VLLM_CACHE_ROOT", cache_root)


_ENGINE_SLOT: dict[str, object] = {}


def keep_logging_to_the_process() -> None:
    """vLLM's own logging set-up calls `logging.config.dictConfig`, which flushes and closes every handler of
    the process while holding the logging lock. Prefect's API log handler flushes through a thread that needs
    that lock, so a flow run whose logs go to a server deadlocks in `LLM(...)` (seen in runs started by a
    worker). vLLM's loggers then propagate to the process's handlers, at VLLM_LOGGING_LEVEL."""
    import logging

    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    logging.getLogger("vllm").setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "WARNING").upper())


def shared_engine(**engine_args):
    """One vLLM engine per process: engines share process-wide distributed state, so a second live engine
    is fragile. Asking for different engine settings first releases the current engine."""
    import gc
    import json

    keep_logging_to_the_process()
    from vllm import LLM

    key = json.dumps(engine_args, sort_keys=True, default=str)
    if _ENGINE_SLOT.get("key") != key:
        _ENGINE_SLOT.clear()
        gc.collect()
        _ENGINE_SLOT["llm"] = LLM(**engine_args)
        _ENGINE_SLOT["key"] = key
    return _ENGINE_SLOT["llm"]


def release_engine() -> bool:
    """Shut this process's vLLM engine down and free what it holds (weights, the KV cache it reserved at
    `gpu_memory_utilization`), so stages that follow in the same process get the GPU. False if none ran."""
    import gc

    llm = _ENGINE_SLOT.pop("llm", None)
    _ENGINE_SLOT.clear()
    if llm is None:
        return False
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if callable(getattr(core, "shutdown", None)):
        core.shutdown()
    del llm, core
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()  # process groups, then gc and the CUDA cache
    gc.collect()
    return True


class VLLMCaptioner:
    """A vLLM engine (shared per process) and sampling settings; a whole shard (× prompts) goes through one
    `generate` call and continuous batching does the rest."""

    def __init__(
        self,
        model_id: str,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        dtype: str = "bfloat16",
        max_model_len: int = 4096,
        max_num_seqs: int | None = None,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        limit_mm_per_prompt: int = 1,
        seed: int = 0,
        revision: str | None = None,
        cache_root: str | None = None,
        ignore_eos: bool = False,
    ) -> None:
        configure_vllm_for_cpu(cache_root)
        import torch
        from transformers import AutoProcessor
        from vllm import SamplingParams

        self.model_id = model_id
        self.processor = AutoProcessor.from_pretrained(model_id, revision=revision)
        self.engine_args = dict(
            model=model_id,
            revision=revision,
            dtype=dtype,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": limit_mm_per_prompt},
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
        )
        if max_num_seqs is not None:  # else vLLM's offline default for this hardware
            self.engine_args.update(max_num_seqs=max_num_seqs)
        if torch.cuda.is_available():
            self.engine_args.update(gpu_memory_utilization=gpu_memory_utilization)
        else:
            self.engine_args.update(enforce_eager=True, distributed_executor_backend="uni")
        shared_engine(**self.engine_args)  # load now, so load time is not charged to the first shard
        self.sampling = SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature, seed=seed, ignore_eos=ignore_eos
        )
        self._rendered: dict[str, str] = {}

    @property
    def llm(self):
        return shared_engine(**self.engine_args)

    def render(self, prompt: str) -> str:
        if prompt not in self._rendered:
            self._rendered[prompt] = chat_prompt(self.processor, prompt)
        return self._rendered[prompt]

    def caption(
        self, images: Sequence[Image.Image], class_names: Sequence[str], prompts: Mapping[str, str]
    ) -> dict[str, list[Caption]]:
        columns = list(prompts)
        requests = [
            {"prompt": self.render(prompts[col]), "multi_modal_data": {"image": im}}
            for col in columns
            for im in images
        ]
        outputs = self.llm.generate(requests, self.sampling, use_tqdm=False)
        result: dict[str, list[Caption]] = {}
        for c, col in enumerate(columns):
            result[col] = []
            for out in outputs[c * len(images) : (c + 1) * len(images)]:
                completion = out.outputs[0]
                result[col].append(
                    Caption(
                        text=postprocess_caption(completion.text),
                        tokens=len(completion.token_ids),
                        finish_reason=completion.finish_reason or "stop",
                    )
                )
        return result


class TransformersCaptioner:
    """Batched `generate` with any `AutoModelForImageTextToText`; slower than vLLM, needs nothing else."""

    def __init__(
        self,
        model_id: str,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        dtype: str = "bfloat16",
        batch_size: int = 16,
        device: str = "auto",
        seed: int = 0,
        revision: str | None = None,
        ignore_eos: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model_id = model_id
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.processor = AutoProcessor.from_pretrained(model_id, revision=revision)
        self.processor.tokenizer.padding_side = "left"
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForImageTextToText.from_pretrained(
            model_id, revision=revision, dtype=torch_dtype
        )
        self.model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.batch_size = batch_size
        self.seed = seed
        self.ignore_eos = ignore_eos

    def caption(
        self, images: Sequence[Image.Image], class_names: Sequence[str], prompts: Mapping[str, str]
    ) -> dict[str, list[Caption]]:
        return {
            col: self._caption_one_prompt(images, chat_prompt(self.processor, p))
            for col, p in prompts.items()
        }

    def _caption_one_prompt(self, images: Sequence[Image.Image], prompt: str) -> list[Caption]:
        import torch

        result: list[Caption] = []
        eos = self.processor.tokenizer.eos_token_id
        for start in range(0, len(images), self.batch_size):
            batch = list(images[start : start + self.batch_size])
            inputs = self.processor(
                images=batch, text=[prompt] * len(batch), return_tensors="pt", padding=True
            )
            inputs = inputs.to(self.device)
            gen = dict(max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0)
            if self.ignore_eos:
                gen["min_new_tokens"] = self.max_new_tokens
            if self.temperature > 0:
                gen["temperature"] = self.temperature
                torch.manual_seed(self.seed + start)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, **gen)
            for row in ids[:, inputs["input_ids"].shape[1] :].tolist():
                stopped = eos in row and not self.ignore_eos
                row = row[: row.index(eos)] if stopped else row
                text = self.processor.tokenizer.decode(row, skip_special_tokens=True)
                result.append(
                    Caption(
                        text=postprocess_caption(text),
                        tokens=len(row),
                        finish_reason="stop" if stopped or len(row) < self.max_new_tokens else "length",
                    )
                )
        return result
