"""The MC-DPM backbone: a 3D MONAI DiffusionModelUNet over a window of ``m`` mask slices."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet


class MCDPMUNet(DiffusionModelUNet):
    """DiffusionModelUNet sized from the MC-DPM setting; its class embedding is the window start.

    Input ``(B, 2K + 1, H, W, m)`` (``common.masks.mcdpm.network_input``: noisy window, given
    slices, indicator), output ``(B, K, H, W, m)``, ``K = num_classes``. ``forward(x,
    timesteps (B,), class_labels (B,))``: ``class_labels`` is the window start on the training
    grid, ``0..D-m`` (``D = spatial_size[2]``), one embedding row per start. ``timesteps`` and
    ``class_labels`` also accept ints or lists (as ``monai.bundle verify_net_in_out
    --extra_forward_args`` passes them).
    """

    def __init__(
        self,
        num_classes: int,
        m: int,
        spatial_size: Sequence[int],
        channels: Sequence[int],
        attention_levels: Sequence[bool],
        num_res_blocks: int | Sequence[int] = 1,
        norm_num_groups: int = 32,
        num_head_channels: int | Sequence[int] = 8,
    ):
        depth = int(spatial_size[-1])
        if not 0 < m <= depth:
            raise ValueError(f"window size m={m} must be in 1..{depth} (the grid's depth)")
        super().__init__(
            spatial_dims=3,
            in_channels=2 * num_classes + 1,
            out_channels=num_classes,
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            num_class_embeds=depth - m + 1,
        )

    def forward(self, x, timesteps, context=None, class_labels=None, **kwargs):
        def as_batch(v):
            v = torch.as_tensor(v, device=x.device).reshape(-1).long()
            return v.expand(x.shape[0]) if v.numel() == 1 else v

        labels = None if class_labels is None else as_batch(class_labels)
        return super().forward(
            x, as_batch(timesteps), context=context, class_labels=labels, **kwargs
        )
