"""CAD-I: the paper's network, a Recurrent Interface Network (RIN, Jabri et al., 2023) over VAE latents
conditioned on T5 text tokens.

This is the function of the paper's official code (`models/networks/rin.py` of lucasdegeorge/T2I-ImageNet):
`RINTextCond` with `coherence=False` (what its ImageNet-256 training configs build; "base" and "L" below are
those configs) and `CADRINTextCond` with `coherence=True` (what its released checkpoint is). Our parameter
names differ from theirs, but only by name: `t2i.models.cad_official` converts checkpoints both ways by
renaming. Time is ours, t ∈ [0, 1] with t = 0 clean; the network sees γ = 1 − t, the signal fraction the
official code calls `gamma` (the ε objective's γ(t), as in the official linear schedule).

The choices the paper's code makes, all kept:
- Data tokens: the latent grid cut into p×p patches by a strided convolution, LayerNorm'd, plus a learned
  (grid², data_width) position table. A latent smaller than `latent_size` (our random crops) takes the
  top-left sub-grid of that table, so a crop is a smaller image rather than a window.
- Time: 1000·γ through EDM's sinusoid (width/4 channels, cos then sin), standardised over its channels
  (mean, unbiased std), then Linear–SiLU–Linear to `width`. It is added to every latent token and is also
  the first token of the conditioning the blocks read.
- Text tower: T5 tokens through one Linear; 16 learned registers (and, with `coherence`, a coherence token:
  the coherence score embedded like time plus a learned vector) go before the text; two pre-norm
  self-attention layers (16 heads, layer scale initialised to 0.1, padded text masked as keys); no final
  norm. The conditioning is [time token, tower output] with its mask (registers and time always real).
- Blocks: latents read the conditioning (cross-attention, `cond_per_block`), then the data (read), run
  `layers_per_block` self-attention layers (process), and the data read the latents back (write). Every
  attention is pre-norm on its queries only (keys and values come un-normalised from the other stream),
  cross-attention works at width min(query, key width) with `read_write_heads` heads, self-attention uses a
  fused qkv projection, MLPs use the exact GELU.
- Output: LayerNorm then Linear from each data token to its p·p·C patch.
- Initialisation: Xavier-uniform linears and patch convolution with zero biases, N(0, 0.02) truncated at
  ±0.04 for the learned tokens and tables; the untrained network does not predict 0.

In float32 and float64 the two compute the same operations in the same order (equal bit for bit on the CPU).
Under mixed precision they differ in one place: every LayerNorm here runs in float32 under autocast (torch's
rule), where the official backbone's `LayerNorm16Bits` runs in the autocast dtype.

Latent self-conditioning (rate 0.9 in the paper): `CAD.forward(..., latents_prev=...)` adds
LN₀(prev + MLP(LN(prev))) of the previous step's latent tokens to the initial ones, LN₀ a LayerNorm whose
weight and bias start at zero (so it starts as an exact no-op); no previous step is zeros. During training
use `self_conditioned_forward`; at sampling time `SelfConditionedSampling` carries the latents from one step
to the next.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i.models.dit import count_parameters as count_parameters  # one definition, re-exported
from t2i.models.dit import unpatchify

# Fixed in the official code (not constructor arguments there).
TEXT_HEADS = 16
TEXT_LAYERS = 2
TEXT_MLP_RATIO = 4
TEXT_LAYER_SCALE = 0.1
TIME_EXPANSION = 4  # the sinusoid has width / 4 channels, its MLP widens them 4×
COHERENCE_SCALE = 1000.0
MAX_POSITIONS = 10000


@dataclass(frozen=True)
class CADConfig:
    """The official constructor's arguments under our names (`cad_official.official_to_config` maps them)."""

    latent_channels: int = 4  # num_input_channels
    latent_size: int = 32  # data_size: largest latent grid side; the position table is built for it
    patch_size: int = 2  # path_size
    data_width: int = 256  # data_dim: width of the data (patch) tokens
    width: int = 1024  # latents_dim: width of the latent tokens and of the text tower
    num_latents: int = 256
    blocks: int = 4  # num_blocks
    layers_per_block: int = 4  # num_processing_layers: latent self-attention layers per block
    heads: int = 16  # compute_heads: heads of the latent self-attention
    read_write_heads: int = 16  # heads of every cross-attention (conditioning, read, write)
    mlp_ratio: int = 4  # latent_mlp_multiplier: latent MLPs, self-conditioning MLP
    data_mlp_ratio: int = 4  # data_mlp_multiplier: the write's MLP
    text_dim: int = 2048  # label_dim: google/flan-t5-xl hidden size
    num_registers: int = 16  # num_text_registers: learned tokens before the text, never masked
    time_scale: float = 1000.0  # time_scaling: γ is embedded as time_scale·γ
    cond_per_block: bool = True  # use_cond_rin_block: each block's latents first read the conditioning
    cond_in_latents: bool = False  # concat_cond_token_to_latents: time and text tokens join the latents
    num_cond_tokens: int = 77  # with cond_in_latents: num_latents − num_cond_tokens − 1 are learned
    coherence: bool = False  # CADRINTextCond: a coherence score conditions the text tower

    def __post_init__(self) -> None:
        attention = min(self.width, self.data_width)  # the width the read and the write attend at
        for what, value, field, divisor in [
            ("width", self.width, "heads", self.heads),
            ("min(width, data_width)", attention, "read_write_heads", self.read_write_heads),
            ("width", self.width, "read_write_heads", self.read_write_heads),
            ("width", self.width, "the text tower's heads", TEXT_HEADS),
        ]:
            if value % divisor:
                raise ValueError(f"CADConfig: {what} {value} is not divisible by {field} ({divisor})")
        if self.width % (2 * TIME_EXPANSION):
            raise ValueError(f"CADConfig: width {self.width} must be a multiple of 8 (time sinusoid)")
        if self.latent_size % self.patch_size:
            raise ValueError(
                f"CADConfig: latent_size {self.latent_size} is not a multiple of patch_size {self.patch_size}"
            )
        if min(self.num_latents, self.blocks, self.mlp_ratio, self.data_mlp_ratio) < 1:
            raise ValueError(
                "CADConfig: num_latents, blocks, mlp_ratio and data_mlp_ratio must be at least 1"
            )
        if not (self.cond_per_block or self.cond_in_latents):
            raise ValueError(
                "CADConfig: cond_per_block or cond_in_latents must be set, else the text is unused"
            )
        if self.cond_in_latents and self.learned_latents < 1:
            raise ValueError(
                f"CADConfig: cond_in_latents needs num_latents ({self.num_latents}) > num_cond_tokens + 1 "
                f"({self.num_cond_tokens + 1})"
            )

    @property
    def learned_latents(self) -> int:
        """How many latent tokens are learned parameters (the rest, with cond_in_latents, are the time and
        conditioning tokens)."""
        return self.num_latents - self.num_cond_tokens - 1 if self.cond_in_latents else self.num_latents

    @property
    def conditioning_tokens(self) -> int:
        """Tokens the text tower adds before the text: the registers and, with coherence, its token."""
        return self.num_registers + int(self.coherence)


