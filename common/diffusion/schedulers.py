"""MONAI schedulers and what a model learns from them.

``kind`` is ``ddpm`` or ``ddim`` (same training; a model trained with one samples with the
other) or ``rflow`` (rectified flow, predicts ``x0 - noise``). DDPM/DDIM models predict
``prediction_type``: ``v_prediction`` (default: well behaved with few steps and at high
noise), ``epsilon`` (the noise) or ``sample`` (x0). Tensors are ``(B, C, *spatial)``.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler, Scheduler

from common.core.errors import DataError

KINDS = ("ddpm", "ddim", "rflow")


def make_scheduler(
    kind: str,
    num_train_timesteps: int = 1000,
    schedule: str = "linear_beta",
    prediction_type: str = "v_prediction",
    trained_as: str | None = None,
    **kwargs,
) -> Scheduler:
    """A MONAI scheduler: DDPMScheduler, DDIMScheduler or RFlowScheduler. ``trained_as``: the
    objective (``scheduler_kind``) of the weights it will sample; a sampler of the other
    objective (rflow on noise-trained weights, ddpm/ddim on flow-trained ones) draws noise,
    so it is refused."""
    if trained_as is not None and (kind == "rflow") != (trained_as == "rflow"):
        fits = "rflow" if trained_as == "rflow" else "ddpm or ddim"
        raise DataError(
            f"sampler {kind!r}",
            f"cannot sample weights trained with scheduler_kind {trained_as!r} (it draws noise)",
            f"use sampler {fits}; weights trained with the other objective need scheduler_kind "
            "set to it (--scheduler_kind with monai.bundle run, or in a YAML file passed as "
            "medgen3d's --scale)",
        )
    if kind in ("ddpm", "ddim"):
        cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
        return cls(
            num_train_timesteps, schedule=schedule, prediction_type=prediction_type, **kwargs
        )
    if kind == "rflow":
        return RFlowScheduler(num_train_timesteps, use_discrete_timesteps=True, **kwargs)
    raise ValueError(f"scheduler kind must be one of {KINDS}, got {kind!r}")


def objective(scheduler: Scheduler) -> str:
    """What the model learns: ``velocity`` (rectified flow) or the scheduler's prediction type."""
    return "velocity" if isinstance(scheduler, RFlowScheduler) else scheduler.prediction_type


def noisy_and_target(
    scheduler: Scheduler, x0: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw timesteps ``(B,)`` and noise; return ``(x_t, target, timesteps)`` for training."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    n = scheduler.num_train_timesteps
    t = torch.randint(0, n, (x0.shape[0],), generator=generator, device=x0.device).long()
    x_t = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
    return x_t, _target(scheduler, x0, noise, t), t


def _target(scheduler: Scheduler, x0, noise, t) -> torch.Tensor:
    """The regression target for ``x_t`` made from ``x0`` and ``noise`` at ``t``."""
    kind = objective(scheduler)
    if kind == "velocity":
        return x0 - noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0 if kind == "sample" else noise
