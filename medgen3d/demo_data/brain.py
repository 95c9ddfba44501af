"""Brain MRI demo cohort: the MNI152 2009a T1 template and tissue maps, warped per case.

The template (ICBM152 2009a nonlinear symmetric, skull-stripped) and its grey/white matter
probability maps ship with nilearn (no download). Labels: CSF is ``1 - GM - WM`` within the
brain, each voxel takes the most likely tissue, and tiny islands join their neighbours.
Each case applies a random global affine and a smooth displacement to the image and to the
tissue maps alike, then a bias field, gamma/scale jitter and Rician noise to the image.
Images are skull-stripped T1w, float32, roughly ``0..1.25`` (0 outside the brain); labels are
the ``brain_tissue`` set (0 background, 1 csf, 2 gray_matter, 3 white_matter), uint8.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from common.core.io import save_nifti, write_json
from common.core.seeds import case_seed
from common.data.datalists import write_datalist
from common.data.labels import LabelSet, load_label_set

RESOLUTIONS = (1, 2)
MARGIN_MM = 16.0  # room around the template's brain for the random affine and warp
SMOOTH_MM = 1.0  # sigma of the light smoothing of the tissue maps before the argmax
MIN_ISLAND_MM3 = 64.0  # smaller tissue islands take the label around them
MAX_SCALE = 0.05
MAX_ROTATION_DEG = 4.0
WARP_MM = 2.5  # RMS of each component of the smooth displacement
BIAS = 0.08  # RMS of the log of the multiplicative bias field


class Template(NamedTuple):
    """MNI152 cropped to the brain plus margin: ``t1``/``mask`` (H,W,D), ``tissue`` (3,H,W,D)."""

    t1: np.ndarray  # float32 in [0, 1], 0 outside the brain
    mask: np.ndarray  # float32 0/1 brain mask
    tissue: np.ndarray  # float32 probabilities of csf, gray and white matter (used in mask)
    affine: np.ndarray  # 4x4 RAS voxel -> mm of the crop


@lru_cache(maxsize=1)
def brain_label_set() -> LabelSet:
    """The ``brain_tissue`` label set: 0 background, 1 csf, 2 gray_matter, 3 white_matter."""
    return load_label_set("brain_tissue")


def _check_resolution(resolution: int) -> None:
    """nilearn ships the template at 1 and 2 mm only."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS} (mm), got {resolution!r}")


def _load_mni(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1, grey and white matter maps (H,W,D float32) and the 4x4 affine, full template FOV."""
    from nilearn import datasets  # slow import; only needed once per process

    t1 = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution=resolution)
    wm = datasets.load_mni152_wm_template(resolution=resolution)
    arrays = (np.asarray(img.get_fdata(), dtype=np.float32) for img in (t1, gm, wm))
    return (*arrays, np.asarray(t1.affine, dtype=np.float64))


def _brain_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels, clipped to the FOV."""
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


@lru_cache(maxsize=len(RESOLUTIONS))
def load_template(resolution: int = 2) -> Template:
    """The cropped MNI152 template at ``resolution`` mm; loaded once per process."""
    _check_resolution(resolution)
    t1, gm, wm, affine = _load_mni(resolution)
    mask = ndi.binary_fill_holes(t1 > 0.2)  # as nilearn's load_mni152_brain_mask
    box = _brain_box(mask, round(MARGIN_MM / resolution))
    sigma = SMOOTH_MM / resolution
    gm, wm = (np.clip(ndi.gaussian_filter(m, sigma), 0, 1) for m in (gm, wm))
    tissue = np.stack([np.clip(1 - gm - wm, 0, 1), gm, wm])
    crop_affine = affine.copy()
    crop_affine[:3, 3] += affine[:3, :3] @ [s.start for s in box]
    return Template(
        t1=np.clip(t1, 0, 1)[box],
        mask=mask[box].astype(np.float32),
        tissue=tissue[(slice(None), *box)],
        affine=crop_affine,
    )


def _cosine_field(rng: np.random.Generator, shape, n_out: int, modes: int, rms: float):
    """Smooth random field ``(n_out, *shape)`` of about ``rms``: 3D cosine modes below ``modes``.

    Mode weights fall as 1/frequency; the constant mode is left out.
    """
    bases = [np.cos(np.pi * np.outer(np.arange(n) + 0.5, np.arange(modes)) / n) for n in shape]
    freq = np.add.outer(np.add.outer(np.arange(modes), np.arange(modes)), np.arange(modes))
    scale = np.divide(1.0, freq, out=np.zeros(freq.shape), where=freq > 0)
    scale *= rms * np.sqrt(2 / np.sum(scale**2))  # a cosine's mean square is 1/2
    weights = rng.standard_normal((n_out, modes, modes, modes)) * scale
    return np.einsum("xa,yb,zc,kabc->kxyz", *bases, weights, optimize=True)


def _sample_coords(rng: np.random.Generator, shape, resolution: int) -> np.ndarray:
    """Source voxel coordinates ``(3, H, W, D)`` of each output voxel: affine + smooth warp."""
    scale = 1 + rng.uniform(-MAX_SCALE, MAX_SCALE, 3)
    angles = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3)
    rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    center = (np.asarray(shape) - 1) / 2
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1) - center[:, None]
    coords = (rot * scale) @ grid + center[:, None]
    warp = _cosine_field(rng, shape, n_out=3, modes=4, rms=WARP_MM / resolution)
    return coords.reshape(3, *shape) + warp


