"""CAD-I: a RIN-style read/process/write denoiser over VAE latents, conditioned on T5 text tokens.

Follows Recurrent Interface Networks (Jabri et al., 2023) as used by the paper's CAD-I: the latent grid is
cut into data tokens (narrow, one per patch); a smaller set of learned latent tokens (wide) does the
heavy computation. Each block: latents cross-attend to the text, read from the data, run a few
self-attention layers, and write back to the data. The output is read off the data tokens.

Choices the paper leaves open, made here once:
- The time embedding is added to every latent token (not appended as an extra token), so the number of
  latents stays `num_latents` and every latent sees t directly in its residual stream.
- Data tokens get a learned positional table initialised to 2D sin-cos and cropped top-left to the input's
  patch grid, so random crops of the latent grid work as in DiT-I.
- Text: padded positions are zeroed before the projection, and the learned registers are always real, so a
  fully-masked caption still gives the latents something finite to attend to.

Latent self-conditioning (rate 0.9 in the paper): `CAD.forward(..., latents_prev=...)` adds the previous
latent tokens through a zero-initialised LayerNorm+Linear to the initial latents (zeros when there is no
previous step). During training use `self_conditioned_forward`; at sampling time
`SelfConditionedSampling` (below) carries the latents from one step to the next.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from t2i.models.dit import (
    Attention,
    Mlp,
    PatchEmbed,
    PositionalEmbedding,
    TimestepEmbedder,
    init_backbone,
    unpatchify,
)
from t2i.models.dit import count_parameters as count_parameters  # one definition, re-exported


@dataclass(frozen=True)
class CADConfig:
    latent_channels: int = 4
    latent_size: int = 32  # largest latent grid side; the positional table is built for it
    patch_size: int = 2
    data_width: int = 256  # width of the data (patch) tokens
    width: int = 1024  # width of the latent tokens and of the text tower
    num_latents: int = 256
    blocks: int = 4
    layers_per_block: int = 4  # latent self-attention layers per block
    heads: int = 16  # heads of every attention whose queries are latents or text
    data_heads: int = 4  # heads of the write attention (queries are data tokens)
    text_dim: int = 2048  # google/flan-t5-xl hidden size
    num_registers: int = 16  # learned tokens appended to the text, never masked
    text_layers: int = 2  # masked self-attention blocks over text + registers
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.data_width % self.data_heads:
            raise ValueError(f"data_width {self.data_width} is not divisible by data_heads {self.data_heads}")
        if self.data_width % 4:
            raise ValueError(f"data_width {self.data_width} must be a multiple of 4 for the 2D sin-cos table")
        if self.latent_size % self.patch_size:
            raise ValueError(
                f"latent_size {self.latent_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.num_latents < 1 or self.blocks < 1:
            raise ValueError("num_latents and blocks must be at least 1")


# "L" and "base" as in the paper (~330M and ~190M parameters at latent 32, patch 2, T5-XL text);
# "tiny" for CPU tests and smoke runs.
CAD_SIZES: dict[str, CADConfig] = {
    "tiny": CADConfig(
        data_width=64, width=128, num_latents=32, blocks=2, layers_per_block=2, heads=4, data_heads=2
    ),
    "base": CADConfig(data_width=256, width=768, num_latents=128, blocks=4, layers_per_block=4, heads=12),
    "L": CADConfig(data_width=256, width=1024, num_latents=256, blocks=4, layers_per_block=4, heads=16),
}


class CrossAttention(Attention):
    """DiT-I's attention with a context of its own width (read: latents ← data; write: data ← latents)."""

    def __init__(self, width: int, context_width: int, heads: int) -> None:
        super().__init__(width, heads)
        self.kv = nn.Linear(context_width, 2 * width)


