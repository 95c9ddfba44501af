"""The reverse-diffusion loop over MONAI schedulers.

A scheduler knows noise and steps, a model knows nothing of sampling; ``sample`` composes
them. DDPM/DDIM with fewer steps than training run on a respaced schedule (``respace``), so
each step goes exactly from one kept timestep to the next. Data lives in [-1, 1], so
DDPM/DDIM clip their x0 estimate to that range. Tensors are ``(B, C, *spatial)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from monai.networks.schedulers import DDIMScheduler, RFlowScheduler, Scheduler
from tqdm import tqdm

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def respace(scheduler: Scheduler, timesteps: Sequence[int]) -> Scheduler:
    """A DDPM/DDIM scheduler over only ``timesteps`` (improved DDPM's respacing).

    Step index ``i`` of the result goes from the ``i``-th smallest kept timestep to the
    ``(i-1)``-th (to clean data for ``i = 0``): its ``alphas_cumprod`` are those of the kept
    timesteps, its betas ``1 - abar_i / abar_{i-1}``, so DDPM steps with the true posterior
    between kept timesteps and DDIM with the true next noise level. All timesteps: unchanged.
    """
    kept = sorted(int(t) for t in timesteps)
    if kept == list(range(scheduler.num_train_timesteps)):
        return scheduler
    abar = scheduler.alphas_cumprod[kept]
    alphas = abar / torch.cat([abar.new_ones(1), abar[:-1]])
    spaced = copy.deepcopy(scheduler)
    spaced.num_train_timesteps = spaced.num_inference_steps = len(kept)
    spaced.alphas_cumprod, spaced.alphas, spaced.betas = abar, alphas, 1.0 - alphas
    return spaced


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
        steps: inference steps over the full schedule, 1 to ``num_train_timesteps``, for
            every scheduler (DDPM and DDIM are respaced to them).
        generator: seeds the stochastic DDPM steps; a list gives each batch item its own
            generator, so an item's result does not depend on what it is batched with.
        start: only timesteps ``<= start`` are run (partial denoising, e.g. the refiner's t0).
        fix_known: ``(x, t) -> x`` applied before every model call, e.g. to keep given
            slices clean (inpainting).
        progress: show a progress bar.
        eta: DDIM only: 0 deterministic, 1 as much fresh noise per step as DDPM.
    Returns the denoised sample, same shape as ``x``.
    """
    if not 1 <= steps <= scheduler.num_train_timesteps:
        raise ValueError(f"steps must be 1 to {scheduler.num_train_timesteps}, got {steps}")
    scheduler.set_timesteps(steps, device=x.device)
    ts = [int(t) for t in scheduler.timesteps]  # high noise to clean
    rflow = isinstance(scheduler, RFlowScheduler)
    stepper = scheduler if rflow else respace(scheduler, ts)
    # where each step goes: rflow from t to the next timestep, DDPM/DDIM by respaced index
    where = list(zip(ts, [*ts[1:], 0])) if rflow else list(range(len(ts) - 1, -1, -1))
    plan = [(t, at) for t, at in zip(ts, where) if start is None or t <= start]
    for t, at in tqdm(plan, disable=not progress, desc="sampling", leave=False):
        if fix_known is not None:
            x = fix_known(x, t)
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        pred = model(x, t_batch)
        if isinstance(generator, list):
            x = torch.cat(
                [
                    _step(stepper, p[None], at, s[None], g, eta)
                    for p, s, g in zip(pred, x, generator)
                ]
            )
        else:
            x = _step(stepper, pred, at, x, generator, eta)
    return fix_known(x, 0) if fix_known is not None else x


def _step(scheduler: Scheduler, pred, at, x, generator, eta) -> torch.Tensor:
    """One reverse step of ``x``; ``at``: ``(t, next_t)`` for RFlow, the step index of a
    respaced DDPM/DDIM."""
    if isinstance(scheduler, RFlowScheduler):
        return scheduler.step(pred, at[0], x, at[1])[0]
    if isinstance(scheduler, DDIMScheduler):
        return scheduler.step(pred, at, x, eta=eta, generator=generator)[0]
    return scheduler.step(pred, at, x, generator=generator)[0]


def noise_to(
    scheduler: Scheduler, x0: torch.Tensor, t: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``x0`` noised to timestep ``t`` (the refiner's start point)."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    ts = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
    return scheduler.add_noise(original_samples=x0, noise=noise, timesteps=ts)
