"""Speed and memory savers for the trainings and samplers: bf16 autocast, activation
checkpointing over a network's blocks, attention without stored probabilities,
``torch.compile``.

None of them changes a network's state-dict keys, so shipped weights load with or without
them, and a checkpoint written with them on loads with them off (and back).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from monai.inferers import Inferer
from monai.networks.blocks import Convolution, ResidualUnit, TransformerBlock
from monai.networks.blocks.selfattention import SABlock
from monai.networks.blocks.unetr_block import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.nets import DiffusionModelUNet, SPADEDiffusionModelUNet
from monai.networks.nets.swin_unetr import BasicLayer
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.nn.modules.batchnorm import _BatchNorm

DIFFUSION_UNETS = (DiffusionModelUNet, SPADEDiffusionModelUNet)
DIFFUSION_BLOCKS = ("down_blocks", "middle_block", "up_blocks")
# the stages of the other MONAI networks the bundles train (UNet, UNETR, SwinUNETR),
# outermost first: a match is wrapped whole and not searched further
STAGES = (BasicLayer, TransformerBlock, UnetrBasicBlock, UnetrUpBlock, UnetrPrUpBlock)
STAGES += (ResidualUnit, Convolution)


def as_flag(value: bool | str, name: str = "flag") -> bool:
    """A config switch as a bool: ``True``/``False`` or, as a command line passes them
    (``--bf16 false``), the strings ``true``/``false``; anything else is a ValueError."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return text == "true"


def autocast(device: str | torch.device, bf16: bool | str):
    """``torch.autocast`` to bfloat16 on ``device``'s type (CPU or CUDA) when ``bf16``, else
    a context that changes nothing."""
    enabled = as_flag(bf16, "bf16")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


class AutocastInferer(Inferer):
    """MONAI's plain inferer, ``network(inputs, *args, **kwargs)``, under bf16 autocast when
    ``bf16``; the prediction comes back in float32, so the loss (and the optimiser's master
    weights, which autocast never touches) stay float32."""

    def __init__(self, bf16: bool | str = False):
        super().__init__()
        self.bf16 = as_flag(bf16, "bf16")

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs):
        with autocast(inputs.device, self.bf16):
            pred = network(inputs, *args, **kwargs)
        return pred.float() if self.bf16 else pred


def _blocks(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(parent, name)`` of the blocks to checkpoint, outermost first: the down, middle and
    up blocks of a diffusion UNet; elsewhere the outermost ``STAGES`` modules."""
    if isinstance(module, DIFFUSION_UNETS):
        out = []
        for name in DIFFUSION_BLOCKS:
            block = getattr(module, name)
            if isinstance(block, nn.ModuleList):
                out += [(block, str(i)) for i in range(len(block))]
            else:
                out.append((module, name))
        return [(p, n) for p, n in out if not isinstance(getattr(p, n), CheckpointWrapper)]
    out = []
    for name, child in module.named_children():
        if isinstance(child, CheckpointWrapper):
            continue
        out += [(module, name)] if isinstance(child, STAGES) else _blocks(child)
    return out


def checkpoint_blocks(network: nn.Module, enabled: bool | str = True) -> nn.Module:
    """``network`` with activation checkpointing over its blocks (in place) when ``enabled``.

    Each block (``_blocks``: a diffusion UNet's down, middle and up blocks; a UNet's
    convolution and residual units; UNETR's and SwinUNETR's transformer blocks and stages)
    is wrapped by torch's non-reentrant ``checkpoint_wrapper``: only the block's inputs are
    kept for backward and its inside is recomputed, one block at a time. The wrapper strips
    its own prefix from state-dict keys, so weights load and save as without it. Outside
    training (``no_grad``/``inference_mode``) a block runs as usual. Do not use it on
    networks with batch norm: the recomputation would update its running statistics twice
    (ValueError).
    """
    if not as_flag(enabled, "activation_checkpointing"):
        return network
    if any(isinstance(m, _BatchNorm) and m.track_running_stats for m in network.modules()):
        raise ValueError(
            f"{type(network).__name__} has batch norm, whose running statistics the "
            "recomputation would update twice; set activation_checkpointing to false"
        )
    for parent, name in _blocks(network):
        setattr(parent, name, checkpoint_wrapper(getattr(parent, name)))
    if not any(isinstance(m, CheckpointWrapper) for m in network.modules()):
        raise ValueError(f"{type(network).__name__} has no blocks to checkpoint")
    return network


def use_flash_attention(network: nn.Module, enabled: bool | str = True) -> nn.Module:
    """``network`` with its MONAI attention blocks (``SABlock``) computing through torch's
    ``scaled_dot_product_attention`` (flash / memory-efficient kernels, on CUDA and the CPU)
    when ``enabled``, in place: the heads x tokens^2 attention probabilities are never stored,
    the result is the same up to float rounding. MONAI's ``use_flash_attention``, set after
    construction (MONAI's constructors refuse it without CUDA); no weight changes."""
    if not as_flag(enabled, "flash_attention"):
        return network
    for m in network.modules():
        if isinstance(m, SABlock):
            special = m.attention_dtype, m.rel_positional_embedding
            if m.save_attn or special != (None, None):
                raise ValueError(f"{type(network).__name__}: an attention block cannot use it")
            m.use_flash_attention = True
    return network


def memory_savers(
    network: nn.Module,
    activation_checkpointing: bool | str = False,
    flash_attention: bool | str = False,
) -> nn.Module:
    """``network`` with ``checkpoint_blocks`` and ``use_flash_attention`` as the two switches
    say (the trainings' ``activation_checkpointing`` and ``flash_attention`` keys)."""
    checkpoint_blocks(network, activation_checkpointing)
    return use_flash_attention(network, flash_attention)


def compile_networks(networks: Iterable[nn.Module], enabled: bool | str = True) -> None:
    """``torch.compile`` each network in place (``nn.Module.compile``: same object, same
    state-dict keys) when ``enabled``. Each new input shape compiles once (tens of seconds on
    a CPU), so it pays only for long runs; see benchmarks/results.md."""
    if as_flag(enabled, "compile"):
        for net in networks:
            net.compile()
