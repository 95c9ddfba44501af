"""The z framings of common.data.transforms: ``field_of_view`` keeps the grid spacing along z,
centres the D slices on the labels, pads or crops scans shorter or longer than the grid and
inverts; segmentation training moves that window along z at random; segmentation inference
slides windows along a scan longer than the grid."""

import numpy as np
import pytest
import torch
from monai.transforms import Compose, Randomizable

from common.core.bundle_configs import bundle_parser
from common.core.io import save_nifti
from common.data.transforms import (
    FRAMINGS,
    RandZWindowd,
    ZWindowd,
    grid_pixdim,
    image_transforms,
    invert_image,
    random_z_window,
    volume_transforms,
)
from medgen3d.bundles import BUNDLES

FOV = dict(modality="CT", num_classes=3, z_framing="field_of_view")


def write_pair(folder, shape, spacing, labelled, name="case"):
    """A CT-like pair on an RAS grid of ``spacing`` mm: HU rising with z (so a slice's value
    tells where it came from), label 1 on slices ``labelled`` (a slice object) in a box."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    image = (-800.0 + 10.0 * z + 5.0 * np.sin(x / 3.0)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[shape[0] // 4 : -shape[0] // 4, shape[1] // 4 : -shape[1] // 4, labelled] = 1
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-40.0, 25.0, 100.0]
    return {
        "image": save_nifti(image, affine, folder / f"{name}_img.nii.gz"),
        "label": save_nifti(label, affine, folder / f"{name}_lab.nii.gz"),
        "affine": affine,
        "array": image,
    }


def labelled_slices(label: torch.Tensor) -> np.ndarray:
    """Indices of the axial slices of a ``(1, H, W, D)`` label that hold a label."""
    return np.flatnonzero(label[0].reshape(-1, label.shape[-1]).amax(0).numpy() > 0)


def world_z(affine, index: float) -> float:
    """World z (mm) of voxel index ``index`` along the last axis (axis-aligned affine)."""
    return float(affine[2, 2] * index + affine[2, 3])


def test_field_of_view_keeps_the_spacing_and_the_labelled_extent(tmp_path):
    # labels on source slices 10..29 at 3 mm: 60 mm, so 12 slices at the grid's 5 mm
    pair = write_pair(tmp_path, (20, 20, 40), (2.0, 2.0, 3.0), slice(10, 30))
    out = volume_transforms(pixdim=(4.0, 4.0, 5.0), spatial_size=(8, 8, 32), **FOV)(pair)
    assert out["image"].shape == out["label"].shape == (1, 8, 8, 32)
    np.testing.assert_allclose(np.diag(out["image"].affine)[:3], [4.0, 4.0, 5.0])
    zs = labelled_slices(out["label"])
    assert len(zs) == 12 and np.all(np.diff(zs) == 1)
    assert abs((zs[0] + zs[-1] + 1) / 2 - 16) <= 0.5  # centred on the grid
    # labelled_range resizes the same 12 slices + 2 x 2 margin to the whole depth instead
    old = volume_transforms(
        modality="CT", num_classes=3, pixdim=(4.0, 4.0, 5.0), spatial_size=(8, 8, 32)
    )(pair)
    assert len(labelled_slices(old["label"])) == 24


@pytest.mark.parametrize("labelled", [slice(4, 12), slice(50, 60), slice(70, 80)])
def test_a_longer_scan_is_cropped_around_its_labels(tmp_path, labelled):
    """80 slices at 5 mm, a 16-slice grid: the window follows the labels, also where it runs
    past the scan's first or last slice (padded there with air and background)."""
    pair = write_pair(tmp_path, (16, 16, 80), (4.0, 4.0, 5.0), labelled)
    t = volume_transforms(pixdim=(4.0, 4.0, 5.0), spatial_size=(16, 16, 16), **FOV)
    out = t(pair)
    image, label, affine = out["image"], out["label"], out["image"].affine.numpy()
    zs = labelled_slices(label)
    assert len(zs) == labelled.stop - labelled.start
    assert abs((zs[0] + zs[-1] + 1) / 2 - 8) <= 0.5
    # every kept slice is the source slice at the same world position (HU = -800 + 10 k)
    src = pair["affine"]
    for k in range(16):
        source_k = (world_z(affine, k) - src[2, 3]) / src[2, 2]
        if 0 <= source_k < 80:
            assert image[0, 8, 8, k] * 1000 == pytest.approx(-800 + 10 * source_k, abs=6)
        else:
            assert torch.all(image[..., k] == -1) and torch.all(label[..., k] == 0)
    back = invert_image(image.clone(), out, t)
    assert back.shape == (1, 16, 16, 80)
    np.testing.assert_allclose(back.affine.numpy(), src, atol=1e-4)
    kept = slice(max(0, labelled.start - 3), min(80, labelled.stop + 3))  # inside the window
    np.testing.assert_allclose(back[0, 4:12, 4:12, kept], pair["array"][4:12, 4:12, kept], atol=1)


