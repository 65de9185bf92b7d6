"""The denoiser's learning-rate schedule (`t2i.models.lr_schedule.lr_factor`)."""

import math

import pytest

from t2i.models.lr_schedule import lr_factor


def test_warmup_rises_linearly_to_one():
    assert [lr_factor(s, 4, 100, 0.2) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(0, 10, 100, 0.21) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.21) == pytest.approx(1.0)


def test_cosine_decays_from_one_to_the_final_ratio_and_stays_there():
    assert lr_factor(10, 10, 100, 0.21) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.21) == pytest.approx(0.21 + 0.79 * 0.5)  # half way: the cosine's middle
    assert lr_factor(100, 10, 100, 0.21) == pytest.approx(0.21)
    assert lr_factor(150, 10, 100, 0.21) == pytest.approx(0.21)
    decay = [lr_factor(s, 10, 100, 0.21) for s in range(10, 101)]
    assert all(a > b for a, b in zip(decay[:-1], decay[1:], strict=True))


def test_no_warmup_starts_at_one():
    assert lr_factor(0, 0, 50, 0.0) == 1.0
    assert lr_factor(25, 0, 50, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
