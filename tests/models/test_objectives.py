"""The objectives (`t2i.models.objectives`): each noise path, loss and time law, each sampler against data
whose exact prediction is known in closed form, classifier-free guidance, and the sampler names."""

import pytest
import torch

from t2i.models.dit import DiT, DiTConfig
from t2i.models.ema import EMA
from t2i.models.objectives import Epsilon, RectifiedFlow, guide, objective

SHAPE = (3, 4, 8, 8)


def fixed_x0() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


def text_inputs(batch=3, length=5):
    generator = torch.Generator().manual_seed(2)
    text = torch.randn(batch, length, 16, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 3:] = False
    null_text = torch.randn(1, 1, 16, generator=generator)
    null_mask = torch.ones(1, 1, dtype=torch.bool)
    return text, mask, null_text, null_mask


def tiny_dit() -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(latent_size=8, width=32, depth=1, heads=2, text_dim=16)).eval()
    with torch.no_grad():  # the output layer is zero-initialised; randomise so the text matters
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def eps_oracle(x0: torch.Tensor):
    """The exact ε that takes x0 to x_t, whatever the text."""

    def model_fn(x_t, t, text, mask):
        g = Epsilon.gamma(t).view(-1, 1, 1, 1).double()
        repeat = x_t.shape[0] // x0.shape[0]  # CFG doubles the batch
        target = x0.repeat(repeat, 1, 1, 1).double()
        return ((x_t.double() - g.sqrt() * target) / (1 - g).sqrt()).float()

    return model_fn


def velocity_oracle(x0: torch.Tensor):
    """The exact velocity E[ε − x0 | x_t] = (x_t − x0)/t when all data is the single point x0."""

    def model_fn(x_t, t, text, mask):
        repeat = x_t.shape[0] // x0.shape[0]
        target = x0.repeat(repeat, 1, 1, 1).double()
        return ((x_t.double() - target) / t.double().view(-1, 1, 1, 1)).float()

    return model_fn


def text_dependent_model(x, t, text, mask):
    pooled = (text * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    return 0.5 * x + pooled[:, :4, None, None] * (1 - t).view(-1, 1, 1, 1)


# --- the paper's ε objective ---------------------------------------------------------------------------


def test_epsilon_path_endpoints():
    x0, eps = fixed_x0(), torch.randn(SHAPE)
    assert torch.equal(Epsilon().noisy(x0, torch.zeros(3), eps), x0)
    assert torch.equal(Epsilon().noisy(x0, torch.ones(3), eps), eps)
    near_one = Epsilon().noisy(x0, torch.full((3,), 1 - 1e-6), eps)  # √γ = 1e-3
    assert (near_one - eps).abs().max() <= 1.1e-3 * x0.abs().max() + 1e-5


def test_epsilon_path_is_per_sample_and_variance_preserving():
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 20000), torch.randn(4, 20000)
    x_t = Epsilon().noisy(x0, torch.tensor([0.0, 0.3, 0.7, 1.0]), eps)
    torch.testing.assert_close(x_t[1], 0.7**0.5 * x0[1] + 0.3**0.5 * eps[1])
    torch.testing.assert_close(x_t.var(dim=1), torch.ones(4), atol=0.05, rtol=0)


def test_epsilon_t_is_uniform_inside_the_open_interval():
    t = Epsilon().sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,)
    assert (t > 0).all() and (t < 1).all()
    assert abs(t.mean().item() - 0.5) < 0.01
    assert abs((t < 0.4).float().mean().item() - 0.4) < 0.02
    assert torch.equal(t, Epsilon().sample_t(20000, generator=torch.Generator().manual_seed(0)))


def test_epsilon_loss_of_a_zero_model_is_about_one():
    x0 = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text, mask = torch.zeros(64, 1, 16), torch.ones(64, 1, dtype=torch.bool)
    zero = lambda x, t, c, m: torch.zeros_like(x)  # noqa: E731
    loss, info = Epsilon().loss(zero, x0, text, mask, generator=torch.Generator().manual_seed(1))
    assert abs(loss.item() - 1.0) < 0.03
    assert info["t"].shape == (64,) and info["mse"].shape == (64,)
    torch.testing.assert_close(info["mse"].mean(), loss)


