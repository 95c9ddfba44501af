"""Image sequence generator (MedGen3D stage 1, Vid2Vid-style without optical flow).

A volume is generated slice by slice along the axial axis: slice ``t`` comes from the one-hot
mask slices ``t, t-1, t-2`` and the image slices ``t-1, t-2`` generated before it. The first
slices of a volume see ``CONTEXT`` zero slices (zero mask, zero image) in place of the missing
predecessors; training windows are padded the same way, so the volume start is learnt.

The generator blends a hallucinated slice with slice ``t-1`` (Vid2Vid's output with the
identity in place of the flow warp). Training (``SequenceGanTrainer``): windows of
``CONTEXT + L`` slices, the ``L`` generated in order, each fed back (detached) with probability
``p_own``, else the real slice (teacher forcing). Losses: L1, LSGAN with a multi-scale 2D patch
discriminator on (mask, image) slices and a temporal one on 3 consecutive slices, and
discriminator feature matching.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.engines import Trainer
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.inferers import Inferer
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import MultiScalePatchDiscriminator, UNet
from monai.transforms import BorderPadd
from monai.utils import convert_to_tensor
from torch import nn
from tqdm import tqdm

from common.core.distributed import rank_seed
from common.core.savers import as_flag, autocast
from common.core.training import require_finite
from common.masks.windows import RandWindowd

CONTEXT = 2  # predecessors of a slice (Vid2Vid: 2 previous frames); fixed by slice_input


def generator_in_channels(num_classes: int) -> int:
    """Input channels of the slice generator: 3 one-hot mask slices + 2 image slices."""
    return 3 * int(num_classes) + CONTEXT


class SliceGenerator(nn.Module):
    """2D conditional generator: ``(B, 3K+2, H, W)`` -> one image slice ``(B, 1, H, W)``.

    Input channels (``slice_input``): mask slices ``t, t-1, t-2`` (K each), then image slices
    ``t-1, t-2``. A MONAI 2D residual UNet (instance norm, stride 2 per level) predicts a
    hallucinated slice ``h`` (tanh) and a weight ``w`` (sigmoid); the output is Vid2Vid's
    blend ``w * h + (1 - w) * image[t-1]`` with the identity in place of the optical-flow
    warp, so it lies in [-1, 1] when the previous slice does. H and W must be divisible by
    ``2 ** (len(channels) - 1)``.
    """

    def __init__(
        self,
        num_classes: int,
        channels: Sequence[int] = (32, 64, 128, 256),
        num_res_units: int = 2,
        norm: str = "instance",
    ):
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"channels needs at least 2 levels, got {list(channels)}")
        self.num_classes, self.factor = int(num_classes), 2 ** (len(channels) - 1)
        self.unet = UNet(
            spatial_dims=2,
            in_channels=generator_in_channels(num_classes),
            out_channels=2,
            channels=tuple(channels),
            strides=(2,) * (len(channels) - 1),
            num_res_units=num_res_units,
            norm=norm,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(
                f"slice size {x.shape[-2]} x {x.shape[-1]} must be divisible by {self.factor} "
                "(2 ** (len(gen_channels) - 1)); change spatial_size or gen_channels"
            )
        out = self.unet(x)
        hallucinated, weight = torch.tanh(out[:, :1]), torch.sigmoid(out[:, 1:])
        previous = x[:, 3 * self.num_classes : 3 * self.num_classes + 1]
        return weight * hallucinated + (1 - weight) * previous


def slice_input(masks: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Generator input for one slice.

    ``masks (B, K, H, W, 3)``: mask slices ``t-2, t-1, t``; ``previous (B, 1, H, W, 2)``:
    image slices ``t-2, t-1``. Returns ``(B, 3K+2, H, W)``: masks ``t, t-1, t-2``, images
    ``t-1, t-2``.
    """
    return torch.cat(
        [masks[..., 2], masks[..., 1], masks[..., 0], previous[..., 1], previous[..., 0]], 1
    )


