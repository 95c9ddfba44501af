"""Thin network wrappers over MONAI's diffusion UNets."""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet


class PositionalDiffusionUNet(DiffusionModelUNet):
    """MONAI DiffusionModelUNet whose class embedding is a slice position.

    ``forward(x (B, C, *spatial), timesteps (B,), class_labels (B,))``; ``timesteps`` and
    ``class_labels`` also accept ints or lists (as ``monai.bundle verify_net_in_out
    --extra_forward_args`` passes them).
    """

    def forward(self, x, timesteps, context=None, class_labels=None, **kwargs):
        def as_batch(v):
            v = torch.as_tensor(v, device=x.device).long().reshape(-1)
            return v.expand(x.shape[0]) if v.numel() == 1 else v

        labels = None if class_labels is None else as_batch(class_labels)
        return super().forward(
            x, as_batch(timesteps), context=context, class_labels=labels, **kwargs
        )
