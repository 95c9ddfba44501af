"""Synthetic thoracic CT phantoms with organ labels: the project's demo cohort.

Each case is a non-contrast chest CT in Hounsfield units on an RAS+ grid (array axis 0 runs
towards the patient's right, axis 1 anterior, axis 2 superior; the affine says so) with SegTHOR
or StructSeg labels. The anatomy is built from analytic shapes in millimetres, so slice position
matters: the liver, stomach and spleen fill the bottom slices under the diaphragm domes, the
heart sits in the lower-middle slices, the aortic arch and the carina lie above it and the lung
apices taper off below the top. A seed draws the body habitus, organ sizes and positions, a small
in-plane rotation, the textures and the noise level.

The anatomy and grid live in ``thorax_geometry``, the organ shapes in ``thorax_organs``; this
module paints them into HU, adds texture and noise and writes cohorts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from common.core.io import save_nifti, write_json
from common.core.seeds import case_seed
from common.data.datalists import write_datalist
from common.data.labels import LabelSet, load_label_set
from medgen3d.demo_data.thorax_geometry import Anatomy, Grid, ellipse, grid_affine, make_grid
from medgen3d.demo_data.thorax_organs import (
    abdomen_masks,
    airway_distances,
    heart_ellipsoid,
    keep_largest,
    lung_masks,
    rib_mask,
    spine_masks,
    trunk_masks,
    vessel_distances,
)

CONVENTIONS = ("segthor", "structseg")
DEFAULT_SHAPE = (128, 128, 64)
DEFAULT_SPACING = (3.0, 3.0, 5.0)
MIN_FOV_MM = (380.0, 380.0, 240.0)  # the body (up to ~370 mm wide) and the labelled organs fit
HU_RANGE = (-1024, 2000)
# Internal organ ids are 1 + the index here; the label conventions pick theirs by name.
# Later ones win where masks overlap (the heart over the aortic root).
ORGANS = ("left_lung", "right_lung", "aorta", "heart", "esophagus", "trachea", "spinal_cord")
AIR = -1000.0


def _draw_lines(field: np.ndarray, starts, ends, w0: float, w1: float) -> None:
    """Rasterise lines ``starts`` -> ``ends`` (N, 3) voxel indices into ``field`` (running max),
    their weight tapering from ``w0`` to ``w1``."""
    t = np.linspace(0, 1, 64)[:, None, None]
    pts = np.rint(starts + t * (ends - starts)).astype(np.intp)  # (64, N, 3)
    pts = np.clip(pts, 0, np.asarray(field.shape) - 1).reshape(-1, 3)
    weights = np.broadcast_to(w0 + (w1 - w0) * t[..., 0], (64, len(ends)))
    np.maximum.at(field, tuple(pts.T), weights.ravel().astype(np.float32))


def _lung_vessels(rng, grid: Grid, spacing, lungs, hila) -> np.ndarray:
    """Vessel trees (H, W, D) float32 in 0..1: from each hilum, 10 trunks that branch towards
    120 random points of its lung, blurred to ~5 mm wide vessels."""
    field = np.zeros(grid.shape, dtype=np.float32)
    mm = np.asarray(spacing)
    for lung, hilum in zip(lungs, hila):
        voxels = np.flatnonzero(lung)
        start = grid.index(np.asarray(hilum, dtype=np.float64))[None]
        ends = np.stack(np.unravel_index(rng.choice(voxels, 120), grid.shape), -1)
        forks = np.stack(np.unravel_index(rng.choice(voxels, 10), grid.shape), -1)
        forks = start + rng.uniform(0.3, 0.55, (10, 1)) * (forks - start)
        nearest = np.argmin(np.linalg.norm((ends[:, None] - forks[None]) * mm, axis=-1), axis=1)
        _draw_lines(field, np.repeat(start, len(forks), axis=0), forks, 1.0, 0.7)
        _draw_lines(field, forks[nearest], ends, 0.7, 0.3)
    sigma = 2.0 / mm
    delta = np.zeros((9, 9, 9), dtype=np.float32)
    delta[4, 4, 4] = 1
    peak = ndimage.gaussian_filter(delta, sigma)[4, 4, 4]
    return np.minimum(ndimage.gaussian_filter(field, sigma) / peak, 1)


def _smooth_noise(rng, shape, cell: int = 4) -> np.ndarray:
    """Smooth random field (H, W, D) float32 with unit std, varying over ~``cell`` voxels."""
    coarse = tuple(max(2, -(-n // cell)) for n in shape)
    field = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), 0.7)
    field = ndimage.zoom(field, [n / c for n, c in zip(shape, coarse)], order=1)
    return field / max(float(field.std()), 1e-6)


def _paint(shape, layers, texture: np.ndarray) -> np.ndarray:
    """HU volume (H, W, D) float32: ``layers`` (mask, HU, texture amplitude) painted in order
    over air, plus each tissue's amplitude times ``texture``."""
    hu = np.full(shape, AIR, dtype=np.float32)
    amp = np.zeros(shape, dtype=np.float32)
    for mask, value, amplitude in layers:
        np.copyto(hu, value, where=mask)
        np.copyto(amp, amplitude, where=mask)
    return hu + amp * texture


