import pytest
import torch

from t2i.models.diffusion import (
    EpsilonObjective,
    add_noise,
    ddim_sample,
    ddpm_sample,
    gamma,
    guided_eps,
)
from t2i.models.dit import DiT, DiTConfig
from t2i.models.ema import EMA

SHAPE = (3, 4, 8, 8)


def fixed_x0() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


def oracle(x0: torch.Tensor):
    """Returns the exact ε that takes x0 to x_t, whatever the text."""

    def model_fn(x_t, t, text, mask):
        g = gamma(t).view(-1, 1, 1, 1).double()
        repeat = x_t.shape[0] // x0.shape[0]  # CFG doubles the batch
        target = x0.repeat(repeat, 1, 1, 1).double()
        return ((x_t.double() - g.sqrt() * target) / (1 - g).sqrt()).float()

    return model_fn


def text_inputs(batch=3, length=5):
    generator = torch.Generator().manual_seed(2)
    text = torch.randn(batch, length, 16, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 3:] = False
    null_text = torch.randn(1, 1, 16, generator=generator)
    null_mask = torch.ones(1, 1, dtype=torch.bool)
    return text, mask, null_text, null_mask


# --- noise process and objective -------------------------------------------------------------------


def test_add_noise_endpoints():
    x0, eps = fixed_x0(), torch.randn(SHAPE)
    assert torch.equal(add_noise(x0, torch.zeros(3), eps), x0)
    assert torch.equal(add_noise(x0, torch.ones(3), eps), eps)
    near_one = add_noise(x0, torch.full((3,), 1 - 1e-6), eps)  # √γ = 1e-3
    assert (near_one - eps).abs().max() <= 1.1e-3 * x0.abs().max() + 1e-5


def test_add_noise_is_per_sample_and_variance_preserving():
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 20000), torch.randn(4, 20000)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    x_t = add_noise(x0, t, eps)
    torch.testing.assert_close(x_t[1], 0.7**0.5 * x0[1] + 0.3**0.5 * eps[1])
    torch.testing.assert_close(x_t.var(dim=1), torch.ones(4), atol=0.05, rtol=0)


def test_sample_t_is_uniform_inside_open_interval():
    objective = EpsilonObjective()
    t = objective.sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,)
    assert (t > 0).all() and (t < 1).all()
    assert abs(t.mean().item() - 0.5) < 0.01
    assert abs((t < 0.4).float().mean().item() - 0.4) < 0.02
    again = objective.sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_loss_of_zero_model_is_about_one():
    x0 = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text, mask = torch.zeros(64, 1, 16), torch.ones(64, 1, dtype=torch.bool)
    loss, info = EpsilonObjective().loss(
        lambda x, t, c, m: torch.zeros_like(x), x0, text, mask, generator=torch.Generator().manual_seed(1)
    )
    assert abs(loss.item() - 1.0) < 0.03
    assert info["t"].shape == (64,) and info["mse"].shape == (64,)
    torch.testing.assert_close(info["mse"].mean(), loss)


def test_loss_of_oracle_is_zero_and_passes_model_the_noisy_input():
    x0 = fixed_x0()
    text, mask, _, _ = text_inputs()
    seen = {}

    def spy(x_t, t, c, m):
        seen["x_t"], seen["t"] = x_t, t
        return oracle(x0)(x_t, t, c, m)

    t, eps = torch.tensor([0.2, 0.5, 0.9]), torch.randn(SHAPE)
    loss, info = EpsilonObjective().loss(spy, x0, text, mask, t=t, eps=eps)
    assert loss.item() < 1e-8
    assert torch.equal(seen["t"], t) and torch.equal(info["t"], t)
    torch.testing.assert_close(seen["x_t"], add_noise(x0, t, eps))