def test_epsilon_loss_of_the_oracle_is_zero_and_the_model_sees_the_noisy_input():
    x0 = fixed_x0()
    text, mask, _, _ = text_inputs()
    seen = {}

    def spy(x_t, t, c, m):
        seen["x_t"], seen["t"] = x_t, t
        return eps_oracle(x0)(x_t, t, c, m)

    t, eps = torch.tensor([0.2, 0.5, 0.9]), torch.randn(SHAPE)
    loss, info = Epsilon().loss(spy, x0, text, mask, t=t, eps=eps)
    assert loss.item() < 1e-8
    assert torch.equal(seen["t"], t) and torch.equal(info["t"], t)
    torch.testing.assert_close(seen["x_t"], Epsilon().noisy(x0, t, eps))


def test_epsilon_loss_reads_only_the_first_channels_of_a_learn_sigma_output():
    x0 = fixed_x0()
    text, mask, _, _ = text_inputs()

    def sigma_model(x, t, c, m):  # perfect ε, garbage variance channels
        return torch.cat([eps_oracle(x0)(x, t, c, m), torch.full_like(x, 100.0)], dim=1)

    loss, _ = Epsilon().loss(sigma_model, x0, text, mask, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-6


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_ddim_and_ddpm_with_the_oracle_recover_x0(sampler, guidance_scale):
    x0 = fixed_x0()
    text, mask, null_text, null_mask = text_inputs()
    generator = torch.Generator().manual_seed(0)
    out = Epsilon(sampler).sample(
        eps_oracle(x0), SHAPE, text, mask, null_text, null_mask, 10, guidance_scale, generator
    )
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_ddim_and_ddpm_reproduce_a_gaussian_data_distribution(sampler):
    """For x0 ~ N(0, s²) the optimal ε̂ is known in closed form; samples must come out with std s."""
    s = 0.5

    def gaussian_eps(x, t, text, mask):
        g = Epsilon.gamma(t).view(-1, 1, 1, 1)
        return (1 - g).sqrt() * x / (g * s * s + 1 - g)

    text, mask = torch.zeros(2048, 1, 4), torch.ones(2048, 1, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    out = Epsilon(sampler).sample(gaussian_eps, (2048, 1, 1, 1), text, mask, steps=250, generator=generator)
    assert abs(out.std().item() - s) < 0.06 * s
    assert abs(out.mean().item()) < 0.05


def test_samplers_are_reproducible_and_ddpm_is_stochastic():
    text, mask, null_text, null_mask = text_inputs()

    def run(sampler, seed):
        generator = torch.Generator().manual_seed(seed)
        return Epsilon(sampler).sample(
            text_dependent_model, SHAPE, text, mask, null_text, null_mask, 5, 2.0, generator
        )

    assert torch.equal(run("ddim", 0), run("ddim", 0))
    assert torch.equal(run("ddpm", 0), run("ddpm", 0))
    assert not torch.allclose(run("ddpm", 0), run("ddim", 0))


def test_clamp_x0_bounds_the_estimate_the_ddim_step_moves_towards():
    x, t_now, t_next = torch.full(SHAPE, 3.0), torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.0)
    eps = torch.zeros(SHAPE)  # x0 estimate = x / √γ = 3 / √0.5 ≈ 4.24
    assert Epsilon().step(x, eps, t_now, t_next).max() > 4
    assert torch.equal(Epsilon(clamp_x0=1.0).step(x, eps, t_now, t_next), torch.ones(SHAPE))


def test_clamp_x0_recomputes_the_noise_from_the_clamped_estimate():
    """Half-way down, x_next = √γ' x̂0 + √(1 − γ') ε̂ with ε̂ = (x − √γ x̂0)/√(1 − γ) and x̂0 clamped."""
    x = torch.full(SHAPE, 3.0)
    t_now, t_next = torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64)
    g, g_next = 0.5, 0.75
    eps_hat = (3.0 - g**0.5 * 1.0) / (1 - g) ** 0.5
    expected = torch.full(SHAPE, g_next**0.5 * 1.0 + (1 - g_next) ** 0.5 * eps_hat)
    torch.testing.assert_close(Epsilon(clamp_x0=1.0).step(x, torch.zeros(SHAPE), t_now, t_next), expected)