def _organ_map(masks: dict[str, np.ndarray]) -> np.ndarray:
    """Organ ids (H, W, D) uint8 (1 + index in ``ORGANS``, later ones win), each organ reduced
    to its largest connected piece."""
    organ = np.zeros(masks["heart"].shape, dtype=np.uint8)
    for i, name in enumerate(ORGANS, start=1):
        organ[masks[name]] = i
    for i in range(1, len(ORGANS) + 1):
        organ[(organ == i) & ~keep_largest(organ == i)] = 0
    return organ


def _render(anat: Anatomy, grid: Grid, spacing, rng) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free textured HU (H, W, D) float32 and the organ map (H, W, D) uint8."""
    x, y, z = grid.x, grid.y, grid.z
    trunk = trunk_masks(anat, grid)
    cavity, z_d = trunk["cavity"], trunk["diaphragm"]
    below = cavity & (z < z_d)
    heart_r2, heart_c = heart_ellipsoid(anat, grid)
    main_airway, airway = airway_distances(anat, grid)
    vessels = vessel_distances(anat, grid, heart_c)
    aorta = np.minimum(vessels["ascending"], vessels["descending"])
    great_vessels, esophagus = vessels["others"], vessels["esophagus"]
    spine = spine_masks(anat, grid)
    # heart with its pericardial fat
    pericardium = cavity & (z > z_d + 3) & ~spine["block"] & (heart_r2 <= 1.3)
    heart = pericardium & (heart_r2 <= 1) & (esophagus > 2) & (vessels["descending"] > 1)
    mediastinum = (
        (np.abs(x) < anat.mediastinum_w)
        | pericardium
        | (aorta <= 3)
        | (great_vessels <= 2)
        | (main_airway <= 4)
        | (esophagus <= 3)
        | spine["block"]
    )
    left_lung, right_lung = lung_masks(anat, grid, trunk, mediastinum)
    lungs = left_lung | right_lung
    cty = float(anat.trachea_y_at(anat.carina_z))
    hila = ((-45, cty - 6, anat.carina_z - 25), (40, cty - 6, anat.carina_z - 28))
    lung_vessels = _lung_vessels(rng, grid, spacing, (left_lung, right_lung), hila)
    sternum = (ellipse(x, y, 0, anat.cavity_b + 6, 15, 6) <= 1) & (z > heart_c[2])
    organs = abdomen_masks(anat, grid, below)

    layers = [
        (trunk["body"], -100, 10),  # subcutaneous fat
        (trunk["wall"], 45, 8),  # chest-wall muscle
        (cavity, -85, 10),  # mediastinal fat
        (below, -30, 25),  # bowel and fat
        (organs["liver"], 62, 6),
        (organs["spleen"], 50, 5),
        (organs["stomach"], 15, 6),
        (organs["gas"], AIR, 0),
        (cavity & (z >= z_d) & (z <= z_d + 4), 40, 5),  # diaphragm
        (lungs, anat.lung_hu - 0.35 * y + 800 * lung_vessels, 20),  # denser at the back
        (spine["paraspinal"], 45, 8),
        (rib_mask(anat, grid, trunk), np.where(y > 0.45 * anat.cavity_b, 120, 450), 60),
        (sternum & (z < anat.apex_z - 10), 350, 60),
        (spine["cortex"], 700, 60),
        (spine["cancellous"], 250, 60),
        (spine["disc"], 90, 8),
        (spine["posterior"], 450, 80),
        (spine["canal"], 10, 3),
        (spine["cord"], 32, 3),
        (pericardium, -90, 10),
        (great_vessels <= 0, 42, 4),
        (aorta <= 0, 45, 4),
        (heart, 38, 4),  # myocardium
        (heart & (heart_r2 <= 0.55), 46, 4),  # blood pool
        (esophagus <= 0, 32, 6),
        (airway <= 2, 60, 5),  # airway wall
        (airway <= 0, AIR, 0),
    ]
    hu = _paint(grid.shape, layers, _smooth_noise(rng, grid.shape))
    masks = {
        "left_lung": left_lung,
        "right_lung": right_lung,
        "heart": heart,
        "aorta": aorta <= 0,
        "esophagus": esophagus <= 0,
        "trachea": main_airway <= 1,
        "spinal_cord": spine["cord"],
    }
    return hu, _organ_map(masks)


def _label_set(convention: str) -> LabelSet:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    return load_label_set(convention)


def _check_grid(shape, spacing) -> tuple[tuple[int, ...], tuple[float, ...]]:
    shape, spacing = tuple(int(n) for n in shape), tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 2 or min(spacing) <= 0:
        raise ValueError(f"need 3 sizes >= 2 and 3 spacings > 0, got {shape} and {spacing}")
    fov = tuple(n * s for n, s in zip(shape, spacing))
    if any(f < lo for f, lo in zip(fov, MIN_FOV_MM)):
        raise ValueError(
            f"field of view {fov} mm is smaller than {MIN_FOV_MM} mm; "
            "raise the spacing or the shape"
        )
    return shape, spacing


def make_thorax_case(
    seed: int,
    convention: str = "segthor",
    shape=DEFAULT_SHAPE,
    spacing=DEFAULT_SPACING,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic chest CT: (image HU int16 (H, W, D), labels uint8 (H, W, D), affine 4x4).

    ``convention`` is ``segthor`` (1 esophagus, 2 heart, 3 trachea, 4 aorta) or ``structseg``
    (1 left_lung, 2 right_lung, 3 heart, 4 esophagus, 5 trachea, 6 spinal_cord). The grid is
    ``shape`` voxels of ``spacing`` mm, RAS+, centred on the world origin; its field of view
    must be at least ``MIN_FOV_MM``. The same seed gives the same case.
    """
    lut = _label_lut(_label_set(convention))
    shape, spacing = _check_grid(shape, spacing)
    rng = np.random.default_rng(seed)
    anat = Anatomy.sample(rng)
    hu, organ = _render(anat, make_grid(shape, spacing, anat), spacing, rng)
    hu = ndimage.gaussian_filter(hu, (0.6, 0.6, 0.4))  # partial volume
    hu += anat.noise_sd * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)
    return image, lut[organ], grid_affine(shape, spacing)


