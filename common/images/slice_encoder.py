"""Axial-slice features of image volumes, for FID and MMD (``common.images.metrics``).

The feature extractor is a small MONAI AutoEncoder trained here on the real slices (nothing is
downloaded), or any ``SliceFeatureExtractor`` a caller passes to ``evaluate_images``. Volumes
are ``(N, 1, H, W, D)`` (or lists of ``(1, H, W, D)`` / ``(H, W, D)``) in [-1, 1], ``D`` = axial
slices.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoEncoder
from torch import nn

SAME_GRID_FIX = (
    "compare volumes on the same grid, e.g. real cases preprocessed to the model's shape"
)
ENCODER_CHANNELS = (16, 32, 64)  # feature size F = 64
ENCODER_STRIDES = (2, 2, 2)
ENCODER_EPOCHS = 20
FEATURE_BATCH = 256


class SliceFeatureExtractor(Protocol):
    """Axial slices ``(B, 1, h, w)`` in [-1, 1] -> features ``(B, F)`` (or ``(B, F, ...)``)."""

    def __call__(self, slices: torch.Tensor) -> torch.Tensor: ...


def as_volumes(x, kind: str) -> torch.Tensor:
    """Images as a CPU float32 tensor ``(N, 1, H, W, D)``, from ``(N, 1, H, W, D)`` or a list."""
    vols = [
        torch.as_tensor(v).detach().to("cpu", torch.float32).as_subclass(torch.Tensor) for v in x
    ]
    if not vols:
        raise ValueError(f"no {kind} volumes")
    for i, v in enumerate(vols):
        if v.ndim not in (3, 4) or (v.ndim == 4 and v.shape[0] != 1):
            raise ValueError(
                f"{kind} volume {i} has shape {tuple(v.shape)}, expected (1, H, W, D) or (H, W, D)"
            )
        if v.shape[-3:] != vols[0].shape[-3:]:
            raise ValueError(
                f"{kind} volume {i} has shape {tuple(v.shape[-3:])} but {kind} volume 0 has "
                f"{tuple(vols[0].shape[-3:])}; {SAME_GRID_FIX}"
            )
    return torch.stack([v.reshape(1, *v.shape[-3:]) for v in vols])


def axial_slices(volumes: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W, D)`` -> ``(N * D, 1, H, W)``, volume by volume."""
    n, c, h, w, d = volumes.shape
    return volumes.permute(0, 4, 1, 2, 3).reshape(n * d, c, h, w)


def _device(extractor) -> torch.device:
    """Device of a module's first parameter; CPU for anything else."""
    params = extractor.parameters() if isinstance(extractor, nn.Module) else iter(())
    return next(params, torch.empty(0)).device


def slice_features(volumes, extractor: SliceFeatureExtractor) -> torch.Tensor:
    """Features ``(N * D, F)`` (float64, CPU) of the axial slices of ``(N, 1, H, W, D)``.

    Outputs with spatial dims ``(B, F, ...)`` are averaged over them.
    """
    slices = axial_slices(as_volumes(volumes, "volume"))
    device, out = _device(extractor), []
    with torch.no_grad():
        for batch in slices.split(FEATURE_BATCH):
            f = extractor(batch.to(device))
            out.append(f.reshape(*f.shape[:2], -1).mean(-1).double().cpu())
    return torch.cat(out)


def _slice_autoencoder() -> AutoEncoder:
    """The 2D AutoEncoder behind the slice encoder; no normalisation layers, so that features
    keep the absolute intensity (instance norm would hide an intensity shift)."""
    return AutoEncoder(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=ENCODER_CHANNELS,
        strides=ENCODER_STRIDES,
        norm=None,
    )


def _encoder(autoencoder: AutoEncoder) -> nn.Sequential:
    """Encoder + global average pooling: ``(B, 1, h, w) -> (B, ENCODER_CHANNELS[-1])``."""
    return nn.Sequential(autoencoder.encode, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode without gradients."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def train_slice_encoder(
    real_slices: torch.Tensor,
    epochs: int = ENCODER_EPOCHS,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
) -> nn.Module:
    """Train a small MONAI AutoEncoder on real slices ``(N, 1, h, w)`` in [-1, 1] with MSE.

    Returns its frozen encoder with global average pooling, ``(B, 1, h, w) -> (B, 64)``. Trained
    on the CPU, deterministic for ``seed``, the global random state untouched; a few seconds for
    a few hundred 32x32 slices.
    """
    x = torch.as_tensor(real_slices).detach().to("cpu", torch.float32).as_subclass(torch.Tensor)
    h, w = x.shape[2:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = _slice_autoencoder()
        order = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.Adam(autoencoder.parameters(), lr=lr)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=order).split(batch_size):
                batch = x[idx]
                loss = F.mse_loss(autoencoder(batch)[..., :h, :w], batch)  # crop stride padding
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
    return _frozen(_encoder(autoencoder))
