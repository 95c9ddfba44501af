import json

import numpy as np
import pytest

from common.data.labels import load_label_set
from common.masks import metrics as mask_metrics
from common.masks.metrics import evaluate_masks, markdown_table

SHAPE = (12, 12, 8)
SEG = load_label_set("segthor")  # esophagus, heart, trachea, aorta; all single-component


def _mask(heart=(2, 8, 2, 8, 2, 6), esophagus=(9, 11, 9, 11, 0, 8)) -> np.ndarray:
    """A (12, 12, 8) mask with a heart box and an esophagus box ``(x0, x1, y0, y1, z0, z1)``."""
    m = np.zeros(SHAPE, np.uint8)
    for value, (x0, x1, y0, y1, z0, z1) in ((2, heart), (1, esophagus)):
        m[x0:x1, y0:y1, z0:z1] = value
    return m


@pytest.fixture
def real():
    return [_mask(), _mask(heart=(3, 8, 2, 8, 1, 6)), _mask(heart=(2, 7, 3, 8, 2, 7))]


def test_identical_sets_have_zero_distance(real):
    m = evaluate_masks(real, [r.copy() for r in real], SEG, spacing=(2.0, 2.0, 2.0))
    assert m["n_generated"] == m["n_real"] == 3
    for name, lab in m["labels"].items():
        assert lab["volume_w1_ml"] == 0.0
        for key in ("volume_ml_{}_mean", "presence_{}", "components_{}", "z_continuity_{}"):
            assert lab[key.format("gen")] == lab[key.format("real")], (name, key)
    heart = m["labels"]["heart"]
    assert heart["volume_ml_real_mean"] == pytest.approx(
        np.mean([(r == 2).sum() for r in real]) * 8 / 1000
    )
    assert heart["presence_gen"] == 1.0 and heart["components_gen"] == 1.0
    assert m["labels"]["trachea"]["presence_gen"] == 0.0
    assert m["labels"]["trachea"]["volume_w1_rel"] is None
    assert m["summary"]["nearest_real_dice_mean"] == 1.0


def _dice(x: np.ndarray, y: np.ndarray) -> float:
    """Mean Dice over the foreground labels present in ``x`` or ``y``."""
    labels = [v for v in range(1, len(SEG.names)) if (x == v).any() or (y == v).any()]
    return float(
        np.mean(
            [2 * ((x == v) & (y == v)).sum() / ((x == v).sum() + (y == v).sum()) for v in labels]
        )
    )


def test_copies_are_detected_against_real_reference(real):
    other = _mask(heart=(1, 6, 5, 11, 3, 8), esophagus=(9, 11, 0, 2, 0, 8))
    m = evaluate_masks([real[1].copy(), other], real, SEG)
    s = m["summary"]
    other_nearest = max(_dice(other, r) for r in real)
    assert other_nearest < 0.9  # a new mask, not a copy
    assert s["nearest_real_dice_max"] == 1.0
    assert s["nearest_real_dice_mean"] == pytest.approx((1.0 + other_nearest) / 2)
    reference = [max(_dice(r, q) for q in real if q is not r) for r in real]
    assert s["real_real_nearest_dice_mean"] == pytest.approx(np.mean(reference))
    assert s["real_real_nearest_dice_max"] == pytest.approx(max(reference))


def test_bigger_heart_gives_positive_volume_shift(real):
    bigger = [r.copy() for r in real]
    for b in bigger:  # one more heart slice: +36 voxels x 8 mm3 each
        b[2:8, 2:8, 6] = 2
    added = [((b == 2).sum() - (r == 2).sum()) * 8 / 1000 for b, r in zip(bigger, real)]
    heart = evaluate_masks(bigger, real, SEG, spacing=(2.0, 2.0, 2.0))["labels"]["heart"]
    assert heart["volume_w1_ml"] > 0 and heart["volume_bias_rel"] > 0
    assert heart["volume_ml_gen_mean"] - heart["volume_ml_real_mean"] == pytest.approx(
        np.mean(added)
    )
    smaller = evaluate_masks(real, bigger, SEG)["labels"]["heart"]
    assert smaller["volume_w1_rel"] > 0 and smaller["volume_bias_rel"] < 0


def test_two_blobs_of_single_component_label_are_fragmented(real):
    split = _mask()
    split[:, 5, :] = 0  # cut the heart in two along y
    touching = _mask(heart=(0, 0, 0, 0, 0, 0))
    touching[1:3, 1:3, 1:3] = 2
    touching[3:5, 3:5, 3:5] = 2  # corner contact: one piece under 26-connectivity
    heart = evaluate_masks([split, touching], real, SEG)["labels"]["heart"]
    assert heart["fragmented_gen"] == 0.5 and heart["fragmented_real"] == 0.0
    assert heart["components_gen"] == 1.5 and heart["components_real"] == 1.0


def test_slice_alternation_lowers_z_continuity(real):
    alternating = _mask()
    alternating[9:11, 9:11, 1::2] = 0  # esophagus on every other slice
    esophagus = evaluate_masks([alternating], real, SEG)["labels"]["esophagus"]
    assert esophagus["z_continuity_real"] == 1.0
    assert esophagus["z_continuity_gen"] == 0.0


def test_z_extent_fractions():
    m = _mask(heart=(2, 8, 2, 8, 2, 6), esophagus=(9, 11, 9, 11, 1, 8))
    labels = evaluate_masks([m], [m], SEG)["labels"]
    assert labels["heart"]["z_first_gen"] == 2 / 8 and labels["heart"]["z_last_gen"] == 5 / 8
    assert labels["esophagus"]["z_first_real"] == 1 / 8
    assert labels["esophagus"]["z_last_real"] == 7 / 8
    assert labels["aorta"]["z_first_gen"] is None


def test_bad_masks_raise(real):
    with pytest.raises(ValueError, match=r"generated mask 1 has shape \(12, 12, 6\).*same grid"):
        evaluate_masks([real[0], np.zeros((12, 12, 6), np.uint8)], real, SEG)
    with pytest.raises(ValueError, match="outside the label values 0..4"):
        evaluate_masks([np.full(SHAPE, 7, np.uint8)], real, SEG)
    with pytest.raises(ValueError, match="need generated and real"):
        evaluate_masks([], real, SEG)


def test_pairwise_dice_matches_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, (4, 300)).astype(np.uint8)
    b = rng.integers(0, 3, (3, 300)).astype(np.uint8)
    b[0] = 0  # no foreground at all
    monkeypatch.setattr(mask_metrics, "CHUNK_ELEMENTS", 64)  # several voxel chunks
    got = mask_metrics._pairwise_dice(a, b, 3)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            dices = [
                2 * ((x == v) & (y == v)).sum() / ((x == v).sum() + (y == v).sum())
                for v in (1, 2)
                if (x == v).any() or (y == v).any()
            ]
            assert got[i, j] == pytest.approx(np.mean(dices))


def test_json_round_trip_and_markdown(real):
    m = evaluate_masks(real[:2], real, SEG)
    assert json.loads(json.dumps(m, allow_nan=False)) == m
    md = markdown_table(m)
    assert all(name in md for name in SEG.names[1:]) and "Memorisation" in md
    assert len({line.count("|") for line in md.splitlines() if line.startswith("|")}) == 1
