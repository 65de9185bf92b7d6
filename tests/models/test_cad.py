import copy
from dataclasses import replace

import pytest
import torch

from t2i.models.cad import CAD, CAD_SIZES, CADConfig, build_cad, count_parameters, self_conditioned_forward

TEXT_DIM = 24
SMALL = CADConfig(
    latent_channels=4,
    latent_size=16,
    patch_size=2,
    data_width=16,
    width=32,
    num_latents=8,
    blocks=2,
    layers_per_block=1,
    heads=4,
    data_heads=2,
    text_dim=TEXT_DIM,
    num_registers=4,
    text_layers=2,
)


def randomized(model: CAD, seed: int = 0) -> CAD:
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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only adds spin-waiting on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small() -> CAD:
    torch.manual_seed(0)
    return CAD(SMALL).eval()


@pytest.fixture(scope="module")
def small_random(small) -> CAD:
    return randomized(small)


def test_tiny_output_shape_full_grid_and_crops():
    torch.manual_seed(0)
    model = build_cad("tiny", text_dim=TEXT_DIM, latent_size=16)
    for height, width in [(16, 16), (8, 12), (2, 16)]:
        x, t, text, mask = inputs(height=height, width=width)
        with torch.no_grad():
            out = model(x, t, text, mask)
        assert out.shape == (2, 4, height, width)


@pytest.mark.parametrize("size", ["base", "L"])
def test_named_sizes_build_and_run_when_shrunk(size):
    torch.manual_seed(0)
    heads = CAD_SIZES[size].heads
    model = build_cad(
        size, width=4 * heads, data_width=16, num_latents=4, blocks=1, layers_per_block=1, text_dim=TEXT_DIM
    )
    x, t, text, mask = inputs(height=8, width=12)
    assert randomized(model)(x, t, text, mask).shape == (2, 4, 8, 12)


def test_crop_uses_the_top_left_of_the_position_table(small_random):
    # A crop is a smaller image, not a window: same output as a model whose table is the full table's corner.
    x, t, text, mask = inputs(height=8, width=8)
    out = small_random(x, t, text, mask)
    other = copy.deepcopy(small_random)
    with torch.no_grad():
        other.pos_embed.table[4:] += 1.0
        other.pos_embed.table[:, 4:] += 1.0
    assert torch.equal(other(x, t, text, mask), out)
    with torch.no_grad():
        other.pos_embed.table[0, 0] += 1.0
    assert not torch.equal(other(x, t, text, mask), out)


def test_bad_grids_are_rejected(small):
    x, t, text, mask = inputs(height=18, width=16)
    with pytest.raises(ValueError, match="exceeds"):
        small(x, t, text, mask)
    x, t, text, mask = inputs(height=15, width=16)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        small(x, t, text, mask)


def test_untrained_output_is_exactly_zero(small):
    x, t, text, mask = inputs()
    prev = torch.randn(2, SMALL.num_latents, SMALL.width)
    assert torch.count_nonzero(small(x, t, text, mask)) == 0
    assert torch.count_nonzero(small(x, t, text, mask, latents_prev=prev)) == 0
    assert torch.count_nonzero(small.blocks[0].read.attn.q.weight) > 0  # not trivially zero everywhere


def test_self_conditioning_starts_as_an_exact_no_op(small):
    x, t, text, mask = inputs()
    prev = torch.randn(2, SMALL.num_latents, SMALL.width)
    _, plain = small(x, t, text, mask, return_latents=True)
    _, conditioned = small(x, t, text, mask, latents_prev=prev, return_latents=True)
    assert torch.equal(conditioned, plain)


def test_return_latents_shape(small_random):
    x, t, text, mask = inputs()
    eps, latents = small_random(x, t, text, mask, return_latents=True)
    assert eps.shape == x.shape
    assert latents.shape == (2, SMALL.num_latents, SMALL.width)