# "base" and "L": the paper's ImageNet-256 text-to-image models (its training configs, `RINTextCond`);
# 188.37M and 330.24M parameters at latent 32, patch 2, flan-t5-xl text. "tiny" for CPU tests and smoke runs.
CAD_SIZES: dict[str, CADConfig] = {
    "tiny": CADConfig(
        data_width=64, width=128, num_latents=32, blocks=2, layers_per_block=2, heads=4, read_write_heads=4
    ),
    "base": CADConfig(num_latents=128, width=768, heads=12),
    "L": CADConfig(),
}


class FeedForward(nn.Module):
    """Linear, exact GELU, Linear."""

    def __init__(self, width: int, ratio: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width * ratio)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width * ratio, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def attend(q: Tensor, k: Tensor, v: Tensor, heads: int, key_mask: Tensor | None) -> Tensor:
    """Multi-head scaled dot-product attention on (B, N, heads·d) projections; `key_mask` (B, L) is True
    for the keys every query may attend to."""
    q, k, v = (part.unflatten(-1, (heads, -1)).transpose(1, 2) for part in (q, k, v))
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(attend(q, k, v, self.heads, key_mask))


class CrossAttention(nn.Module):
    """Queries of `width` attend to a context of `context_width` at min(width, context_width)."""

    def __init__(self, width: int, context_width: int, heads: int) -> None:
        super().__init__()
        inner = min(width, context_width)
        self.heads = heads
        self.q = nn.Linear(width, inner)
        self.kv = nn.Linear(context_width, 2 * inner)
        self.proj = nn.Linear(inner, width)

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor | None = None) -> Tensor:
        k, v = self.kv(context).chunk(2, dim=-1)
        return self.proj(attend(self.q(x), k, v, self.heads, key_mask))


