"""DiT-I: a Diffusion Transformer over VAE latents, conditioned on T5 text tokens.

Follows facebookresearch/DiT `models.py` (adaLN-Zero on the timestep embedding) with a cross-attention
sub-layer to the text in every block, as the paper's DiT-I baseline. The latent grid size is read from
the input at forward time, so random crops of the latent grid (H, W <= latent_size) work unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class DiTConfig:
    latent_channels: int = 4
    latent_size: int = 32  # largest latent grid side; positional tables are built for it
    patch_size: int = 2
    width: int = 1024
    depth: int = 12
    heads: int = 16
    mlp_ratio: float = 4.0
    text_dim: int = 2048  # google/flan-t5-xl hidden size
    # doubles the output channels (prediction, variance); the objectives read the first half
    learn_sigma: bool = False
    learned_pos_embed: bool = False  # False: fixed 2D sin-cos; True: learned table initialised to sin-cos

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.width % 4:
            raise ValueError(f"width {self.width} must be a multiple of 4 for the 2D sin-cos embedding")
        if self.latent_size % self.patch_size:
            raise ValueError(
                f"latent_size {self.latent_size} is not a multiple of patch_size {self.patch_size}"
            )


# Sizes chosen to match CAD-I's parameter budget (base ~190M, L ~330M) at latent 32, patch 2, T5-XL text.
DIT_SIZES: dict[str, DiTConfig] = {
    "tiny": DiTConfig(width=128, depth=4, heads=4),
    "base": DiTConfig(width=768, depth=12, heads=12),
    "L": DiTConfig(width=1024, depth=12, heads=16),
}


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """(grid_h, grid_w, dim) table: half the channels encode the row, half the column (as DiT / MAE)."""

    def one_axis(pos: Tensor, d: int) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        angles = pos.to(torch.float64)[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    rows = one_axis(torch.arange(grid_h), dim // 2)  # (grid_h, dim/2)
    cols = one_axis(torch.arange(grid_w), dim // 2)  # (grid_w, dim/2)
    table = torch.cat(
        [rows[:, None].expand(-1, grid_w, -1), cols[None].expand(grid_h, -1, -1)],
        dim=-1,
    )
    return table.float()


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> width vector: sinusoid of 1000·t (DiT's frequencies for integer steps), then an MLP."""

    def __init__(self, width: int, freq_dim: int = 256, t_scale: float = 1000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.t_scale = t_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    @staticmethod
    def sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )
        angles = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        freq = self.sinusoid(t * self.t_scale, self.freq_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class TextEmbedder(nn.Module):
    """T5 tokens -> width tokens for cross-attention, plus a pooled vector (masked mean) for adaLN.

    The LayerNorm keeps T5's large activations in range. Padded positions are zeroed first, so whatever
    sits there (even NaN) cannot leak into the output.
    """

    def __init__(self, text_dim: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(text_dim, width), nn.LayerNorm(width))
        self.pool_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, text: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        keep = text_mask.unsqueeze(-1)
        tokens = self.proj(torch.where(keep, text, torch.zeros((), dtype=text.dtype, device=text.device)))
        summed = torch.where(keep, tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device)).sum(1)
        pooled = summed / text_mask.sum(1, keepdim=True).clamp_min(1).to(tokens.dtype)
        return tokens, self.pool_mlp(pooled)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p · W/p, width) with a strided convolution."""

    def __init__(self, in_channels: int, width: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class PositionalEmbedding(nn.Module):
    """A (grid, grid, width) table, cropped to the input's grid (top-left), so latent crops keep working."""

    def __init__(self, grid_size: int, width: int, learned: bool) -> None:
        super().__init__()
        table = sincos_2d(grid_size, grid_size, width)
        if learned:
            self.table = nn.Parameter(table)
        else:
            self.register_buffer("table", table, persistent=False)

    def forward(self, grid_h: int, grid_w: int) -> Tensor:
        max_h, max_w = self.table.shape[:2]
        if grid_h > max_h or grid_w > max_w:
            raise ValueError(
                f"patch grid {grid_h}x{grid_w} exceeds the model's {max_h}x{max_w} (latent_size)"
            )
        return self.table[:grid_h, :grid_w].reshape(grid_h * grid_w, -1)


