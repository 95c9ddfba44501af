import numpy as np
import pytest
import torch
from bundle_helpers import REPO
from monai.networks.schedulers import RFlowScheduler
from scipy import ndimage

from common.core.bundle_configs import bundle_parser
from common.diffusion.schedulers import make_scheduler
from common.masks.mcdpm import (
    MaskedMSELoss,
    MCDPMPrepareBatch,
    given_mask,
    keep_single_components,
    network_input,
    sample_mask_volumes,
)
from common.masks.network import MCDPMUNet

K, H, W, M = 3, 8, 8, 6


def _batch(b=16):
    labels = torch.randint(0, K, (b, H, W, M))
    onehot = torch.nn.functional.one_hot(labels, K).movedim(-1, 1).float()
    return {"label": onehot, "z": torch.arange(b) % 4}


def _net(depth=12, m=4):
    torch.manual_seed(0)
    return MCDPMUNet(
        num_classes=K,
        m=m,
        spatial_size=(H, W, depth),
        channels=(8, 8),
        attention_levels=(False, False),
        norm_num_groups=4,
        num_head_channels=8,
    )


@pytest.mark.parametrize("branch,first,last", [("forward", True, False), ("backward", False, True)])
def test_prepare_batch_branches_keep_given_slices_clean(branch, first, last):
    probs = {"forward": (1, 0, 0), "backward": (0, 1, 0)}[branch]
    pb = MCDPMPrepareBatch(
        make_scheduler("ddpm"),
        n=2,
        p_forward=probs[0],
        p_backward=probs[1],
        p_unconditional=probs[2],
        p_extra_given=0.0,
        seed=0,
    )
    batch = _batch()
    inputs, targets, args, kwargs = pb(batch)
    x0 = batch["label"] * 2 - 1
    given = given_mask(branch, 2, M)
    assert inputs.shape == (16, 2 * K + 1, H, W, M) and targets.shape == (16, K + 1, H, W, M)
    torch.testing.assert_close(inputs[:, :K][..., given], x0[..., given])  # never noised
    torch.testing.assert_close(inputs[:, K : 2 * K][..., given], x0[..., given])
    assert (inputs[:, K : 2 * K][..., ~given] == 0).all()
    assert (inputs[:, -1][..., given] == 1).all() and (inputs[:, -1][..., ~given] == 0).all()
    assert (targets[:, -1][..., given] == 0).all() and (targets[:, -1][..., ~given] == 1).all()
    assert not torch.allclose(inputs[:, :K][..., ~given], x0[..., ~given])
    assert kwargs["timesteps"].shape == (16,) and torch.equal(kwargs["class_labels"], batch["z"])
    assert given[0].item() is first and given[-1].item() is last


def test_prepare_batch_branch_mix_and_extra_given():
    pb = MCDPMPrepareBatch(
        make_scheduler("ddpm"),
        n=2,
        p_forward=0.5,
        p_backward=0.3,
        p_unconditional=0.2,
        p_extra_given=0.5,
        seed=1,
    )
    given = pb.draw_given(4000, M)
    fwd = given[:, 0] & ~given[:, -1]
    bwd = given[:, -1] & ~given[:, 0]
    none = ~given.any(1)
    assert abs(fwd.float().mean() - 0.5) < 0.04 and abs(bwd.float().mean() - 0.3) < 0.04
    assert abs(none.float().mean() - 0.2) < 0.04
    counts = given.sum(1)[~none]
    assert counts.min() == 2 and counts.max() == M - 1
    assert abs((counts > 2).float().mean() - 0.5) < 0.05


def test_rflow_target_is_velocity():
    pb = MCDPMPrepareBatch(make_scheduler("rflow"), n=2, seed=0, p_extra_given=0.0)
    batch = _batch(4)
    inputs, targets, _, kw = pb(batch)
    # x_t = (1 - t/T) x0 + t/T noise and target = x0 - noise  =>  x0 = x_t + t/T * target
    t = kw["timesteps"].float()[:, None, None, None, None] / 1000
    x0 = batch["label"] * 2 - 1
    free = targets[:, -1:].bool().expand_as(x0)
    rebuilt = inputs[:, :K] + t * targets[:, :K]
    torch.testing.assert_close(rebuilt[free], x0[free], atol=1e-5, rtol=0)


