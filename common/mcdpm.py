"""MC-DPM (MedGen3D): diffusion over windows of ``m`` axial mask slices.

The network sees ``2K + 1`` channels over a window ``(H, W, m)``: the noisy one-hot window
(given slices kept clean), the given slices (clean one-hot, zero elsewhere) and a 0/1
indicator of which slices are given. Its position ``z`` (start slice) enters as a class
embedding. Training draws per sample a forward (first slices given), backward (last slices
given) or unconditional branch; sampling grows a volume window by window
(``common.sequences.extension_plan``). One-hot masks live in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.schedulers import Scheduler
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from common.diffusion import SeededPrepareBatch, guided, noisy_and_target, sample
from common.sequences import extension_plan

BRANCHES = ("forward", "backward", "unconditional")


def to_signed_onehot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels ``(B, H, W, m)`` -> one-hot in [-1, 1], ``(B, K, H, W, m)``."""
    onehot = F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()
    return onehot * 2.0 - 1.0


def given_mask(direction: str, given: int, m: int) -> torch.Tensor:
    """``(m,)`` bool: the ``given`` lowest (forward) or highest (backward) slices."""
    mask = torch.zeros(m, dtype=torch.bool)
    if direction == "forward":
        mask[:given] = True
    elif direction == "backward":
        mask[m - given :] = True
    return mask


def network_input(x_t: torch.Tensor, x0: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """``x_t, x0 (B, K, H, W, m)``, ``given (B, m)`` -> network input ``(B, 2K+1, H, W, m)``."""
    g = given[:, None, None, None, :].to(x_t.dtype)
    cond = x0 * g
    return torch.cat([x_t * (1 - g) + cond, cond, g.expand(x_t.shape[0], 1, *x_t.shape[2:])], 1)


class MaskedMSELoss(nn.Module):
    """MSE over generated slices only. ``target (B, K+1, ...)``: K target channels + a weight."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value, weight = target[:, :-1], target[:, -1:]
        err = ((pred - value) ** 2 * weight).sum()
        return err / (weight.sum() * value.shape[1]).clamp_min(1.0)


class MCDPMPrepareBatch(SeededPrepareBatch):
    """Builds MC-DPM training inputs from a batch ``{"label": (B, K, H, W, m) one-hot, "z": (B,)}``.

    Per sample a branch is drawn with probabilities ``p_forward, p_backward,
    p_unconditional``; conditioned branches give ``n`` slices, or with probability
    ``p_extra_given`` between ``n+1`` and ``m-1`` (as the windows at the volume's ends are
    sampled). Given slices are never noised and carry zero loss weight.
    Returns ``(inputs, targets, (), {"timesteps", "class_labels"})`` for SupervisedTrainer.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        n: int,
        p_forward: float = 0.4,
        p_backward: float = 0.4,
        p_unconditional: float = 0.2,
        p_extra_given: float = 0.25,
        seed: int | None = None,
        reseed_every_batch: bool = False,
    ):
        probs = torch.tensor([p_forward, p_backward, p_unconditional], dtype=torch.float64)
        if (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"branch probabilities must be >= 0 with a positive sum, got {probs}")
        super().__init__(seed, reseed_every_batch)
        self.scheduler, self.n, self.probs = scheduler, int(n), probs / probs.sum()
        self.p_extra_given = float(p_extra_given)

    def draw_given(self, batch: int, m: int) -> torch.Tensor:
        """``(B, m)`` bool: which slices each sample is given."""
        branches = torch.multinomial(self.probs.float(), batch, True, generator=self.generator)
        extra = torch.rand(batch, generator=self.generator) < self.p_extra_given
        counts = torch.randint(self.n + 1, max(m, self.n + 2), (batch,), generator=self.generator)
        counts = torch.where(extra & (m - 1 > self.n), counts.clamp(max=m - 1), self.n)
        return torch.stack(
            [given_mask(BRANCHES[b], int(c), m) for b, c in zip(branches.tolist(), counts)]
        )

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        self.start_batch()
        x0 = batchdata["label"].float() * 2.0 - 1.0
        z = batchdata["z"].long().reshape(-1)
        given = self.draw_given(x0.shape[0], x0.shape[-1])
        x_t, target, t = noisy_and_target(self.scheduler, x0, generator=self.generator)
        weight = (~given)[:, None, None, None, :].float().expand(x0.shape[0], 1, *x0.shape[2:])
        inputs = network_input(x_t, x0, given)
        targets = torch.cat([target, weight], 1)

        def move(x):
            return self.to_device(x, device, non_blocking, **kwargs)

        return move(inputs), move(targets), (), {"timesteps": move(t), "class_labels": move(z)}