def pad_context(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W, D)`` -> ``(B, C, H, W, CONTEXT + D)``: zero slices before the first."""
    return torch.nn.functional.pad(x, (CONTEXT, 0))


def training_windows(keys: Sequence[str], length: int, num_samples: int = 1) -> list:
    """Transforms of ``(C, H, W, D)`` volumes into ``num_samples`` training windows
    ``(C, H, W, CONTEXT + length)``: ``CONTEXT`` zero slices go before the first slice (what it
    sees at inference), then windows of ``CONTEXT + length`` slices are cut at random."""
    return [
        BorderPadd(keys, spatial_border=[0, 0, 0, 0, CONTEXT, 0]),
        RandWindowd(keys, m=CONTEXT + int(length), num_samples=num_samples),
    ]


def unroll(
    generator: nn.Module,
    masks: torch.Tensor,
    previous: torch.Tensor,
    teacher: torch.Tensor | None = None,
    p_own: float = 1.0,
    rng: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate ``L`` slices in order, each seeing its two predecessors.

    ``masks (B, K, H, W, CONTEXT + L)``: the first ``CONTEXT`` slices precede the generated
    ones; ``previous (B, 1, H, W, CONTEXT)``: the image slices before the first generated one.
    Each output is fed back as a predecessor (detached), except that with ``teacher``
    ``(B, 1, H, W, L)`` (the real slices) each sample feeds the real slice instead with
    probability ``1 - p_own`` (drawn from ``rng`` per sample and slice). ``progress`` shows
    a slice counter. Returns ``(B, 1, H, W, L)``.
    """
    length = masks.shape[-1] - CONTEXT
    if length < 1 or previous.shape[-1] != CONTEXT:
        raise ValueError(
            f"need masks with > {CONTEXT} slices and {CONTEXT} previous slices, "
            f"got {masks.shape[-1]} and {previous.shape[-1]}"
        )
    prev = [previous[..., i] for i in range(CONTEXT)]
    fakes = []
    for t in tqdm(range(length), desc="slices", leave=False, disable=not progress):
        fake = generator(
            slice_input(masks[..., t : t + CONTEXT + 1], torch.stack(prev[-CONTEXT:], -1))
        )
        fakes.append(fake)
        fed = fake.detach()
        if teacher is not None:
            own = torch.rand(fake.shape[0], generator=rng) < p_own
            fed = torch.where(own.to(fake.device)[:, None, None, None], fed, teacher[..., t])
        prev.append(fed)
    return torch.stack(fakes, -1)


@torch.inference_mode()
def generate_volume(
    generator: nn.Module, onehot_mask: torch.Tensor, progress: bool = False
) -> torch.Tensor:
    """One-hot {0, 1} masks ``(B, K, H, W, D)`` -> images ``(B, 1, H, W, D)`` in [-1, 1].

    The B volumes advance together, one axial slice per generator call; the first slice
    sees zero predecessors. Deterministic: the generator takes no noise.
    """
    if onehot_mask.ndim != 5:
        raise ValueError(f"expected a one-hot mask (B, K, H, W, D), got {tuple(onehot_mask.shape)}")
    generator = generator.eval()
    masks = pad_context(convert_to_tensor(onehot_mask, track_meta=False).float())
    b, _, h, w, _ = masks.shape
    return unroll(generator, masks, masks.new_zeros(b, 1, h, w, CONTEXT), progress=progress)


class SliceBySliceInferer(Inferer):
    """MONAI inferer: ``inputs`` one-hot masks ``(B, K, H, W, D)`` -> ``generate_volume``."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        return generate_volume(network, inputs)


class MaskToImageBatch(PrepareBatch):
    """Evaluator batch: ``(label (B, K, H, W, D) one-hot, image (B, 1, H, W, D))`` on device.

    The mask is the network input, the real image the target.
    """

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        def move(x):
            x = convert_to_tensor(x, track_meta=False)
            return x.to(device=device, non_blocking=non_blocking, **kwargs)

        return move(batchdata["label"]).float(), move(batchdata["image"]).float()


def own_output_probability(epoch: int, ramp_epochs: int, p_max: float) -> float:
    """Teacher-forcing schedule: probability of feeding back the generator's own output.

    0 at epoch 1, rising linearly to ``p_max`` at epoch ``ramp_epochs + 1`` (1-based epochs,
    as ignite counts), ``p_max`` afterwards; ``ramp_epochs = 0`` gives ``p_max`` at once.
    """
    if not 0.0 <= p_max <= 1.0:
        raise ValueError(f"p_max must be in [0, 1], got {p_max}")
    if ramp_epochs <= 0:
        return float(p_max)
    return float(p_max) * min(1.0, (epoch - 1) / ramp_epochs)


def patch_discriminator(
    num_classes: int,
    spatial_size: Sequence[int],
    temporal: bool = False,
    channels: int = 32,
    num_layers: int = 2,
    num_scales: int = 2,
) -> MultiScalePatchDiscriminator:
    """MONAI multi-scale 2D patch discriminator (LSGAN head, batch norm) for ``(H, W)`` slices.

    Input: (mask, image) slice pairs ``(N, K+1, H, W)`` (``pair_input``), or with ``temporal``
    3 consecutive pairs ``(N, 3(K+1), H, W)`` (``triplet_input``); ``spatial_size = (H, W, ..)``.
    Scale ``i`` has ``num_layers * (i + 1)`` layers; returns ``([N, 1, s_i, s_i] per scale,
    [features] per scale)``. ValueError when the deepest scale would shrink a slice to nothing.
    """
    image_size = size = min(int(s) for s in spatial_size[:2])
    for _ in range(num_layers * num_scales):  # first conv and stride-2 layers: kernel 4, pad 1
        size = (size - 2) // 2 + 1
    if size < 2:
        raise ValueError(
            f"{num_scales} discriminator scales of {num_layers} layers need slices larger than "
            f"{image_size} px; lower gen_disc_layers or gen_disc_scales"
        )
    return MultiScalePatchDiscriminator(
        num_d=num_scales,
        num_layers_d=num_layers,
        spatial_dims=2,
        channels=channels,
        in_channels=(3 if temporal else 1) * (int(num_classes) + 1),
        norm="BATCH",  # instance norm fails on the 1x1 maps of the deepest scale
        minimum_size_im=image_size,
    )


def fold_slices(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W, L)`` -> ``(B*L, C, H, W)``: every slice a 2D sample."""
    b, c, h, w, n = x.shape
    return x.movedim(-1, 1).reshape(b * n, c, h, w)


