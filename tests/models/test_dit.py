import copy
from dataclasses import replace

import pytest
import torch

from t2i.models.dit import DIT_SIZES, DiT, DiTConfig, build_dit, count_parameters

TEXT_DIM = 24
TINY = DiTConfig(
    latent_channels=4, latent_size=16, patch_size=2, width=64, depth=2, heads=4, text_dim=TEXT_DIM
)


def randomized(model: DiT, seed: int = 0) -> DiT:
    """A copy with every parameter random, so zero-initialised layers do not hide anything."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def inputs(batch=2, height=16, width=16, length=6, real=(6, 3), seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, height, width, generator=generator)
    t = torch.rand(batch, generator=generator)
    text = torch.randn(batch, length, TEXT_DIM, generator=generator)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for i, n in enumerate(real[:batch]):
        mask[i, :n] = True
    return x, t, text, mask


@pytest.fixture(scope="module")
def tiny() -> DiT:
    torch.manual_seed(0)
    return DiT(TINY).eval()


@pytest.fixture(scope="module")
def tiny_random(tiny) -> DiT:
    return randomized(tiny)


@pytest.mark.parametrize("size", sorted(DIT_SIZES))
@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("learned_pos_embed", [False, True])
def test_output_shape_full_grid_and_crops(size, learn_sigma, learned_pos_embed):
    torch.manual_seed(0)
    heads = DIT_SIZES[size].heads
    model = build_dit(
        size,
        width=8 * heads,
        depth=1,
        text_dim=TEXT_DIM,
        latent_size=16,
        learn_sigma=learn_sigma,
        learned_pos_embed=learned_pos_embed,
    )
    out_channels = 8 if learn_sigma else 4
    for height, width in [(16, 16), (8, 12), (2, 16)]:
        x, t, text, mask = inputs(height=height, width=width)
        out = model(x, t, text, mask)
        assert out.shape == (2, out_channels, height, width)


def test_grid_larger_than_latent_size_is_rejected(tiny):
    x, t, text, mask = inputs(height=18, width=16)
    with pytest.raises(ValueError, match="exceeds"):
        tiny(x, t, text, mask)


def test_zero_init_output_is_exactly_zero(tiny):
    x, t, text, mask = inputs()
    out = tiny(x, t, text, mask)
    assert torch.count_nonzero(out) == 0


def test_adaln_and_output_layers_are_zero_init(tiny):
    for block in tiny.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    assert torch.count_nonzero(tiny.final_layer.linear.weight) == 0
    # everything else is not trivially zero
    assert torch.count_nonzero(tiny.blocks[0].attn.q.weight) > 0


def test_gradient_reaches_every_parameter(tiny_random):
    model = copy.deepcopy(tiny_random).train()
    x, t, text, mask = inputs()
    out = model(x, t, text, mask)
    (out - torch.randn_like(out)).pow(2).mean().backward()
    starved = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert starved == []


def test_training_from_zero_init_moves_every_parameter():
    torch.manual_seed(0)
    model = DiT(replace(TINY, learned_pos_embed=True)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, t, text, mask = inputs(batch=4, real=(6, 3, 1, 5))
    for _ in range(4):
        out = model(x, t, text, mask)
        loss = (out - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    frozen = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert frozen == []


def test_padded_text_positions_do_not_change_output(tiny_random):
    x, t, text, mask = inputs(real=(4, 2))
    out = tiny_random(x, t, text, mask)
    garbage = text.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), TEXT_DIM) * 100
    assert torch.equal(tiny_random(x, t, garbage, mask), out)


def test_padding_is_masked_in_attention_not_just_zeroed(tiny_random):
    # Sample 0 has 3 real tokens of 6: same output as the same 3 tokens with no padding at all.
    x, t, text, mask = inputs(batch=1, real=(3,))
    padded = tiny_random(x, t, text, mask)
    trimmed = tiny_random(x, t, text[:, :3], mask[:, :3])
    torch.testing.assert_close(padded, trimmed, rtol=1e-5, atol=1e-6)


def test_changing_a_real_token_changes_output(tiny_random):
    x, t, text, mask = inputs(real=(4, 2))
    out = tiny_random(x, t, text, mask)
    edited = text.clone()
    edited[:, 1] += 1.0  # real token in both samples
    changed = tiny_random(x, t, edited, mask)
    for i in range(2):
        assert not torch.allclose(changed[i], out[i], atol=1e-4)


def test_empty_text_mask_gives_finite_output(tiny_random):
    x, t, text, mask = inputs(real=(0, 3))
    out = tiny_random(x, t, text, mask)
    assert torch.isfinite(out).all()


def test_output_depends_on_time(tiny_random):
    x, _, text, mask = inputs()
    a = tiny_random(x, torch.full((2,), 0.1), text, mask)
    b = tiny_random(x, torch.full((2,), 0.9), text, mask)
    assert not torch.allclose(a, b, atol=1e-4)


def test_samples_are_independent_in_a_batch(tiny_random):
    x, t, text, mask = inputs(real=(6, 3))
    both = tiny_random(x, t, text, mask)
    first = tiny_random(x[:1], t[:1], text[:1], mask[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("size", "low", "high"), [("base", 150e6, 200e6), ("L", 300e6, 400e6)])
def test_parameter_counts(size, low, high):
    with torch.device("meta"):
        model = build_dit(size)  # latent 32, patch 2, text_dim 2048
    assert model.config.latent_size == 32 and model.config.text_dim == 2048
    assert low <= count_parameters(model) <= high


def test_unknown_size_is_rejected():
    with pytest.raises(KeyError, match="unknown DiT size"):
        build_dit("XXL")
