"""Speed and memory savers (common/core/savers.py): activation checkpointing gives the same
gradients and state-dict keys, bf16 training steps run with a finite loss, the config keys
reach the trainings and samplers, shipped weights load with the savers on."""

import copy

import pytest
import torch
from bundle_helpers import REPO
from monai.networks.blocks.selfattention import SABlock
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.paper_step import ATTENTION, config, train_stage
from common.core.bundle_configs import bundle_parser
from common.core.io import load_weights, weights_fingerprint
from common.core.savers import AutocastInferer, as_flag, checkpoint_blocks, use_flash_attention
from common.images.pipeline import ImagePipeline
from common.images.sequence_generator import patch_discriminator
from common.seg.networks import make_network

BUNDLES = REPO / "bundles"
SEG_SIZES = {
    "unet3d": {"channels": [4, 8], "strides": [2], "num_res_units": 1},
    "unet2d": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
    "unetr": {"feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4},
}


def _tiny(bundle, **values):
    return bundle_parser(BUNDLES / bundle, ["inference.yaml"], "tiny", "thorax", values)


def _network(name):
    """A tiny network the bundles train and ``() -> (args, kwargs)`` of a batch of two."""
    t = {"timesteps": torch.tensor([3, 700])}
    if name.startswith("seg"):
        net = make_network(name[4:], 5, [16, 16, 16], SEG_SIZES)
        return net, lambda: ((torch.randn(2, 1, 16, 16, 16),), {})
    if name == "mcdpm":
        mask = _tiny("mask_diffusion")
        k, m = mask.get_parsed_content("num_classes"), mask.get_parsed_content("m")
        x = torch.randn(2, 2 * k + 1, 16, 16, m)
        return mask.get_parsed_content("network_def"), lambda: ((x,), {**t, "class_labels": [0, 2]})
    image = _tiny("image_synthesis")
    k = image.get_parsed_content("num_classes")
    if name == "refiner":
        x, seg = torch.randn(2, 1, 16, 16), torch.rand(2, k, 16, 16)
        return image.get_parsed_content("refiner_def"), lambda: ((x,), {**t, "seg": seg})
    x = torch.randn(2, 3 * k + 2, 16, 16)
    return image.get_parsed_content("network_def"), lambda: ((x,), {})


@pytest.mark.parametrize(
    "name", ["mcdpm", "refiner", "generator", *(f"seg {n}" for n in SEG_SIZES)]
)
def test_checkpointing_keeps_the_gradients_and_the_state_dict_keys(name):
    torch.manual_seed(0)
    plain, inputs = _network(name)
    args, kwargs = inputs()
    plain.train()
    saved = checkpoint_blocks(copy.deepcopy(plain))
    assert any(type(m).__name__ == "CheckpointWrapper" for m in saved.modules())
    assert list(saved.state_dict()) == list(plain.state_dict())
    for n in (plain, saved):
        n.zero_grad()
        n(*args, **kwargs).square().mean().backward()
    for (key, a), b in zip(plain.named_parameters(), saved.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), key
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), key
    # weights round-trip between the two, and the checkpointed one runs without gradients
    plain.load_state_dict(saved.state_dict())
    saved.load_state_dict(plain.state_dict())
    with torch.inference_mode():
        assert torch.allclose(saved.eval()(*args, **kwargs), plain.eval()(*args, **kwargs))


def test_checkpointing_refuses_batch_norm_and_is_idempotent():
    with pytest.raises(ValueError, match="batch norm"):
        checkpoint_blocks(patch_discriminator(5, [16, 16], num_layers=1))
    net = _tiny("mask_diffusion").get_parsed_content("network_def")
    once = sum(type(m).__name__ == "CheckpointWrapper" for m in checkpoint_blocks(net).modules())
    twice = sum(type(m).__name__ == "CheckpointWrapper" for m in checkpoint_blocks(net).modules())
    assert once == twice == len(net.down_blocks) + 1 + len(net.up_blocks)
    assert checkpoint_blocks(torch.nn.Linear(2, 2), enabled=False) is not None