def test_loss_uses_only_eps_channels_of_learn_sigma_output():
    x0 = fixed_x0()
    text, mask, _, _ = text_inputs()

    def sigma_model(x, t, c, m):  # perfect ε, garbage variance channels
        return torch.cat([oracle(x0)(x, t, c, m), torch.full_like(x, 100.0)], dim=1)

    loss, _ = EpsilonObjective().loss(sigma_model, x0, text, mask, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-6


# --- samplers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_sampler_with_oracle_recovers_x0(sampler, guidance_scale):
    x0 = fixed_x0()
    text, mask, null_text, null_mask = text_inputs()
    sample = ddim_sample if sampler == "ddim" else ddpm_sample
    out = sample(
        oracle(x0),
        SHAPE,
        text,
        mask,
        null_text,
        null_mask,
        steps=10,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def text_dependent_model(x, t, text, mask):
    pooled = (text * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    return 0.5 * x + pooled[:, :4, None, None] * (1 - t).view(-1, 1, 1, 1)


def test_cfg_scale_one_equals_conditional_model_alone():
    text, mask, null_text, null_mask = text_inputs()
    kwargs = {"steps": 8, "guidance_scale": 1.0}
    guided = ddim_sample(
        text_dependent_model, SHAPE, text, mask, null_text, null_mask,
        generator=torch.Generator().manual_seed(0), **kwargs,
    )  # fmt: skip
    alone = ddim_sample(
        text_dependent_model,
        SHAPE,
        text,
        mask,
        None,
        None,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    torch.testing.assert_close(guided, alone, atol=1e-5, rtol=1e-5)
    stronger = ddim_sample(
        text_dependent_model, SHAPE, text, mask, null_text, null_mask,
        generator=torch.Generator().manual_seed(0), steps=8, guidance_scale=4.0,
    )  # fmt: skip
    assert not torch.allclose(stronger, alone, atol=1e-3)


def test_guided_eps_doubled_batch_matches_separate_calls_on_dit():
    torch.manual_seed(0)
    model = DiT(DiTConfig(latent_size=8, width=32, depth=1, heads=2, text_dim=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    text, mask, null_text, null_mask = text_inputs()
    x, t = torch.randn(SHAPE), torch.rand(3)
    with torch.no_grad():
        eps_c = model(x, t, text, mask)
        eps_u = model(x, t, null_text.expand(3, -1, -1), null_mask.expand(3, -1))
        guided = guided_eps(model, x, t, text, mask, null_text, null_mask, 3.0)
    torch.testing.assert_close(guided, eps_u + 3.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", [ddim_sample, ddpm_sample])
def test_sampler_reproduces_gaussian_data_distribution(sampler):
    """For x0 ~ N(0, s²) the optimal ε̂ is known in closed form; samples must come out with std s."""
    s = 0.5

    def gaussian_eps(x, t, text, mask):
        g = gamma(t).view(-1, 1, 1, 1)
        return (1 - g).sqrt() * x / (g * s * s + 1 - g)

    text, mask = torch.zeros(2048, 1, 4), torch.ones(2048, 1, dtype=torch.bool)
    out = sampler(
        gaussian_eps, (2048, 1, 1, 1), text, mask, steps=250, generator=torch.Generator().manual_seed(0)
    )
    assert abs(out.std().item() - s) < 0.06 * s
    assert abs(out.mean().item()) < 0.05


def test_samplers_are_reproducible_and_ddpm_is_stochastic():
    text, mask, null_text, null_mask = text_inputs()

    def run(sampler, seed):
        return sampler(
            text_dependent_model, SHAPE, text, mask, null_text, null_mask,
            steps=5, guidance_scale=2.0, generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    assert torch.equal(run(ddim_sample, 0), run(ddim_sample, 0))
    assert torch.equal(run(ddpm_sample, 0), run(ddpm_sample, 0))
    assert not torch.allclose(run(ddpm_sample, 0), run(ddim_sample, 0))


def test_objective_and_sampler_drive_a_tiny_dit_with_ema():
    """Smoke test of the intended loop: loss, step, EMA, sample from the EMA copy."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(latent_size=8, width=32, depth=1, heads=2, text_dim=16))
    ema = EMA(model, decay=0.9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    text, mask, null_text, null_mask = text_inputs()
    objective, generator = EpsilonObjective(), torch.Generator().manual_seed(0)
    for _ in range(2):
        loss, _ = objective.loss(model, fixed_x0(), text, mask, generator=generator)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    ema.copy_to(model)
    out = ddim_sample(model.eval(), SHAPE, text, mask, null_text, null_mask, steps=3, guidance_scale=4.0)
    assert out.shape == SHAPE and torch.isfinite(out).all()


# --- EMA (models/ema.py) -----------------------------------------------------------------------------


def small_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict(keep_vars=True).values():
            if value.is_floating_point():
                value.copy_(torch.randn(value.shape, generator=generator))
            else:
                value.add_(7)


def test_ema_update_is_standard_average():
    torch.manual_seed(0)
    model = small_net()
    old = {k: v.clone() for k, v in model.state_dict().items()}
    decay = 0.9
    ema = EMA(model, decay=decay)
    perturb(model, seed=1)
    new = model.state_dict()
    ema.update(model)
    for name, value in ema.shadow.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, decay * old[name] + (1 - decay) * new[name], rtol=0, atol=1e-6)
        else:  # integer buffers (BatchNorm's step counter) are copied
            assert torch.equal(value, new[name])
    assert ema.shadow["1.running_mean"].abs().sum() > 0  # buffers are tracked, not just parameters


def test_ema_update_exact_on_representable_values():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(-2.0)
    ema = EMA(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(2.0)
    ema.update(model)
    assert torch.equal(ema.shadow["weight"], torch.full((2, 2), 0.75 * 1.0 + 0.25 * 3.0))
    assert torch.equal(ema.shadow["bias"], torch.full((2,), 0.75 * -2.0 + 0.25 * 2.0))


def test_ema_high_decay_stays_near_old_weights():
    model = torch.nn.Linear(2, 2)
    old = model.weight.detach().clone()
    ema = EMA(model)  # 0.9999
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], old + 1e-4, rtol=0, atol=1e-6)


def test_ema_decay_zero_copies_and_copy_to_writes_back():
    torch.manual_seed(0)
    model = small_net()
    ema = EMA(model, decay=0.0)
    perturb(model, seed=3)
    ema.update(model)
    for name, value in model.state_dict().items():
        assert torch.equal(ema.shadow[name], value)
    target = small_net()
    ema.copy_to(target)
    for name, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[name], value)


def test_ema_state_round_trip():
    torch.manual_seed(0)
    model = small_net()
    ema = EMA(model, decay=0.5, warmup=True)
    perturb(model, seed=4)
    ema.update(model)
    restored = EMA(small_net(), decay=0.9999)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1 and restored.decay == 0.5 and restored.warmup
    perturb(model, seed=5)
    ema.update(model)
    restored.update(model)
    for name, value in ema.shadow.items():
        assert torch.equal(restored.shadow[name], value)
    with pytest.raises(KeyError, match="mismatch"):
        EMA(torch.nn.Linear(3, 4)).load_state_dict(ema.state_dict())


def test_ema_state_dict_is_a_snapshot():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.0)
    saved = ema.state_dict()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert not torch.equal(saved["shadow"]["weight"], ema.shadow["weight"])


def test_ema_warmup_and_bf16_shadow():
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    ema = EMA(model, decay=0.9999, warmup=True)
    assert ema.shadow["weight"].dtype == torch.float32
    assert ema.current_decay() == pytest.approx(0.1)
    ema.update(model)
    assert ema.current_decay() == pytest.approx(2 / 11)
    assert EMA(model).current_decay() == 0.9999


def test_ema_unwraps_wrapped_model():
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    inner = torch.nn.Linear(2, 2)
    ema = EMA(Wrapper(inner), decay=0.0)
    assert set(ema.shadow) == {"weight", "bias"}
    with torch.no_grad():
        inner.weight.add_(1.0)
    ema.update(Wrapper(inner))
    assert torch.equal(ema.shadow["weight"], inner.weight)


# --- EMA: the multi-tensor update equals the per-tensor definition (tests/reference_optim.py) ---------


def _ema_pair(model: torch.nn.Module, **options):
    from tests.reference_optim import ReferenceEMA

    return EMA(model, **options), ReferenceEMA(model, **options)


def _assert_same_shadows(ema: EMA, reference) -> None:
    assert ema.shadow.keys() == reference.shadow.keys()
    for name, value in reference.shadow.items():
        assert ema.shadow[name].dtype == value.dtype, name
        assert torch.equal(ema.shadow[name], value), name  # the same lerp, tensor by tensor: exact


@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_multi_tensor_update_equals_the_per_tensor_definition(dtype, chunk, monkeypatch):
    """Float32 and bf16 live weights (float32 shadow, staged in chunks of 5 elements too), BatchNorm's float
    buffers and integer step counter, warmup decay: five updates, bitwise equal."""
    from t2i.models.lamb import CHUNK_NUMEL

    if chunk:
        monkeypatch.setitem(CHUNK_NUMEL, "cpu", chunk)
    torch.manual_seed(0)
    model = small_net().to(dtype)
    ema, reference = _ema_pair(model, decay=0.9, warmup=True)
    assert ema.shadow["0.weight"].dtype == torch.float32
    for seed in range(5):
        perturb(model, seed=10 + seed)
        ema.update(model)
        reference.update(model)
        _assert_same_shadows(ema, reference)
    assert ema.shadow["1.num_batches_tracked"].item() == 35  # copied, not averaged
    assert ema.state_dict()["num_updates"] == reference.state_dict()["num_updates"] == 5


def test_ema_of_a_dit_equals_the_per_tensor_definition():
    torch.manual_seed(0)
    model = DiT(DiTConfig(latent_size=8, width=32, depth=2, heads=2, text_dim=16))
    ema, reference = _ema_pair(model, decay=0.99)
    for seed in range(3):
        perturb(model, seed=20 + seed)
        ema.update(model)
        reference.update(model)
    _assert_same_shadows(ema, reference)


def test_ema_updates_through_ddp_and_compile_wrappers_hit_the_same_tensors():
    class DDPLike(torch.nn.Module):  # DistributedDataParallel keeps the model as `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    class CompiledLike(torch.nn.Module):  # torch.compile's OptimizedModule keeps it as `._orig_mod`
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

    torch.manual_seed(0)
    model = small_net()
    ema, reference = _ema_pair(model, decay=0.5)
    for seed, wrapped in enumerate(
        [DDPLike(model), CompiledLike(model), CompiledLike(DDPLike(model)), model]
    ):
        perturb(model, seed=30 + seed)  # in place: the wrappers see the same parameters
        ema.update(wrapped)
        reference.update(model)
        _assert_same_shadows(ema, reference)


def test_ema_follows_a_different_model_and_a_reassigned_buffer():
    """Passed another module (with the same names), it averages that one's tensors; a module that assigns a
    new tensor to a buffer, or is cast to bf16, is followed too."""
    torch.manual_seed(0)
    first, second = small_net(), small_net()
    ema, reference = _ema_pair(first, decay=0.5)
    perturb(second, seed=40)
    ema.update(second)
    reference.update(second)
    _assert_same_shadows(ema, reference)
    second[1].running_mean = torch.full((4,), 3.0)  # a new buffer object, as a module's forward may do
    second[1].num_batches_tracked = torch.tensor(99)
    ema.update(second)
    reference.update(second)
    _assert_same_shadows(ema, reference)
    assert ema.shadow["1.num_batches_tracked"].item() == 99
    second.to(torch.bfloat16)  # swaps the parameters' data (and replaces the float buffers)
    perturb(second, seed=41)
    ema.update(second)
    reference.update(second)
    _assert_same_shadows(ema, reference)
    with pytest.raises(KeyError, match="does not track"):
        ema.update(torch.nn.Linear(3, 4))


def test_ema_state_round_trip_continues_exactly():
    torch.manual_seed(0)
    model = small_net().to(torch.bfloat16)
    ema = EMA(model, decay=0.9)
    perturb(model, seed=50)
    ema.update(model)
    restored = EMA(model, decay=0.9999)
    restored.load_state_dict(ema.state_dict())
    for seed in range(3):
        perturb(model, seed=51 + seed)
        ema.update(model)
        restored.update(model)
    for name, value in ema.shadow.items():
        assert torch.equal(restored.shadow[name], value), name
    assert restored.num_updates == ema.num_updates == 4


def test_ema_update_never_reads_a_tensor_on_the_host(monkeypatch):
    model = small_net().to(torch.bfloat16)
    ema = EMA(model, decay=0.9, warmup=True)

    def host_sync(*_):
        raise AssertionError("host synchronisation in EMA.update")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, method, host_sync)
    ema.update(model)
    ema.update(model)