def test_gradient_reaches_every_parameter(small_random):
    model = copy.deepcopy(small_random).train()
    x, t, text, mask = inputs()
    prev = torch.randn(2, SMALL.num_latents, SMALL.width)
    out = model(x, t, text, mask, latents_prev=prev)
    (out - torch.randn_like(out)).pow(2).mean().backward()
    starved = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert starved == []


def test_training_from_zero_init_moves_every_parameter():
    torch.manual_seed(0)
    model = CAD(SMALL).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, t, text, mask = inputs(real=(6, 3))
    for _ in range(3):  # zero-init output layer, then the self-conditioning Linear, then its LayerNorm
        out = self_conditioned_forward(model, x, t, text, mask, rate=1.0)
        loss = (out - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    frozen = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert frozen == []


def test_padded_text_positions_do_not_change_output(small_random):
    x, t, text, mask = inputs(real=(4, 2))
    out = small_random(x, t, text, mask)
    garbage = text.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), TEXT_DIM) * 100
    assert torch.equal(small_random(x, t, garbage, mask), out)
    garbage[~mask] = float("nan")
    assert torch.equal(small_random(x, t, garbage, mask), out)


def test_padding_is_masked_in_attention_not_just_zeroed(small_random):
    x, t, text, mask = inputs(batch=1, real=(3,))
    padded = small_random(x, t, text, mask)
    trimmed = small_random(x, t, text[:, :3], mask[:, :3])
    torch.testing.assert_close(padded, trimmed, rtol=1e-5, atol=1e-6)


def test_changing_a_real_token_changes_output(small_random):
    x, t, text, mask = inputs(real=(4, 2))
    out = small_random(x, t, text, mask)
    edited = text.clone()
    edited[:, 1] += 1.0  # real token in both samples
    changed = small_random(x, t, edited, mask)
    for i in range(2):
        assert not torch.allclose(changed[i], out[i], atol=1e-5)


def test_registers_carry_a_fully_masked_caption(small_random):
    x, t, text, mask = inputs(real=(0, 3))
    text[0] = float("nan")  # nothing of an empty caption may leak
    out = small_random(x, t, text, mask)
    assert torch.isfinite(out).all()
    # The latents still attend to the (always real) registers: changing them changes the empty sample.
    other = copy.deepcopy(small_random)
    with torch.no_grad():
        other.text_tower.registers.add_(torch.randn(other.text_tower.registers.shape))
    assert not torch.allclose(other(x, t, text, mask)[0], out[0], atol=1e-5)


def test_output_depends_on_time(small_random):
    x, _, text, mask = inputs()
    a = small_random(x, torch.full((2,), 0.1), text, mask)
    b = small_random(x, torch.full((2,), 0.9), text, mask)
    assert not torch.allclose(a, b, atol=1e-5)


