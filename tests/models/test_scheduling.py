"""The exported pipeline samples as `t2i evaluate` does: its scheduler walks the objectives' grid with their
steps, and the pipeline itself runs the objective's sampling loop, so both give the latents
`sample_latents` gives, bit for bit."""

import pytest
import torch
from transformers import AutoTokenizer, T5EncoderModel

from t2i.models.architectures import build_denoiser, sample_latents
from t2i.models.denoiser import T2IDenoiser
from t2i.models.diffusers_pipeline import T2IPipeline
from t2i.models.objectives import guide, objective, sampling_noise
from t2i.models.scheduling import T2IScheduler

SHAPE = (3, 4, 8, 8)
OBJECTIVE = {"ddim": "epsilon", "ddpm": "epsilon", "euler": "rectified_flow"}


def model_fn(x, t, text, mask):
    return 0.3 * x + t.reshape(-1, 1, 1, 1) * text[:, :1, :4].mean() + mask.float().mean()


def text_inputs():
    text, mask = torch.randn(3, 5, 8), torch.tensor([[1, 1, 1, 0, 0]] * 3).bool()
    return text, mask, torch.randn(1, 2, 8), torch.tensor([[1, 0]]).bool()


def scheduler_loop(scheduler, steps, text, mask, null_text, null_mask, generator):
    """How a diffusers user drives a scheduler: set the timesteps, then guide and step at each."""
    scheduler.set_timesteps(steps)
    x = sampling_noise(SHAPE, generator, "cpu")
    for t in scheduler.timesteps:
        t_batch = torch.full((SHAPE[0],), float(t))
        out = guide(model_fn, x, t_batch, text, mask, null_text, null_mask, 3.0).float()
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler"])
def test_a_loop_over_the_scheduler_equals_the_evaluation_sampler(sampler):
    text, mask, null_text, null_mask = text_inputs()
    expected = sample_latents(
        OBJECTIVE[sampler],
        sampler,
        model_fn,
        SHAPE,
        text,
        mask,
        null_text,
        null_mask,
        steps=7,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(5),
    )
    scheduler = T2IScheduler(sampler=sampler)
    got = scheduler_loop(scheduler, 7, text, mask, null_text, null_mask, torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)


def test_the_scheduler_passes_its_grid_settings_to_the_objective():
    text, mask, null_text, null_mask = text_inputs()
    flow = objective("rectified_flow", shift=3.0)
    expected = flow.sample(
        model_fn, SHAPE, text, mask, null_text, null_mask, 7, 3.0, torch.Generator().manual_seed(5)
    )
    got = scheduler_loop(
        T2IScheduler(sampler="euler", shift=3.0),
        7,
        text,
        mask,
        null_text,
        null_mask,
        torch.Generator().manual_seed(5),
    )
    assert torch.equal(got, expected)
    assert T2IScheduler(sampler="ddpm", t_max=0.9).objective == objective("epsilon", "ddpm", t_start=0.9)


def test_a_step_off_the_grid_and_an_unknown_sampler_are_refused():
    with pytest.raises(ValueError, match="sampler: 'heun'; allowed: ddim, ddpm, euler"):
        T2IScheduler(sampler="heun")
    scheduler = T2IScheduler(sampler="ddim")
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="next time on the grid"):
        scheduler.step(torch.zeros(SHAPE), torch.tensor(0.5), torch.zeros(SHAPE))


@pytest.fixture(scope="module")
def text_encoder(tiny_models):
    path = next(tiny_models.glob("tiny-t5-*"))  # the folder `t2i` builds `tiny:t5` in
    return T5EncoderModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize(("architecture", "sampler"), [("dit", "ddpm"), ("cad", "ddim"), ("dit", "euler")])
def test_the_pipeline_draws_the_latents_of_the_evaluation_sampler(text_encoder, architecture, sampler):
    """CAD-I's self-conditioning carried from step to step included; ddpm draws fresh noise at every step."""
    encoder, tokenizer = text_encoder
    torch.manual_seed(0)
    model = build_denoiser(
        architecture, "tiny", latent_channels=4, latent_size=8, text_dim=encoder.config.d_model
    )
    with torch.no_grad():  # zero-initialised outputs would sample the same whatever the text
        for p in model.parameters():
            p.normal_(0, 0.05)
    transformer = T2IDenoiser(architecture, vars(model.config), [4, 8, 8])
    transformer.model.load_state_dict(model.state_dict())
    pipe = T2IPipeline(transformer, None, encoder, tokenizer, T2IScheduler(sampler=sampler))
    prompts = ["a red square", "two blue circles on grass"]
    text, mask = pipe.encode_prompt(prompts)
    null_text, null_mask = pipe.encode_prompt([""])
    pipe.set_progress_bar_config(disable=True)
    got = pipe(
        prompts,
        num_inference_steps=5,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(1),
        output_type="latent",
    ).images
    expected = sample_latents(
        OBJECTIVE[sampler],
        sampler,
        model.eval(),
        (2, 4, 8, 8),
        text,
        mask,
        null_text,
        null_mask,
        steps=5,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(got, expected)
