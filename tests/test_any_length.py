"""Masks and images of any axial length: MC-DPM grows each volume window by window at the
slice density it learned (the training depth) and resamples it along z to the length asked
for, so every organ keeps its share of the length; the refiner pads slices that its UNet
levels cannot halve."""

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import REPO
from monai.networks.nets import SPADEDiffusionModelUNet

from common.core.bundle_configs import bundle_parser
from common.core.errors import find_data_error
from common.core.io import read_record
from common.data.labels import load_label_set
from common.images.refiner import VIEWS, SemanticDiffusionUNet
from common.masks.generation import generate_mask_cases
from common.masks.pipeline import MaskPipeline, resample_depth
from medgen3d.bundles import bundle_config

MASKS = REPO / "bundles" / "mask_diffusion"


pytestmark = pytest.mark.usefixtures("one_thread")


def _organ_lengths(volumes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, K)``: the number of slices each label appears on, per volume."""
    present = torch.stack([(volumes == k).any(1).any(1) for k in range(num_classes)], 1)
    return present.sum(-1)


def test_resample_depth_stretches_and_shrinks_every_label_in_proportion():
    """A 40-slice volume: label 1 on slices 10-29 (20), label 2 on 0-3 (4), label 3 a
    one-voxel-wide tube on 8-35 (28). At 60 and 20 slices each spans 1.5x and 0.5x its slices
    (within one slice) and keeps its in-plane shape; 40 returns the volume itself."""
    labels = torch.zeros(2, 6, 6, 40, dtype=torch.long)
    labels[:, 1:4, 1:4, 10:30] = 1
    labels[:, :, :, 0:4] = 2
    labels[:, 5, 5, 8:36] = 3
    assert resample_depth(labels, 40) is labels
    for depth, ratio in ((60, 1.5), (20, 0.5), (100, 2.5)):
        out = resample_depth(labels, depth)
        assert out.shape == (2, 6, 6, depth) and out.dtype == torch.long
        lengths = _organ_lengths(out, 4)[:, 1:].float()
        expected = torch.tensor([20.0, 4.0, 28.0]) * ratio
        assert (lengths - expected).abs().max() <= 1, (depth, lengths)
        middle = out[..., depth // 2]
        assert torch.equal(middle, labels[..., 20]), depth  # the cross-section is unchanged


def _tiny_pipeline(**values) -> tuple[MaskPipeline, list]:
    """The bundle's pipeline at the tiny preset (16x16x12, m=4, n=2, DDIM-2), untrained."""
    values = {"pipeline#network": "@network_def", "device": "cpu", "batch_size": 2, **values}
    parser = bundle_parser(MASKS, ["inference.yaml"], "tiny", "thorax", values)
    torch.manual_seed(0)
    return parser.get_parsed_content("pipeline"), parser.get_parsed_content("output_pixdim")


@pytest.mark.parametrize("depth", [6, 7, 18, 4, 1])
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
        ({"depth": 0}, "depth: 0 slices"),
        ({"extent_mm": 3.0}, "extent_mm: 3.0 mm is less than one slice of 26.6667 mm"),
        ({"depth": 18, "extent_mm": 480.0}, "depth / extent_mm: both are set"),
    ):
        with pytest.raises(RuntimeError) as err:  # MONAI's wrapper; the CLI prints the cause
            _tiny_pipeline(**values)
        assert message in str(find_data_error(err.value))


def test_other_depths_are_the_grid_volume_resampled():
    """Same seeds: a volume at any depth is the one grown at the grid's 12 slices, resampled;
    keep-largest runs on the grown volume (so each organ keeps its share of the length), and
    again after shrinking, which can split a thin piece."""
    grid, _ = _tiny_pipeline()
    native = grid([2, 3], postprocess=False)
    kept = grid._keep_largest(native)
    for depth in (18, 5):
        pipeline, _ = _tiny_pipeline(depth=depth)
        assert torch.equal(pipeline([2, 3], postprocess=False), resample_depth(native, depth))
        expected = resample_depth(kept, depth)
        expected = grid._keep_largest(expected) if depth < 12 else expected
        assert torch.equal(pipeline([2, 3]), expected)


def test_extent_mm_writes_that_many_slices_at_the_grid_spacing(tmp_path):
    """tiny grid: 320 mm over 12 slices = 26.67 mm; 480 mm -> 18 slices, 1.5x the grid."""
    pipeline, pixdim = _tiny_pipeline(extent_mm=480.0)
    labels = load_label_set("segthor")
    generate_mask_cases(pipeline, labels, tmp_path, 1, pixdim, seed=1)
    path = tmp_path / "labels" / "synthetic_0000.nii.gz"
    img = nib.load(path)
    assert img.shape == (16, 16, 18)
    assert img.header.get_zooms() == pytest.approx((20.0, 20.0, 320.0 / 12))
    centre = img.affine @ np.array([7.5, 7.5, 8.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-4)  # centred on the origin
    assert read_record(path)["spatial_size"] == [16, 16, 18]


@pytest.mark.slow
def test_shipped_weights_label_volumes_scale_with_the_depth():
    """The shipped demo MC-DPM's 32-slice volumes (8 seeds), raw and after keep-largest, at 16, 24,
    40 and 48 slices as the pipeline makes them (``test_other_depths_are_the_grid_volume_
    resampled``): every label's voxels scale with the depth within 10% (the farthest, 1.05x of
    0.5x, is the trachea), and its z-continuity (Dice of consecutive slices) drops by at most
    0.12."""
    pipeline = bundle_config("mask_diffusion", "demo", None, device="cpu").get_parsed_content(
        "pipeline"
    )
    raw = pipeline(list(range(8)), postprocess=False)
    kept = pipeline._keep_largest(raw)
    for native, keep in ((raw, False), (kept, True)):
        for depth in (16, 24, 40, 48):
            out = resample_depth(native, depth)
            out = pipeline._keep_largest(out) if keep and depth < 32 else out
            for k in range(1, 5):
                ratio = int((out == k).sum()) / int((native == k).sum())
                assert ratio == pytest.approx(depth / 32, rel=0.1), (depth, k, ratio)
                drop = _z_continuity(native == k) - _z_continuity(out == k)
                assert drop < 0.12, (depth, k, drop)


def _z_continuity(organ: torch.Tensor) -> float:
    """Mean Dice of consecutive slices of ``organ (B, H, W, D)`` where both are non-empty."""
    a, b = organ[..., :-1].float(), organ[..., 1:].float()
    inter, total = (a * b).sum((1, 2)), a.sum((1, 2)) + b.sum((1, 2))
    both = (a.sum((1, 2)) > 0) & (b.sum((1, 2)) > 0)
    return float((2 * inter[both] / total[both]).mean())


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
    masks of 16, 48 and an odd number of slices."""
    pipeline = bundle_config("image_synthesis", None, None, device="cpu", sdm_steps=100)
    pipeline = pipeline.get_parsed_content("pipeline")
    assert sorted(pipeline.refiners) == sorted(VIEWS)
    labels = torch.zeros(1, 16, 16, depth, dtype=torch.long)
    labels[:, 4:12, 5:11, depth // 4 : 3 * depth // 4] = 2
    onehot = torch.nn.functional.one_hot(labels, 5).movedim(-1, 1).float()
    rough, refined = pipeline(onehot, [0])
    assert rough.shape == refined.shape == (1, 1, 16, 16, depth)
    assert torch.isfinite(refined).all() and refined.abs().max() <= 1.0
