"""Masks and images of any axial length: the MC-DPM's window position is continuous (anchors =
the training grid's window starts, interpolated between them), so a volume of ``depth`` slices
is grown window by window at positions relative to the volume; the shipped weights give the
same outputs as before at the training depth; the refiner pads slices that its UNet levels
cannot halve."""

import copy

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import REPO
from monai.networks.nets import DiffusionModelUNet, SPADEDiffusionModelUNet
from torch import nn

from common.core.bundle_configs import bundle_parser
from common.core.errors import find_data_error
from common.core.io import read_record
from common.data.labels import load_label_set
from common.diffusion.schedulers import make_scheduler
from common.images.refiner import VIEWS, SemanticDiffusionUNet
from common.masks.generation import generate_mask_cases
from common.masks.network import PositionEmbedding, window_position
from common.masks.pipeline import MaskPipeline
from medgen3d.bundles import bundle_config

MASKS = REPO / "bundles" / "mask_diffusion"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_position_embedding_is_the_lookup_at_integers_and_interpolates_between():
    torch.manual_seed(0)
    table = nn.Embedding(5, 7)
    emb = PositionEmbedding(5, 7, _weight=table.weight.data)
    ints = torch.tensor([0, 3, 4, 1])
    assert torch.equal(emb(ints), table(ints))
    assert torch.equal(emb(ints.float()), table(ints))  # float integers: bit for bit
    w = table.weight.detach()
    torch.testing.assert_close(
        emb(torch.tensor([2.5, 0.25])), torch.stack([(w[2] + w[3]) / 2, 0.75 * w[0] + 0.25 * w[1]])
    )
    assert torch.equal(emb(torch.tensor([-1.0, 9.0])), w[[0, 4]])  # outside: the end rows


def test_window_position_is_relative_and_the_start_itself_at_the_training_depth():
    assert [window_position(s, 32, 8, 32) for s in range(25)] == list(range(25))
    assert window_position(0, 48, 8, 32) == 0 and window_position(40, 48, 8, 32) == 24
    assert window_position(20, 48, 8, 32) == 12  # the middle stays the middle
    assert window_position(4, 16, 8, 32) == 12
    assert window_position(0, 8, 8, 32) == 12  # one window: the middle


def _shipped_network():
    parser = bundle_parser(MASKS, ["inference.yaml"], None, None)
    return parser.get_parsed_content("pipeline#network")


