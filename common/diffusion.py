"""Diffusion training targets and sampling loops over MONAI schedulers.

A scheduler knows noise and steps, a model knows nothing of sampling; these functions
compose them. ``kind`` is ``ddpm`` or ``ddim`` (same training; a model trained with one
samples with the other) or ``rflow`` (rectified flow, predicts ``x0 - noise``). DDPM/DDIM
models predict ``prediction_type``: ``v_prediction`` (default: well behaved with few steps
and at high noise), ``epsilon`` (the noise) or ``sample`` (x0). Data lives in [-1, 1], so
DDPM/DDIM clip their x0 estimate to that range. Tensors are ``(B, C, *spatial)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.engines.utils import PrepareBatch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler, Scheduler
from tqdm import tqdm

from common.distributed import rank_seed

KINDS = ("ddpm", "ddim", "rflow")
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(
    kind: str,
    num_train_timesteps: int = 1000,
    schedule: str = "linear_beta",
    prediction_type: str = "v_prediction",
    **kwargs,
) -> Scheduler:
    """A MONAI scheduler: DDPMScheduler, DDIMScheduler or RFlowScheduler."""
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


class SeededPrepareBatch(PrepareBatch):
    """Base of the diffusion prepare-batches: a seeded generator for every random draw.

    ``reseed_every_batch`` makes validation draw the same noise each time; ``state_dict``
    lets a resumed training draw what it would have drawn. Under torchrun rank ``r`` uses
    ``seed + r`` (``rank_seed``), so ranks draw different noise. Subclasses call
    ``start_batch()`` first and ``to_device`` on what they return.
    """

    def __init__(self, seed: int | None = None, reseed_every_batch: bool = False):
        self.seed, self.reseed = None if seed is None else rank_seed(seed), reseed_every_batch
        self.generator = torch.Generator()
        if self.seed is not None:
            self.generator.manual_seed(self.seed)

    def start_batch(self) -> None:
        if self.reseed and self.seed is not None:
            self.generator.manual_seed(self.seed)

    @staticmethod
    def to_device(x: torch.Tensor, device=None, non_blocking: bool = False, **kwargs):
        return x.to(device=device, non_blocking=non_blocking, **kwargs)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