def test_a_case_without_labels_is_framed_on_its_middle(tmp_path):
    pair = write_pair(tmp_path, (16, 16, 80), (4.0, 4.0, 5.0), slice(0, 0))
    out = volume_transforms(pixdim=(4.0, 4.0, 5.0), spatial_size=(16, 16, 16), **FOV)(pair)
    hu = out["image"][0, 8, 8] * 1000  # source slice k holds about -800 + 10 k HU
    np.testing.assert_allclose(hu.numpy(), -800 + 10 * np.arange(32, 48), atol=6)


def test_a_shorter_scan_is_padded_and_inverts(tmp_path):
    pair = write_pair(tmp_path, (16, 16, 6), (4.0, 4.0, 5.0), slice(1, 5))
    t = volume_transforms(pixdim=(4.0, 4.0, 5.0), spatial_size=(16, 16, 16), one_hot=True, **FOV)
    out = t(pair)
    assert out["image"].shape == (1, 16, 16, 16) and out["label"].shape == (3, 16, 16, 16)
    zs = labelled_slices(out["label"][1:])
    assert list(zs) == [6, 7, 8, 9]
    assert torch.all(out["image"][..., :5] == -1) and torch.all(out["image"][..., 11:] == -1)
    back = invert_image(out["image"].clone(), out, t)
    assert back.shape == (1, 16, 16, 6)
    np.testing.assert_allclose(back.affine.numpy(), pair["affine"], atol=1e-4)
    np.testing.assert_allclose(back[0].numpy(), pair["array"], atol=1e-3)


def test_image_chain_keeps_a_long_scan_whole_and_pads_a_short_one(tmp_path):
    long = write_pair(tmp_path, (24, 20, 50), (4.0, 4.0, 5.0), slice(0, 1), "long")
    short = write_pair(tmp_path, (24, 20, 10), (4.0, 4.0, 5.0), slice(0, 1), "short")
    fov = image_transforms("CT", (4.0, 4.0, 5.0), (16, 16, 16), z_framing="field_of_view")
    assert fov({"image": long["image"]})["image"].shape == (1, 16, 16, 50)
    padded = fov({"image": short["image"]})["image"]
    assert padded.shape == (1, 16, 16, 16)
    assert torch.all(padded[..., :3] == -1) and torch.all(padded[..., 13:] == -1)
    centre = image_transforms("CT", (4.0, 4.0, 5.0), (16, 16, 16))
    assert centre({"image": long["image"]})["image"].shape == (1, 16, 16, 16)


def test_framing_settings_are_checked():
    assert grid_pixdim((320, 320, 320), (64, 64, 64), None, "field_of_view") == [5.0] * 3
    assert grid_pixdim((320, 320, 320), (64, 64, 64), 5.0, "field_of_view") == [5.0] * 3
    assert grid_pixdim((320, 320, 320), (32, 32, 32), 5.0) == [10.0, 10.0, 5.0]
    with pytest.raises(ValueError, match="z_resample_mm 2.5 differs"):
        grid_pixdim((320, 320, 320), (64, 64, 64), 2.5, "field_of_view")
    with pytest.raises(ValueError, match="z_framing must be one of"):
        volume_transforms("CT", (1, 1, 1), (8, 8, 8), 2, z_framing="whole")


