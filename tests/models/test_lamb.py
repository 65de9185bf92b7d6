"""LAMB's trust ratio: every step of a weight matrix is ‖w‖-sized, with or without weight decay."""

import pytest
import torch

from t2i.models.lamb import Lamb


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
