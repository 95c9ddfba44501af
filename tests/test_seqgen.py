import pytest
import torch
from ignite.engine import Events
from monai.transforms import Compose
from torch import nn

from common.images.sequence_generator import (
    CONTEXT,
    MaskToImageBatch,
    SequenceGanTrainer,
    SliceBySliceInferer,
    SliceGenerator,
    feature_matching,
    generate_volume,
    generator_in_channels,
    label_balanced_l1,
    own_output_probability,
    pair_input,
    patch_discriminator,
    training_windows,
    triplet_input,
    unroll,
)

K, H, W = 3, 16, 16


def _onehot(b=2, depth=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (b, H, W, depth), generator=g)
    return torch.nn.functional.one_hot(labels, K).movedim(-1, 1).float()


class PlusOne(nn.Module):
    """Stub generator: image slice t-1 plus one; records every input ``(B, 3K+2, H, W)``."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return x[:, 3 * K : 3 * K + 1] + 1.0


def test_generator_shapes_and_range():
    net = SliceGenerator(K, channels=(8, 16, 32), num_res_units=1)
    x = torch.randn(3, generator_in_channels(K), H, W)
    x[:, 3 * K :] = x[:, 3 * K :].clamp(-1, 1)  # previous image slices
    out = net(x)
    assert generator_in_channels(K) == 3 * K + 2
    assert out.shape == (3, 1, H, W) and out.abs().max() <= 1.0
    x[:, 3 * K] = 5.0  # the output blends the hallucinated slice with image slice t-1
    assert net(x).max() > 1.0
    with pytest.raises(ValueError, match="divisible by 4"):
        net(x[..., :10])


def test_generate_volume_starts_from_zeros_and_feeds_back_own_output():
    stub, masks = PlusOne(), _onehot(b=2, depth=5)
    out = generate_volume(stub, masks)
    assert out.shape == (2, 1, H, W, 5)
    for t in range(5):
        assert (out[..., t] == t + 1).all()  # image t-1 fed back each step
    padded = torch.nn.functional.pad(masks, (CONTEXT, 0))
    for t, x in enumerate(stub.inputs):
        expected = [padded[..., t + CONTEXT - k] for k in range(3)]  # masks t, t-1, t-2
        torch.testing.assert_close(x[:, : 3 * K], torch.cat(expected, 1))
        assert (x[:, 3 * K] == t).all() and (x[:, 3 * K + 1] == max(t - 1, 0)).all()
    assert (stub.inputs[0][:, K:] == 0).all()  # first slice: zero predecessors


@pytest.mark.parametrize("p_own,expected", [(0.0, [1, 11, 11, 11]), (1.0, [1, 2, 3, 4])])
def test_unroll_teacher_forcing_feeds_real_or_own_slices(p_own, expected):
    masks = torch.nn.functional.pad(_onehot(b=3, depth=4), (CONTEXT, 0))
    teacher = torch.full((3, 1, H, W, 4), 10.0)
    previous = torch.zeros(3, 1, H, W, CONTEXT)
    out = unroll(PlusOne(), masks, previous, teacher, p_own, torch.Generator().manual_seed(0))
    assert [float(out[..., t].unique()) for t in range(4)] == expected


def test_unroll_rejects_missing_context():
    with pytest.raises(ValueError, match="previous slices"):
        unroll(PlusOne(), _onehot(depth=4), torch.zeros(2, 1, H, W, 1))


@pytest.mark.parametrize(
    "epoch,ramp,p_max,expected",
    [
        (1, 10, 0.8, 0.0),
        (6, 10, 0.8, 0.4),
        (11, 10, 0.8, 0.8),
        (50, 10, 0.8, 0.8),
        (1, 0, 0.5, 0.5),
    ],
)
def test_teacher_forcing_schedule(epoch, ramp, p_max, expected):
    assert own_output_probability(epoch, ramp, p_max) == pytest.approx(expected)


def test_teacher_forcing_schedule_rejects_bad_probability():
    with pytest.raises(ValueError, match="p_max"):
        own_output_probability(1, 10, 1.5)


def test_discriminator_inputs_layout():
    masks, images = _onehot(b=2, depth=5), torch.randn(2, 1, H, W, 5)
    pairs = pair_input(masks, images)
    assert pairs.shape == (10, K + 1, H, W)
    torch.testing.assert_close(pairs[1], torch.cat([masks[0, ..., 1], images[0, ..., 1]]))
    triplets = triplet_input(masks, images)
    assert triplets.shape == (2 * 3, 3 * (K + 1), H, W)
    sample = triplets[3 + 1]  # volume 1, triplet of slices 1, 2, 3
    torch.testing.assert_close(sample[:3], images[1, 0, ..., 1:4].movedim(-1, 0))
    torch.testing.assert_close(sample[3:6], masks[1, 0, ..., 1:4].movedim(-1, 0))


def test_discriminator_output_shapes_and_size_check():
    disc = patch_discriminator(K, (32, 48, 6), temporal=True, channels=8, num_layers=2)
    outs, feats = disc(torch.randn(4, 3 * (K + 1), 32, 32))
    assert [tuple(o.shape) for o in outs] == [(4, 1, 7, 7), (4, 1, 1, 1)]
    assert [len(f) for f in feats] == [3, 5]
    pairs = patch_discriminator(K, (32, 32), channels=8, num_layers=2)
    assert [tuple(o.shape) for o in pairs(torch.randn(2, K + 1, 32, 32))[0]][0] == (2, 1, 7, 7)
    with pytest.raises(ValueError, match="gen_disc_layers"):
        patch_discriminator(K, (16, 40), num_layers=2, num_scales=2)


def test_training_windows_start_with_zero_context():
    transforms = Compose(training_windows(["image", "label"], length=3, num_samples=20))
    transforms.set_random_state(0)
    image = torch.arange(1.0, 6.0).expand(1, 2, 2, 5).clone()  # slice z holds z + 1
    windows = transforms({"image": image, "label": image.clone()})
    assert len(windows) == 20
    assert all(w["image"].shape == (1, 2, 2, CONTEXT + 3) for w in windows)
    # windows of the padded volume start at its slice 0, 1 or 2; the first sees 2 zero slices
    assert {int(w["z"]) for w in windows} == {0, 1, 2}
    first = next(w for w in windows if int(w["z"]) == 0)
    assert first["image"][0, 0, 0].tolist() == first["label"][0, 0, 0].tolist() == [0, 0, 1, 2, 3]


def test_feature_matching_is_zero_for_equal_features():
    feats = [[torch.ones(2, 3)], [torch.ones(2, 4), torch.zeros(1)]]
    assert feature_matching(feats, feats).item() == 0.0
    other = [[torch.zeros(2, 3)], [torch.ones(2, 4), torch.zeros(1)]]
    assert feature_matching(other, feats).item() == pytest.approx(1 / 3)


def test_label_balanced_l1_weighs_every_present_label_the_same():
    onehot = torch.zeros(1, K, 4, 4, 1)
    onehot[:, 0] = 1
    onehot[:, 0, 0, 0], onehot[:, 1, 0, 0] = 0, 1  # label 1: one voxel of 16; label 2 absent
    real = torch.zeros(1, 1, 4, 4, 1)
    fake = real.clone()
    fake[..., 0, 0, :] = 1.5  # wrong on the thin label only
    # plain L1 dilutes that voxel's error 16-fold; label-balanced L1 averages labels 0 and 1
    assert torch.nn.functional.l1_loss(fake, real).item() == pytest.approx(1.5 / 16)
    assert label_balanced_l1(fake, real, onehot).item() == pytest.approx((0 + 1.5) / 2)


def _trainer(steps, **kwargs):
    torch.manual_seed(0)
    length = 4
    masks = _onehot(b=2, depth=CONTEXT + length, seed=1)
    image = (masks[:, 1:2] - masks[:, 2:3]) * 0.8  # a learnable function of the mask
    batch = {"image": image, "label": masks}
    gen = SliceGenerator(K, channels=(8, 16), num_res_units=1)
    d_img = patch_discriminator(K, (H, W), channels=8, num_layers=1)
    d_tmp = patch_discriminator(K, (H, W), temporal=True, channels=8, num_layers=1)
    trainer = SequenceGanTrainer(
        "cpu",
        max_epochs=1,
        train_data_loader=[batch] * steps,
        generator=gen,
        image_discriminator=d_img,
        temporal_discriminator=d_tmp,
        g_optimizer=torch.optim.Adam(gen.parameters(), 2e-3, betas=(0.5, 0.999)),
        d_optimizer=torch.optim.Adam([*d_img.parameters(), *d_tmp.parameters()], 2e-4),
        **kwargs,
    )
    return trainer, gen, (d_img, d_tmp)


def test_trainer_steps_give_finite_losses_and_update_all_networks():
    trainer, gen, discs = _trainer(3, teacher_forcing_epochs=0, p_own_max=0.5)
    before = [[p.detach().clone() for p in n.parameters()] for n in (gen, *discs)]
    l1 = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: l1.append(e.state.output["g_l1"])
    )
    trainer.run()
    out = trainer.state.output
    assert set(out) == {"loss", "g_l1", "g_label_l1", "g_adv", "g_fm", "d_loss", "p_own"}
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    assert out["p_own"] == 0.5 and l1[-1] < l1[0]
    for net, old in zip((gen, *discs), before):
        assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), old))


def test_trainer_loss_adds_the_label_balanced_term_with_its_weight():
    trainer, _, _ = _trainer(1, teacher_forcing_epochs=0, label_l1_weight=10.0)
    trainer.run()
    out = trainer.state.output
    expected = 10 * out["g_l1"] + 10 * out["g_label_l1"] + out["g_adv"] + 10 * out["g_fm"]
    assert out["g_label_l1"] > 0 and out["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("p_restart,blank", [(1.0, True), (0.0, False)])
def test_restart_blanks_the_context_slices(p_restart, blank):
    trainer, _, _ = _trainer(1, p_restart=p_restart)
    image, masks = torch.ones(4, 1, H, W, 6), torch.ones(4, K, H, W, 6)
    new_image, new_masks = trainer._restart(image, masks)
    for x in (new_image, new_masks):
        assert bool((x[..., :CONTEXT] == 0).all()) is blank and (x[..., CONTEXT:] == 1).all()
    assert (image == 1).all()  # the batch itself is left alone


def test_trainer_rejects_bad_probabilities():
    with pytest.raises(ValueError, match="p_restart"):
        _trainer(1, p_restart=1.5)


def test_generate_volume_is_deterministic_and_batch_independent():
    gen = SliceGenerator(K, channels=(8, 16), num_res_units=1)
    masks = _onehot(b=2, depth=4)
    a, b = generate_volume(gen, masks), generate_volume(gen, masks)
    alone = generate_volume(gen, masks[1:])
    assert a.shape == (2, 1, H, W, 4) and a.abs().max() <= 1.0
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[1:], alone)
    with pytest.raises(ValueError, match="one-hot mask"):
        generate_volume(gen, masks[0])


def test_evaluator_pieces_route_mask_to_image():
    masks, image = _onehot(b=1, depth=3), torch.zeros(1, 1, H, W, 3)
    inputs, target = MaskToImageBatch()({"label": masks, "image": image})
    assert inputs is not None and torch.equal(inputs, masks) and torch.equal(target, image)
    pred = SliceBySliceInferer()(inputs, PlusOne())
    assert [float(pred[..., t].unique()) for t in range(3)] == [1, 2, 3]