def test_masked_loss_ignores_given_slices():
    pred, value = torch.zeros(2, K, H, W, M), torch.ones(2, K, H, W, M)
    weight = torch.zeros(2, 1, H, W, M)
    weight[..., 3:] = 1
    value[..., :3] = 100.0  # huge error on given slices must not count
    loss = MaskedMSELoss()(pred, torch.cat([value, weight], 1))
    assert loss.item() == pytest.approx(1.0)


def test_network_input_layout():
    x_t, x0 = torch.randn(1, K, H, W, M), torch.randn(1, K, H, W, M)
    given = given_mask("backward", 2, M)[None]
    inp = network_input(x_t, x0, given)
    torch.testing.assert_close(inp[:, :K, ..., :4], x_t[..., :4])
    torch.testing.assert_close(inp[:, :K, ..., 4:], x0[..., 4:])


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "rflow"])
def test_sampling_is_seeded_and_independent_of_batch(kind):
    net = _net()
    args = dict(
        network=net,
        scheduler=make_scheduler(kind),
        num_classes=K,
        spatial_size=(H, W, 12),
        m=4,
        n=2,
        steps=3,
    )
    a = sample_mask_volumes(**args, seeds=[5, 6])
    b = sample_mask_volumes(**args, seeds=[5, 6])
    alone = sample_mask_volumes(**args, seeds=[6])
    assert a.shape == (2, H, W, 12) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert torch.equal(a[1], alone[0])
    assert not torch.equal(a[0], a[1])


def test_guidance_and_fixed_start_change_the_sample():
    net = _net()
    with torch.no_grad():  # MONAI zero-initialises the output layer: an untrained net ignores x
        for p in net.parameters():
            p.normal_(0, 0.2)
    args = (net, make_scheduler("ddim"), K, (H, W, 12), 4, 2, 2)
    plain = sample_mask_volumes(*args, seeds=[1], z0=[8])
    assert plain.shape == (1, H, W, 12) and int(plain.max()) < K
    assert torch.equal(plain, sample_mask_volumes(*args, seeds=[1], z0=[8], guidance=1.0))
    assert not torch.equal(plain, sample_mask_volumes(*args, seeds=[1], z0=[8], guidance=3.0))
    assert not torch.equal(plain, sample_mask_volumes(*args, seeds=[1], z0=[0]))


def test_keep_single_components():
    labels = torch.zeros(6, 6, 6, dtype=torch.long)
    labels[0:2, 0:2, 0:2] = 1
    labels[3:6, 3:6, 3:6] = 1
    labels[0, 5, 0] = 2
    labels[5, 0, 5] = 2
    out = keep_single_components(labels, [1])
    assert (out == 1).sum() == 27 and (out[0:2, 0:2, 0:2] == 0).all()
    assert (out == 2).sum() == 2  # not listed: untouched


def test_guidance_runs_both_branches_in_one_forward_and_bf16_runs():
    net, calls = _net(), []
    net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    args = (make_scheduler("ddim"), K, (H, W, 12), 4, 2, 2)
    out = sample_mask_volumes(net, *args, seeds=[1], guidance=2.0, z0=[4])
    # z0=4: the first window (unguided), then two rounds of an upward and a downward window,
    # each round one forward of 2 windows x 2 guidance branches, per step
    assert calls == [1, 1] + [4, 4] * 2
    half = sample_mask_volumes(net, *args, seeds=[1], guidance=2.0, z0=[4], bf16=True)
    assert half.shape == out.shape and (half == out).float().mean() > 0.5


def test_validation_batches_draw_the_training_mix_again_every_batch():
    train = MCDPMPrepareBatch(
        make_scheduler("ddpm"), n=2, p_forward=1, p_backward=0, seed=0, class_weights=[1, 4, 1]
    )
    val = train.for_validation(seed=1)
    assert torch.equal(val.probs, train.probs) and val.class_weights is None
    batch = _batch(4)
    first, again = val(batch), val(batch)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert torch.equal(first[1][:, -1], 1 - first[0][:, -1])  # weight 1 where generated


def test_network_channels_and_positions_follow_the_setting():
    net = _net(depth=12, m=4)
    assert net.conv_in.conv.in_channels == 2 * K + 1 and net.out[2].conv.out_channels == K
    assert net.class_embedding.num_embeddings == 12 - 4 + 1
    with pytest.raises(ValueError, match="window size"):
        MCDPMUNet(K, 13, (H, W, 12), (8, 8), (False, False), norm_num_groups=4)


