"""Semantic diffusion refiner (MedGen3D image stage 2): three 2D mask-conditioned diffusion models.

Each view model is a MONAI ``SPADEDiffusionModelUNet``: the noisy image slice goes through the
UNet, the one-hot mask slice ``{0, 1}`` enters the decoder through SPADE normalisation; an
all-zero mask is the unconditional branch (condition dropout, classifier-free guidance).

Views of a volume ``(C, H, W, D)`` in RAS (H = x, W = y, D = z), by the axis that indexes
the slices: ``axial`` D, ``coronal`` W, ``sagittal`` H. ``to_view_slices`` moves that axis to
the front: axial ``(D, C, H, W)``, coronal ``(W, C, H, D)``, sagittal ``(H, C, W, D)``.

Refinement noises a rough volume to step ``t0``, lets each view model denoise all slices of
its view from that same start and averages the views.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.nets import SPADEDiffusionModelUNet
from monai.networks.schedulers import Scheduler
from monai.transforms import MapTransform, Randomizable
from torch import nn
from tqdm import tqdm

from common.core.io import load_weights
from common.core.seeds import case_seed
from common.diffusion.prepare_batch import SeededPrepareBatch
from common.diffusion.sampling import ModelFn, noise_to, sample
from common.diffusion.schedulers import noisy_and_target

VIEWS = ("axial", "coronal", "sagittal")
SLICE_AXIS = {"axial": 3, "coronal": 2, "sagittal": 1}  # axis of (C, H, W, D)


def _permutation(view: str) -> tuple[int, int, int, int]:
    """Permutation of ``(C, H, W, D)`` that puts the view's slice axis first, then C."""
    if view not in SLICE_AXIS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    axis = SLICE_AXIS[view]
    return (axis, 0, *(i for i in (1, 2, 3) if i != axis))


def to_view_slices(volume: torch.Tensor, view: str) -> torch.Tensor:
    """Volume ``(C, H, W, D)`` -> the view's slices ``(N, C, a, b)`` (see module docstring)."""
    if volume.ndim != 4:
        raise ValueError(f"expected a volume (C, H, W, D), got shape {tuple(volume.shape)}")
    return volume.permute(*_permutation(view))


def from_view_slices(slices: torch.Tensor, view: str, shape: Sequence[int]) -> torch.Tensor:
    """Slices ``(N, C, a, b)`` of ``view`` -> volume of ``shape`` ``(C, H, W, D)``; inverts
    ``to_view_slices`` exactly."""
    perm = _permutation(view)
    expected = tuple(int(shape[i]) for i in perm)
    if tuple(slices.shape) != expected:
        raise ValueError(
            f"{view} slices of a {tuple(shape)} volume must have shape {expected}, "
            f"got {tuple(slices.shape)}"
        )
    return slices.permute(*np.argsort(perm).tolist())


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a 2D slice's 3D affine would be wrong."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def _count(slices: dict[str, torch.Tensor]) -> int:
    """Number of slices, the same under every key."""
    counts = {k: s.shape[0] for k, s in slices.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"the keys' volumes differ in shape along the slice axis: {counts}")
    return next(iter(counts.values()))


class RandViewSlicesd(Randomizable, MapTransform):
    """``num_samples`` random slices of ``view`` from ``(C, H, W, D)`` volumes (training).

    Returns a list of dicts, each with the slices ``(C, a, b)`` under the same keys.
    """

    def __init__(self, keys, view: str, num_samples: int = 1):
        MapTransform.__init__(self, keys)
        _permutation(view)
        self.view, self.num_samples = view, int(num_samples)

    def __call__(self, data) -> list[dict]:
        d = dict(data)
        slices = {k: to_view_slices(_plain(d[k]), self.view) for k in self.key_iterator(d)}
        picks = self.R.randint(0, _count(slices), size=self.num_samples)
        return [{**d, **{k: s[int(i)] for k, s in slices.items()}} for i in picks]


class ViewSlicesd(MapTransform):
    """Every ``stride``-th slice of ``view`` from ``(C, H, W, D)`` volumes (validation)."""

    def __init__(self, keys, view: str, stride: int = 1):
        super().__init__(keys)
        _permutation(view)
        self.view, self.stride = view, int(stride)

    def __call__(self, data) -> list[dict]:
        d = dict(data)
        slices = {k: to_view_slices(_plain(d[k]), self.view) for k in self.key_iterator(d)}
        picks = range(0, _count(slices), self.stride)
        return [{**d, **{k: s[i] for k, s in slices.items()}} for i in picks]