def test_gamma_min_grid_is_the_papers_linear_schedule_from_pure_noise():
    """γ_i = max(i/N, gamma_min), with t = 1 − i/N rounded as the paper's float32 grid; t_start unused."""
    times = Epsilon(gamma_min=1e-9, t_start=0.5).times(10)
    assert times.dtype == torch.float64 and len(times) == 11
    assert abs(float(Epsilon.gamma(times[0])) - 1e-9) < 1e-15  # pure noise, γ floored
    steps32 = 1 - torch.arange(11, dtype=torch.float32) / 10
    assert torch.equal(times[1:], steps32[1:].double())
    assert times[-1] == 0
    # A floor above the first steps' γ holds them at 1 − gamma_min.
    coarse = Epsilon(gamma_min=0.25).times(10)
    assert torch.equal(coarse[:3], torch.full((3,), 0.75, dtype=torch.float64))
    # The default grid is unchanged: t_start down to 0.
    torch.testing.assert_close(Epsilon().times(4), torch.linspace(1 - 1e-3, 0, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="gamma_min"):
        Epsilon(gamma_min=0.0)
    with pytest.raises(ValueError, match="clamp_x0"):
        Epsilon(clamp_x0=-1.0)


def test_unguided_steps_call_the_conditional_model_alone_then_guide():
    text, mask, null_text, null_mask = text_inputs()
    calls = []

    def model_fn(x, t, c, m):
        calls.append(x.shape[0])
        return text_dependent_model(x, t, c, m)

    def run(unguided):
        calls.clear()
        generator = torch.Generator().manual_seed(0)
        out = Epsilon().sample(
            model_fn, SHAPE, text, mask, null_text, null_mask, 4, 3.0, generator, unguided_steps=unguided
        )
        return out, list(calls)

    guided, guided_calls = run(0)
    first, first_calls = run(1)
    assert guided_calls == [6, 6, 6, 6] and first_calls == [3, 6, 6, 6]
    assert not torch.allclose(first, guided, atol=1e-4)
    all_alone, _ = run(
        4
    )  # every step unguided: the conditional model alone, as guidance scale 1 without null
    generator = torch.Generator().manual_seed(0)
    alone = Epsilon().sample(model_fn, SHAPE, text, mask, None, None, 4, 3.0, generator)
    assert torch.equal(all_alone, alone)
    with pytest.raises(ValueError, match="unguided_steps"):
        run(-1)


def test_guide_tells_branch_aware_callables_which_rows_are_conditional():
    text, mask, null_text, null_mask = text_inputs()
    seen = []

    class Aware:
        branch_aware = True

        def __call__(self, x, t, c, m, conditional):
            seen.append(conditional.tolist())
            return text_dependent_model(x, t, c, m)

    x, t = torch.randn(SHAPE), torch.rand(3)
    guided = guide(Aware(), x, t, text, mask, null_text, null_mask, 3.0)
    guide(Aware(), x, t, text, mask, None, None, 3.0)
    assert seen == [[False] * 3 + [True] * 3, [True] * 3]
    torch.testing.assert_close(
        guided, guide(text_dependent_model, x, t, text, mask, null_text, null_mask, 3.0)
    )


def test_one_unconditional_text_per_sample():
    """Per-sample unconditional prompts (the paper's random words): each row is guided by its own."""
    text, mask, _, _ = text_inputs()
    generator = torch.Generator().manual_seed(5)
    null_text, null_mask = torch.randn(3, 2, 16, generator=generator), torch.ones(3, 2, dtype=torch.bool)
    x, t = torch.randn(SHAPE), torch.rand(3)
    both = guide(text_dependent_model, x, t, text, mask, null_text, null_mask, 2.0)
    for i in range(3):
        one = guide(
            text_dependent_model,
            x[i : i + 1],
            t[i : i + 1],
            text[i : i + 1],
            mask[i : i + 1],
            null_text[i : i + 1],
            null_mask[i : i + 1],
            2.0,
        )
        torch.testing.assert_close(both[i : i + 1], one)


# --- rectified flow ----------------------------------------------------------------------------------


def test_flow_path_endpoints_and_velocity():
    flow, x0 = RectifiedFlow(), fixed_x0()
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    assert torch.equal(flow.noisy(x0, torch.zeros(3), eps), x0)
    assert torch.equal(flow.noisy(x0, torch.ones(3), eps), eps)
    t = torch.tensor([0.0, 0.25, 0.9])
    x_t = flow.noisy(x0, t, eps)
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    slope = (flow.noisy(x0, t + 1e-3, eps) - x_t) / 1e-3  # the target is the path's time derivative
    torch.testing.assert_close(slope, flow.target(x0, eps), atol=1e-3, rtol=0)


def test_flow_t_is_logit_normal():
    t = RectifiedFlow().sample_t(100_000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (100_000,)
    assert (t > 0).all() and (t < 1).all()
    assert abs(t.median().item() - 0.5) < 0.01
    logit = torch.logit(t.double())
    assert abs(logit.mean().item()) < 0.02 and abs(logit.std().item() - 1.0) < 0.02
    assert torch.equal(t, RectifiedFlow().sample_t(100_000, generator=torch.Generator().manual_seed(0)))
    shifted = RectifiedFlow(logit_mean=1.0, logit_std=0.5).sample_t(
        100_000, generator=torch.Generator().manual_seed(0)
    )
    assert abs(shifted.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.01


def test_flow_loss_of_the_oracle_is_zero():
    x0 = fixed_x0()
    text, mask, _, _ = text_inputs()
    loss, info = RectifiedFlow().loss(
        velocity_oracle(x0), x0, text, mask, generator=torch.Generator().manual_seed(4)
    )
    assert loss.item() < 1e-10
    assert info["t"].shape == (3,) and info["mse"].shape == (3,)


def test_flow_loss_of_a_zero_model_is_the_mean_squared_velocity():
    x0 = 0.5 * torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    text, mask = torch.zeros(64, 1, 16), torch.ones(64, 1, dtype=torch.bool)
    loss, info = RectifiedFlow().loss(lambda x, t, c, m: torch.zeros_like(x), x0, text, mask, eps=eps)
    torch.testing.assert_close(loss, ((eps - x0) ** 2).mean())
    torch.testing.assert_close(info["mse"], ((eps - x0) ** 2).flatten(1).mean(1))
    assert abs(loss.item() - 1.25) < 0.03  # E|ε − x0|² = 1 + σ² per element


def test_flow_loss_uses_the_given_t_and_is_seeded():
    x0 = fixed_x0()
    text, mask, _, _ = text_inputs()
    seen = {}

    def model_fn(x_t, t, c, m):
        seen["t"] = t
        return torch.zeros_like(x_t)

    t = torch.tensor([0.1, 0.5, 0.9])
    _, info = RectifiedFlow().loss(model_fn, x0, text, mask, t=t, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen["t"], t) and torch.equal(info["t"], t)
    first, _ = RectifiedFlow().loss(model_fn, x0, text, mask, generator=torch.Generator().manual_seed(5))
    second, _ = RectifiedFlow().loss(model_fn, x0, text, mask, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, second)


def test_the_shift_keeps_the_endpoints_and_moves_the_grid_towards_noise():
    uniform = RectifiedFlow().times(10)
    assert torch.equal(uniform, torch.linspace(1, 0, 11, dtype=torch.float64))
    shifted = RectifiedFlow(shift=3.0).times(10)
    assert shifted[0] == 1 and shifted[-1] == 0
    assert (shifted[1:-1] > uniform[1:-1]).all()
    assert (shifted.diff() < 0).all()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_recovers_a_point_mass(shift):
    x0 = fixed_x0()
    text, mask, _, _ = text_inputs()
    generator = torch.Generator().manual_seed(0)
    sample = RectifiedFlow(shift=shift).sample(
        velocity_oracle(x0), SHAPE, text, mask, steps=10, generator=generator
    )
    torch.testing.assert_close(sample, x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_euler_on_gaussian_data_has_the_data_std(sigma):
    """For x0 ~ N(0, σ²I), x_t and v = ε − x0 are jointly Gaussian and centred, so the exact field
    E[v | x_t] = (t − (1 − t)σ²) / ((1 − t)²σ² + t²)·x_t is linear in x and Euler only rescales its starting
    noise: the samples' std over the noise's std must approach σ (first-order error ≈1.5/steps)."""

    def field(x_t, t, text, mask):
        t = t.double().view(-1, 1, 1, 1)
        return ((t - (1 - t) * sigma**2) / ((1 - t) ** 2 * sigma**2 + t**2) * x_t.double()).float()

    shape = (4096, 1, 1, 1)
    text, mask = torch.zeros(shape[0], 1, 4), torch.ones(shape[0], 1, dtype=torch.bool)
    noise_std = torch.randn(shape, generator=torch.Generator().manual_seed(0)).std().item()

    def relative_error(steps):
        generator = torch.Generator().manual_seed(0)
        sample = RectifiedFlow().sample(field, shape, text, mask, steps=steps, generator=generator)
        assert abs(sample.mean().item()) < 0.05 * sigma
        return abs(sample.std().item() / noise_std / sigma - 1.0)

    fine, coarse = relative_error(200), relative_error(50)
    assert fine < 0.01 and coarse < 0.04
    assert fine < coarse / 3


def test_the_flow_loss_trains_a_tiny_dit():
    torch.manual_seed(0)
    model = DiT(DiTConfig(latent_size=8, width=32, depth=1, heads=2, text_dim=16))
    text, mask, _, _ = text_inputs()
    loss, _ = RectifiedFlow().loss(model, fixed_x0(), text, mask, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# --- classifier-free guidance, for both ---------------------------------------------------------------


def test_guide_on_a_doubled_batch_equals_separate_calls_on_a_dit():
    model = tiny_dit()
    text, mask, null_text, null_mask = text_inputs()
    x, t = torch.randn(SHAPE), torch.rand(3)
    with torch.no_grad():
        conditional = model(x, t, text, mask)
        unconditional = model(x, t, null_text.expand(3, -1, -1), null_mask.expand(3, -1))
        guided = guide(model, x, t, text, mask, null_text, null_mask, 3.0)
    torch.testing.assert_close(
        guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("name", ["epsilon", "rectified_flow"])
def test_guidance_scale_one_equals_the_conditional_model_alone(name):
    model = tiny_dit()
    text, mask, null_text, null_mask = text_inputs()

    def sample(null_text, null_mask, scale):
        generator = torch.Generator().manual_seed(0)
        return objective(name).sample(model, SHAPE, text, mask, null_text, null_mask, 4, scale, generator)

    alone = sample(None, None, 1.0)
    torch.testing.assert_close(sample(null_text, null_mask, 1.0), alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sample(null_text, null_mask, 4.0), alone, atol=1e-3)


def test_euler_steps_along_the_guided_velocity():
    text, mask, null_text, null_mask = text_inputs()

    def model_fn(x, t, c, m):  # velocity = mean of the real tokens, so cond and null differ
        mean = (c * m[..., None]).sum((1, 2)) / m.sum(1).clamp_min(1)
        return torch.ones_like(x) * mean.view(-1, 1, 1, 1)

    v_c = model_fn(torch.zeros(SHAPE), None, text, mask)
    v_u = model_fn(torch.zeros(SHAPE), None, null_text.expand(3, -1, -1), null_mask.expand(3, -1))
    generator = torch.Generator().manual_seed(0)
    sample = RectifiedFlow().sample(model_fn, SHAPE, text, mask, null_text, null_mask, 3, 4.0, generator)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample, start - (v_u + 4.0 * (v_c - v_u)))


def test_the_loss_and_the_sampler_drive_a_tiny_dit_with_ema():
    """Smoke test of the intended loop: loss, step, EMA, sample from the EMA copy."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(latent_size=8, width=32, depth=1, heads=2, text_dim=16))
    ema = EMA(model, decay=0.9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    text, mask, null_text, null_mask = text_inputs()
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        loss, _ = Epsilon().loss(model, fixed_x0(), text, mask, generator=generator)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    ema.copy_to(model)
    out = Epsilon().sample(model.eval(), SHAPE, text, mask, null_text, null_mask, steps=3, guidance_scale=4.0)
    assert out.shape == SHAPE and torch.isfinite(out).all()


# --- names --------------------------------------------------------------------------------------------


def test_the_factory_resolves_auto_and_refuses_a_sampler_of_the_other_objective():
    assert objective("epsilon") == Epsilon(sampler="ddim")
    assert objective("epsilon", "ddpm", clamp_x0=2.0) == Epsilon(sampler="ddpm", clamp_x0=2.0)
    assert objective("rectified_flow", "auto", shift=3.0) == RectifiedFlow(sampler="euler", shift=3.0)
    with pytest.raises(
        ValueError, match=r"evaluate.sampler: 'euler' does not fit a epsilon model; allowed: auto, ddim, ddpm"
    ):
        objective("epsilon", "euler")
    with pytest.raises(ValueError, match="allowed: auto, euler"):
        objective("rectified_flow", "ddim")
    with pytest.raises(
        ValueError, match="evaluate.clamp_x0: not an option of a rectified_flow model.s sampler"
    ):
        objective("rectified_flow", clamp_x0=1.2)
