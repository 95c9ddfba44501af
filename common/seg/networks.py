"""The segmentation networks of the downstream study, all MONAI's: one constructor for four.

``make_network`` is the seg_downstream bundle's ``network_def``: the config names the
architecture (``network_name``) and gives a table of sizes per architecture
(``network_sizes``); the channel counts and the shape checks are worked out here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from monai.networks.nets import UNETR, SwinUNETR, UNet
from torch import nn

NETWORKS = ("unet2d", "unet3d", "unetr", "swinunetr")


class SliceWise(nn.Module):
    """A 2D network applied to every axial slice: ``(B, C, H, W, D) -> (B, K, H, W, D)``.

    The D slices of each volume go through the 2D network as a batch of ``B * D`` images,
    so training sees independent slices and inference segments slice by slice.
    """

    def __init__(self, net2d: nn.Module):
        super().__init__()
        self.net = net2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w, d = x.shape
        out = self.net(x.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w))
        return out.reshape(b, d, out.shape[1], h, w).permute(0, 2, 3, 4, 1)


def _check_divisible(name: str, size: Sequence[int], factor: int, why: str) -> None:
    """Raise ValueError unless every entry of ``size`` is a multiple of ``factor``."""
    if any(int(s) % factor for s in size):
        raise ValueError(
            f"{name}: roi_size {list(size)} must be a multiple of {factor} ({why}); "
            f"set roi_size (and spatial_size) to multiples of {factor}"
        )


def _build(
    name: str, num_classes: int, size: list[int], sizes: dict, in_channels: int
) -> nn.Module:
    """The MONAI network ``name`` (one of ``NETWORKS``) with keyword arguments ``sizes``."""
    if name in ("unet2d", "unet3d"):
        dims = 2 if name == "unet2d" else 3
        factor = math.prod(int(s) for s in sizes.get("strides", ()))
        _check_divisible(name, size[:dims], factor, "the UNet halves the grid at each stride")
        net = UNet(dims, in_channels, num_classes, **sizes)
        return SliceWise(net) if dims == 2 else net
    if name == "unetr":
        _check_divisible(name, size, 16, "UNETR embeds 16x16x16 patches")
        return UNETR(in_channels, num_classes, img_size=size, **sizes)
    _check_divisible(name, size, 32, "SwinUNETR halves the grid five times")
    norm = str(sizes.get("norm_name", "instance")).lower()
    if math.prod(s // 32 for s in size) == 1 and "instance" in norm:
        raise ValueError(
            f"swinunetr: at roi_size {size} the deepest features are one voxel, which "
            "instance norm cannot train on; set network_sizes#swinunetr#norm_name to "
            "['group', {num_groups: 4}] or use a larger roi_size"
        )
    return SwinUNETR(in_channels, num_classes, **sizes)


def make_network(
    name: str,
    num_classes: int,
    spatial_size: Sequence[int],
    sizes: Mapping[str, Mapping],
    in_channels: int = 1,
) -> nn.Module:
    """The segmentation network ``(B, in_channels, H, W, D) -> (B, num_classes, H, W, D)`` logits.

    ``name``: ``unet2d`` (a 2D MONAI UNet applied slice-wise), ``unet3d`` (MONAI UNet,
    ``spatial_dims=3``), ``unetr`` or ``swinunetr``. ``spatial_size`` is the network's input
    window ``(H, W, D)`` (UNETR's ``img_size``). ``sizes[name]`` are the keyword arguments of
    the MONAI class (``channels``/``strides``/``num_res_units``; ``feature_size``/
    ``hidden_size``/``mlp_dim``/``num_heads``; ``feature_size``/``depths``/``num_heads``).
    """
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; set network_name to one of {NETWORKS}")
    if name not in sizes:
        raise ValueError(f"network_sizes has no {name!r} entry; add network_sizes#{name}")
    kwargs = dict(sizes[name])
    try:
        return _build(name, num_classes, [int(s) for s in spatial_size], kwargs, in_channels)
    except TypeError as e:
        raise ValueError(f"network_sizes#{name} {kwargs} do not fit the network: {e}") from e