@pytest.mark.parametrize("scale, folder", [(None, ""), ("demo", "demo")])
@pytest.mark.parametrize(
    "bundle, network, ckpt",
    [
        ("mask_diffusion", "network_def", "model.pt"),
        ("image_synthesis", "network_def", "model.pt"),
        ("image_synthesis", "refiner_def", "refiner_axial.pt"),
        ("seg_downstream", "network_def", "model.pt"),
    ],
)
def test_shipped_weights_load_into_checkpointed_networks(bundle, network, ckpt, scale, folder):
    """The base configs' networks take the shipped standard weights, the demo preset's the
    demo weights (in models/demo/)."""
    parser = bundle_parser(BUNDLES / bundle, ["inference.yaml"], scale, None)
    path = BUNDLES / bundle / "models" / folder / ckpt
    plain = load_weights(parser.get_parsed_content(network), path)
    saved = load_weights(checkpoint_blocks(copy.deepcopy(plain)), path)
    assert weights_fingerprint(saved) == weights_fingerprint(plain)


def test_flash_attention_gives_the_same_outputs_and_gradients():
    """MONAI's attention through scaled_dot_product_attention (set after construction, also
    on the CPU): same outputs and gradients up to rounding, same state-dict keys."""
    torch.manual_seed(0)
    mask = _tiny("mask_diffusion", unet_attention=[False, True])
    plain = mask.get_parsed_content("network_def").train()
    with torch.no_grad():  # the attention output projections start at zero
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    flash = use_flash_attention(copy.deepcopy(plain))
    blocks = [m for m in flash.modules() if isinstance(m, SABlock)]
    assert len(blocks) == 4 and all(m.use_flash_attention for m in blocks)  # down, mid, up x2
    assert list(flash.state_dict()) == list(plain.state_dict())
    k, m = mask.get_parsed_content("num_classes"), mask.get_parsed_content("m")
    x = torch.randn(2, 2 * k + 1, 16, 16, m)
    kwargs = {"timesteps": torch.tensor([3, 700]), "class_labels": torch.tensor([0, 2])}
    outs = []
    for n in (plain, flash):
        n.zero_grad()
        outs.append(n(x, **kwargs))
        outs[-1].square().mean().backward()
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for (key, a), b in zip(plain.named_parameters(), flash.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), key


def test_switches_read_command_line_strings():
    assert as_flag(True) is True and as_flag("false") is False and as_flag(" True ") is True
    with pytest.raises(ValueError, match="bf16 must be true or false"):
        as_flag("yes please", "bf16")


def test_autocast_inferer_returns_float32_near_fp32():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.SiLU())
    x = torch.randn(1, 2, 8, 8, 8)
    fp32 = AutocastInferer(bf16=False)(x, net)
    bf16 = AutocastInferer(bf16=True)(x, net)
    assert fp32.dtype == bf16.dtype == torch.float32
    assert torch.equal(fp32, net(x))
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()


@pytest.mark.parametrize("stage", ["mcdpm", "generator", "refiner", "seg"])
def test_bf16_checkpointed_training_steps_run_with_a_finite_loss(stage):
    """Two steps of each training's own trainer (its config, tiny) with both savers on: the
    loss is finite, the weights change and stay float32, their keys are unchanged."""
    cfg = config(stage, mode="bf16+flash+ckpt" if stage in ATTENTION else "bf16+ckpt", scale="tiny")
    torch.manual_seed(0)
    job = train_stage(cfg, stage, 2, FlopCounterMode(display=False), lambda: None)
    net = job.trained[0]
    keys = list(net.state_dict())
    before = copy.deepcopy(net.state_dict())
    assert any(type(m).__name__ == "CheckpointWrapper" for m in net.modules())
    job.run()
    output = cfg.get_parsed_content("train#trainer").state.output
    output = output[0] if isinstance(output, list) else output  # decollated
    assert torch.isfinite(torch.as_tensor(output["loss"])).all()
    assert list(net.state_dict()) == keys
    after = net.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())
    assert any(not torch.equal(v, before[k]) for k, v in after.items())