class Attention(nn.Module):
    """Multi-head attention via SDPA: self-attention, or cross-attention when `context` is given.

    `mask` (B, L) is True for real context tokens. A sample with no real token gets a zero update
    rather than the NaN a fully masked softmax would give.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, n, width = x.shape
        context = x if context is None else context
        q = self._split_heads(self.q(x))
        k, v = (self._split_heads(part) for part in self.kv(context).chunk(2, dim=-1))
        attn_mask = None
        empty = None
        if mask is not None:
            empty = ~mask.any(dim=-1)
            attn_mask = (mask | empty[:, None])[
                :, None, None, :
            ]  # (B, 1, 1, L): broadcast over heads, queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj(out.transpose(1, 2).reshape(b, n, width))
        if empty is not None:
            out = out.masked_fill(empty[:, None, None], 0.0)
        return out


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Self-attention, cross-attention to text, MLP; each sub-layer adaLN-modulated and gated by c."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(width, heads)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        # shift, scale, gate for each of the three sub-layers
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 9 * width))

    def forward(self, x: Tensor, c: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        (shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca, shift_mlp, scale_mlp, gate_mlp) = (
            self.adaLN_modulation(c).chunk(9, dim=-1)
        )
        x = x + gate_sa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_sa, scale_sa))
        x = x + gate_ca.unsqueeze(1) * self.cross_attn(
            modulate(self.norm2(x), shift_ca, scale_ca), context=text, mask=text_mask
        )
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from each token to its p·p·C output patch."""

    def __init__(self, width: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def init_backbone(model: nn.Module) -> None:
    """The DiT initialisation shared by DiT-I and CAD-I: Xavier-uniform linears with zero biases, the patch
    embedding initialised like a linear layer, N(0, 0.02) timestep MLP. Zero-inits come after, per model."""

    def basic_init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    model.apply(basic_init)
    weight = model.x_embedder.proj.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)


def unpatchify(x: Tensor, grid_h: int, grid_w: int, patch: int, channels: int) -> Tensor:
    """(B, gh·gw, p·p·C) -> (B, C, gh·p, gw·p)."""
    x = x.reshape(x.shape[0], grid_h, grid_w, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, grid_h * patch, grid_w * patch)


class DiT(nn.Module):
    """DiT over latents with text cross-attention (DiT-I). It predicts what its objective trains it to:
    ε (`Epsilon`) or the velocity ε − x0 (`RectifiedFlow`)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.out_channels = config.latent_channels * (2 if config.learn_sigma else 1)
        self.x_embedder = PatchEmbed(config.latent_channels, width, config.patch_size)
        self.pos_embed = PositionalEmbedding(
            config.latent_size // config.patch_size, width, learned=config.learned_pos_embed
        )
        self.t_embedder = TimestepEmbedder(width)
        self.text_embedder = TextEmbedder(config.text_dim, width)
        self.blocks = nn.ModuleList(
            [DiTBlock(width, config.heads, config.mlp_ratio) for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(width, config.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_backbone(self)
        nn.init.normal_(self.text_embedder.pool_mlp[0].weight, std=0.02)
        nn.init.normal_(self.text_embedder.pool_mlp[2].weight, std=0.02)
        # adaLN-Zero: every gate, shift and scale starts at zero, so each block starts as the identity,
        # and the output layer starts at zero, so the untrained model predicts 0 (initial ε loss = 1).
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor, grid_h: int, grid_w: int) -> Tensor:
        return unpatchify(x, grid_h, grid_w, self.config.patch_size, self.out_channels)

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """x (B, C, H, W) latents, t (B,) in [0, 1], text (B, L, D), text_mask (B, L) True = real token.

        Returns the prediction (ε or velocity) (B, C, H, W), or (B, 2C, H, W) with learn_sigma.
        """
        batch, _, height, width = x.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent {height}x{width} is not a multiple of patch_size {p}")
        grid_h, grid_w = height // p, width // p
        if t.ndim == 0:
            t = t.expand(batch)
        text_mask = text_mask.bool()

        h = self.x_embedder(x) + self.pos_embed(grid_h, grid_w).to(x.dtype)
        tokens, pooled = self.text_embedder(text, text_mask)
        c = self.t_embedder(t) + pooled
        for block in self.blocks:
            h = block(h, c, tokens, text_mask)
        h = self.final_layer(h, c)
        return self.unpatchify(h, grid_h, grid_w)


def build_dit(size: str, **overrides) -> DiT:
    """A DiT of a named size (`DIT_SIZES`), with any DiTConfig field overridden."""
    if size not in DIT_SIZES:
        raise KeyError(f"unknown DiT size {size!r}; choose from {sorted(DIT_SIZES)}")
    return DiT(replace(DIT_SIZES[size], **overrides))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
