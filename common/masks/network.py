"""The MC-DPM backbone: a 3D MONAI DiffusionModelUNet over a window of ``m`` mask slices."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn


class PositionEmbedding(nn.Embedding):
    """An ``nn.Embedding`` (same ``weight (K, C)``) that also takes fractional positions.

    ``forward(positions (B,))``: integer positions are the plain lookup; a float position
    ``q`` in ``[0, K-1]`` interpolates linearly between rows ``floor(q)`` and ``floor(q)+1``
    (outside, the end rows). A float with an integer value gives its row exactly.
    """

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if not positions.is_floating_point():
            return super().forward(positions)
        q = positions.float().clamp(0, self.num_embeddings - 1)
        low = q.floor().long()
        high = (low + 1).clamp(max=self.num_embeddings - 1)
        frac = (q - low)[:, None]
        return F.embedding(low, self.weight) * (1 - frac) + F.embedding(high, self.weight) * frac


def window_position(start: int, depth: int, m: int, train_depth: int) -> float:
    """The position of a window of ``m`` slices at ``start`` in a volume of ``depth`` slices,
    in the training grid's window starts (``0..train_depth - m``, ``MCDPMUNet``'s anchors).

    Positions are relative: ``start / (depth - m)`` of the way from the first window start to
    the last, so at ``depth == train_depth`` the position is ``start`` itself. A volume of
    ``m`` slices (one window) sits in the middle.
    """
    if depth == m:
        return (train_depth - m) / 2
    return start * (train_depth - m) / (depth - m)


class MCDPMUNet(DiffusionModelUNet):
    """DiffusionModelUNet sized from the MC-DPM setting; its class embedding is the window start.

    Input ``(B, 2K + 1, H, W, m)`` (``common.masks.mcdpm.network_input``: noisy window, given
    slices, indicator), output ``(B, K, H, W, m)``, ``K = num_classes``. ``forward(x,
    timesteps (B,), class_labels (B,))``: ``class_labels`` is the window start on the training
    grid, ``0..D-m`` (``D = spatial_size[2]``), one embedding row (anchor) per integer
    start; a float start between two anchors interpolates them (``PositionEmbedding``), so
    volumes of any depth can be sampled (``window_position``). ``timesteps`` and
    ``class_labels`` also accept ints, floats or lists (as ``monai.bundle verify_net_in_out
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
        table = self.class_embedding  # MONAI's nn.Embedding: keep its (initialised) weight
        self.class_embedding = PositionEmbedding(*table.weight.shape, _weight=table.weight.data)

    def forward(self, x, timesteps, context=None, class_labels=None, **kwargs):
        def as_batch(v, long=True):
            v = torch.as_tensor(v, device=x.device).reshape(-1)
            v = v.long() if long or not v.is_floating_point() else v
            return v.expand(x.shape[0]) if v.numel() == 1 else v

        labels = None if class_labels is None else as_batch(class_labels, long=False)
        return super().forward(
            x, as_batch(timesteps), context=context, class_labels=labels, **kwargs
        )
