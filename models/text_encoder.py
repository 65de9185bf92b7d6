"""The text-encoder interface: captions → (token embeddings, padding mask), T5's last hidden state in float32
(computed in the configured dtype)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from t2i.models.conditioning import bucket_length


def tokenize(tokenizer, texts: Sequence[str], max_length: int, buckets: int | None = None):
    """Token ids and attention mask (B, L) on the host, padded to the longest text (≤ max_length) or, with
    `buckets`, on to the length bucket that holds it (`t2i.models.conditioning.text_buckets`)."""
    batch = tokenizer(
        list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    ids, mask = batch.input_ids, batch.attention_mask
    extra = bucket_length(ids.shape[1], max_length, buckets) - ids.shape[1] if buckets else 0
    if extra > 0:
        ids = F.pad(ids, (0, extra), value=tokenizer.pad_token_id)
        mask = F.pad(mask, (0, extra), value=0)
    return ids, mask


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

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = tokenize(self.tokenizer, texts, self.max_length)
        return self.embed(ids.to(self.device), mask.to(self.device))

    @torch.no_grad()  # not inference_mode: the embeddings feed a training graph
    def embed(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids already on the encoder's device (tokenized off the step, e.g. in loader workers).

        The mask goes in additive and 4-D, as T5 adds it to its position bias: given the 2-D mask, transformers
        first asks whether any token is padded (`mask.all()`), which makes the host wait for the GPU."""
        mask = attention_mask.bool()
        zero = torch.zeros((), dtype=self.model.dtype, device=mask.device)
        additive = torch.where(mask, zero, torch.finfo(self.model.dtype).min)[:, None, None, :]
        hidden = self.model(input_ids=ids, attention_mask=additive).last_hidden_state
        return hidden.float() * mask[..., None], mask