def test_samples_are_independent_in_a_batch(small_random):
    x, t, text, mask = inputs(real=(6, 3))
    both = small_random(x, t, text, mask)
    first = small_random(x[:1], t[:1], text[:1], mask[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-6)


def test_latents_prev_is_a_no_op_until_its_projection_is_trained(small_random):
    x, t, text, mask = inputs()
    prev = torch.randn(2, SMALL.num_latents, SMALL.width)
    plain = small_random(x, t, text, mask)
    assert not torch.allclose(small_random(x, t, text, mask, latents_prev=prev), plain, atol=1e-5)
    zeroed = copy.deepcopy(small_random)
    with torch.no_grad():
        zeroed.self_cond[-1].weight.zero_()
        zeroed.self_cond[-1].bias.zero_()
    assert torch.equal(zeroed(x, t, text, mask, latents_prev=prev), zeroed(x, t, text, mask))


def test_self_conditioned_forward_rate_zero_is_a_plain_forward(small_random):
    x, t, text, mask = inputs()
    plain = small_random(x, t, text, mask)
    assert torch.equal(self_conditioned_forward(small_random, x, t, text, mask, rate=0.0), plain)


def test_self_conditioned_forward_rate_one_feeds_back_detached_latents(small_random):
    model = copy.deepcopy(small_random).train()
    x, t, text, mask = inputs()
    with torch.no_grad():
        _, latents = model(x, t, text, mask, return_latents=True)
        expected = model(x, t, text, mask, latents_prev=latents)
        plain = model(x, t, text, mask)
    out = self_conditioned_forward(model, x, t, text, mask, rate=1.0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, plain, atol=1e-5)
    out.sum().backward()  # one graph only: the first pass holds none
    assert model.latents.grad is not None


def test_self_conditioning_coin_follows_the_generator(small_random):
    x, t, text, mask = inputs()
    plain = small_random(x, t, text, mask)

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return self_conditioned_forward(small_random, x, t, text, mask, rate=0.5, generator=generator)

    # The first draw is 0.496 for seed 0 (self-condition) and 0.758 for seed 1 (plain).
    assert not torch.equal(run(0), plain)
    assert torch.equal(run(1), plain)


@pytest.mark.parametrize(("size", "low", "high"), [("base", 150e6, 200e6), ("L", 300e6, 400e6)])
def test_parameter_counts(size, low, high):
    with torch.device("meta"):
        model = build_cad(size, text_dim=2048)
    assert model.config.latent_size == 32 and model.config.patch_size == 2
    assert low <= count_parameters(model) <= high


def test_paper_sizes():
    large, base = CAD_SIZES["L"], CAD_SIZES["base"]
    assert (large.num_latents, large.width, large.blocks, large.layers_per_block, large.heads) == (
        256,
        1024,
        4,
        4,
        16,
    )
    assert (base.num_latents, base.width, base.heads) == (128, 768, 12)
    assert large.num_registers == 16 and large.text_layers == 2 and large.data_width == 256


def test_config_and_size_validation():
    with pytest.raises(KeyError, match="unknown CAD size"):
        build_cad("XXL")
    with pytest.raises(ValueError, match="heads"):
        replace(SMALL, width=30)
    with pytest.raises(ValueError, match="data_heads"):
        replace(SMALL, data_width=18, data_heads=4)


@pytest.mark.parametrize(("objective", "sampler"), [("epsilon", "ddim"), ("rectified_flow", "euler")])
def test_sampling_feeds_each_steps_latents_back(small_random, objective, sampler):
    """What CAD-I trained with 90% of the time: every step after the first sees the previous step's latents."""
    from t2i.models.architectures import sample_latents
    from t2i.models.objectives import objective as make_objective

    _, _, text, mask = inputs()
    null_text, null_mask = torch.zeros(1, 1, TEXT_DIM), torch.ones(1, 1, dtype=torch.bool)
    shape, kwargs = (2, 4, 16, 16), dict(steps=4, guidance_scale=3.0)
    calls = []

    def record(module, args, call_kwargs, output):
        calls.append((call_kwargs.get("latents_prev"), output[1].detach().clone()))

    def run():
        generator = torch.Generator().manual_seed(0)
        args = (small_random, shape, text, mask, null_text, null_mask)
        return sample_latents(objective, sampler, *args, generator=generator, **kwargs)

    handle = small_random.register_forward_hook(record, with_kwargs=True)
    try:
        z = run()
    finally:
        handle.remove()
    assert len(calls) == 4 and calls[0][0] is None
    for (_, returned), (fed, _) in zip(calls[:-1], calls[1:], strict=True):
        assert torch.equal(fed, returned)  # the doubled guidance batch included
    generator = torch.Generator().manual_seed(0)
    plain = make_objective(objective, sampler).sample(
        small_random, shape, text, mask, null_text, null_mask, generator=generator, **kwargs
    )
    assert not torch.allclose(z, plain, atol=1e-4)
    assert torch.equal(run(), z)  # each run starts again from no latents