def _warp(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Trilinear resampling of ``volume`` (H,W,D) at ``coords`` (3,H,W,D); edges extended."""
    return ndi.map_coordinates(volume, coords, order=1, mode="nearest", output=np.float32)


def _labels(mask: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """uint8 labels (H,W,D): 0 outside ``mask`` > 0.5, else 1 + argmax of ``tissue`` (3,H,W,D)."""
    return np.where(mask > 0.5, 1 + np.argmax(tissue, axis=0), 0).astype(np.uint8)


def _stray_voxels(region: np.ndarray, min_size: float, keep_largest: bool) -> np.ndarray:
    """Voxels of ``region`` (H,W,D bool) in 26-connected pieces under ``min_size`` voxels, and,
    when ``keep_largest``, those outside its largest 6-connected piece."""
    pieces, _ = ndi.label(region, np.ones((3, 3, 3)))
    stray = (np.bincount(pieces.ravel()) < min_size)[pieces] & region
    if keep_largest:
        pieces, _ = ndi.label(region)
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        stray |= region & (pieces != sizes.argmax())
    return stray


def _clean_labels(labels: np.ndarray, resolution: int) -> np.ndarray:
    """Give stray tissue voxels (see ``_stray_voxels``) the nearest other tissue label, in place.

    Labels the label set declares single-component keep only their largest piece.
    """
    label_set = brain_label_set()
    for value in range(1, label_set.num_classes):
        single = label_set.names[value] in label_set.single_component
        stray = _stray_voxels(labels == value, MIN_ISLAND_MM3 / resolution**3, single)
        if stray.any():
            others = (labels > 0) & (labels != value)
            nearest = ndi.distance_transform_edt(
                ~others, return_distances=False, return_indices=True
            )
            labels[stray] = labels[tuple(i[stray] for i in nearest)]
    return labels


def _mri_contrast(rng: np.random.Generator, t1: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Bias field, gamma and scale jitter and Rician noise on ``t1`` (H,W,D); 0 off ``brain``."""
    bias = np.exp(_cosine_field(rng, t1.shape, n_out=1, modes=3, rms=BIAS)[0])
    image = (t1 * bias) ** rng.uniform(0.85, 1.15) * rng.uniform(0.9, 1.1)
    sigma = rng.uniform(0.01, 0.03)
    noise = rng.normal(0, sigma, (2, *t1.shape))
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    return np.where(brain, image, 0).astype(np.float32)


def make_brain_case(seed: int, resolution: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random case: image (H,W,D) float32, labels (H,W,D) uint8, affine 4x4 float64 (RAS).

    At 2 mm ``H,W,D`` is about ``89,106,86``; the same ``seed`` always gives the same case.
    """
    template = load_template(resolution)
    rng = np.random.default_rng(seed)
    coords = _sample_coords(rng, template.t1.shape, resolution)
    tissue = np.stack([_warp(p, coords) for p in template.tissue])
    labels = _clean_labels(_labels(_warp(template.mask, coords), tissue), resolution)
    image = _mri_contrast(rng, _warp(template.t1, coords), labels > 0)
    return image, labels, template.affine.copy()


def make_brain_cohort(out_dir, n_cases: int, seed: int = 0, resolution: int = 2) -> Path:
    """Write ``n_cases`` cases to ``imagesTr/``, ``labelsTr/``, ``datalist.json``, ``labels.json``.

    Returns the datalist path. Case ``i`` depends only on ``(seed, i)``.
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    out_dir = Path(out_dir)
    label_set = brain_label_set()
    names = ", ".join(f"{v} {n}" for v, n in enumerate(label_set.names))
    cases = []
    for i in tqdm(range(n_cases), desc="brain demo cases", unit="case"):
        image, labels, affine = make_brain_case(case_seed(seed, i), resolution)
        image_path = out_dir / "imagesTr" / f"brain_{i:03d}.nii.gz"
        label_path = out_dir / "labelsTr" / f"brain_{i:03d}.nii.gz"
        save_nifti(image, affine, image_path, description="T1w MRI demo (warped MNI152 2009a)")
        save_nifti(labels, affine, label_path, description=f"labels: {names}")
        cases.append({"image": image_path, "label": label_path})
    write_json(label_set.channel_def, out_dir / "labels.json")
    return write_datalist(
        out_dir / "datalist.json", cases, label_set, modality="MRI", name="brain_demo", seed=seed
    )
