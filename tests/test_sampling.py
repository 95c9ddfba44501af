"""The reverse-diffusion loop ``common.diffusion.sampling.sample`` on toy distributions.

Constant data ``C``: the best possible model knows ``x0 = C`` from any ``x_t``, so every
scheduler must land on ``C`` (or its clipped value) whatever the step count. Gaussian data
``N(MU, S^2)``: the best model is linear in ``x_t``, so each sampler step maps the output
variance in closed form and the sampled mean and std must match it at every step count.
"""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import RFlowScheduler

from common.diffusion.sampling import noise_to, respace, sample
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


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "rflow"])
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


MU, S, N = 0.2, 0.3, 20000  # Gaussian toy data N(MU, S^2), N samples


def _levels(scheduler, t):
    """``(a, b)`` with ``x_t = a x0 + b noise``, float64, broadcastable like ``t``."""
    if isinstance(scheduler, RFlowScheduler):
        s = t.double() / scheduler.num_train_timesteps
        return 1 - s, s
    abar = scheduler.alphas_cumprod.double()[t]
    return abar.sqrt(), (1 - abar).sqrt()


def gaussian_oracle(scheduler):
    """The exact prediction for data ``N(MU, S^2)``: ``E[x0 | x_t]`` and ``E[noise | x_t]``."""

    def model(x, t):
        a, b = (v.view(-1, *[1] * (x.ndim - 1)) for v in _levels(scheduler, t))
        x0 = MU + a * S**2 / (a**2 * S**2 + b**2) * (x.double() - a * MU)
        noise = (x.double() - a * x0) / b
        if isinstance(scheduler, RFlowScheduler):
            return (x0 - noise).float()
        if scheduler.prediction_type == "epsilon":
            return noise.float()
        return (a * noise - b * x0).float()  # v_prediction

    return model


def exact_std(scheduler, steps: int, eta: float, start: int | None = None) -> float:
    """The output std of the sampler with ``gaussian_oracle``, from its timesteps alone.

    DDIM (paper eq. 12, ``eta``; DDPM's posterior step is ``eta = 1``) from each timestep
    to the next kept one (clean after the last); rectified flow: an Euler step of
    ``x0 - noise``.
    """
    scheduler.set_timesteps(steps)
    ts = [int(t) for t in scheduler.timesteps]
    rflow = isinstance(scheduler, RFlowScheduler)
    run = [t for t in ts if start is None or t <= start]
    a, b = _levels(scheduler, torch.tensor(run[0]))
    var = float(a**2 * S**2 + b**2)
    for t, nxt in zip(run, [*run[1:], None]):
        a, b = (float(v) for v in _levels(scheduler, torch.tensor(t)))
        k, e = a * S**2 / (a**2 * S**2 + b**2), b / (a**2 * S**2 + b**2)  # x0, noise per x_t
        if rflow:
            dt = (t - (nxt or 0)) / scheduler.num_train_timesteps
            gain, sigma2 = 1 + (k - e) * dt, 0.0
        else:
            abar_t = a**2
            abar = 1.0 if nxt is None else float(scheduler.alphas_cumprod[nxt])
            sigma2 = eta**2 * (1 - abar) / (1 - abar_t) * (1 - abar_t / abar)
            gain = abar**0.5 * k + (1 - abar - sigma2) ** 0.5 * e
        var = gain**2 * var + sigma2
    return var**0.5


# (kind, eta, steps): every sampler the CLI allows; DDPM ignores eta (its step is eta = 1)
SAMPLERS = [("ddpm", 1.0, 1000)] + [
    (kind, eta, steps)
    for kind, eta in [("ddpm", 1.0), ("ddim", 0.0), ("ddim", 1.0), ("rflow", 0.0)]
    for steps in (50, 20, 10)
]
CASES = [
    (*sampler, prediction)
    for sampler in SAMPLERS
    for prediction in (["v_prediction"] if sampler[0] == "rflow" else ["v_prediction", "epsilon"])
]


@pytest.mark.parametrize("kind, eta, steps, prediction_type", CASES)
def test_exact_model_gives_the_gaussian_data_statistics(kind, eta, steps, prediction_type):
    """Every sampler the CLI allows, at 10 to 1000 steps, with the best possible model of
    Gaussian data (MC-DPM predicts v, the refiners the noise): the sampled mean is the data's,
    the std the closed form of its steps (DDPM-1000: the data's, as the issue measured)."""
    scheduler = make_scheduler(kind, prediction_type=prediction_type)
    x = torch.randn(1, 1, N, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    out = sample(gaussian_oracle(scheduler), scheduler, x, steps, generator=gen, eta=eta)
    assert abs(out.mean().item() - MU) < 0.01
    assert out.std().item() == pytest.approx(exact_std(scheduler, steps, eta), rel=0.02)
    if steps == 1000:
        assert out.std().item() == pytest.approx(S, rel=0.02)


@pytest.mark.parametrize(
    "kind, eta, steps",
    [
        ("ddpm", 1.0, 1000),
        ("ddpm", 1.0, 100),
        ("ddpm", 1.0, 20),
        ("ddim", 1.0, 100),
        ("ddim", 0.0, 20),
    ],
)
@pytest.mark.parametrize("start", [10, 300])
def test_partial_denoising_from_a_noised_start(kind, eta, steps, start):
    """The refiner's use: real data noised to the largest kept timestep <= start, denoised."""
    scheduler = make_scheduler(kind, prediction_type="epsilon")
    scheduler.set_timesteps(steps)
    t0 = max(int(t) for t in scheduler.timesteps if int(t) <= start)
    x0 = MU + S * torch.randn(1, 1, N, generator=torch.Generator().manual_seed(0))
    x_start = noise_to(scheduler, x0, t0, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    model = gaussian_oracle(scheduler)
    out = sample(model, scheduler, x_start, steps, generator=gen, start=start, eta=eta)
    assert abs(out.mean().item() - MU) < 0.01
    assert out.std().item() == pytest.approx(exact_std(scheduler, steps, eta, start), rel=0.02)


def test_respace_keeps_the_kept_noise_levels_and_all_steps_unchanged():
    ddpm = make_scheduler("ddpm")
    spaced = respace(ddpm, [999, 500, 0])
    assert torch.equal(spaced.alphas_cumprod, ddpm.alphas_cumprod[[0, 500, 999]])
    torch.testing.assert_close(torch.cumprod(spaced.alphas, 0), spaced.alphas_cumprod)
    assert respace(ddpm, range(1000)) is ddpm and ddpm.alphas_cumprod.shape == (1000,)
    with pytest.raises(ValueError, match="steps must be 1 to 1000"):
        sample(_toy, ddpm, _noise(), 0)