@pytest.mark.parametrize(
    "bundle, files",
    [
        ("mask_diffusion", ["inference.yaml", "train.yaml"]),
        ("image_synthesis", ["inference.yaml", "train.yaml", "train_generator.yaml"]),
        ("image_synthesis", ["inference.yaml", "train.yaml", "train_refiner.yaml"]),
        ("seg_downstream", ["train.yaml"]),
    ],
)
def test_every_training_has_the_saver_keys_as_measured(bundle, files):
    """The generators train under bf16 at the standard scale (the base; about 2x faster on an
    avx512_bf16 CPU) and the paper scale, whose diffusion trainings also use flash attention
    (what fits them in 40 GB, benchmarks/results.md); the seg model (no gain measured) and the
    tiny and demo scales train in fp32."""
    for scale in ("tiny", "demo", "standard", "paper"):
        parser = bundle_parser(BUNDLES / bundle, files, scale, "thorax")
        bf16 = scale in ("standard", "paper") and bundle != "seg_downstream"
        assert parser["bf16"] is bf16 and parser["activation_checkpointing"] is False
        assert bundle == "seg_downstream" or parser["flash_attention"] is (scale == "paper")


def test_sampling_keys_reach_the_pipelines():
    mask = _tiny("mask_diffusion", sample_bf16=True)
    mask["pipeline#network"] = "@network_def"
    assert mask.get_parsed_content("pipeline").bf16 is True
    image = _tiny("image_synthesis")
    assert image["pipeline#bf16"] == "@sdm_bf16" and image["pipeline#compile"] == "@sdm_compile"
    assert image["sdm_bf16"] is False and image["sdm_compile"] is False


def test_compiled_refiners_keep_their_weights_and_keys():
    image = _tiny("image_synthesis")
    refiner = image.get_parsed_content("refiner_def")
    generator = image.get_parsed_content("network_def")
    scheduler = image.get_parsed_content("scheduler")
    keys, fingerprint = list(refiner.state_dict()), weights_fingerprint(refiner)
    pipeline = ImagePipeline(generator, {"axial": refiner}, scheduler, compile=True)
    assert pipeline.refiners["axial"] is refiner
    assert list(refiner.state_dict()) == keys and weights_fingerprint(refiner) == fingerprint
    assert pipeline.settings["refiners"]["axial"] == fingerprint


def test_paper_projection_arithmetic():
    """GPU GiB = 16 B/parameter + batch x (activations per sample, + 4 B per attention
    probability for bf16 without flash); seconds = batch x FLOPs per sample / rate."""
    from benchmarks.paper_memory import GIB, projections

    row = {"samples": 2, "default_samples": 8, "trained_params": GIB // 16, "params": 1}
    row |= {"flops": 2e12, "rss_start": 1 * GIB, "rss_peak": 3 * GIB}
    results = {
        "train:mcdpm:bf16:2": dict(row),
        "train:mcdpm:bf16+flash:2": dict(row),
        "sample:mcdpm:bf16:1": {"attention_probs": GIB / 4, "samples": 1},
    }
    out = projections(results, mfu=0.5, peak_tflops=2.0)
    assert out["train:mcdpm:bf16+flash:2"]["gpu_gib"] == pytest.approx(1 + 8 * 1)
    assert out["train:mcdpm:bf16:2"]["gpu_gib"] == pytest.approx(1 + 8 * (1 + 1))
    assert out["train:mcdpm:bf16:2"]["gpu_s"] == pytest.approx(8 * 1e12 / 1e12)


def test_command_line_false_switches_off(tmp_path):
    """``--resume false`` / ``--keep_largest false`` / ``--refine false`` arrive as the string
    ``'false'`` (fire), which is truthy: the constructors read them as switches."""
    from common.core.training import ResumeCheckpoint
    from common.diffusion.schedulers import make_scheduler
    from common.images.pipeline import ImagePipeline
    from common.masks.pipeline import MaskPipeline

    net = torch.nn.Linear(1, 1)
    assert ResumeCheckpoint(tmp_path, {"model": net}, resume="false").resume is False
    masks = MaskPipeline(
        net, make_scheduler("ddim"), 2, (2, 2, 8), 4, 2, 2, keep_largest="false", bf16="false"
    )
    assert masks.keep_largest is False and masks.bf16 is False
    images = ImagePipeline(net, {}, make_scheduler("ddim"), refine="false")
    assert images.refine is False
    with pytest.raises(ValueError, match="keep_largest"):
        MaskPipeline(net, make_scheduler("ddim"), 2, (2, 2, 8), 4, 2, 2, keep_largest="no")
