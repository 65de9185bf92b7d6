"""The samplers as a diffusers scheduler, for the exported pipeline (`t2i export-model`).

Our time runs from 1 (noise) to 0 (data), with γ(t) = 1 − t for the ε objective and straight paths for
rectified flow, and the model takes t itself, not an index into a table of 1000 betas. No diffusers
scheduler walks that grid, so this one does, with the very step functions `t2i evaluate` samples with
(`ddim_step`, `euler_step`), on the same float64 grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from t2i.models.diffusion import ddim_step, ddim_times
from t2i.models.flow_matching import euler_step, euler_times

STEPPERS = {"ddim": 0.0, "ddpm": 1.0, "euler": None}  # DDIM's eta; None: the Euler step


@dataclass
class T2ISchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


class T2IScheduler(SchedulerMixin, ConfigMixin):
    """`sampler`: `ddim` or `ddpm` (ε objective), `euler` (rectified flow). `timesteps` are the times the
    model is called at; `step` moves the sample to the next one."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, sampler: str = "ddim", t_max: float = 1.0 - 1e-3, shift: float = 1.0) -> None:
        if sampler not in STEPPERS:
            raise ValueError(f"sampler: {sampler!r}; allowed: {', '.join(STEPPERS)}")
        self.times = self.timesteps = None
        self._index = 0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        if self.config.sampler == "euler":
            self.times = euler_times(num_inference_steps, self.config.shift, device)
        else:
            self.times = ddim_times(num_inference_steps, self.config.t_max, device)
        self.timesteps = self.times[:-1]
        self._index = 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> T2ISchedulerOutput | tuple[torch.Tensor]:
        """`model_output`: the (guided) ε or velocity at `timestep`, which must be the next of `timesteps`."""
        t_now, t_next = self.times[self._index], self.times[self._index + 1]
        if float(timestep) != float(t_now):
            raise ValueError(f"step at t={float(timestep)} but the next time on the grid is {float(t_now)}")
        eta = STEPPERS[self.config.sampler]
        if eta is None:
            prev = euler_step(sample, model_output, t_now, t_next)
        else:
            prev = ddim_step(sample, model_output, t_now, t_next, eta=eta, generator=generator)
        self._index += 1
        return T2ISchedulerOutput(prev_sample=prev) if return_dict else (prev,)
