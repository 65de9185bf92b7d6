"""The exported pipeline's scheduler walks the same grid with the same steps as the samplers `t2i evaluate`
uses: a loop over `T2IScheduler` reproduces `ddim_sample`, `ddpm_sample` and `euler_sample` exactly."""

import pytest
import torch

from t2i.models.diffusion import ddim_sample, ddpm_sample, guided_eps, sampling_noise
from t2i.models.flow_matching import euler_sample
from t2i.models.scheduling import T2IScheduler

SHAPE = (3, 4, 8, 8)


def model_fn(x, t, text, mask):
    return 0.3 * x + t.reshape(-1, 1, 1, 1) * text[:, :1, :4].mean() + mask.float().mean()


def scheduler_loop(scheduler, steps, text, mask, null_text, null_mask, generator):
    scheduler.set_timesteps(steps)
    x = sampling_noise(SHAPE, generator, "cpu")
    for t in scheduler.timesteps:
        t_batch = torch.full((SHAPE[0],), float(t))
        out = guided_eps(model_fn, x, t_batch, text, mask, null_text, null_mask, 3.0).float()
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize(
    ("sampler", "reference", "options"),
    [("ddim", ddim_sample, {}), ("ddpm", ddpm_sample, {}), ("euler", euler_sample, {"shift": 3.0})],
)
def test_a_loop_over_the_scheduler_equals_the_evaluation_sampler(sampler, reference, options):
    text, mask = torch.randn(3, 5, 8), torch.tensor([[1, 1, 1, 0, 0]] * 3).bool()
    null_text, null_mask = torch.randn(1, 2, 8), torch.tensor([[1, 0]]).bool()
    expected = reference(
        model_fn, SHAPE, text, mask, null_text, null_mask, steps=7, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(5), **options,
    )  # fmt: skip
    scheduler = T2IScheduler(sampler=sampler, **options)
    got = scheduler_loop(scheduler, 7, text, mask, null_text, null_mask, torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)


def test_a_step_off_the_grid_and_an_unknown_sampler_are_refused():
    with pytest.raises(ValueError, match="sampler: 'heun'; allowed: ddim, ddpm, euler"):
        T2IScheduler(sampler="heun")
    scheduler = T2IScheduler(sampler="ddim")
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="next time on the grid"):
        scheduler.step(torch.zeros(SHAPE), torch.tensor(0.5), torch.zeros(SHAPE))
