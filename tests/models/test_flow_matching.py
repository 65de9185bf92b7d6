import pytest
import torch

from t2i.models.diffusion import guided_eps
from t2i.models.dit import DiT, DiTConfig
from t2i.models.flow_matching import (
    RectifiedFlowObjective,
    euler_sample,
    interpolate,
    shift_time,
    velocity,
)

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


def point_mass_field(x0: torch.Tensor):
    """The exact velocity E[ε − x0 | x_t] = (x_t − x0)/t when all data is the single point x0."""

    def model_fn(x_t, t, text, mask):
        repeat = x_t.shape[0] // x0.shape[0]  # CFG doubles the batch
        target = x0.repeat(repeat, 1, 1, 1).double()
        return ((x_t.double() - target) / t.double().view(-1, 1, 1, 1)).float()

    return model_fn


def gaussian_field(sigma: float):
    """Exact velocity for x0 ~ N(0, σ²I): x_t and v = ε − x0 are jointly Gaussian and centred, so
    E[v | x_t] = Cov(v, x_t)/Var(x_t)·x_t = (t − (1 − t)σ²) / ((1 − t)²σ² + t²)·x_t."""

    def model_fn(x_t, t, text, mask):
        t = t.double().view(-1, *([1] * (x_t.ndim - 1)))
        s2 = sigma**2
        gain = (t - (1 - t) * s2) / ((1 - t) ** 2 * s2 + t**2)
        return (gain * x_t.double()).float()

    return model_fn


# --- path and objective ----------------------------------------------------------------------------


