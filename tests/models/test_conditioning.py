import pytest
import torch

from t2i.models.conditioning import (
    apply_text_dropout,
    bucket_length,
    cfg_dropout_mask,
    cutmix_gate,
    random_latent_crop,
    text_buckets,
    trim_padding,
)
from t2i.models.objectives import pad_text

N = 100_000


def text_batch(batch, length, dim=8, lengths=None, seed=0):
    """Random tokens with a prefix mask of the given real lengths; padding positions zero."""
    generator = torch.Generator().manual_seed(seed)
    lengths = lengths or [length] * batch
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    text = torch.randn(batch, length, dim, generator=generator) * mask[..., None]
    return text, mask


# --- classifier-free guidance dropout ----------------------------------------------------------------


def test_cfg_dropout_rate_matches_p():
    for p in (0.1, 0.3):
        drop = cfg_dropout_mask(N, p, torch.Generator().manual_seed(0))
        assert drop.dtype == torch.bool and drop.shape == (N,)
        assert abs(drop.float().mean().item() - p) < 0.005
    assert not cfg_dropout_mask(1000, 0.0, torch.Generator().manual_seed(0)).any()
    assert cfg_dropout_mask(1000, 1.0, torch.Generator().manual_seed(0)).all()
    a = cfg_dropout_mask(64, 0.1, torch.Generator().manual_seed(7))
    assert torch.equal(a, cfg_dropout_mask(64, 0.1, torch.Generator().manual_seed(7)))


def test_apply_text_dropout_rows_are_the_null_embedding():
    text, mask = text_batch(4, 6, lengths=[6, 3, 5, 2])
    null_text = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(1))
    null_mask = torch.ones(1, 1, dtype=torch.bool)
    drop = torch.tensor([True, False, True, False])
    out_text, out_mask = apply_text_dropout(text, mask, drop, null_text, null_mask)
    assert out_text.shape == text.shape and out_mask.dtype == torch.bool
    for row in (0, 2):
        assert out_mask[row].sum() == 1 and out_mask[row, 0]
        assert torch.equal(out_text[row, :1], null_text[0])
        assert (out_text[row, 1:] == 0).all()
    for row in (1, 3):
        assert torch.equal(out_text[row], text[row]) and torch.equal(out_mask[row], mask[row])


def test_apply_text_dropout_pads_short_text_to_the_trimmed_null_text():
    text, mask = text_batch(3, 2, lengths=[2, 1, 2])
    null_text, null_mask = text_batch(1, 10, lengths=[3], seed=2)  # stored padded to 10, 3 real tokens
    drop = torch.tensor([False, True, False])
    out_text, out_mask = apply_text_dropout(text, mask, drop, *trim_padding(null_text, null_mask))
    assert out_text.shape == (3, 3, 8)  # grown to the null's real length, not its stored one
    assert out_mask[1].tolist() == [True, True, True]
    assert torch.equal(out_text[1], null_text[0, :3])
    assert out_mask[0].tolist() == [True, True, False] and out_mask[2].tolist() == [True, True, False]
    assert (out_text[:, 2][[0, 2]] == 0).all()
    torch.testing.assert_close(out_text[[0, 2], :2], text[[0, 2]])


def test_text_lengths_fall_in_a_few_buckets():
    assert text_buckets(256, 4) == [64, 128, 192, 256] and text_buckets(64, 1) == [64]
    assert text_buckets(10, 4) == [3, 6, 9, 10]  # uneven: the last bucket is max_length itself
    lengths = {bucket_length(n, 256, 4) for n in range(1, 257)}
    assert lengths == {64, 128, 192, 256}
    assert bucket_length(64, 256, 4) == 64 and bucket_length(65, 256, 4) == 128


# --- CutMix gating -------------------------------------------------------------------------------------


def test_cutmix_gate_rates():
    t = torch.rand(N, generator=torch.Generator().manual_seed(0))
    gate = cutmix_gate(t, torch.Generator().manual_seed(1))
    assert gate.dtype == torch.bool and gate.shape == (N,)
    assert abs(gate.float().mean().item() - 0.30) < 0.005
    assert not gate[t <= 0.4].any()
    assert abs(gate[t > 0.4].float().mean().item() - 0.5) < 0.006


def test_cutmix_gate_never_swaps_at_low_noise_and_honours_its_arguments():
    gen = torch.Generator().manual_seed(2)
    t = torch.tensor([0.0, 0.2, 0.4, 0.4 + 1e-6, 1.0])
    always = cutmix_gate(t, gen, p=1.0)
    assert always.tolist() == [False, False, False, True, True]
    assert not cutmix_gate(t, gen, p=0.0).any()
    t = torch.rand(N, generator=torch.Generator().manual_seed(3))
    gate = cutmix_gate(t, torch.Generator().manual_seed(4), threshold=0.8, p=0.25)
    assert not gate[t <= 0.8].any()
    assert abs(gate.float().mean().item() - 0.2 * 0.25) < 0.004


# --- swapping in composites --------------------------------------------------------------------------


def test_pad_text_zero_pads_and_masks():
    text, mask = text_batch(2, 3, lengths=[3, 1])
    padded_text, padded_mask = pad_text(text, mask, 5)
    assert padded_text.shape == (2, 5, 8) and (padded_text[:, 3:] == 0).all()
    assert padded_mask.sum(1).tolist() == [3, 1]


# --- latent crops ----------------------------------------------------------------------------------


def test_random_latent_crop_shape_content_and_offsets():
    batch, channels, height, width = 256, 4, 8, 10
    # Each position encodes its own (row, column); channel c adds 1000·c.
    rows = torch.arange(height).view(1, 1, -1, 1) * 100
    cols = torch.arange(width).view(1, 1, 1, -1)
    latent = (rows + cols + 1000 * torch.arange(channels).view(1, -1, 1, 1)).expand(batch, -1, -1, -1).float()
    crop = random_latent_crop(latent, (5, 6), torch.Generator().manual_seed(0))
    assert crop.shape == (batch, channels, 5, 6)
    top = (crop[:, 0, 0, 0] // 100).long()
    left = (crop[:, 0, 0, 0] % 100).long()
    for b in range(batch):
        expected = latent[b, :, top[b] : top[b] + 5, left[b] : left[b] + 6]
        assert torch.equal(crop[b], expected)  # one offset shared by every channel of a sample
    offsets = set(zip(top.tolist(), left.tolist(), strict=True))
    assert len(offsets) == 4 * 5  # every possible (top, left) appears among 256 draws
    assert top.min() == 0 and top.max() == 3 and left.min() == 0 and left.max() == 4


def test_random_latent_crop_full_size_is_identity_and_rejects_too_big():
    latent = torch.randn(3, 4, 8, 8)
    assert torch.equal(random_latent_crop(latent, 8, torch.Generator().manual_seed(0)), latent)
    with pytest.raises(ValueError):
        random_latent_crop(latent, 9, torch.Generator().manual_seed(0))
    a = random_latent_crop(latent, 4, torch.Generator().manual_seed(5))
    assert torch.equal(a, random_latent_crop(latent, 4, torch.Generator().manual_seed(5)))
