"""A guard that fails on every operation that would make the host wait for a GPU, usable on a CPU.

On a GPU the host queues kernels and runs ahead; an operation that needs a value or a shape computed on the
device (`item()`, `nonzero`, a boolean-mask index, `x.any()` in an `if`), or a copy that blocks the host, drains
the queue and leaves the GPU idle until the host catches up. On a CPU nothing waits, so such code passes every
functional test: this guard makes it fail there too.

- At the dispatcher (everywhere, torch's and accelerate's code included): the ops whose result size or value
  the host must read — `_local_scalar_dense` (behind `item`, `int()`, `float()`, `bool()`), `nonzero`,
  `masked_select`, `unique`, `equal`, `repeat_interleave` without `output_size`, indexing with a boolean mask —
  and copies from a device to the host.
- At the Python call (our code only: torch's own `.to(device)` of a tensor already there is a no-op): a
  `.to(device)` / `.cuda()` / `.copy_()` without `non_blocking=True`, and `.cpu()`, `.numpy()`, `.tolist()`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
OURS = tuple(str(Path(__file__).resolve().parents[1] / name) for name in ("models", "tasks", "data", "flows"))

SYNC_OPS = {
    aten._local_scalar_dense.default: "reads a scalar on the host (item/int/float/bool of a tensor)",
    aten.nonzero.default: "nonzero: its size is known only after the kernel ran",
    aten.masked_select.default: "masked_select: its size is known only after the kernel ran",
    aten._unique2.default: "unique: its size is known only after the kernel ran",
    aten.unique_consecutive.default: "unique_consecutive: its size is known only after the kernel ran",
    aten.unique_dim.default: "unique_dim: its size is known only after the kernel ran",
    aten.equal.default: "equal: returns a Python bool",
    aten.is_nonzero.default: "is_nonzero: returns a Python bool",
}
HOST_CALLS = {"cpu", "numpy", "tolist", "item", "__bool__", "__int__", "__float__"}
COPY_CALLS = {"to", "cuda", "copy_"}


class HostSyncError(AssertionError):
    pass


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            raise HostSyncError(f"{func}: {SYNC_OPS[func]}")
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            raise HostSyncError(f"{func} without output_size: its size is known only after the kernel ran")
        indexing = func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default)
        if indexing and any(i is not None and i.dtype == torch.bool for i in args[1]):
            raise HostSyncError(f"{func} with a boolean mask: its size is known only after the kernel ran")
        if func in (aten._to_copy.default, aten.copy_.default):
            source = args[1] if func is aten.copy_.default else args[0]
            target = args[0].device if func is aten.copy_.default else kwargs.get("device", source.device)
            if source.device.type != "cpu" and torch.device(target).type == "cpu":
                raise HostSyncError(f"{func}: a copy from {source.device} to the host")
        return func(*args, **kwargs)


def _names_a_device(args, kwargs) -> bool:
    if "device" in kwargs:
        return True
    return any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args)


class _Calls(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(OURS):
            where = f"{caller}:{sys._getframe(1).f_lineno}"
            if name in HOST_CALLS:
                raise HostSyncError(f"Tensor.{name} at {where} waits for the device")
            if name in COPY_CALLS and not kwargs.get("non_blocking") and _names_a_device(args[1:], kwargs):
                raise HostSyncError(f"Tensor.{name} at {where}: a blocking copy (pass non_blocking=True)")
        return func(*args, **kwargs)


class no_host_syncs:  # noqa: N801  (used as a context manager, like torch's modes)
    """`with no_host_syncs(): ...` raises HostSyncError at the first operation that would sync a GPU."""

    def __enter__(self):
        self.modes = [_Calls(), _Dispatch()]
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self.modes):
            mode.__exit__(*exc)
        return False