def keep_single_components(labels: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """``(H, W, D)`` labels: keep only the largest 26-connected piece of each listed label.

    Removed pieces become background.
    """
    out = labels.clone()
    arr = labels.cpu().numpy()
    for label_id in label_ids:
        pieces, count = ndimage.label(arr == label_id, structure=np.ones((3, 3, 3)))
        if count > 1:
            sizes = np.bincount(pieces.ravel())[1:]
            drop = (pieces > 0) & (pieces != 1 + int(sizes.argmax()))
            out[torch.from_numpy(drop)] = 0
    return out


@torch.inference_mode()
def sample_mask_volumes(
    network: nn.Module,
    scheduler: Scheduler,
    num_classes: int,
    spatial_size: Sequence[int],
    m: int,
    n: int,
    steps: int,
    seeds: Sequence[int],
    guidance: float = 1.0,
    z0: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Sample whole label volumes ``(B, H, W, D)``, window by window, one per seed.

    Volume ``b`` draws its first window's start (unless ``z0`` is given) and all of its noise
    from a generator on ``device`` seeded with ``seeds[b]``, so it does not depend on the
    batch. Windows at the same plan step of all volumes are denoised in one batch.
    """
    h, w, depth = (int(s) for s in spatial_size)
    dev = torch.device(device)
    gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
    starts = (
        list(z0)
        if z0 is not None
        else [int(torch.randint(0, depth - m + 1, (1,), generator=g, device=dev)) for g in gens]
    )
    plans = [extension_plan(depth, m, n, s) for s in starts]
    volumes = torch.zeros(len(seeds), num_classes, h, w, depth, device=dev)
    network = network.eval()
    rounds = range(max(len(p) for p in plans))
    for i in tqdm(rounds, disable=not progress, desc="windows", leave=False):
        idx = [b for b, p in enumerate(plans) if i < len(p)]
        steps_i = [plans[b][i] for b in idx]
        given = torch.stack([given_mask(s.direction, s.given, m) for s in steps_i]).to(dev)
        cond = torch.stack([volumes[b, ..., s.start : s.start + m] for b, s in zip(idx, steps_i)])
        z = torch.tensor([s.start for s in steps_i], device=dev)
        noise = torch.stack(
            [torch.randn(num_classes, h, w, m, generator=gens[b], device=dev) for b in idx]
        )
        gens_i = [gens[b] for b in idx]
        window = _denoise_window(network, scheduler, noise, cond, given, z, steps, gens_i, guidance)
        labels = window.argmax(1)
        for j, (b, s) in enumerate(zip(idx, steps_i)):
            new = ~given[j]
            onehot = to_signed_onehot(labels[j : j + 1], num_classes)[0]
            volumes[b, ..., s.start : s.start + m][..., new] = onehot[..., new]
    return volumes.argmax(1).cpu()


def _denoise_window(network, scheduler, noise, cond, given, z, steps, gens, guidance):
    """Denoise windows ``(B, K, H, W, m)`` keeping the given slices equal to ``cond``."""
    g = given[:, None, None, None, :].float()
    no_given = torch.zeros_like(given)

    def cond_fn(x, t):
        return network(network_input(x, cond, given), timesteps=t, class_labels=z)

    def uncond_fn(x, t):
        return network(network_input(x, cond, no_given), timesteps=t, class_labels=z)

    def fix_known(x, t):
        return x * (1 - g) + cond * g

    model = guided(cond_fn, uncond_fn, guidance) if given.any() else cond_fn
    return sample(model, scheduler, noise, steps, generator=gens, fix_known=fix_known)