class SemanticDiffusionUNet(SPADEDiffusionModelUNet):
    """A view model: MONAI 2D SPADEDiffusionModelUNet, one image channel in and out, the
    one-hot mask of ``num_classes`` channels entering through SPADE.

    ``forward(x (B, 1, a, b), timesteps (B,), seg (B, K, a, b))``: ``timesteps`` may be an int
    or list (as a bundle check passes it); ``seg`` that is None or not a tensor means an
    all-zero mask, the unconditional branch that condition dropout trains. Slices whose ``a``
    or ``b`` does not divide by ``2 ** (len(channels) - 1)`` (the UNet's levels; e.g. coronal
    ``H x D`` of a volume of any depth) are padded at their high ends to the next multiple,
    repeating the edge, and the output is cropped back.
    """

    def __init__(
        self,
        num_classes: int,
        channels: Sequence[int] = (32, 64, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True, True),
        num_res_blocks: int = 2,
        norm_num_groups: int = 32,
        num_head_channels: int = 8,
        spade_intermediate_channels: int = 128,
    ):
        super().__init__(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            label_nc=int(num_classes),
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            spade_intermediate_channels=spade_intermediate_channels,
        )

    def forward(self, x, timesteps, seg=None, **kwargs):
        t = torch.as_tensor(timesteps, device=x.device).long().reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        if not isinstance(seg, torch.Tensor):
            seg = x.new_zeros(x.shape[0], self.label_nc, *x.shape[2:])
        a, b = x.shape[2:]
        factor = 2 ** (len(self.block_out_channels) - 1)
        pad = (0, -b % factor, 0, -a % factor)
        x, seg = (F.pad(v, pad, mode="replicate") for v in (x, seg))
        return super().forward(x, t, seg=seg, **kwargs)[..., :a, :b]