class SelfAttentionLayer(nn.Module):
    """Pre-norm self-attention then MLP, each residual branch optionally scaled by a learned vector."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, layer_scale: float | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.attn = SelfAttention(width, heads)
        self.norm_mlp = nn.LayerNorm(width, eps=1e-6)
        self.mlp = FeedForward(width, mlp_ratio)
        self.scale_attn = self.scale_mlp = None
        if layer_scale is not None:
            self.scale_attn = nn.Parameter(torch.full((width,), layer_scale))
            self.scale_mlp = nn.Parameter(torch.full((width,), layer_scale))

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        attended = self.attn(self.norm(x), key_mask)
        if self.scale_attn is None:
            x = x + attended
            return x + self.mlp(self.norm_mlp(x))
        x = x + self.scale_attn * attended
        return x + self.scale_mlp * self.mlp(self.norm_mlp(x))


class CrossAttentionLayer(nn.Module):
    """`x` attends (pre-norm on `x` only) to a context, then an MLP on `x`."""

    def __init__(self, width: int, context_width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.attn = CrossAttention(width, context_width, heads)
        self.norm_mlp = nn.LayerNorm(width, eps=1e-6)
        self.mlp = FeedForward(width, mlp_ratio)

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm(x), context, key_mask)
        return x + self.mlp(self.norm_mlp(x))


def sinusoid_frequencies(channels: int) -> Tensor:
    """EDM's frequencies (1/10000)^(2i/channels), i < channels/2, in float32 as the official code has them."""
    freqs = torch.arange(0, channels // 2, dtype=torch.float32)
    return (1 / MAX_POSITIONS) ** (2 * freqs / channels)


class TimeEmbedder(nn.Module):
    """A scalar per sample → `width`: sinusoid of scale·value (width/4 channels), standardised over its
    channels, then Linear–SiLU–Linear. Embeds γ, and with coherence the coherence score."""

    def __init__(self, width: int, scale: float) -> None:
        super().__init__()
        channels = width // TIME_EXPANSION
        self.scale = scale
        self.register_buffer("freqs", sinusoid_frequencies(channels), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(channels, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, value: Tensor) -> Tensor:
        angles = torch.outer((value * self.scale).to(self.freqs.dtype), self.freqs)
        features = torch.cat([angles.cos(), angles.sin()], dim=1)
        features = (features - features.mean(dim=-1, keepdim=True)) / features.std(dim=-1, keepdim=True)
        return self.mlp(features)


class TextTower(nn.Module):
    """T5 tokens → width, learned registers (and the coherence token) before them, two masked
    self-attention layers with layer scale. Returns the tokens and their mask (the added tokens True)."""

    def __init__(self, config: CADConfig) -> None:
        super().__init__()
        width = config.width
        self.proj = nn.Linear(config.text_dim, width)
        self.registers = nn.Parameter(torch.zeros(config.num_registers, width))
        self.layers = nn.ModuleList(
            [
                SelfAttentionLayer(width, TEXT_HEADS, TEXT_MLP_RATIO, layer_scale=TEXT_LAYER_SCALE)
                for _ in range(TEXT_LAYERS)
            ]
        )
        self.coherence_embedder = self.coherence_pos = None
        if config.coherence:
            self.coherence_embedder = TimeEmbedder(width, COHERENCE_SCALE)
            self.coherence_pos = nn.Parameter(torch.zeros(width))

    def forward(self, text: Tensor, text_mask: Tensor, coherence: Tensor) -> tuple[Tensor, Tensor]:
        batch = text.shape[0]
        tokens = self.proj(text)
        added = [self.registers.expand(batch, -1, -1)]
        if self.coherence_embedder is not None:
            token = self.coherence_embedder(coherence.to(tokens.dtype)).unsqueeze(1)
            added.insert(0, token + self.coherence_pos.expand(batch, 1, -1))
        added_count = sum(part.shape[1] for part in added)
        tokens = torch.cat([*added, tokens], dim=1)
        mask = torch.cat([text_mask.new_ones(batch, added_count), text_mask], dim=1)
        for layer in self.layers:
            tokens = layer(tokens, mask)
        return tokens, mask


class SelfConditioning(nn.Module):
    """The previous step's latents → what is added to the initial ones: LN₀(prev + MLP(LN(prev)))."""

    def __init__(self, width: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(width, eps=1e-6)
        self.mlp = FeedForward(width, mlp_ratio)
        self.norm_out = nn.LayerNorm(width, eps=1e-6)

    def forward(self, previous: Tensor) -> Tensor:
        return self.norm_out(previous + self.mlp(self.norm_in(previous)))


class CADBlock(nn.Module):
    """Latents ← conditioning, read (latents ← data), process (latent self-attention), write (data ←
    latents)."""

    def __init__(self, config: CADConfig) -> None:
        super().__init__()
        width, data_width, heads = config.width, config.data_width, config.read_write_heads
        self.cond_read = None
        if config.cond_per_block:
            self.cond_read = CrossAttentionLayer(width, width, heads, config.mlp_ratio)
        self.read = CrossAttentionLayer(width, data_width, heads, config.mlp_ratio)
        self.process = nn.ModuleList(
            [
                SelfAttentionLayer(width, config.heads, config.mlp_ratio)
                for _ in range(config.layers_per_block)
            ]
        )
        self.write = CrossAttentionLayer(data_width, width, heads, config.data_mlp_ratio)

    def forward(
        self, data: Tensor, latents: Tensor, cond: Tensor, cond_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        if self.cond_read is not None:
            latents = self.cond_read(latents, cond, cond_mask)
        latents = self.read(latents, data)
        for layer in self.process:
            latents = layer(latents)
        return self.write(data, latents), latents


class CAD(nn.Module):
    """The paper's CAD-I network; it predicts ε or velocity, whichever its objective trains."""

    def __init__(self, config: CADConfig) -> None:
        super().__init__()
        self.config = config
        width, data_width, grid = config.width, config.data_width, config.latent_size // config.patch_size
        self.out_channels = config.latent_channels
        self.patch_embed = nn.Conv2d(config.latent_channels, data_width, config.patch_size, config.patch_size)
        self.data_norm = nn.LayerNorm(data_width, eps=1e-6)
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, data_width))
        self.latents = nn.Parameter(torch.zeros(config.learned_latents, width))
        self.time_embedder = TimeEmbedder(width, config.time_scale)
        self.text_tower = TextTower(config)
        self.self_cond = SelfConditioning(width, config.mlp_ratio)
        self.blocks = nn.ModuleList([CADBlock(config) for _ in range(config.blocks)])
        self.out_norm = nn.LayerNorm(data_width, eps=1e-6)
        self.out_proj = nn.Linear(data_width, config.patch_size**2 * config.latent_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation (see the module docstring)."""

        def xavier(module: nn.Module) -> None:
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(xavier)
        tables = [self.pos_embed, self.latents, self.text_tower.registers, self.text_tower.coherence_pos]
        for table in tables:
            if table is not None:
                nn.init.trunc_normal_(table, std=0.02, a=-0.04, b=0.04)
        nn.init.zeros_(self.self_cond.norm_out.weight)  # self-conditioning starts as an exact no-op
        nn.init.zeros_(self.self_cond.norm_out.bias)

    def positions(self, grid_h: int, grid_w: int) -> Tensor:
        """The position table's top-left grid_h × grid_w corner, one row per data token."""
        side = self.config.latent_size // self.config.patch_size
        if grid_h > side or grid_w > side:
            raise ValueError(f"patch grid {grid_h}x{grid_w} exceeds the model's {side}x{side} (latent_size)")
        if (grid_h, grid_w) == (side, side):
            return self.pos_embed
        return self.pos_embed.view(side, side, -1)[:grid_h, :grid_w].reshape(grid_h * grid_w, -1)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor,
        latents_prev: Tensor | None = None,
        return_latents: bool = False,
        coherence: Tensor | float | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, C, H, W) latents, t (B,) in [0, 1], text (B, L, D), text_mask (B, L) True = real token.

        `latents_prev` (B, num_latents, width): last step's latent tokens for self-conditioning (None: zeros,
        as RIN starts; every parameter takes part either way, which DDP without unused-parameter search needs).
        `coherence` (B,) or a number: the caption's coherence score (coherence models only; None: 1.0, a
        caption that describes its image). Returns the prediction (B, C, H, W), or (prediction, latent
        tokens) with `return_latents`; the latents are not detached, detach them before feeding them back.
        """
        batch, _, height, width = x.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent {height}x{width} is not a multiple of patch_size {p}")
        grid_h, grid_w = height // p, width // p
        if t.ndim == 0:
            t = t.expand(batch)
        text_mask = text_mask.bool()
        if not self.config.cond_in_latents:  # padding is masked everywhere: zeroed, even NaN cannot leak
            zero = torch.zeros((), dtype=text.dtype, device=text.device)
            text = torch.where(text_mask.unsqueeze(-1), text, zero)

        data = self.patch_embed(x).flatten(2).transpose(1, 2)
        data = self.data_norm(data) + self.positions(grid_h, grid_w)
        time = self.time_embedder(1 - t).unsqueeze(1)
        tokens, token_mask = self.text_tower(
            text, text_mask, self.coherence_values(coherence, batch, x.device)
        )
        cond = torch.cat([time, tokens], dim=1)
        cond_mask = torch.cat([token_mask.new_ones(batch, 1), token_mask], dim=1)
        latents = self.initial_latents(batch, time, cond)
        if latents_prev is None:  # "no previous step" is zeros, so every parameter is used on every call
            latents_prev = torch.zeros_like(latents)
        latents = latents + self.self_cond(latents_prev)
        for block in self.blocks:
            data, latents = block(data, latents, cond, cond_mask)
        patches = self.out_proj(self.out_norm(data))
        prediction = unpatchify(patches, grid_h, grid_w, p, self.out_channels)
        return (prediction, latents) if return_latents else prediction

    def coherence_values(self, coherence: Tensor | float | None, batch: int, device) -> Tensor:
        """(B,) float32 coherence scores: None is 1.0 for every sample, a number is that for every sample."""
        if coherence is None:
            coherence = 1.0
        if not isinstance(coherence, Tensor):
            return torch.full((batch,), float(coherence), device=device)
        return coherence.expand(batch) if coherence.ndim == 0 else coherence

    def initial_latents(self, batch: int, time: Tensor, cond: Tensor) -> Tensor:
        """The learned latents plus the time embedding; with cond_in_latents, the learned latents followed by
        the time and conditioning tokens (num_latents in all)."""
        latents = self.latents.expand(batch, -1, -1)
        if not self.config.cond_in_latents:
            return latents + time
        if latents.shape[1] + cond.shape[1] != self.config.num_latents:
            text = self.config.num_cond_tokens - self.config.conditioning_tokens
            raise ValueError(
                f"cond_in_latents: the text must be {text} tokens long (num_cond_tokens "
                f"{self.config.num_cond_tokens} less the registers and coherence token), got "
                f"{cond.shape[1] - 1 - self.config.conditioning_tokens}"
            )
        return torch.cat([latents, cond], dim=1)


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
    model is sampled with the self-conditioning it trained with. One instance per sampling run.

    Guidance (`t2i.models.objectives.guide`) tells it which rows are the conditional branch (`conditional`,
    (B,) bool): a coherence model gets coherence 1.0 there and 0.0 on the unconditional branch, as the
    paper's sampler passes them. A step taken without guidance runs the conditional rows alone; when the
    next call has the doubled guidance batch, those latents feed both of its halves (as the paper's sampler
    does after its unguided first step), and from then on each branch carries its own.
    """

    branch_aware = True  # `guide` passes `conditional` to callables that set this

    def __init__(self, model: CAD) -> None:
        self.model, self.latents = model, None

    def __call__(
        self, x: Tensor, t: Tensor, text: Tensor, mask: Tensor, conditional: Tensor | None = None
    ) -> Tensor:
        latents = self.latents
        if latents is not None and latents.shape[0] != x.shape[0]:
            if x.shape[0] % latents.shape[0]:
                raise ValueError(
                    f"sampling batch changed from {latents.shape[0]} to {x.shape[0]} rows mid-run; "
                    "use one SelfConditionedSampling per sampling run"
                )
            latents = latents.repeat(x.shape[0] // latents.shape[0], 1, 1)
        coherence = None if conditional is None else conditional.to(torch.float32)
        prediction, self.latents = self.model(
            x, t, text, mask, latents_prev=latents, return_latents=True, coherence=coherence
        )
        return prediction


def build_cad(size: str, **overrides) -> CAD:
    """A CAD of a named size (`CAD_SIZES`), with any CADConfig field overridden."""
    if size not in CAD_SIZES:
        raise KeyError(f"unknown CAD size {size!r}; choose from {sorted(CAD_SIZES)}")
    return CAD(replace(CAD_SIZES[size], **overrides))