@pytest.mark.parametrize("slices, framed", [(60, 48), (10, 16)])
def test_seg_inference_slides_along_a_scan_longer_than_the_grid(tmp_path, slices, framed):
    """seg_downstream's inference config (tiny grid 16 x 16 x 16 at 6 x 6 x 5 mm, field_of_view
    framing): a 240 mm scan is segmented whole, window by window, a 40 mm one padded to one
    window; the label map comes back on the input grid and affine."""
    affine = np.diag([-2.5, -3.0, 4.0, 1.0])  # flipped, anisotropic: LPS-like
    affine[:3, 3] = [40.0, 60.0, -30.0]
    image = np.random.default_rng(0).normal(0, 300, (40, 36, slices)).astype(np.float32)
    path = save_nifti(image, affine, tmp_path / "scan.nii.gz")
    parser = bundle_parser(
        BUNDLES / "seg_downstream",
        ["inference.yaml"],
        "tiny",
        None,
        {"z_framing": "field_of_view", "output_dir": str(tmp_path / "labels")},
    )
    network = parser.get_parsed_content("network").eval()
    pre, inferer, post = (
        parser.get_parsed_content(k) for k in ("preprocessing", "inferer", "postprocessing")
    )
    data = pre({"image": path})
    assert data["image"].shape == (1, 16, 16, framed)  # 5 mm slices, at least one window
    windows = []
    network.register_forward_hook(lambda m, i, o: windows.append(i[0].shape))
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    assert all(tuple(w[2:]) == (16, 16, 16) for w in windows)
    assert sum(w[0] for w in windows) == (4 if framed == 48 else 1)  # overlap 0.25: stride 12
    out = Compose(list(post.transforms))(data)["pred"]
    assert tuple(out.shape) == (1, 40, 36, slices)
    np.testing.assert_allclose(out.affine.numpy(), affine, atol=1e-4)
    assert (tmp_path / "labels" / "scan_seg.nii.gz").is_file()


def window_start(out, pair) -> int:
    """Source slice index of a framed case's first slice (negative: padded below the scan)."""
    src = pair["affine"]
    return round((world_z(out["image"].affine.numpy(), 0) - src[2, 3]) / src[2, 2])


def assert_aligned_and_padded(out, pair, labelled: slice):
    """Each slice of the window is the source slice at its world z (image HU and label), or
    air (-1) and background (0) past the scan's ends."""
    image, label, slices = out["image"], out["label"], pair["array"].shape[-1]
    for k in range(image.shape[-1]):
        source_k = window_start(out, pair) + k
        if 0 <= source_k < slices:
            assert image[0, 8, 8, k] * 1000 == pytest.approx(-800 + 10 * source_k, abs=6)
            assert bool(label[..., k].any()) == (labelled.start <= source_k < labelled.stop)
        else:
            assert torch.all(image[..., k] == -1) and torch.all(label[..., k] == 0)


@pytest.mark.parametrize("labelled", [slice(30, 42), slice(2, 8), slice(72, 80)])
def test_training_moves_the_window_along_z_reproducibly(tmp_path, labelled):
    """80 slices at 5 mm, a 16-slice grid, shifts up to 7 slices: the window lands at many
    offsets around the centred one, the same for the same seed, image and label move together,
    and past the scan's ends it is padded as the centred window is (air, background)."""
    pair = write_pair(tmp_path, (16, 16, 80), (4.0, 4.0, 5.0), labelled)
    chain = volume_transforms(pixdim=(4.0, 4.0, 5.0), spatial_size=(16, 16, 16), **FOV)
    centred = chain(dict(pair))
    train = random_z_window(chain, 7)
    window = next(t for t in train.transforms if isinstance(t, RandZWindowd))
    starts = {}
    for seed in range(24):
        out = train.set_random_state(seed)(dict(pair))
        again = train.set_random_state(seed)(dict(pair))
        assert all(torch.equal(out[k], again[k]) for k in ("image", "label"))
        assert out["image"].shape == out["label"].shape == (1, 16, 16, 16)
        assert_aligned_and_padded(out, pair, labelled)
        starts[seed] = window_start(out, pair) - window_start(centred, pair)
        assert starts[seed] == window.shift
        if window.shift == 0:  # no shift: the centred window bit for bit
            assert torch.equal(out["image"], centred["image"])
            assert torch.equal(out["label"], centred["label"])
    assert set(starts.values()) <= set(range(-7, 8)) and len(set(starts.values())) >= 8


