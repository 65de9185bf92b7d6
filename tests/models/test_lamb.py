"""LAMB's trust ratio: every step of a weight matrix is ‖w‖-sized, with or without weight decay. The
multi-tensor step equals the per-tensor definition (`tests/reference_optim.py`), a group without the trust
ratio is Adam, and checkpoints of the per-tensor era load and continue."""

import copy
import io

import pytest
import torch

from t2i.models.dit import build_dit
from t2i.models.lamb import CHUNK_NUMEL, Lamb
from tests.reference_optim import ReferenceLamb

# float32: the multi-tensor step rounds differently from the per-tensor one (lerp for the first moment,
# (bc₁(√v̂ + ε))⁻¹·m for m̂/(√v̂ + ε), one fused multiply-add for the step), ~1e-7 of |w| after 20 steps.
REL_TOL = 1e-6


def _step_size(weight_decay: float, **group) -> tuple[float, float]:
    """(‖Δw‖, ‖w‖) of one step on a 16×16 weight with a random gradient."""
    generator = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 16, generator=generator) * 3.0)
    w.grad = torch.randn(16, 16, generator=generator)
    before = w.detach().clone()
    Lamb([{"params": [w], **group}], lr=0.01, weight_decay=weight_decay).step()
    return float((w.detach() - before).norm()), float(before.norm())


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_the_trust_ratio_scales_each_step_to_the_weight_norm(weight_decay):
    moved, norm = _step_size(weight_decay)
    assert moved == pytest.approx(0.01 * norm, rel=1e-4)  # Adam's first step would move 0.01 · 16 = 0.16


def test_a_group_can_opt_out_of_the_trust_ratio():
    moved, _ = _step_size(0.0, trust_ratio=False)
    assert moved == pytest.approx(0.01 * 16, rel=1e-3)  # Adam: each element moves lr (|m̂/√v̂| = 1)


def small_dit() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_dit("tiny", width=32, depth=1, heads=2, text_dim=16, latent_size=8)  # 34 tensors


def recipe_groups(model: torch.nn.Module, weight_decay: float = 0.01) -> list[dict]:
    """As `tasks/train.py::make_optimizer` builds them: no decay and no trust ratio on 1-D parameters."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "trust_ratio": False},
    ]


def run(models_and_optimizers, steps: int, seed: int, skip: str | None = None) -> None:
    """`steps` steps of each optimizer on the same random gradients; parameter `skip` has none on odd steps."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        grads = {
            name: torch.randn(p.shape, generator=generator)
            for name, p in models_and_optimizers[0][0].named_parameters()
        }
        for model, optimizer in models_and_optimizers:
            for name, p in model.named_parameters():
                p.grad = None if name == skip and step % 2 else grads[name].clone()
            optimizer.step()


def assert_close_to(model: torch.nn.Module, expected: torch.nn.Module, rel: float = REL_TOL) -> None:
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        scale = q.detach().abs().max().clamp_min(1e-12)
        assert ((p - q).abs().max() / scale).item() <= rel, name


@pytest.mark.parametrize("chunk", [None, 1000])
def test_multi_tensor_lamb_equals_the_per_tensor_definition(chunk, monkeypatch):
    """20 steps on a small DiT in the recipe's two groups, one parameter skipped every other step (its step
    count falls behind, so the group holds two step counts): within 1e-6 of each tensor's largest |w|. With
    chunks of 1000 elements too (several small tensors to a chunk, a large one alone)."""
    if chunk:
        monkeypatch.setitem(CHUNK_NUMEL, "cpu", chunk)
    model = small_dit()
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    lamb = Lamb(recipe_groups(ours), lr=2e-3, betas=(0.9, 0.99))
    reference = ReferenceLamb(recipe_groups(theirs), lr=2e-3, betas=(0.9, 0.99))
    run([(ours, lamb), (theirs, reference)], steps=20, seed=1, skip="blocks.0.attn.kv.weight")
    assert_close_to(ours, theirs)
    moved = max(
        (p - q).abs().max().item() for p, q in zip(ours.parameters(), model.parameters(), strict=True)
    )
    assert moved > 1e-3  # it trained
    assert lamb.state[ours.get_parameter("blocks.0.attn.kv.weight")]["step"] == 10
    assert {type(s["step"]) for s in lamb.state.values()} == {int}


def test_without_the_trust_ratio_and_weight_decay_it_is_adam():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    ours, adams = copy.deepcopy(model), copy.deepcopy(model)
    lamb = Lamb([{"params": ours.parameters(), "trust_ratio": False}], lr=1e-2, eps=1e-6, betas=(0.9, 0.98))
    adam = torch.optim.Adam(adams.parameters(), lr=1e-2, eps=1e-6, betas=(0.9, 0.98), foreach=False)
    run([(ours, lamb), (adams, adam)], steps=20, seed=2)
    assert_close_to(ours, adams)


def test_a_per_tensor_era_checkpoint_loads_and_continues():
    """State saved by the per-tensor optimizer (int `step`, `exp_avg`, `exp_avg_sq`) resumes in this one as
    if the run had not changed optimizer; this one's own checkpoints resume bitwise."""
    model = small_dit()
    theirs = copy.deepcopy(model)
    reference = ReferenceLamb(recipe_groups(theirs), lr=2e-3)
    run([(theirs, reference)], steps=5, seed=3)
    saved = io.BytesIO()
    torch.save({"model": theirs.state_dict(), "optimizer": reference.state_dict()}, saved)

    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    ours = copy.deepcopy(model)
    ours.load_state_dict(state["model"])
    lamb = Lamb(recipe_groups(ours), lr=2e-3)
    lamb.load_state_dict(state["optimizer"])
    assert {s["step"] for s in lamb.state.values()} == {5}
    run([(ours, lamb), (theirs, reference)], steps=5, seed=4)
    assert_close_to(ours, theirs)
    assert {s["step"] for s in lamb.state.values()} == {10}

    resumed = copy.deepcopy(ours)
    again = Lamb(recipe_groups(resumed), lr=2e-3)
    again.load_state_dict(copy.deepcopy(lamb.state_dict()))
    run([(ours, lamb), (resumed, again)], steps=3, seed=5)
    for p, q in zip(ours.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_zero_norm_takes_ratio_one():
    """‖w‖ = 0 (a zero-initialised projection) or ‖update‖ = 0 (a zero gradient): ratio 1, not 0 or NaN."""
    generator = torch.Generator().manual_seed(6)
    zero = torch.nn.Parameter(torch.zeros(4, 4))
    zero.grad = torch.randn(4, 4, generator=generator)
    still = torch.nn.Parameter(torch.randn(4, 4, generator=generator))
    still.grad = torch.zeros(4, 4)
    start = still.detach().clone()
    Lamb([zero, still], lr=0.1, eps=1e-6).step()
    # Adam's first step: m̂/(√v̂ + ε) = g/(|g| + ε), times lr, times ratio 1.
    torch.testing.assert_close(zero.detach(), -0.1 * zero.grad / (zero.grad.abs() + 1e-6), rtol=1e-6, atol=0)
    assert torch.equal(still.detach(), start)


def test_a_step_never_reads_a_tensor_on_the_host(monkeypatch):
    """No `.item()`, `bool`, `float` or `int` of a tensor: a step never waits for the device."""
    model = small_dit()
    lamb = Lamb(recipe_groups(model), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)

    def host_sync(*_):
        raise AssertionError("host synchronisation in Lamb.step")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, method, host_sync)
    lamb.step()
    lamb.step()