def test_shipped_weights_give_the_class_lookup_outputs_at_integer_positions():
    """What the network computed before positions became continuous: MONAI's own forward with
    its nn.Embedding lookup, on the same weights and inputs."""
    net = _shipped_network().eval()
    old = copy.deepcopy(net)
    old.class_embedding = nn.Embedding(*net.class_embedding.weight.shape)
    old.class_embedding.weight = net.class_embedding.weight
    assert net.class_embedding.weight.shape == (32 - 8 + 1, 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 11, 32, 32, 8, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    z = torch.tensor([0, 7, 19, 24])
    with torch.inference_mode():
        before = DiffusionModelUNet.forward(old, x, t, class_labels=z)
        assert torch.equal(net(x, t, class_labels=z), before)
        assert torch.equal(net(x, t, class_labels=z.float()), before)
        one = DiffusionModelUNet.forward(old, x[:1], torch.tensor([5]), class_labels=z[:1])
        assert torch.equal(net(x[:1], 5, class_labels=0), one)  # verify_net_in_out's ints


def _tiny_pipeline(**values) -> tuple[MaskPipeline, list]:
    """The bundle's pipeline at the tiny preset (16x16x12, m=4, n=2, DDIM-2), untrained."""
    values = {"pipeline#network": "@network_def", "device": "cpu", "batch_size": 2, **values}
    parser = bundle_parser(MASKS, ["inference.yaml"], "tiny", "thorax", values)
    torch.manual_seed(0)
    return parser.get_parsed_content("pipeline"), parser.get_parsed_content("output_pixdim")


@pytest.mark.parametrize("depth", [6, 7, 18, 4])
def test_tiny_pipeline_makes_valid_masks_of_any_depth(depth):
    pipeline, _ = _tiny_pipeline(depth=depth)
    out = pipeline([5, 6])
    assert out.shape == (2, 16, 16, depth) and out.dtype == torch.long
    assert 0 <= int(out.min()) and int(out.max()) < 5
    assert torch.equal(pipeline([6])[0], out[1])  # still seeded and batch-independent


def test_default_depth_is_the_grid_and_too_short_is_a_clear_error():
    default, _ = _tiny_pipeline()
    same, _ = _tiny_pipeline(depth=12)
    assert default.output_size == [16, 16, 12] and torch.equal(default([3]), same([3]))
    for values, message in (
        ({"depth": 3}, "depth: 3 slices is shorter than one window of m=4"),
        ({"depth": 18, "extent_mm": 480.0}, "depth / extent_mm: both are set"),
    ):
        with pytest.raises(RuntimeError) as err:  # MONAI's wrapper; the CLI prints the cause
            _tiny_pipeline(**values)
        assert message in str(find_data_error(err.value))


def test_positions_span_the_training_anchors_at_any_depth():
    pipeline, _ = _tiny_pipeline(depth=18)
    seen = []
    pipeline.network.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["class_labels"].clone()), with_kwargs=True
    )
    pipeline([1])
    positions = torch.cat(seen).unique()
    assert positions.is_floating_point() and float(positions.min()) == 0.0
    assert float(positions.max()) == 12 - 4  # the last window start of the training grid