def test_interpolation_endpoints_and_velocity():
    x0, eps = fixed_x0(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    assert torch.equal(interpolate(x0, torch.zeros(3), eps), x0)
    assert torch.equal(interpolate(x0, torch.ones(3), eps), eps)
    t = torch.tensor([0.0, 0.25, 0.9])
    x_t = interpolate(x0, t, eps)
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    # v is the time derivative of the straight path.
    dt = 1e-3
    slope = (interpolate(x0, t + dt, eps) - x_t) / dt
    torch.testing.assert_close(slope, velocity(x0, eps), atol=1e-3, rtol=0)


def test_logit_normal_t_statistics():
    t = RectifiedFlowObjective().sample_t(100_000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (100_000,)
    assert (t > 0).all() and (t < 1).all()
    assert abs(t.median().item() - 0.5) < 0.01
    logit = torch.logit(t.double())
    assert abs(logit.mean().item()) < 0.02 and abs(logit.std().item() - 1.0) < 0.02
    again = RectifiedFlowObjective().sample_t(100_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    shifted = RectifiedFlowObjective(logit_mean=1.0, logit_std=0.5).sample_t(
        100_000, generator=torch.Generator().manual_seed(0)
    )
    assert abs(shifted.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.01


def test_loss_of_oracle_velocity_is_zero():
    x0 = fixed_x0()
    text, mask, _, _ = text_inputs()

    def oracle(x_t, t, c, m):  # knows x0, hence ε = (x_t − (1 − t)·x0)/t and v = ε − x0 = (x_t − x0)/t
        return (x_t - x0) / t.view(-1, 1, 1, 1)

    loss, info = RectifiedFlowObjective().loss(
        oracle, x0, text, mask, generator=torch.Generator().manual_seed(4)
    )
    assert loss.item() < 1e-10
    assert info["t"].shape == (3,) and info["mse"].shape == (3,)


def test_loss_of_zero_model_is_mean_squared_velocity():
    x0 = 0.5 * torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    text, mask = torch.zeros(64, 1, 16), torch.ones(64, 1, dtype=torch.bool)
    loss, info = RectifiedFlowObjective().loss(
        lambda x, t, c, m: torch.zeros_like(x), x0, text, mask, eps=eps
    )
    torch.testing.assert_close(loss, ((eps - x0) ** 2).mean())
    torch.testing.assert_close(info["mse"], ((eps - x0) ** 2).flatten(1).mean(1))
    assert abs(loss.item() - 1.25) < 0.03  # E|ε − x0|² = 1 + σ² per element


def test_loss_uses_given_t_and_is_seeded():
    x0 = fixed_x0()
    text, mask, _, _ = text_inputs()
    objective = RectifiedFlowObjective()
    seen = {}

    def model_fn(x_t, t, c, m):
        seen["t"] = t
        return torch.zeros_like(x_t)

    t = torch.tensor([0.1, 0.5, 0.9])
    _, info = objective.loss(model_fn, x0, text, mask, t=t, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen["t"], t) and torch.equal(info["t"], t)
    first, _ = objective.loss(model_fn, x0, text, mask, generator=torch.Generator().manual_seed(5))
    second, _ = objective.loss(model_fn, x0, text, mask, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, second)


def test_loss_trains_a_tiny_dit():
    torch.manual_seed(0)
    model = DiT(DiTConfig(latent_size=8, width=32, depth=1, heads=2, text_dim=16))
    x0 = fixed_x0()
    text, mask, _, _ = text_inputs()
    loss, _ = RectifiedFlowObjective().loss(model, x0, text, mask, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# --- sampler -----------------------------------------------------------------------------------------


def test_shift_time_keeps_endpoints_and_moves_towards_noise():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(shift_time(t, 1.0), t)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] > t[1:-1]).all()
    assert (shifted.diff() > 0).all()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_recovers_a_point_mass(shift):
    x0 = fixed_x0()
    text, mask, _, _ = text_inputs()
    sample = euler_sample(
        point_mass_field(x0),
        SHAPE,
        text,
        mask,
        steps=10,
        generator=torch.Generator().manual_seed(0),
        shift=shift,
    )
    torch.testing.assert_close(sample, x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_euler_on_gaussian_data_has_the_data_std(sigma):
    """The exact field is linear in x, so Euler only rescales its starting noise: the samples' std over the
    noise's std must approach σ (first-order error ≈1.5/steps), free of sampling error."""
    shape = (4096, 1, 1, 1)
    text, mask = torch.zeros(shape[0], 1, 4), torch.ones(shape[0], 1, dtype=torch.bool)
    noise_std = torch.randn(shape, generator=torch.Generator().manual_seed(0)).std().item()

    def relative_error(steps):
        sample = euler_sample(
            gaussian_field(sigma), shape, text, mask, steps=steps, generator=torch.Generator().manual_seed(0)
        )
        assert abs(sample.mean().item()) < 0.05 * sigma
        return abs(sample.std().item() / noise_std / sigma - 1.0)

    fine, coarse = relative_error(200), relative_error(50)
    assert fine < 0.01 and coarse < 0.04
    assert fine < coarse / 3


def tiny_dit() -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(latent_size=8, width=32, depth=1, heads=2, text_dim=16)).eval()
    with torch.no_grad():  # the output layer is zero-initialised; randomise so the text matters
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_cfg_scale_one_equals_the_conditional_model():
    model = tiny_dit()
    text, mask, null_text, null_mask = text_inputs()

    def sample(null_text, null_mask, scale):
        return euler_sample(
            model, SHAPE, text, mask, null_text, null_mask, steps=4, guidance_scale=scale,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    alone = sample(None, None, 1.0)
    torch.testing.assert_close(sample(null_text, null_mask, 1.0), alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sample(null_text, null_mask, 4.0), alone, atol=1e-3)


def test_cfg_extrapolates_from_the_unconditional_velocity():
    text, mask, null_text, null_mask = text_inputs()

    def model_fn(x, t, c, m):  # velocity = mean of the real tokens, so cond and null differ
        mean = (c * m[..., None]).sum((1, 2)) / m.sum(1).clamp_min(1)
        return torch.ones_like(x) * mean.view(-1, 1, 1, 1)

    x, t = torch.zeros(SHAPE), torch.full((3,), 0.5)
    v_c = model_fn(x, t, text, mask)
    v_u = model_fn(x, t, null_text.expand(3, -1, -1), null_mask.expand(3, -1))
    v = guided_eps(model_fn, x, t, text, mask, null_text, null_mask, 4.0)
    torch.testing.assert_close(v, v_u + 4.0 * (v_c - v_u))
    sample = euler_sample(
        model_fn,
        SHAPE,
        text,
        mask,
        null_text,
        null_mask,
        steps=3,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
    )
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample, start - (v_u + 4.0 * (v_c - v_u)))