def _label_lut(label_set: LabelSet) -> np.ndarray:
    """Internal organ id -> label value of ``label_set`` (0 for organs it does not label)."""
    values = [label_set.names.index(n) if n in label_set.names else 0 for n in ORGANS]
    return np.array([0, *values], dtype=np.uint8)


def make_thorax_cohort(
    out_dir,
    n_cases: int,
    seed: int = 0,
    convention: str = "segthor",
    shape=DEFAULT_SHAPE,
    spacing=DEFAULT_SPACING,
) -> Path:
    """Write ``n_cases`` phantoms and return the path of ``out_dir/datalist.json``.

    Files: ``imagesTr/thorax_XXX.nii.gz`` (int16 HU), ``labelsTr/thorax_XXX.nii.gz`` (uint8),
    ``datalist.json`` (training section, label set, modality CT) and ``labels.json``.
    """
    out_dir = Path(out_dir)
    label_set = _label_set(convention)
    description = "labels: " + ",".join(f"{v} {n}" for v, n in enumerate(label_set.names) if v)
    cases = []
    for i in tqdm(range(n_cases), desc="thorax phantoms", unit="case"):
        image, labels, affine = make_thorax_case(case_seed(seed, i), convention, shape, spacing)
        name = f"thorax_{i:03d}.nii.gz"
        cases.append(
            {
                "image": save_nifti(image, affine, out_dir / "imagesTr" / name),
                "label": save_nifti(labels, affine, out_dir / "labelsTr" / name, description),
            }
        )
    write_json(label_set.channel_def, out_dir / "labels.json")
    return write_datalist(
        out_dir / "datalist.json",
        cases,
        label_set,
        modality="CT",
        name="thorax_demo",
        seed=seed,
        convention=convention,
    )
