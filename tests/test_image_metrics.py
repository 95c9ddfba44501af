import json
import math

import numpy as np
import pytest
import torch

from common.data.labels import load_label_set
from common.images import metrics as im
from common.images import slice_encoder as se

SEG = load_label_set("segthor")  # esophagus, heart, trachea, aorta
CT = (-1000.0, 1000.0)
SHAPE = (32, 32, 16)


def _cases(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, list[np.ndarray]]:
    """``n`` CT-like volumes ``(n, 1, 32, 32, 16)`` (body, heart disc, texture) and their labels.

    ``shift`` (model units) is added inside the body: 0.1 = +100 HU.
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    body = (x - 16) ** 2 + (y - 16) ** 2 < 14**2
    images, labels = [], []
    for _ in range(n):
        cx, cy, r = 16 + rng.integers(-3, 4), 16 + rng.integers(-3, 4), 6 + rng.integers(0, 3)
        heart = ((x - cx) ** 2 + (y - cy) ** 2 < r**2) & (z > 2) & (z < 13)
        trachea = ((x - 16) ** 2 + (y - 26) ** 2 < 4) & (z > 8)
        texture = 0.05 * np.sin(x / 3 + rng.uniform(0, 6)) + 0.02 * rng.standard_normal(SHAPE)
        image = np.where(body, -0.1 + shift, -1.0) + 0.1 * heart - 0.8 * trachea + texture * body
        images.append(image.clip(-1, 1)[None].astype(np.float32))
        labels.append((2 * heart + 3 * trachea).astype(np.uint8))
    return np.stack(images), labels


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: on a shared 2-core CPU, thread contention costs more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def real():
    return _cases(4, seed=0)


@pytest.fixture(scope="module")
def extractor(real):
    return se.train_slice_encoder(se.axial_slices(torch.as_tensor(real[0])), epochs=3, seed=0)


def test_identical_sets_are_perfect_and_json_safe(real, extractor):
    images, labels = real
    r = im.evaluate_images(images, images.copy(), labels, labels, SEG, CT, extractor, paired=True)
    p = r["paired_metrics"]
    assert p["mae"] == [0.0] * 4 and p["mae_original_mean"] == 0.0
    assert p["psnr"] == [im.PSNR_CAP_DB] * 4
    assert p["ssim_mean"] == pytest.approx(1.0, abs=1e-5)
    assert r["fid"] == pytest.approx(0.0, abs=1e-6) and r["mmd"] == pytest.approx(0.0, abs=1e-9)
    assert r["slices_gen"] == r["slices_real"] == 4 * SHAPE[2]
    assert r["diversity_gen"] == r["diversity_real"]
    heart = r["intensity"]["labels"]["heart"]
    assert heart["median_diff"] == 0.0 and -100 < heart["median_real"] < 100
    assert r["intensity"]["labels"]["aorta"]["median_gen"] is None
    assert r["intensity"]["mean_abs_median_diff"] == 0.0
    assert json.loads(json.dumps(r, allow_nan=False)) == r


def test_shifted_intensity_is_farther_with_signed_median_difference(real, extractor):
    images, labels = real
    brighter, _ = _cases(4, seed=0, shift=0.2)  # +200 HU inside the body
    same = im.fid_mmd(images, images, extractor)
    shifted = im.fid_mmd(brighter, images, extractor)
    assert shifted["fid"] > same["fid"] + 1e-3 and shifted["mmd"] > same["mmd"] + 1e-3
    gen_stats = im.label_intensity_stats(brighter, labels, SEG, CT)
    real_stats = im.label_intensity_stats(images, labels, SEG, CT)
    up = im.intensity_agreement(gen_stats, real_stats)
    assert up["labels"]["heart"]["median_diff"] == pytest.approx(200.0, abs=1.0)
    assert up["mean_abs_median_diff"] > 150.0
    down = im.intensity_agreement(real_stats, gen_stats)
    assert down["labels"]["heart"]["median_diff"] == pytest.approx(-200.0, abs=1.0)


def test_unpaired_evaluation_trains_its_own_encoder(real, extractor):
    images, labels = real
    other, other_labels = _cases(3, seed=1)
    r = im.evaluate_images(other, images, other_labels, labels, SEG, CT, encoder_epochs=1)
    assert r["paired_metrics"] is None and r["n_generated"] == 3 and r["n_real"] == 4
    assert "1 epochs, seed 0" in r["feature_extractor"]
    # the encoder it trained: on the real slices, 1 epoch, seed 0
    own = se.train_slice_encoder(se.axial_slices(torch.as_tensor(images)), epochs=1, seed=0)
    expected, same = im.fid_mmd(other, images, own), im.fid_mmd(images, images, own)
    assert r["fid"] == pytest.approx(expected["fid"]) and r["mmd"] == pytest.approx(expected["mmd"])
    assert r["fid"] > same["fid"] + 1e-6 and r["mmd"] > same["mmd"] + 1e-6
    json.dumps(r, allow_nan=False)
    with pytest.raises(ValueError, match="equal sizes"):
        im.evaluate_images(other, images, other_labels, labels, SEG, CT, extractor, paired=True)


def test_an_encoder_trained_once_gives_what_each_evaluation_would_train(real):
    images, labels = real
    other, other_labels = _cases(3, seed=1)
    encoder, name = im.real_slice_encoder(images, seed=0, epochs=1)
    given = im.evaluate_images(
        other, images, other_labels, labels, SEG, CT, encoder, extractor_name=name
    )
    own = im.evaluate_images(other, images, other_labels, labels, SEG, CT, encoder_epochs=1)
    assert given["feature_extractor"] == own["feature_extractor"] == name
    assert given["fid"] == pytest.approx(own["fid"]) and given["mmd"] == pytest.approx(own["mmd"])


def test_diversity_is_one_for_copies_and_lower_for_different_volumes(real):
    images, _ = real
    copies = im.diversity(np.repeat(images[:1], 3, axis=0))
    assert copies["ms_ssim"] == pytest.approx(1.0, abs=1e-6) and copies["pairs"] == 3
    assert copies["scales"] == 3 and copies["kernel_size"] == 7
    assert im.diversity(images)["ms_ssim"] < 0.99
    assert im.diversity(images[:1])["ms_ssim"] is None


@pytest.mark.parametrize(
    "size, scales, kernel",
    [(256, 5, 7), (128, 5, 7), (64, 4, 7), (32, 3, 7), (16, 2, 7), (5, 1, 5)],
)
def test_ms_ssim_settings_fit_the_slice_size(size, scales, kernel):
    k, weights = im.ms_ssim_settings(size, size + 3)
    assert (k, len(weights)) == (kernel, scales) and sum(weights) == pytest.approx(1.0)
    x = torch.rand(2, 1, size, size + 3, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert im.diversity(x[[0, 0]])["ms_ssim"] == pytest.approx(1.0, abs=1e-5)
    assert im.diversity(x)["ms_ssim"] < 0.3  # independent noise volumes: far from 1


def test_small_depth_uses_a_smaller_ssim_window():
    x = torch.rand(2, 1, 12, 12, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    p = im.paired_metrics(x, x.flip(0), value_range=CT)
    assert im._ssim_window((12, 12, 4)) == (7, 7, 3)
    assert all(abs(s) < 0.1 for s in p["ssim"])  # independent noise: no shared structure
    assert p["mae_original_mean"] == pytest.approx(p["mae_mean"] * (CT[1] - CT[0]) / 2)
    with pytest.raises(ValueError, match="differ"):
        im.paired_metrics(x, x[:1])


def test_psnr_and_mae_of_known_noise_match_the_formulas():
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 1, 12, 12, 6, generator=gen) * 1.6 - 0.8
    noise = 0.05 * torch.randn(ref.shape, generator=gen)
    p = im.paired_metrics(ref + noise, ref, value_range=CT)
    mse, mae = noise.square().mean(dim=(1, 2, 3, 4)), noise.abs().mean(dim=(1, 2, 3, 4))
    assert p["psnr"] == pytest.approx([10 * math.log10(2.0**2 / m) for m in mse], abs=1e-3)
    assert p["psnr_mean"] == pytest.approx(10 * math.log10(4 / 0.05**2), abs=0.5)  # ~32 dB
    assert p["mae"] == pytest.approx(mae.tolist(), rel=1e-5)
    assert p["mae_original"] == pytest.approx((mae * 1000).tolist(), rel=1e-5)  # HU
    shifted = im.paired_metrics(ref + 0.2, ref)  # constant offset: MSE 0.04
    assert shifted["psnr_mean"] == pytest.approx(10 * math.log10(4 / 0.04), abs=1e-3)


def test_frechet_distance_and_mmd_on_known_features():
    a = torch.randn(200, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert im.frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)  # |mean shift|^2
    assert im.mmd(a, a) == 0.0
    assert im.mmd(a + 1.0, a) > im.mmd(a + 0.1, a) > 0
    assert im.mmd(a, torch.zeros(5, 8)) > 0  # no distinct reference vectors: bandwidth 1
    with pytest.raises(ValueError, match=">= 2"):
        im.frechet_distance(a[:1], a)


def test_encoder_training_is_deterministic_and_leaves_global_rng(real):
    slices = se.axial_slices(torch.as_tensor(real[0][:2]))
    state = torch.random.get_rng_state()
    first, again = (se.train_slice_encoder(slices, epochs=1, seed=3) for _ in range(2))
    other = se.train_slice_encoder(slices, epochs=1, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.no_grad():
        f1, f2, f3 = first(slices), again(slices), other(slices)
    assert f1.shape == (len(slices), se.ENCODER_CHANNELS[-1])
    torch.testing.assert_close(f1, f2)
    assert not torch.allclose(f1, f3)
    assert not any(p.requires_grad for p in first.parameters()) and not first.training


def test_spatial_feature_maps_are_pooled(real):
    conv = torch.nn.Conv2d(1, 5, 3)
    feats = se.slice_features(real[0], conv)
    assert feats.shape == (4 * SHAPE[2], 5) and feats.dtype == torch.float64


def test_markdown_table_and_report_round_trip(tmp_path, real, extractor):
    images, labels = real
    brighter, _ = _cases(4, seed=0, shift=0.1)
    results = {
        "Vid2Vid only": im.evaluate_images(brighter, images, labels, labels, SEG, CT, extractor),
        "refined (MedGen3D)": im.evaluate_images(
            images, images, labels, labels, SEG, CT, extractor, paired=True
        ),
    }
    table = im.markdown_table(results)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(results)
    assert rows[1].startswith("| Vid2Vid only |") and "| – |" in rows[1]  # unpaired: no MAE
    assert all(row.count(" | ") == len(im.TABLE_COLUMNS) - 1 for row in rows)
    json_path, md_path = im.write_report(results, tmp_path / "report")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(results, allow_nan=False))
    assert md_path.read_text() == table
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "image_metrics.json",
        "image_metrics.md",
    ]


def test_mri_values_in_small_units_keep_their_decimals(real, extractor):
    images, labels = real
    brighter, _ = _cases(4, seed=0, shift=0.1)
    ct = im.evaluate_images(brighter, images, labels, labels, SEG, CT, extractor)
    mri = im.evaluate_images(brighter, images, labels, labels, SEG, (0.0, 0.92), extractor)
    ct_cell = im.markdown_table({"a": ct}).splitlines()[2].split(" | ")[-1].rstrip(" |")
    mri_cell = im.markdown_table({"a": mri}).splitlines()[2].split(" | ")[-1].rstrip(" |")
    assert ct_cell == f"{ct['intensity']['mean_abs_median_diff']:.1f}"
    assert mri_cell == f"{mri['intensity']['mean_abs_median_diff']:.4f}" != "0.0"
