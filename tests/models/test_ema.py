"""The exponential moving average of the weights (`t2i.models.ema.EMA`): the standard average, its state, and
the multi-tensor update bitwise equal to the per-tensor definition (`tests/reference_optim.py`)."""

import pytest
import torch

from t2i.models.dit import DiT, DiTConfig
from t2i.models.ema import EMA


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
