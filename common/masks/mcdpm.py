"""MC-DPM (MedGen3D): diffusion over windows of ``m`` axial mask slices.

The network sees ``2K + 1`` channels over a window ``(H, W, m)``: the noisy one-hot window
(given slices kept clean), the given slices (clean one-hot, zero elsewhere) and a 0/1
indicator of which slices are given. Its position ``z`` (start slice) enters as a class
embedding. Training draws per sample a forward (first slices given), backward (last slices
given) or unconditional branch; sampling grows a volume window by window
(``common.masks.windows.extension_plan``). One-hot masks live in [-1, 1].
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

from common.diffusion.prepare_batch import SeededPrepareBatch
from common.diffusion.sampling import sample
from common.diffusion.schedulers import noisy_and_target
from common.masks.windows import WindowStep, extension_plan

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
    sampled). Given slices are never noised and carry zero loss weight; a generated voxel of
    class ``k`` weighs ``class_weights[k]`` (None or empty: all 1; thin structures can be
    weighted up).
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
        class_weights: Sequence[float] | None = None,
    ):
        probs = torch.tensor([p_forward, p_backward, p_unconditional], dtype=torch.float64)
        if (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"branch probabilities must be >= 0 with a positive sum, got {probs}")
        super().__init__(seed, reseed_every_batch)
        self.scheduler, self.n, self.probs = scheduler, int(n), probs / probs.sum()
        self.p_extra_given = float(p_extra_given)
        self.class_weights = torch.tensor(class_weights).float() if class_weights else None

    def for_validation(self, seed: int) -> MCDPMPrepareBatch:
        """The same branch mix, drawn again from ``seed`` every batch, all classes weighted 1."""
        p_forward, p_backward, p_unconditional = self.probs.tolist()
        return MCDPMPrepareBatch(
            self.scheduler,
            self.n,
            p_forward,
            p_backward,
            p_unconditional,
            self.p_extra_given,
            seed=seed,
            reseed_every_batch=True,
        )

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
        if self.class_weights is not None:
            if len(self.class_weights) != x0.shape[1]:
                raise ValueError(
                    f"class_weights has {len(self.class_weights)} values for {x0.shape[1]} "
                    "classes; give one weight per label (background first)"
                )
            weight = weight * self.class_weights[x0.argmax(1)][:, None]
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
    bf16: bool = False,
    eta: float = 1.0,
) -> torch.Tensor:
    """Sample whole label volumes ``(B, H, W, D)``, window by window, one per seed.

    Volume ``b`` draws its first window's start (unless ``z0`` is given) and all of its noise
    from a generator on ``device`` seeded with ``seeds[b]``, so it does not depend on the
    batch. After the first window the upward and downward windows grow side by side
    (``plan_rounds``); all windows of a round, of all volumes, are denoised in one batch.
    ``bf16`` runs the network under bf16 autocast (faster on recent GPUs and on CPUs with
    AMX / AVX512-BF16); the sampler's arithmetic stays float32. ``eta`` (DDIM only): 1 adds
    fresh noise every step as DDPM does; few-step masks then come out far less fragmented
    than with deterministic DDIM (``eta=0``), see benchmarks/results.md. A window's position
    is its start, so ``D`` is the depth the network was trained at
    (``common.masks.pipeline.resample_depth`` makes other lengths).
    """
    h, w, depth = (int(s) for s in spatial_size)
    dev = torch.device(device)
    gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
    starts = (
        list(z0)
        if z0 is not None
        else [int(torch.randint(0, depth - m + 1, (1,), generator=g, device=dev)) for g in gens]
    )
    plans = [plan_rounds(extension_plan(depth, m, n, s)) for s in starts]
    volumes = torch.zeros(len(seeds), num_classes, h, w, depth, device=dev)
    network = network.eval()
    rounds = range(max(len(p) for p in plans))
    for i in tqdm(rounds, disable=not progress, desc="windows", leave=False):
        jobs = [(b, s) for b, p in enumerate(plans) if i < len(p) for s in p[i]]
        given = torch.stack([given_mask(s.direction, s.given, m) for _, s in jobs]).to(dev)
        cond = torch.stack([volumes[b, ..., s.start : s.start + m] for b, s in jobs])
        z = torch.tensor([s.start for _, s in jobs], device=dev)
        noise = torch.stack(
            [torch.randn(num_classes, h, w, m, generator=gens[b], device=dev) for b, _ in jobs]
        )
        gens_i = [gens[b] for b, _ in jobs]
        window = _denoise_window(
            network, scheduler, noise, cond, given, z, steps, gens_i, guidance, bf16, eta
        )
        onehot = to_signed_onehot(window.argmax(1), num_classes)
        for j, (b, s) in enumerate(jobs):
            new = ~given[j]
            volumes[b, ..., s.start : s.start + m][..., new] = onehot[j][..., new]
    return volumes.argmax(1).cpu()


def plan_rounds(plan: Sequence[WindowStep]) -> list[list[WindowStep]]:
    """An ``extension_plan`` as rounds: the first window, then per round the next upward and
    the next downward window. The upward chain reads and writes only slices from the first
    window's start up, the downward one only slices below its end, so they run together."""
    up = [s for s in plan if s.direction == "forward"]
    down = [s for s in plan if s.direction == "backward"]
    return [[plan[0]]] + [
        [*up[i : i + 1], *down[i : i + 1]] for i in range(max(len(up), len(down)))
    ]


def _denoise_window(network, scheduler, noise, cond, given, z, steps, gens, guidance, bf16, eta):
    """Denoise windows ``(B, K, H, W, m)`` keeping the given slices equal to ``cond``.

    With guidance, the conditional and unconditional (nothing given) branches run in one
    forward pass of ``2B`` windows; ``bf16`` runs that pass under bf16 autocast. The
    unconditional branch sees what training's does: every slice noised to ``t``, the given
    ones freshly from ``cond`` (noise from each window's generator), no condition channels.
    """
    g = given[:, None, None, None, :].float()
    guide = guidance != 1.0 and bool(given.any())
    branches = torch.cat([given, torch.zeros_like(given)]) if guide else given
    cond_b, z_b = (cond.repeat(2, 1, 1, 1, 1), z.repeat(2)) if guide else (cond, z)

    def unconditional(x, t):
        fresh = torch.stack(
            [torch.randn(x.shape[1:], generator=gn, device=x.device) for gn in gens]
        )
        noised = scheduler.add_noise(original_samples=cond, noise=fresh, timesteps=t)
        return x * (1 - g) + noised * g

    def model(x, t):
        x_b, t_b = (torch.cat([x, unconditional(x, t)]), t.repeat(2)) if guide else (x, t)
        inputs = network_input(x_b, cond_b, branches)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = network(inputs, timesteps=t_b, class_labels=z_b).float()
        if not guide:
            return pred
        c, u = pred.chunk(2)
        return u + guidance * (c - u)

    def fix_known(x, t):
        return x * (1 - g) + cond * g

    return sample(model, scheduler, noise, steps, generator=gens, fix_known=fix_known, eta=eta)