def pair_input(masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Image-discriminator input: masks ``(B, K, H, W, L)``, images ``(B, 1, H, W, L)``
    -> ``(B*L, K+1, H, W)``."""
    return fold_slices(torch.cat([masks, images], 1))


def triplet_input(masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Temporal-discriminator input: every 3 consecutive slices, stacked as channels.

    ``masks (B, K, H, W, N)``, ``images (B, 1, H, W, N)`` -> ``(B*(N-2), 3K+3, H, W)``;
    channels per triplet ``t-2, t-1, t``: the 3 image slices, then the 3 mask slices per class.
    """
    x = torch.cat([images, masks], 1).unfold(-1, 3, 1)  # (B, C, H, W, N-2, 3)
    b, c, h, w, n, _ = x.shape
    return x.permute(0, 4, 1, 5, 2, 3).reshape(b * n, c * 3, h, w)


def feature_matching(
    fake: list[list[torch.Tensor]], real: list[list[torch.Tensor]]
) -> torch.Tensor:
    """Mean L1 between discriminator features of fakes and (fixed) reals, over scales and layers."""
    terms = [
        torch.nn.functional.l1_loss(f, r.detach())
        for fs, rs in zip(fake, real, strict=True)
        for f, r in zip(fs, rs, strict=True)
    ]
    return torch.stack(terms).mean()


def label_balanced_l1(fake: torch.Tensor, real: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Mean over the labels present of each label's mean ``|fake - real|``.

    ``fake``, ``real (B, 1, H, W, L)``, ``onehot (B, K, H, W, L)`` {0, 1} masks of the same
    slices. Every label counts the same however few voxels it has, so a thin organ's
    intensity weighs as much as the background's (plain L1 weighs it by its voxel share).
    """
    error = (fake - real).abs()
    voxels = onehot.sum(dim=(0, 2, 3, 4))
    per_label = (error * onehot).sum(dim=(0, 2, 3, 4)) / voxels.clamp(min=1)
    return per_label.sum() / (voxels > 0).sum().clamp(min=1)  # 0 when no label is present


def _requires_grad(nets: Sequence[nn.Module], flag: bool) -> None:
    for net in nets:
        net.requires_grad_(flag)


def _local(net: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper: a call that syncs no gradients."""
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


class SequenceGanTrainer(Trainer):
    """MONAI trainer for the slice generator with an image and a temporal discriminator.

    A batch ``{"image": (B, 1, H, W, CONTEXT+L), "label": (B, K, H, W, CONTEXT+L) one-hot}``
    holds windows whose first ``CONTEXT`` slices are predecessors (zeros before the volume).
    One iteration: blank a window's context with probability ``p_restart`` (the volume start,
    where inference begins); unroll the generator over the ``L`` slices with teacher forcing
    (``own_output_probability``); update it with ``l1_weight * L1 + label_l1_weight *
    label_balanced_l1 + adv_weight * LSGAN + fm_weight * feature matching``; update both
    discriminators with LSGAN on real vs detached fake. Output: the scalar losses and
    ``p_own``. Networks may be DDP-wrapped (torchrun); rank ``r`` draws from ``seed + r``.
    ``bf16``: the networks' forward passes run under bf16 autocast, the losses and the
    weights stay float32.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader,
        generator: nn.Module,
        image_discriminator: nn.Module,
        temporal_discriminator: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        l1_weight: float = 10.0,
        adv_weight: float = 1.0,
        fm_weight: float = 10.0,
        label_l1_weight: float = 0.0,
        teacher_forcing_epochs: int = 50,
        p_own_max: float = 1.0,
        p_restart: float = 0.2,
        seed: int = 0,
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        non_blocking: bool = False,
        bf16: bool = False,
    ):
        for name, p in (("p_own_max", p_own_max), ("p_restart", p_restart)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=default_prepare_batch,
            handlers=train_handlers,
            decollate=False,
        )
        self.generator, self.g_optimizer, self.d_optimizer = generator, g_optimizer, d_optimizer
        self.discriminators = (image_discriminator, temporal_discriminator)
        self.l1_weight, self.adv_weight, self.fm_weight = l1_weight, adv_weight, fm_weight
        self.label_l1_weight = float(label_l1_weight)
        self.teacher_forcing_epochs, self.p_own_max = int(teacher_forcing_epochs), float(p_own_max)
        self.p_restart, self.bf16 = float(p_restart), as_flag(bf16, "bf16")
        self.rng = torch.Generator().manual_seed(rank_seed(seed))
        self.adversarial = PatchAdversarialLoss(
            criterion="least_squares", no_activation_leastsq=True
        )

    def _restart(self, image: torch.Tensor, masks: torch.Tensor) -> tuple:
        """Blank the context of each window with probability ``p_restart``, as at a volume start."""
        restart = (torch.rand(image.shape[0], generator=self.rng) < self.p_restart).to(image.device)
        image, masks = image.clone(), masks.clone()
        image[restart, ..., :CONTEXT] = 0
        masks[restart, ..., :CONTEXT] = 0
        return image, masks

    def _disc_inputs(self, masks: torch.Tensor, images: torch.Tensor) -> tuple:
        """Windows ``(B, K, H, W, CONTEXT+L)``, ``(B, 1, ...)`` -> image and temporal D inputs."""
        gen = slice(CONTEXT, None)
        return pair_input(masks[..., gen], images[..., gen]), triplet_input(masks, images)

    def _iteration(self, engine: SequenceGanTrainer, batchdata: dict) -> dict:
        image, label = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        image = convert_to_tensor(image, track_meta=False).float()
        masks = convert_to_tensor(label, track_meta=False).float()
        if image.shape[-1] <= CONTEXT:
            raise ValueError(f"training windows need > {CONTEXT} slices, got {image.shape[-1]}")
        image, masks = engine._restart(image, masks)
        p_own = own_output_probability(
            engine.state.epoch, engine.teacher_forcing_epochs, engine.p_own_max
        )
        for net in (engine.generator, *engine.discriminators):
            net.train()
        ctx = image[..., :CONTEXT]
        with autocast(image.device, engine.bf16):
            fake = unroll(engine.generator, masks, ctx, image[..., CONTEXT:], p_own, engine.rng)
        fake = fake.float()
        fake_seq = torch.cat([ctx, fake], -1)
        real_in = engine._disc_inputs(masks, image)
        losses = engine._generator_step(fake, image[..., CONTEXT:], masks, fake_seq, real_in)
        d_loss = engine._discriminator_step(engine._disc_inputs(masks, fake_seq.detach()), real_in)
        return {**losses, "d_loss": d_loss, "p_own": p_own}

    def _generator_step(self, fake, real, masks, fake_seq, real_in) -> dict[str, float]:
        """One generator update: ``fake``, ``real (B, 1, H, W, L)``; returns the loss terms."""
        _requires_grad(self.discriminators, False)
        l1 = torch.nn.functional.l1_loss(fake, real)
        label_l1 = label_balanced_l1(fake, real, masks[..., CONTEXT:])
        adv, fm = fake.new_zeros(()), fake.new_zeros(())
        for d, f_in, r_in in zip(self.discriminators, self._disc_inputs(masks, fake_seq), real_in):
            with autocast(fake.device, self.bf16):  # the losses autocast to float32
                f_out, f_feat = _local(d)(f_in)  # frozen: no gradients of d to sync across ranks
                with torch.no_grad():
                    _, r_feat = _local(d)(r_in)
                adv = adv + self.adversarial(f_out, target_is_real=True, for_discriminator=False)
                fm = fm + feature_matching(f_feat, r_feat)
        loss = require_finite(
            self.l1_weight * l1
            + self.label_l1_weight * label_l1
            + self.adv_weight * adv
            + self.fm_weight * fm
        )
        self.g_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.g_optimizer.step()
        _requires_grad(self.discriminators, True)
        return {
            "loss": loss.item(),
            "g_l1": l1.item(),
            "g_label_l1": label_l1.item(),
            "g_adv": adv.item(),
            "g_fm": fm.item(),
        }

    def _discriminator_step(self, fake_in: tuple, real_in: tuple) -> float:
        """One update of both discriminators: LSGAN, real -> 1, detached fake -> 0."""
        loss = 0.0
        for d, f_in, r_in in zip(self.discriminators, fake_in, real_in):
            with autocast(f_in.device, self.bf16):
                real = self.adversarial(d(r_in)[0], target_is_real=True, for_discriminator=True)
                fake = self.adversarial(d(f_in)[0], target_is_real=False, for_discriminator=True)
            loss = loss + 0.5 * (real + fake)
        require_finite(loss)
        self.d_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.d_optimizer.step()
        return loss.item()