class SDMPrepareBatch(SeededPrepareBatch):
    """Noised slices for SupervisedTrainer from ``{"image": (B, 1, a, b), "label": (B, K, a, b)}``.

    ``image`` in [-1, 1], ``label`` one-hot {0, 1}. With probability ``condition_dropout`` a
    sample's mask is replaced by zeros (unconditional branch). Returns
    ``(x_t, target, (), {"timesteps", "seg"})``; ``reseed_every_batch`` makes validation
    draw the same noise every time.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        condition_dropout: float = 0.2,
        seed: int | None = None,
        reseed_every_batch: bool = False,
    ):
        if not 0.0 <= condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1], got {condition_dropout}")
        super().__init__(seed, reseed_every_batch)
        self.scheduler, self.condition_dropout = scheduler, float(condition_dropout)

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        self.start_batch()
        x0 = _plain(batchdata["image"]).float()
        seg = _plain(batchdata["label"]).float()
        drop = torch.rand(x0.shape[0], generator=self.generator) < self.condition_dropout
        seg = seg * (~drop).float()[:, None, None, None]
        x_t, target, t = noisy_and_target(self.scheduler, x0, generator=self.generator)

        def move(x):
            return self.to_device(x, device, non_blocking, **kwargs)

        return move(x_t), move(target), (), {"timesteps": move(t), "seg": move(seg)}


def load_view_models(
    network: nn.Module,
    ckpt_dir: str | Path,
    views: Sequence[str] = VIEWS,
    device: str | torch.device = "cpu",
) -> dict[str, nn.Module]:
    """``{view: copy of network with ckpt_dir/refiner_<view>.pt}``, eval mode, on ``device``.

    A missing or mismatched checkpoint raises DataError naming the file.
    """
    for view in views:
        _permutation(view)
    return {
        view: load_weights(copy.deepcopy(network), Path(ckpt_dir) / f"refiner_{view}.pt")
        .to(device)
        .eval()
        for view in views
    }


def view_model(
    network: nn.Module, seg: torch.Tensor, guidance: float, bf16: bool = False
) -> ModelFn:
    """``(x (N, 1, a, b), t (N,)) -> noise`` of ``network``, guided by ``seg (N, K, a, b)``.

    Classifier-free guidance ``uncond + guidance * (cond - uncond)``, the unconditional branch
    seeing an all-zero mask; both branches run in one forward pass of ``2N`` slices. One
    conditional pass when ``guidance == 1``. ``bf16``: the network runs under bf16 autocast,
    its output (and everything after) in float32.
    """

    def net(x, t, s):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return network(x, timesteps=t, seg=s).float()

    if guidance == 1.0:
        return lambda x, t: net(x, t, seg)
    segs = torch.cat([seg, torch.zeros_like(seg)])

    def fn(x, t):
        cond, uncond = net(torch.cat([x, x]), torch.cat([t, t]), segs).chunk(2)
        return uncond + guidance * (cond - uncond)

    return fn


def start_timestep(scheduler: Scheduler, steps: int, t0: int) -> int:
    """The largest timestep ``<= t0`` of the ``steps``-step schedule: where refinement starts."""
    scheduler.set_timesteps(steps)
    ts = [int(t) for t in scheduler.timesteps if int(t) <= t0]
    if not ts:
        raise ValueError(
            f"t0={t0} is below every timestep of a {steps}-step schedule "
            f"(smallest {int(min(scheduler.timesteps))}); raise t0 or steps"
        )
    return max(ts)


def _volume_seeds(seed: int | Sequence[int], batch: int) -> list[int]:
    """One seed per volume: a list as given, or ``case_seed(seed, b)`` for an int."""
    if np.ndim(seed) == 0:
        return [case_seed(int(seed), b) for b in range(batch)]
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} volumes")
    return seeds


def _slice_generators(seed: int, view: str, n: int, device) -> list[torch.Generator]:
    """One generator per slice of a view, from ``(volume seed, view, slice)`` alone, so the
    result does not depend on the batch or ``slice_batch``."""
    view_seed = case_seed(seed, VIEWS.index(view))
    return [torch.Generator(device=device).manual_seed(case_seed(view_seed, i)) for i in range(n)]


def refine_view(
    network: nn.Module,
    scheduler: Scheduler,
    view: str,
    x_start: torch.Tensor,
    onehot_mask: torch.Tensor,
    t_start: int,
    steps: int,
    guidance: float,
    seeds: Sequence[int],
    slice_batch: int,
    progress: bool = False,
    bf16: bool = False,
) -> torch.Tensor:
    """Denoise all ``view`` slices of ``x_start (B, 1, H, W, D)`` from ``t_start``, whole slices
    ``slice_batch`` at a time, each conditioned on its mask slice; returns ``(B, 1, H, W, D)``."""
    x = torch.cat([to_view_slices(v, view) for v in x_start])
    seg = torch.cat([to_view_slices(m, view) for m in onehot_mask])
    n = x.shape[0] // x_start.shape[0]
    gens = [g for s in seeds for g in _slice_generators(s, view, n, x.device)]
    out = torch.empty_like(x)
    chunks = range(0, x.shape[0], slice_batch)
    for i in tqdm(chunks, disable=not progress, desc=f"refine {view}", leave=False):
        part = slice(i, i + slice_batch)
        model = view_model(network, seg[part], guidance, bf16)
        out[part] = sample(model, scheduler, x[part], steps, generator=gens[part], start=t_start)
    return torch.stack([from_view_slices(o, view, x_start.shape[1:]) for o in out.split(n)])


def _check_inputs(models: Mapping[str, nn.Module], image: torch.Tensor, mask: torch.Tensor):
    """Clear errors for unknown views and mis-shaped volumes."""
    if not models or set(models) - set(VIEWS):
        raise ValueError(f"models must map some of {VIEWS} to networks, got {sorted(models)}")
    if image.ndim != 5 or image.shape[1] != 1:
        raise ValueError(f"image must be (B, 1, H, W, D), got {tuple(image.shape)}")
    if mask.ndim != 5 or mask.shape[0] != image.shape[0] or mask.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"onehot_mask must be (B, K, H, W, D) matching image {tuple(image.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    for view, net in models.items():
        label_nc = getattr(net, "label_nc", mask.shape[1])
        if label_nc != mask.shape[1]:
            raise ValueError(
                f"the {view} model expects {label_nc} mask channels, got {mask.shape[1]}: "
                "one-hot the labels with the label set the refiner was trained with"
            )


@torch.inference_mode()
def refine_volume(
    models: Mapping[str, nn.Module],
    scheduler: Scheduler,
    image: torch.Tensor,
    onehot_mask: torch.Tensor,
    t0: int = 10,
    guidance: float = 1.5,
    steps: int = 1000,
    seed: int | Sequence[int] = 0,
    slice_batch: int = 64,
    progress: bool = False,
    bf16: bool = False,
) -> torch.Tensor:
    """Refine rough image volumes with the view models and average the views.

    Args:
        models: ``{view: network}`` for some of ``axial``, ``coronal``, ``sagittal``.
        scheduler: from ``common.diffusion.schedulers.make_scheduler`` (DDPM or DDIM, at
            any number of steps: ``sample`` respaces them).
        image: ``(B, 1, H, W, D)`` in [-1, 1], e.g. the sequence generator's output.
        onehot_mask: ``(B, K, H, W, D)`` one-hot {0, 1}.
        t0: noise level to refine from (of the training schedule, the paper: 10 of 1000);
            with fewer ``steps`` the nearest scheduled timestep ``<= t0`` is used.
        guidance: classifier-free guidance scale (1 = conditional only).
        steps: inference steps over the full schedule; only those ``<= t0`` run.
        seed: one per volume, or an int giving volume ``b`` the seed ``case_seed(seed, b)``.
            The start noise of a volume is shared by all views.
        slice_batch: slices per forward pass (twice that with guidance).
        progress: show progress bars.
        bf16: run the networks under bf16 autocast (faster on recent GPUs and on CPUs with
            AMX / AVX512-BF16; the sampler's arithmetic stays float32).
    Returns the refined volumes ``(B, 1, H, W, D)``, clipped to [-1, 1].
    """
    _check_inputs(models, image, onehot_mask)
    if slice_batch < 1:
        raise ValueError(f"slice_batch must be >= 1, got {slice_batch}")
    seeds = _volume_seeds(seed, image.shape[0])
    t_start = start_timestep(scheduler, steps, t0)
    x_start = torch.cat(
        [
            noise_to(scheduler, v[None].float(), t_start, torch.Generator(v.device).manual_seed(s))
            for v, s in zip(image, seeds)
        ]
    )
    mask = onehot_mask.float()
    views = [
        refine_view(
            net.eval(),
            scheduler,
            view,
            x_start,
            mask,
            t_start,
            steps,
            guidance,
            seeds,
            slice_batch,
            progress,
            bf16,
        )
        for view, net in models.items()
    ]
    return torch.stack(views).mean(0).clamp(-1.0, 1.0)