class SelfAttentionLayer(nn.Module):
    """Pre-norm transformer layer: masked self-attention, then MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class CrossAttentionLayer(nn.Module):
    """Pre-norm cross-attention from `x` to a (normalised) context, then MLP on `x`."""

    def __init__(self, width: int, context_width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.norm_context = nn.LayerNorm(context_width, eps=1e-6)
        self.attn = CrossAttention(width, context_width, heads)
        self.norm_mlp = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm(x), context=self.norm_context(context), mask=mask)
        return x + self.mlp(self.norm_mlp(x))


class TextTower(nn.Module):
    """T5 tokens -> width, append learned registers, a few masked self-attention layers.

    Returns the tokens and their mask (registers always True). Padded positions are zeroed first, so
    whatever sits there (even NaN) cannot reach the output.
    """

    def __init__(
        self, text_dim: int, width: int, heads: int, num_registers: int, layers: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim, width)
        self.registers = nn.Parameter(torch.zeros(num_registers, width))
        self.layers = nn.ModuleList([SelfAttentionLayer(width, heads, mlp_ratio) for _ in range(layers)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, text: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        batch = text.shape[0]
        zero = torch.zeros((), dtype=text.dtype, device=text.device)
        tokens = self.proj(torch.where(text_mask.unsqueeze(-1), text, zero))
        registers = self.registers.to(tokens.dtype).expand(batch, -1, -1)
        tokens = torch.cat([tokens, registers], dim=1)
        mask = torch.cat([text_mask, text_mask.new_ones(batch, registers.shape[1])], dim=1)
        for layer in self.layers:
            tokens = layer(tokens, mask)
        return self.norm(tokens), mask


class CADBlock(nn.Module):
    """Latents ← text, read (latents ← data), process (latent self-attention), write (data ← latents)."""

    def __init__(self, config: CADConfig) -> None:
        super().__init__()
        width, data_width, ratio = config.width, config.data_width, config.mlp_ratio
        self.text_cross = CrossAttentionLayer(width, width, config.heads, ratio)
        self.read = CrossAttentionLayer(width, data_width, config.heads, ratio)
        self.process = nn.ModuleList(
            [SelfAttentionLayer(width, config.heads, ratio) for _ in range(config.layers_per_block)]
        )
        self.write = CrossAttentionLayer(data_width, width, config.data_heads, ratio)

    def forward(
        self, data: Tensor, latents: Tensor, text: Tensor, text_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        latents = self.text_cross(latents, text, text_mask)
        latents = self.read(latents, data)
        for layer in self.process:
            latents = layer(latents)
        data = self.write(data, latents)
        return data, latents


class CAD(nn.Module):
    """RIN over latents with text cross-attention and latent self-conditioning (CAD-I); like DiT-I it predicts
    ε or velocity, whichever its objective trains."""

    def __init__(self, config: CADConfig) -> None:
        super().__init__()
        self.config = config
        width, data_width = config.width, config.data_width
        self.out_channels = config.latent_channels
        self.x_embedder = PatchEmbed(config.latent_channels, data_width, config.patch_size)
        self.pos_embed = PositionalEmbedding(
            config.latent_size // config.patch_size, data_width, learned=True
        )
        self.latents = nn.Parameter(torch.zeros(config.num_latents, width))
        self.t_embedder = TimestepEmbedder(width)
        self.text_tower = TextTower(
            config.text_dim, width, config.heads, config.num_registers, config.text_layers, config.mlp_ratio
        )
        self.self_cond = nn.Sequential(nn.LayerNorm(width, eps=1e-6), nn.Linear(width, width))
        self.blocks = nn.ModuleList([CADBlock(config) for _ in range(config.blocks)])
        self.final_norm = nn.LayerNorm(data_width, eps=1e-6)
        self.final_linear = nn.Linear(data_width, config.patch_size**2 * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_backbone(self)
        nn.init.normal_(self.latents, std=0.02)
        nn.init.normal_(self.text_tower.registers, std=0.02)
        # Zero-init: self-conditioning starts as a no-op, and the untrained model predicts 0.
        nn.init.zeros_(self.self_cond[-1].weight)
        nn.init.zeros_(self.self_cond[-1].bias)
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)

    def unpatchify(self, x: Tensor, grid_h: int, grid_w: int) -> Tensor:
        return unpatchify(x, grid_h, grid_w, self.config.patch_size, self.out_channels)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor,
        latents_prev: Tensor | None = None,
        return_latents: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, C, H, W) latents, t (B,) in [0, 1], text (B, L, D), text_mask (B, L) True = real token.

        `latents_prev` (B, num_latents, width): last step's latent tokens for self-conditioning (None: zeros,
        as RIN starts; every parameter takes part either way, which DDP without unused-parameter search needs).
        Returns the prediction (B, C, H, W), or (prediction, latent tokens) with `return_latents`; the latents
        are not detached, detach them before feeding them back.
        """
        batch, _, height, width = x.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent {height}x{width} is not a multiple of patch_size {p}")
        grid_h, grid_w = height // p, width // p
        if t.ndim == 0:
            t = t.expand(batch)
        text_mask = text_mask.bool()

        data = self.x_embedder(x) + self.pos_embed(grid_h, grid_w).to(x.dtype)
        latents = self.latents.to(data.dtype).expand(batch, -1, -1) + self.t_embedder(t).unsqueeze(1)
        if latents_prev is None:  # "no previous step" is zeros, so every parameter is used on every call
            latents_prev = torch.zeros_like(latents)
        latents = latents + self.self_cond(latents_prev)
        tokens, mask = self.text_tower(text, text_mask)
        for block in self.blocks:
            data, latents = block(data, latents, tokens, mask)
        prediction = self.unpatchify(self.final_linear(self.final_norm(data)), grid_h, grid_w)
        return (prediction, latents) if return_latents else prediction


def self_conditioned_forward(
    model: CAD,
    x: Tensor,
    t: Tensor,
    text: Tensor,
    mask: Tensor,
    rate: float,
    generator: torch.Generator | None = None,
    take: bool | None = None,
) -> Tensor:
    """Training-time latent self-conditioning (RIN): with probability `rate` for the whole batch, first run
    without gradients to get latents, then run again feeding them back (detached); returns the prediction.

    Under DDP pass a generator seeded alike on every rank: the ranks then take the extra pass together
    instead of all waiting for whichever rank drew it. The training step passes `take`, the coin drawn with
    its batch, so it reads no tensor on the host. At sampling time use `SelfConditionedSampling`.
    """
    if take is None:
        device = generator.device if generator is not None else None
        take = rate > 0 and float(torch.rand((), generator=generator, device=device)) < rate
    latents_prev = None
    if take:
        with torch.no_grad():
            _, latents_prev = model(x, t, text, mask, return_latents=True)
        latents_prev = latents_prev.detach()
    return model(x, t, text, mask, latents_prev=latents_prev)


class SelfConditionedSampling:
    """CAD-I at sampling time (RIN): each call feeds back the latent tokens of the previous call, so the
    model is sampled with the self-conditioning it trained with. One instance per sampling run: the
    batch layout (the doubled guidance batch too) is the same at every step of a run."""

    def __init__(self, model: CAD) -> None:
        self.model, self.latents = model, None

    def __call__(self, x: Tensor, t: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        prediction, self.latents = self.model(
            x, t, text, mask, latents_prev=self.latents, return_latents=True
        )
        return prediction


def build_cad(size: str, **overrides) -> CAD:
    """A CAD of a named size (`CAD_SIZES`), with any CADConfig field overridden."""
    if size not in CAD_SIZES:
        raise KeyError(f"unknown CAD size {size!r}; choose from {sorted(CAD_SIZES)}")
    return CAD(replace(CAD_SIZES[size], **overrides))
