"""Captioner backends behind one small interface: vLLM (batched offline inference), transformers
`generate` (fallback, and the reference for tests) and the paper's class-name template baseline.

A backend takes a list of RGB images with their class names and returns one `Caption` per image. A failed
item comes back with `error` set instead of raising, so one bad image never costs the rest of the batch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
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

    def caption(self, images: Sequence[Image.Image], class_names: Sequence[str]) -> list[Caption]: ...


def postprocess_caption(text: str) -> str:
    """The paper's cleaning: one line, and cut after the last full stop (drops a half-finished sentence)."""
    text = re.sub(r"\s*\n+\s*", " ", text).strip()
    cut = text.rfind(".")
    if cut > 0:
        text = text[: cut + 1]
    return text


class TemplateCaptioner:
    """The paper's baseline: "An image of <class>"."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.model_id = "template"

    def caption(self, images: Sequence[Image.Image], class_names: Sequence[str]) -> list[Caption]:
        out = []
        for name in class_names:
            text = self.template.format(class_name=name)
            out.append(Caption(text=text, tokens=len(text.split())))
        return out


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


class VLLMCaptioner:
    """One vLLM engine; a whole shard goes through one `generate` call and continuous batching does the rest."""

    def __init__(
        self,
        model_id: str,
        *,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 0.0,
        dtype: str = "bfloat16",
        max_model_len: int = 4096,
        max_num_seqs: int = 64,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        revision: str | None = None,
        cache_root: str | None = None,
    ) -> None:
        configure_vllm_for_cpu(cache_root)
        import torch
        from transformers import AutoProcessor
        from vllm import LLM, SamplingParams

        self.model_id = model_id
        processor = AutoProcessor.from_pretrained(model_id, revision=revision)
        self.prompt = chat_prompt(processor, prompt)
        on_cpu = not torch.cuda.is_available()
        kwargs = dict(
            model=model_id,
            revision=revision,
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            limit_mm_per_prompt={"image": 1},
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
        )
        if on_cpu:
            kwargs.update(enforce_eager=True, distributed_executor_backend="uni")
        else:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization)
        self.llm = LLM(**kwargs)
        self.sampling = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed)

    def caption(self, images: Sequence[Image.Image], class_names: Sequence[str]) -> list[Caption]:
        requests = [{"prompt": self.prompt, "multi_modal_data": {"image": im}} for im in images]
        outputs = self.llm.generate(requests, self.sampling, use_tqdm=False)
        result = []
        for out in outputs:
            completion = out.outputs[0]
            result.append(
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
        prompt: str,
        max_new_tokens: int,
        temperature: float = 0.0,
        dtype: str = "bfloat16",
        batch_size: int = 16,
        device: str = "auto",
        seed: int = 0,
        revision: str | None = None,
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
        self.prompt = chat_prompt(self.processor, prompt)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.batch_size = batch_size
        self.seed = seed

    def caption(self, images: Sequence[Image.Image], class_names: Sequence[str]) -> list[Caption]:
        import torch

        result: list[Caption] = []
        eos = self.processor.tokenizer.eos_token_id
        for start in range(0, len(images), self.batch_size):
            batch = list(images[start : start + self.batch_size])
            inputs = self.processor(
                images=batch, text=[self.prompt] * len(batch), return_tensors="pt", padding=True
            ).to(self.device)
            gen = dict(max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0)
            if self.temperature > 0:
                gen["temperature"] = self.temperature
                torch.manual_seed(self.seed + start)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, **gen)
            new = ids[:, inputs["input_ids"].shape[1] :]
            for row in new.tolist():
                stopped = eos in row
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
