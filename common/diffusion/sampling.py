"""The reverse-diffusion loop over MONAI schedulers.

A scheduler knows noise and steps, a model knows nothing of sampling; ``sample`` composes
them. Data lives in [-1, 1], so DDPM/DDIM clip their x0 estimate to that range.
Tensors are ``(B, C, *spatial)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.schedulers import DDIMScheduler, RFlowScheduler, Scheduler
from tqdm import tqdm

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _step_pairs(scheduler: Scheduler, steps: int, device, start: int | None):
    """``(t, next_t)`` pairs from high noise to clean, only those with ``t <= start``."""
    scheduler.set_timesteps(steps, device=device)
    ts = [int(t) for t in scheduler.timesteps]
    if start is not None:
        ts = [t for t in ts if t <= start]
    return list(zip(ts, [*ts[1:], 0]))


def sample(
    model: ModelFn,
    scheduler: Scheduler,
    x: torch.Tensor,
    steps: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    start: int | None = None,
    fix_known: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    progress: bool = False,
    eta: float = 0.0,
) -> torch.Tensor:
    """Run the reverse process from ``x`` (pure noise, or ``x_start`` when ``start`` is set).

    Args:
        model: ``(x_t, t (B,)) -> prediction`` (noise or velocity, matching the scheduler).
        scheduler: from ``make_scheduler``.
        x: ``(B, C, *spatial)`` starting sample.
        steps: inference steps over the full schedule (DDIM/RFlow: few; DDPM: up to 1000).
        generator: seeds the stochastic DDPM steps; a list gives each batch item its own
            generator, so an item's result does not depend on what it is batched with.
        start: only timesteps ``<= start`` are run (partial denoising, e.g. the refiner's t0).
        fix_known: ``(x, t) -> x`` applied before every model call, e.g. to keep given
            slices clean (inpainting).
        progress: show a progress bar.
        eta: DDIM only: 0 deterministic, 1 as much fresh noise per step as DDPM.
    Returns the denoised sample, same shape as ``x``.
    """
    pairs = _step_pairs(scheduler, steps, x.device, start)
    for t, next_t in tqdm(pairs, disable=not progress, desc="sampling", leave=False):
        if fix_known is not None:
            x = fix_known(x, t)
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        pred = model(x, t_batch)
        if isinstance(generator, list):
            x = torch.cat(
                [
                    _step(scheduler, p[None], t, next_t, s[None], g, eta)
                    for p, s, g in zip(pred, x, generator)
                ]
            )
        else:
            x = _step(scheduler, pred, t, next_t, x, generator, eta)
    return fix_known(x, 0) if fix_known is not None else x


def _step(scheduler: Scheduler, pred, t: int, next_t: int, x, generator, eta) -> torch.Tensor:
    """One reverse step ``x_t -> x_next_t`` with any of the three schedulers."""
    if isinstance(scheduler, RFlowScheduler):
        return scheduler.step(pred, t, x, next_t)[0]
    if isinstance(scheduler, DDIMScheduler):
        return scheduler.step(pred, t, x, eta=eta, generator=generator)[0]
    return scheduler.step(pred, t, x, generator=generator)[0]


def noise_to(
    scheduler: Scheduler, x0: torch.Tensor, t: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``x0`` noised to timestep ``t`` (the refiner's start point)."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    ts = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
    return scheduler.add_noise(original_samples=x0, noise=noise, timesteps=ts)
