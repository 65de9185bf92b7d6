"""The objectives' samplers as a diffusers scheduler, for the exported pipeline (`t2i export-model`).

Our time runs from 1 (noise) to 0 (data), and the model takes t itself, not an index into a table of 1000
betas. No diffusers scheduler walks that grid, so this one does: `objective` is the `t2i.models.objectives`
class its sampler belongs to, whose `times` and `step` it calls — the very grid and steps `t2i evaluate`
samples with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from t2i.models.objectives import OBJECTIVES, Epsilon, Objective, RectifiedFlow


@dataclass
class T2ISchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


class T2IScheduler(SchedulerMixin, ConfigMixin):
    """`sampler`: `ddim` or `ddpm` (ε objective, from `t_max`), `euler` (rectified flow, grid warped by
    `shift`). `timesteps` are the times the model is called at; `step` moves the sample to the next one."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, sampler: str = "ddim", t_max: float = 1.0 - 1e-3, shift: float = 1.0) -> None:
        allowed = [name for cls in OBJECTIVES.values() for name in cls.samplers]
        if sampler not in allowed:
            raise ValueError(f"sampler: {sampler!r}; allowed: {', '.join(allowed)}")
        self.times = self.timesteps = None
        self._index = 0

    @property
    def objective(self) -> Objective:
        """The objective whose sampler this is, with the grid's settings."""
        if self.config.sampler in RectifiedFlow.samplers:
            return RectifiedFlow(sampler=self.config.sampler, shift=self.config.shift)
        return Epsilon(sampler=self.config.sampler, t_start=self.config.t_max)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        self.times = self.objective.times(num_inference_steps, device)
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
        prev = self.objective.step(sample, model_output, t_now, t_next, generator)
        self._index += 1
        return T2ISchedulerOutput(prev_sample=prev) if return_dict else (prev,)
