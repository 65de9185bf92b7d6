"""The text-encoder interface: captions → (token embeddings, padding mask), T5's last hidden state in float32
(computed in the configured dtype)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class TextEncoder:
    """A frozen T5 encoder; batches are padded to their longest caption (≤ max_length) with a mask."""

    def __init__(
        self,
        path: str,
        *,
        max_length: int,
        device: str = "cpu",
        dtype: str = "float32",
        revision: str | None = None,
    ) -> None:
        from transformers import AutoTokenizer, T5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        self.model = (
            T5EncoderModel.from_pretrained(path, revision=revision, dtype=getattr(torch, dtype))
            .to(device)
            .eval()
            .requires_grad_(False)
        )
        self.max_length = max_length
        self.device = device

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()  # not inference_mode: the embeddings feed a training graph
    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mask = batch.attention_mask.bool()
        return hidden.float() * mask[..., None], mask