def _tiny_pipeline(**values):
    """The bundle's ``pipeline`` at the tiny preset (16x16x12, m=4, n=2, DDIM-2), untrained."""
    bundle = REPO / "bundles" / "mask_diffusion"
    values = {"pipeline#network": "@network_def", "device": "cpu", **values}
    parser = bundle_parser(bundle, ["inference.yaml"], "tiny", "thorax", values)
    torch.manual_seed(0)
    return parser.get_parsed_content("pipeline")


def test_mask_pipeline_seeds_in_volumes_out_independent_of_the_batch():
    pipeline = _tiny_pipeline(batch_size=2)
    out = pipeline([5, 6, 7])
    assert out.shape == (3, 16, 16, 12) and out.dtype == torch.long and 0 <= int(out.min())
    assert int(out.max()) < 5 and len(out.unique()) > 1
    assert torch.equal(pipeline([5, 6, 7]), out)  # same seeds, same volumes
    assert torch.equal(pipeline([6, 5])[0], out[1])  # another batch and position
    assert torch.equal(pipeline([7])[0], out[2])
    raw = pipeline([5, 6, 7], postprocess=False)
    assert ((out == raw) | (out == 0)).all()  # post-processing only removes pieces
    assert pipeline.single_component == [1, 2, 3, 4]
    for volume in out.numpy():
        for label in pipeline.single_component:
            assert ndimage.label(volume == label, structure=np.ones((3, 3, 3)))[1] <= 1


def _noise_levels(scheduler, t):
    """``(a, b)`` with ``x_t = a x0 + b noise`` at timesteps ``t (B,)``, as ``(B, 1, 1, 1, 1)``."""
    if isinstance(scheduler, RFlowScheduler):
        s = t.float() / scheduler.num_train_timesteps
        a, b = 1 - s, s
    else:
        abar = scheduler.alphas_cumprod[t]
        a, b = abar.sqrt(), (1 - abar).sqrt()
    return a.view(-1, 1, 1, 1, 1), b.view(-1, 1, 1, 1, 1)


def _implied_noise(inputs, x0, t, scheduler, slices):
    """``(noisy channels - a x0) / b`` on ``slices``: standard normal where ``x_t`` was noised."""
    a, b = _noise_levels(scheduler, t)
    return ((inputs[:, :K][..., slices] - a * x0[..., slices]) / b).flatten()


@pytest.mark.parametrize("kind", ["ddim", "rflow"])
def test_guided_unconditional_input_is_the_trained_unconditional_branch(kind):
    """With guidance the unconditional half of each pass must look like MCDPMPrepareBatch's
    unconditional branch: no condition channels, every slice noised to t (the given ones
    freshly from their clean values), nothing clean in the noisy channels."""
    scheduler = make_scheduler(kind)
    train = MCDPMPrepareBatch(scheduler, n=2, p_forward=0, p_backward=0, seed=0)
    batch = _batch(64)
    inputs, _, _, kw = train(batch)
    t = kw["timesteps"]
    keep = t >= 1  # rflow's t = 0 is noise-free
    assert (inputs[:, K:] == 0).all()  # training: no condition channels
    x0 = batch["label"][keep] * 2 - 1
    trained = _implied_noise(inputs[keep], x0, t[keep], scheduler, slice(None))
    assert abs(trained.mean()) < 0.05 and abs(trained.std() - 1) < 0.05

    net, seen = _net(), []
    net.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].clone(), kwargs["timesteps"])),
        with_kwargs=True,
    )
    sample_mask_volumes(net, scheduler, K, (H, W, 12), 4, 2, 4, seeds=[1], guidance=3.0, z0=[4])
    guided = [(x, t) for x, t in seen if x.shape[0] == 4]  # 2 windows x 2 branches
    assert len(guided) == 2 * 4  # two rounds of 4 steps
    for x, t in guided:
        cond, uncond = x.chunk(2)
        given = cond[:, -1, 0, 0].bool()  # (2, m) the conditional half's indicator
        assert given.any(1).all() and (uncond[:, K:] == 0).all()
        for j in range(2):
            free, g = ~given[j], given[j]
            assert torch.equal(uncond[j, :K][..., free], cond[j, :K][..., free])
            clean = cond[j : j + 1, K : 2 * K]  # the given slices' clean values
            noise = _implied_noise(uncond[j : j + 1], clean, t[j : j + 1], scheduler, g)
            assert abs(noise.mean()) < 0.2 and abs(noise.std() - 1) < 0.2, int(t[j])
