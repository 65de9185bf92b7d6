"""CAD-I (`t2i.models.cad`): shapes and crops, the text mask, self-conditioning and its training pass,
coherence, every parameter taking part, sizes, and sampling with the latents carried from step to step.
Equality with the paper's own network is in test_cad_official.py."""

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
    read_write_heads=2,
    text_dim=TEXT_DIM,
    num_registers=4,
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
        size, width=16 * heads, data_width=16, num_latents=4, blocks=1, layers_per_block=1, text_dim=TEXT_DIM
    )
    x, t, text, mask = inputs(height=8, width=12)
    assert randomized(model)(x, t, text, mask).shape == (2, 4, 8, 12)


def test_crop_uses_the_top_left_of_the_position_table(small_random):
    # A crop is a smaller image, not a window: same output as a model whose table is the full table's corner.
    x, t, text, mask = inputs(height=8, width=8)
    out = small_random(x, t, text, mask)
    other = copy.deepcopy(small_random)
    side = SMALL.latent_size // SMALL.patch_size
    table = other.pos_embed.data.view(side, side, -1)  # (grid², width) rows in row-major grid order
    table[4:] += 1.0
    table[:, 4:] += 1.0
    assert torch.equal(other(x, t, text, mask), out)
    table[3, 0] += 1.0
    assert not torch.equal(other(x, t, text, mask), out)


def test_bad_grids_are_rejected(small):
    x, t, text, mask = inputs(height=18, width=16)
    with pytest.raises(ValueError, match="exceeds"):
        small(x, t, text, mask)
    x, t, text, mask = inputs(height=15, width=16)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        small(x, t, text, mask)


def test_initialisation_is_the_papers(small):
    """Xavier linears with zero biases, truncated N(0, 0.02) tables, layer scale 0.1 in the text tower;
    the output layer is not zeroed, so the untrained model already predicts something."""
    x, t, text, mask = inputs()
    assert torch.count_nonzero(small(x, t, text, mask)) > 0
    assert torch.count_nonzero(small.blocks[0].read.attn.q.bias) == 0
    for table in (small.pos_embed, small.latents, small.text_tower.registers):
        assert table.abs().max() <= 0.04 and table.std() > 0.01
    assert torch.equal(small.text_tower.layers[0].scale_attn, torch.full((SMALL.width,), 0.1))
    bound = (6 / (SMALL.width + SMALL.width)) ** 0.5
    assert small.blocks[0].cond_read.attn.q.weight.abs().max() <= bound


def test_self_conditioning_starts_as_an_exact_no_op(small):
    x, t, text, mask = inputs()
    prev = torch.randn(2, SMALL.num_latents, SMALL.width)
    out, plain = small(x, t, text, mask, return_latents=True)
    conditioned_out, conditioned = small(x, t, text, mask, latents_prev=prev, return_latents=True)
    assert torch.equal(conditioned, plain) and torch.equal(conditioned_out, out)


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
    for _ in range(3):  # the zero-initialised outer self-conditioning LayerNorm first, then its MLP
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
    other_time = copy.deepcopy(small_random)  # and to the time token, which is always real too
    with torch.no_grad():
        other_time.time_embedder.mlp[2].bias.add_(1.0)
    assert not torch.allclose(other_time(x, t, text, mask)[0], out[0], atol=1e-5)


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
        zeroed.self_cond.norm_out.weight.zero_()
        zeroed.self_cond.norm_out.bias.zero_()
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


# The official networks' trainable parameter counts (RINTextCond; CADRINTextCond adds its coherence
# embedder and token).
@pytest.mark.parametrize(
    ("size", "coherence", "expected"),
    [("base", False, 188_372_752), ("L", False, 330_235_152), ("L", True, 331_548_944)],
)
def test_parameter_counts_are_the_papers(size, coherence, expected):
    with torch.device("meta"):
        model = build_cad(size, coherence=coherence)
    assert model.config.latent_size == 32 and model.config.patch_size == 2 and model.config.text_dim == 2048
    assert count_parameters(model) == expected


def test_config_and_size_validation():
    with pytest.raises(KeyError, match="unknown CAD size"):
        build_cad("XXL")
    with pytest.raises(ValueError, match=r"width 32 is not divisible by heads \(5\)"):
        replace(SMALL, heads=5)
    with pytest.raises(ValueError, match=r"min\(width, data_width\) 18 is not divisible by read_write_heads"):
        replace(SMALL, data_width=18, read_write_heads=4)
    with pytest.raises(ValueError, match="text tower's heads"):
        replace(SMALL, width=40, heads=4)
    with pytest.raises(ValueError, match="the text is unused"):
        replace(SMALL, cond_per_block=False)
    with pytest.raises(ValueError, match="num_cond_tokens"):
        replace(SMALL, cond_in_latents=True, num_cond_tokens=7)


