"""LAMB (You et al., 2019): Adam's update rescaled per tensor by the trust ratio ‖w‖ / ‖update‖.

The recipe applies neither weight decay nor the trust ratio to norms and biases: the train stage puts
those in a group with `trust_ratio=False` and no weight decay. Every other group gets the trust ratio
whatever its weight decay, so `weight_decay=0` still trains with LAMB, not Adam.

A step is 11 multi-tensor (`torch._foreach_*`) ops, and a few on the per-tensor norms, per chunk of a parameter
group, whatever the number of tensors, with no host synchronisation: the trust ratios stay on the device. Chunks (`CHUNK_NUMEL` elements,
or one larger tensor) bound the step's one list of temporaries and, on the CPU, keep a chunk in cache across
its passes (3× faster than whole-model passes). The per-tensor definition it must equal is
`tests/reference_optim.py`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

# Elements per chunk of a step, by device type: on the CPU a chunk's ~5 tensors' worth of data should stay in
# cache; elsewhere chunks only bound the temporaries (256 MB in float32) at a few kernels each.
CHUNK_NUMEL = {"cpu": 1 << 20}
DEFAULT_CHUNK_NUMEL = 1 << 26


def numel_chunks(tensors: Sequence[Tensor], limit: int) -> Iterator[slice]:
    """Consecutive slices of `tensors` of about `limit` elements each (one tensor if it is larger)."""
    start = total = 0
    for i, tensor in enumerate(tensors):
        total += tensor.numel()
        if total >= limit:
            yield slice(start, i + 1)
            start, total = i + 1, 0
    if start < len(tensors):
        yield slice(start, len(tensors))


class Lamb(torch.optim.Optimizer):
    """State per parameter, as checkpoints hold it: `step` (a Python int), `exp_avg`, `exp_avg_sq`.
    Parameters whose `grad` is None are skipped (their step count does not advance)."""

    def __init__(
        self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # Tensors at the same step count share the bias corrections; normally that is all of them.
            by_step: dict[int, tuple[list[Tensor], ...]] = defaultdict(lambda: ([], [], [], []))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                lists = by_step[state["step"]]
                lists[0].append(p)
                lists[1].append(p.grad)
                lists[2].append(state["exp_avg"])
                lists[3].append(state["exp_avg_sq"])
            for step, lists in by_step.items():
                grouped = _group_tensors_by_device_and_dtype(list(lists))
                for (device, _), ((params, grads, exp_avgs, exp_avg_sqs), _) in grouped.items():
                    for c in numel_chunks(params, CHUNK_NUMEL.get(device.type, DEFAULT_CHUNK_NUMEL)):
                        _lamb_step(params[c], grads[c], exp_avgs[c], exp_avg_sqs[c], step, group)
        return loss


def _lamb_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step: int,
    group: dict,
) -> None:
    """One LAMB step of tensors on one device, of one dtype, at the same step count.

    The update m̂/(√v̂ + ε) + λw is kept as u = m/(√v + ε√bc₂) + (λ/c)w with c = √bc₂/bc₁, so that
    update = c·u: the bias corrections cost no pass over the data, and ‖update‖ = c‖u‖.
    """
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    sqrt_bc2 = math.sqrt(1 - beta2**step)
    c = sqrt_bc2 / (1 - beta1**step)

    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m ← β₁m + (1 − β₁)g
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)  # v ← β₂v + (1 − β₂)g²

    u = torch._foreach_sqrt(exp_avg_sqs)  # the one list of temporaries
    torch._foreach_add_(u, eps * sqrt_bc2)
    torch._foreach_reciprocal_(u)
    torch._foreach_mul_(u, exp_avgs)
    if weight_decay:
        torch._foreach_add_(u, params, alpha=weight_decay / c)

    if group.get("trust_ratio", True):
        w_norm = torch.stack(torch._foreach_norm(params))
        u_norm = torch.stack(torch._foreach_norm(u))
        # lr · ratio · update = lr · (ratio · c) · u, with ratio · c = ‖w‖/‖u‖, or c where a norm is 0.
        scale = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, c).mul_(-lr)
        torch._foreach_addcmul_(params, u, scale.unbind())  # each tensor by its own on-device scale
    else:
        torch._foreach_add_(params, u, alpha=-lr * c)
