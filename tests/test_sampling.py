"""The reverse-diffusion loop ``common.diffusion.sampling.sample`` on a toy distribution.

The data are one constant volume ``C``: the best possible model knows ``x0 = C`` from any
``x_t``, so every scheduler must land on ``C`` (or its clipped value) whatever the step count.
"""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import RFlowScheduler

from common.diffusion.sampling import noise_to, sample
from common.diffusion.schedulers import make_scheduler

SHAPE = (2, 1, 4, 4, 3)  # (B, C, H, W, D)
C = 0.3


def oracle(scheduler, x0_value: float, seen: list | None = None):
    """The exact prediction ``(x_t, t (B,)) -> target`` for data that are all ``x0_value``."""

    def model(x, t):
        if seen is not None:
            seen.append((x.clone(), int(t[0])))
        x0 = torch.full_like(x, x0_value)
        if isinstance(scheduler, RFlowScheduler):  # x_t = (1 - s) x0 + s noise, s = t / T
            s = t.double().view(-1, 1, 1, 1, 1) / scheduler.num_train_timesteps
            noise = (x - (1 - s) * x0) / s
            return (x0 - noise).float()
        abar = scheduler.alphas_cumprod[t].double().view(-1, 1, 1, 1, 1)
        noise = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        if scheduler.prediction_type == "epsilon":
            return noise.float()
        if scheduler.prediction_type == "sample":
            return x0
        return (abar.sqrt() * noise - (1 - abar).sqrt() * x0).float()  # v_prediction

    return model


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "kind, prediction_type, steps",
    [
        ("ddim", "v_prediction", 1),
        ("ddim", "v_prediction", 5),
        ("ddim", "v_prediction", 50),
        ("ddim", "epsilon", 20),
        ("ddim", "sample", 20),
        ("ddpm", "v_prediction", 10),
        ("ddpm", "epsilon", 100),
        ("rflow", "v_prediction", 1),
        ("rflow", "v_prediction", 30),
    ],
)
def test_exact_model_lands_on_the_data(kind, prediction_type, steps):
    scheduler = make_scheduler(kind, prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(1)
    out = sample(oracle(scheduler, C), scheduler, _noise(), steps, generator=gen, eta=1.0)
    assert out.shape == SHAPE
    torch.testing.assert_close(out, torch.full(SHAPE, C), atol=1e-4, rtol=0)


def test_ddim_clips_the_x0_estimate_to_the_data_range():
    scheduler = make_scheduler("ddim")
    out = sample(oracle(scheduler, 1.5), scheduler, _noise(), 10)
    torch.testing.assert_close(out, torch.ones(SHAPE), atol=1e-4, rtol=0)


def _toy(x, t):
    """Not an oracle: the result depends on every noise draw."""
    return 0.5 * x + 1e-3 * t.view(-1, 1, 1, 1, 1)


def test_seeded_generators_make_sampling_reproducible():
    ddpm = make_scheduler("ddpm")

    def run(seed, x=None, kind=ddpm, **kwargs):
        x = _noise() if x is None else x
        if isinstance(seed, list):
            gen = [torch.Generator().manual_seed(s) for s in seed]
        else:
            gen = torch.Generator().manual_seed(seed)
        return sample(_toy, kind, x, 10, generator=gen, **kwargs)

    assert torch.equal(run(0), run(0)) and not torch.allclose(run(0), run(1))
    # a list of generators: each item's result is the same alone or batched
    batched, alone = run([3, 4]), run([4], x=_noise()[1:])
    assert torch.equal(batched[1:], alone) and not torch.allclose(batched[0], batched[1])
    # DDIM with eta 0 draws no noise; eta 1 does
    ddim = make_scheduler("ddim")
    assert torch.equal(run(0, kind=ddim, eta=0.0), run(1, kind=ddim, eta=0.0))
    assert not torch.allclose(run(0, kind=ddim, eta=1.0), run(1, kind=ddim, eta=1.0))


@pytest.mark.parametrize("kind", ["ddim", "rflow"])
def test_start_runs_only_the_timesteps_up_to_it(kind):
    scheduler, seen, start = make_scheduler(kind), [], 300
    scheduler.set_timesteps(50)
    schedule = [int(t) for t in scheduler.timesteps]
    x_start = noise_to(scheduler, torch.full(SHAPE, C), start, torch.Generator().manual_seed(0))
    out = sample(oracle(scheduler, C, seen), scheduler, x_start, 50, start=start)
    ts = [t for _, t in seen]
    assert ts == [t for t in schedule if t <= start] and len(ts) < len(schedule)
    assert ts[0] > start - 1000 // 50 and ts[-1] == min(schedule)
    torch.testing.assert_close(out, torch.full(SHAPE, C), atol=1e-4, rtol=0)


def test_fix_known_holds_the_given_slice_before_every_model_call_and_at_the_end():
    scheduler, seen, calls, known = make_scheduler("ddim"), [], [], -0.7

    def fix_known(x, t):
        calls.append(t)
        x = x.clone()
        x[..., 0] = known
        return x

    out = sample(oracle(scheduler, C, seen), scheduler, _noise(), 8, fix_known=fix_known)
    assert calls == [t for _, t in seen] + [0]
    assert all(bool((x[..., 0] == known).all()) for x, _ in seen)
    assert bool((out[..., 0] == known).all())
    torch.testing.assert_close(out[..., 1:], torch.full_like(out[..., 1:], C), atol=1e-4, rtol=0)