def test_coherence_is_one_unless_given_and_conditions_the_output():
    torch.manual_seed(0)
    model = randomized(CAD(replace(SMALL, coherence=True)).eval())
    x, t, text, mask = inputs()
    out = model(x, t, text, mask)
    assert torch.equal(model(x, t, text, mask, coherence=1.0), out)
    assert torch.equal(model(x, t, text, mask, coherence=torch.ones(2)), out)
    mixed = model(x, t, text, mask, coherence=torch.tensor([1.0, 0.0]))
    assert torch.equal(mixed[0], out[0]) and not torch.allclose(mixed[1], out[1], atol=1e-4)


def test_conditioning_in_the_latents_needs_the_text_length_it_was_built_for():
    """cond_in_latents (the official option): the time token, registers and text join the learned latents,
    num_latents in all, so the text has one length."""
    config = replace(SMALL, num_latents=16, cond_in_latents=True, cond_per_block=False, num_cond_tokens=10)
    torch.manual_seed(0)
    model = randomized(CAD(config))
    assert model.latents.shape == (16 - 10 - 1, SMALL.width)
    x, t, text, mask = inputs(length=6)  # 4 registers + 6 tokens = num_cond_tokens
    out, latents = model(x, t, text, mask, return_latents=True)
    assert out.shape == x.shape and latents.shape == (2, 16, SMALL.width)
    x, t, text, mask = inputs(length=5, real=(5, 3))
    with pytest.raises(ValueError, match="the text must be 6 tokens long"):
        model(x, t, text, mask)


@pytest.mark.parametrize(
    "overrides", [{"coherence": True}, {"cond_in_latents": True, "num_latents": 16, "num_cond_tokens": 10}]
)
def test_every_parameter_takes_part_in_the_variants(overrides):
    model = randomized(CAD(replace(SMALL, **overrides))).train()
    x, t, text, mask = inputs()
    out = model(x, t, text, mask, latents_prev=torch.randn(2, model.config.num_latents, SMALL.width))
    out.square().mean().backward()
    starved = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert starved == []


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
        assert fed.shape[0] == 4
    generator = torch.Generator().manual_seed(0)
    plain = make_objective(objective, sampler).sample(
        small_random, shape, text, mask, null_text, null_mask, generator=generator, **kwargs
    )
    assert not torch.allclose(z, plain, atol=1e-4)
    assert torch.equal(run(), z)  # each run starts again from no latents


def test_an_unguided_first_step_feeds_its_latents_to_both_branches_and_coherence_splits_them():
    """The paper's sampler: step 0 runs the conditional rows alone (coherence 1); its latents then feed the
    unconditional and the conditional half, which carry their own from there (coherence 0 and 1)."""
    from t2i.models.architectures import sample_latents

    torch.manual_seed(0)
    model = randomized(CAD(replace(SMALL, coherence=True)).eval())
    _, _, text, mask = inputs()
    null_text, null_mask = torch.randn(2, 3, TEXT_DIM), torch.ones(2, 3, dtype=torch.bool)
    calls = []

    def record(module, args, call_kwargs, output):
        calls.append((call_kwargs["latents_prev"], call_kwargs["coherence"].tolist(), output[1].clone()))

    handle = model.register_forward_hook(record, with_kwargs=True)
    try:
        sample_latents(
            "epsilon",
            "ddim",
            model,
            (2, 4, 16, 16),
            text,
            mask,
            null_text,
            null_mask,
            steps=3,
            guidance_scale=16.0,
            unguided_steps=1,
            clamp_x0=1.2,
            gamma_min=1e-9,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    assert [coherence for _, coherence, _ in calls] == [[1.0, 1.0]] + [[0.0, 0.0, 1.0, 1.0]] * 2
    assert calls[0][0] is None
    assert torch.equal(calls[1][0], torch.cat([calls[0][2], calls[0][2]]))
    assert torch.equal(calls[2][0], calls[1][2])


def test_a_run_of_an_older_layout_is_refused_by_its_unknown_fields():
    from t2i.models.architectures import denoiser_from_config

    fields = {**SMALL.__dict__}
    model = denoiser_from_config("cad", fields)
    assert model.config == SMALL
    with pytest.raises(ValueError, match="does not know: data_heads, text_layers"):
        denoiser_from_config("cad", {**fields, "data_heads": 2, "text_layers": 2})
