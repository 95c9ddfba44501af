import numpy as np
import pytest
import torch

from common.transforms import (
    NormaliseIntensityd,
    RemapLabelsd,
    invert_image,
    model_space_affine,
    volume_transforms,
)


def _run(pair, **kw):
    t = volume_transforms(**kw)
    return t, t({"image": pair["image"], "label": pair["label"]})


def test_chain_gives_fixed_shape_range_and_labels(smooth_ct_pair):
    _, out = _run(
        smooth_ct_pair,
        modality="CT",
        pixdim=(1.6, 1.8, 2.5),
        spatial_size=(16, 16, 8),
        num_classes=3,
    )
    assert out["image"].shape == (1, 16, 16, 8) and out["label"].shape == (1, 16, 16, 8)
    assert -1.0 <= out["image"].min() and out["image"].max() <= 1.0
    assert set(out["label"].unique().tolist()) == {0.0, 1.0, 2.0}
    # RAS after orientation: x spacing positive in the model-space affine
    assert out["image"].affine[0, 0] > 0


def test_crop_keeps_labelled_z_range_plus_margin(smooth_ct_pair):
    # labels span z 5..14 (10 slices); margin 2 -> 14 slices; D=14 means no resize along z
    _, out = _run(
        smooth_ct_pair,
        modality="CT",
        pixdim=(0.8, 0.9, 2.5),
        spatial_size=(40, 36, 14),
        num_classes=3,
        z_margin=2,
    )
    lab = out["label"][0]
    per_slice = lab.reshape(-1, lab.shape[-1]).amax(0)
    assert per_slice[:2].sum() == 0 and per_slice[-2:].sum() == 0 and per_slice[2:-2].all()


def test_one_hot_option(smooth_ct_pair):
    _, out = _run(
        smooth_ct_pair,
        modality="CT",
        pixdim=(1.6, 1.8, 2.5),
        spatial_size=(16, 16, 8),
        num_classes=3,
        one_hot=True,
    )
    assert out["label"].shape == (3, 16, 16, 8)
    assert torch.allclose(out["label"].sum(0), torch.ones(16, 16, 8))


def test_inverse_round_trip_restores_affine_and_hu(smooth_ct_pair):
    t, out = _run(
        smooth_ct_pair,
        modality="CT",
        pixdim=(0.8, 0.9, 2.5),
        spatial_size=(48, 48, 14),
        num_classes=3,
        z_margin=2,
    )
    inv = invert_image(out["image"].clone(), out, t)
    assert inv.shape == (1, 40, 36, 20)
    np.testing.assert_allclose(inv.affine.numpy(), smooth_ct_pair["affine"], atol=1e-4)
    # slices inside the crop come back in HU
    np.testing.assert_allclose(
        inv[0, :, :, 3:17].numpy(), smooth_ct_pair["array"][:, :, 3:17], atol=0.5
    )


def test_inverse_after_resampling_restores_grid(smooth_ct_pair):
    t, out = _run(
        smooth_ct_pair,
        modality="CT",
        pixdim=(1.6, 1.8, 2.5),
        spatial_size=(32, 32, 14),
        num_classes=3,
        z_margin=2,
    )
    inv = invert_image(out["image"].clone(), out, t)
    assert inv.shape == (1, 40, 36, 20)
    np.testing.assert_allclose(inv.affine.numpy(), smooth_ct_pair["affine"], atol=1e-4)
    err = np.abs(inv[0, 2:-2, 2:-2, 4:16].numpy() - smooth_ct_pair["array"][2:-2, 2:-2, 4:16])
    assert err.mean() < 25.0  # HU, from 2x in-plane downsampling of a smooth image


def test_mri_percentile_normalisation_inverts():
    img = torch.linspace(0, 1000, 4000).reshape(1, 10, 20, 20)
    t = NormaliseIntensityd("image", percentiles=(0.5, 99.5))
    from monai.data import MetaTensor

    out = t({"image": MetaTensor(img)})
    assert out["image"].min() == -1 and out["image"].max() == 1
    back = t.inverse(out)["image"]
    inner = (img > 10) & (img < 990)
    assert torch.allclose(back[inner], img[inner], atol=1e-2)


def test_remap_labels_and_unknown_value():
    t = RemapLabelsd("label", {0: 0, 2: 3, 41: 3, 3: 2})
    out = t({"label": torch.tensor([[[[0.0, 2.0, 41.0, 3.0]]]])})
    assert out["label"].flatten().tolist() == [0, 3, 3, 2]
    with pytest.raises(ValueError, match=r"\[7\]"):
        t({"label": torch.tensor([[[[7.0]]]])})


def test_model_space_affine_is_centred():
    aff = model_space_affine((2.0, 2.0, 5.0), (16, 16, 8))
    centre = aff @ np.array([7.5, 7.5, 3.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0)
    assert np.allclose(np.diag(aff)[:3], [2, 2, 5])