def test_extent_mm_writes_that_many_slices_at_the_grid_spacing(tmp_path):
    """tiny grid: 320 mm over 12 slices = 26.67 mm; 480 mm -> 18 slices, 1.5x the grid."""
    pipeline, pixdim = _tiny_pipeline(extent_mm=480.0)
    labels = load_label_set("segthor")
    generate_mask_cases(pipeline, labels, tmp_path, 1, pixdim, seed=1)
    path = tmp_path / "labels" / "mask_0000.nii.gz"
    img = nib.load(path)
    assert img.shape == (16, 16, 18)
    assert img.header.get_zooms() == pytest.approx((20.0, 20.0, 320.0 / 12))
    centre = img.affine @ np.array([7.5, 7.5, 8.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-4)  # centred on the origin
    assert read_record(path)["spatial_size"] == [16, 16, 18]


class PositionOracle(nn.Module):
    """A constructed MC-DPM that knows the anatomy only by position: the whole window is
    "organ" (label 1) when its position lies in ``[low, high]``, background otherwise; it
    predicts the clean window (``prediction_type="sample"``), so sampling returns it exactly."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x, timesteps, class_labels=None):
        q = class_labels.float()
        organ = ((q >= self.low) & (q <= self.high)).float()[:, None, None, None, None]
        return torch.cat([1 - 2 * organ, 2 * organ - 1], 1).expand(-1, -1, *x.shape[2:])


def test_label_volumes_scale_with_the_depth_for_a_position_driven_network():
    """Training grid D = 40, m = 4, n = 2: anchors 0..36, the organ at positions 9..27. A
    window's new slices are organ when its start lies in the organ's share of the starts,
    ``[9, 27] / 36 * (depth - m)``; windows start every ``m - n`` slices and each adds that
    many, so the organ spans ``18 (depth - m) / 36 + (m - n)`` slices: 10, 20, 30 at depths 20,
    40, 60 (ratios 0.5 and 1.5). Each boundary falls on the window grid: per volume within
    ``m`` slices, the mean of 16 seeds within 1 slice."""
    scheduler = make_scheduler("ddim", prediction_type="sample")
    means = {}
    for depth, expected in ((20, 10), (40, 20), (60, 30)):
        pipeline = MaskPipeline(
            PositionOracle(9, 27),
            scheduler,
            2,
            (2, 2, 40),
            4,
            2,
            2,
            keep_largest=False,
            depth=depth,
        )
        slices = (pipeline(list(range(16))) == 1).any(1).any(1).sum(1).float()
        assert (slices - expected).abs().max() <= 4, (depth, slices)
        means[depth] = float(slices.mean())
        assert abs(means[depth] - expected) <= 1, (depth, means)
    assert means[60] / means[40] == pytest.approx(1.5, abs=0.1)
    assert means[20] / means[40] == pytest.approx(0.5, abs=0.1)


@pytest.mark.slow
def test_shipped_weights_label_voxels_grow_with_the_depth():
    """The shipped MC-DPM (32 slices) at 16, 32, 48 slices, 4 seeds, its DDIM-20: the label
    voxels grow with the depth, but less than in proportion. It was trained at one slice
    density, so organs keep part of their trained length in slices: over 16 seeds the total
    was 0.40x and 1.28x (per label 0.33-0.70x and 1.09-1.32x; the trachea of these 4 seeds
    even shrinks at 48). The bounds leave room for 4 seeds' spread (0.41x, 1.29x here)."""
    totals = {}
    for depth in (16, 32, 48):
        config = bundle_config("mask_diffusion", None, None, depth=depth, device="cpu")
        volumes = config.get_parsed_content("pipeline")([0, 1, 2, 3])
        assert volumes.shape == (4, 32, 32, depth) and int(volumes.max()) < 5
        totals[depth] = int((volumes > 0).sum())
    assert 0.25 < totals[16] / totals[32] < 0.7, totals
    assert 1.1 < totals[48] / totals[32] < 1.7, totals


def test_refiner_pads_slices_its_levels_cannot_halve():
    """Coronal and sagittal slices of a volume of any depth are H x depth: a 3-level SPADE
    UNet needs multiples of 4 (before: a size mismatch in the decoder)."""
    torch.manual_seed(0)
    net = SemanticDiffusionUNet(3, (8, 8, 8), (False, False, False), 1, 4, 8, 8).eval()
    with torch.no_grad():  # MONAI zero-initialises the output layer
        for p in net.parameters():
            p.normal_(0, 0.1)
    seg = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 16, 12)), 3).movedim(-1, 1).float()
    x, t = torch.randn(2, 1, 16, 12), torch.tensor([3, 7])
    with torch.inference_mode():
        valid = net(x, t, seg)
        assert torch.equal(valid, SPADEDiffusionModelUNet.forward(net, x, t, seg=seg))
        for depth in (7, 13, 18):
            xs = torch.randn(2, 1, 16, depth)
            segs = seg[..., :1].expand(-1, -1, -1, depth)
            out = net(xs, t, segs)
            assert out.shape == xs.shape and torch.isfinite(out).all()
            with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
                SPADEDiffusionModelUNet.forward(net, xs, t, seg=segs)


@pytest.mark.parametrize("depth", [16, 48, 13])
def test_shipped_image_stage_at_any_depth(depth):
    """The shipped sequence generator and all three refiners (3 levels: multiples of 4) on
    masks of 0.5x, 1.5x and an odd number of the training grid's 32 slices."""
    pipeline = bundle_config("image_synthesis", None, None, device="cpu", sdm_steps=100)
    pipeline = pipeline.get_parsed_content("pipeline")
    assert sorted(pipeline.refiners) == sorted(VIEWS)
    labels = torch.zeros(1, 16, 16, depth, dtype=torch.long)
    labels[:, 4:12, 5:11, depth // 4 : 3 * depth // 4] = 2
    onehot = torch.nn.functional.one_hot(labels, 5).movedim(-1, 1).float()
    rough, refined = pipeline(onehot, [0])
    assert rough.shape == refined.shape == (1, 1, 16, 16, depth)
    assert torch.isfinite(refined).all() and refined.abs().max() <= 1.0
