import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.data.transforms import (
    NormaliseIntensityd,
    RemapLabelsd,
    invert_image,
    model_space_affine,
    to_original_intensity,
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
    # the CT window [-1000, 1000] HU maps HU / 1000; resampling stays inside the input's range
    hu = smooth_ct_pair["array"]
    assert hu.min() / 1000 - 1e-4 <= out["image"].min() < hu.min() / 1000 + 0.1
    assert hu.max() / 1000 - 0.1 < out["image"].max() <= hu.max() / 1000 + 1e-4
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


@settings(max_examples=100, deadline=None)
@given(
    lo=st.floats(-2000, 1000),
    width=st.floats(1, 3000),
    values=st.lists(st.floats(-5000, 5000), min_size=1, max_size=50),
)
def test_intensity_window_clips_keeps_order_and_inverts_inside(lo, width, values):
    hi = lo + width
    x = torch.tensor(values, dtype=torch.float64)[None]
    out = NormaliseIntensityd("image", window=(lo, hi))({"image": x.float()})["image"].double()
    assert out.min() >= -1 and out.max() <= 1
    order = torch.argsort(x.flatten())
    assert (out.flatten()[order].diff() >= 0).all()  # monotone
    inside = (x >= lo) & (x <= hi)
    back = to_original_intensity(out, lo, hi)
    torch.testing.assert_close(back[inside], x[inside], rtol=0, atol=width * 1e-6 + 1e-3)
    assert torch.allclose(back[x < lo], torch.tensor(lo).double(), atol=1e-3 * width)


@settings(max_examples=100, deadline=None)
@given(
    table=st.dictionaries(st.integers(0, 3000), st.integers(0, 9), min_size=1, max_size=12),
    data=st.data(),
)
def test_remap_labels_follows_the_table(table, data):
    keys = sorted(table)
    picks = data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=40))
    label = torch.tensor(picks, dtype=torch.float32)[None]
    out = RemapLabelsd("label", table)({"label": label})["label"]
    assert out.flatten().tolist() == [table[v] for v in picks]
    unknown = data.draw(st.integers(0, 3100).filter(lambda v: v not in table))
    with pytest.raises(ValueError, match=rf"\[{unknown}\]"):
        RemapLabelsd("label", table)({"label": torch.tensor([[float(unknown)]])})


def test_model_space_affine_is_centred():
    aff = model_space_affine((2.0, 2.0, 5.0), (16, 16, 8))
    centre = aff @ np.array([7.5, 7.5, 3.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0)
    assert np.allclose(np.diag(aff)[:3], [2, 2, 5])