def test_a_training_window_always_holds_the_labels_middle(tmp_path):
    """The largest shift, (D - 1) // 2, keeps a one-slice label at the scan's last slice in the
    window; a larger one is refused."""
    pair = write_pair(tmp_path, (16, 16, 40), (4.0, 4.0, 5.0), slice(39, 40))
    chain = volume_transforms(pixdim=(4.0, 4.0, 5.0), spatial_size=(16, 16, 16), **FOV)
    train = random_z_window(chain, 7)
    shifts = set()
    for seed in range(40):
        out = train.set_random_state(seed)(dict(pair))
        shifts.add(next(t.shift for t in train.transforms if isinstance(t, RandZWindowd)))
        assert len(labelled_slices(out["label"])) == 1
    assert 7 in shifts  # the window starting on the labelled slice
    with pytest.raises(ValueError, match="z_shift_max must be in 0..7"):
        random_z_window(chain, 8)


def test_labelled_range_training_is_unchanged(tmp_path):
    """No window to move: z_shift_max 0 keeps the chain's own deterministic transforms (the
    shipped weights' framing), a shift is refused; z_shift_max 0 under field_of_view too."""
    pair = write_pair(tmp_path, (20, 20, 40), (2.0, 2.0, 3.0), slice(10, 30))
    for framing in FRAMINGS:
        chain = volume_transforms(
            "CT", (4.0, 4.0, 5.0), (8, 8, 16), 3, z_framing=framing, one_hot=True
        )
        train = random_z_window(chain, 0)
        assert train.transforms == chain.transforms
        assert not any(isinstance(t, Randomizable) for t in train.transforms)
        ref, out = chain(dict(pair)), train(dict(pair))
        assert torch.equal(ref["image"], out["image"]) and torch.equal(ref["label"], out["label"])
    with pytest.raises(ValueError, match="with z_framing labelled_range set it to 0"):
        random_z_window(volume_transforms("CT", (4.0, 4.0, 5.0), (8, 8, 16), 3), 3)


@pytest.mark.parametrize("scale", ["tiny", "demo"])
def test_seg_training_keeps_the_labelled_range_framing_of_the_small_scales(tmp_path, scale):
    """The tiny and demo seg configs (the demo weights) train on exactly what
    volume_transforms gives: no random window, bit for bit."""
    pair = write_pair(tmp_path, (20, 20, 40), (4.0, 4.0, 5.0), slice(10, 30))
    parser = bundle_parser(BUNDLES / "seg_downstream", ["train.yaml"], scale, None)
    assert (parser["z_framing"], parser["z_shift_max"]) == ("labelled_range", 0)
    train = parser.get_parsed_content("train#transforms")
    assert not any(isinstance(t, ZWindowd) for t in train.transforms)
    ref = parser.get_parsed_content("volume_transforms")(dict(pair))
    out = train(dict(pair))
    assert torch.equal(ref["image"], out["image"]) and torch.equal(ref["label"], out["label"])


def test_standard_seg_training_moves_the_window_and_validation_keeps_it_centred(tmp_path):
    """standard (field_of_view): training windows up to 31 slices off the centred one;
    validation and evaluation (volume_transforms) the centred window, as before."""
    pair = write_pair(tmp_path, (16, 16, 120), (20.0, 20.0, 5.0), slice(40, 70))
    parser = bundle_parser(BUNDLES / "seg_downstream", ["train.yaml"], "standard", "thorax")
    assert parser["z_shift_max"] == 31
    train = parser.get_parsed_content("train#transforms")
    assert [t.shift_max for t in train.transforms if isinstance(t, RandZWindowd)] == [31]
    assert parser["validate#dataset#transform"] == "@volume_transforms"
    validate = parser.get_parsed_content("volume_transforms")
    assert not any(isinstance(t, Randomizable) for t in validate.transforms)
    firsts = set()
    for seed in range(6):
        firsts.add(int(labelled_slices(train.set_random_state(seed)(dict(pair))["label"])[0]))
        assert int(labelled_slices(validate(dict(pair))["label"])[0]) == 17  # (64 - 30) / 2
    assert len(firsts) > 1
