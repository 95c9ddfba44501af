"""Synthetic thoracic CT phantoms with organ labels: the project's demo cohort.

Each case is a non-contrast chest CT in Hounsfield units on an RAS+ grid (array axis 0 runs
towards the patient's right, axis 1 anterior, axis 2 superior; the affine says so) with SegTHOR
or StructSeg labels. The anatomy is built from analytic shapes in millimetres, so slice position
matters: the liver, stomach and spleen fill the bottom slices under the diaphragm domes, the
heart sits in the lower-middle slices, the aortic arch and the carina lie above it and the lung
apices taper off below the top. A seed draws the body habitus, organ sizes and positions, a small
in-plane rotation, the textures and the noise level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from common.datalist import write_datalist
from common.io import save_nifti, write_json
from common.labels import LabelSet, load_label_set
from common.seeds import case_seed

CONVENTIONS = ("segthor", "structseg")
DEFAULT_SHAPE = (128, 128, 64)
DEFAULT_SPACING = (3.0, 3.0, 5.0)
MIN_FOV_MM = (380.0, 380.0, 240.0)  # the body (up to ~370 mm wide) and the labelled organs fit
HU_RANGE = (-1024, 2000)
# Internal organ ids are 1 + the index here; the label conventions pick theirs by name.
# Later ones win where masks overlap (the heart over the aortic root).
ORGANS = ("left_lung", "right_lung", "aorta", "heart", "esophagus", "trachea", "spinal_cord")
AIR = -1000.0


@dataclass(frozen=True)
class _Anatomy:
    """One case's anatomy (mm, degrees, HU) in patient coordinates: +x right, +y anterior."""

    yaw: float  # in-plane rotation of the patient, degrees
    shift: tuple[float, float, float]  # patient offset from the grid centre
    cavity_a: float  # thoracic cavity half-width
    cavity_b: float  # thoracic cavity half-depth
    fat: float  # subcutaneous fat thickness
    muscle: float  # chest-wall muscle thickness
    spine_y: float  # vertebral body centre
    kyphosis: float  # how far the mid-thoracic spine bows backwards
    mediastinum_w: float  # half-width of the mediastinal band between the lungs
    heart_scale: float
    heart_x: float  # heart centre, left of the midline
    heart_dy: float  # heart centre offset in front of the esophagus
    heart_angle: float  # long axis from patient-left towards anterior, degrees
    dome_z: float  # top of the right hemidiaphragm
    dome_drop: float  # the left dome lies this much lower
    carina_z: float
    arch_z: float  # top of the aortic arch centreline
    apex_z: float  # lung apices
    aorta_r: float
    trachea_r: float
    esophagus_r: float
    cord_r: float
    rib_phase: float  # 0..1, where the ribs fall between slices
    lung_hu: float
    stomach_gas: bool
    noise_sd: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> _Anatomy:
        """Draw a plausible adult thorax."""
        u = rng.uniform
        cavity_a, cavity_b = u(118, 140), u(72, 90)
        carina_z = u(25, 50)
        return cls(
            yaw=u(-6, 6),
            shift=(u(-6, 6), u(-6, 6), u(-12, 12)),
            cavity_a=cavity_a,
            cavity_b=cavity_b,
            fat=u(6, 24),
            muscle=u(8, 14),
            spine_y=-cavity_b + u(36, 44),
            kyphosis=u(0, 10),
            mediastinum_w=u(9, 16),
            heart_scale=u(0.88, 1.12) * cavity_b / 82,
            heart_x=u(-32, -18),
            heart_dy=u(-6, 6),
            heart_angle=u(25, 50),
            dome_z=u(-95, -75),
            dome_drop=u(8, 22),
            carina_z=carina_z,
            arch_z=carina_z + u(14, 24),
            apex_z=u(125, 150),
            aorta_r=u(11, 14),
            trachea_r=u(7.5, 9.5),
            esophagus_r=u(6.5, 8.5),
            cord_r=u(4.5, 5.5),
            rib_phase=u(0, 1),
            lung_hu=u(-880, -820),
            stomach_gas=bool(rng.random() < 0.7),
            noise_sd=u(10, 20),
        )

    def spine_y_at(self, z):
        """Vertebral body centre y (mm) at height ``z``: the kyphosis bows it backwards."""
        return self.spine_y - self.kyphosis * np.cos(np.pi * np.asarray(z) / 400.0)

    def trachea_y_at(self, z):
        """Trachea centre y (mm) at height ``z``: in front of the esophagus, rising forwards."""
        return self.spine_y_at(z) + 46 + 0.12 * (np.asarray(z) - self.carina_z)


@dataclass(frozen=True)
class _Grid:
    """Patient coordinates (mm, float32) of the voxel centres of an (H, W, D) grid.

    ``x`` (H, W, 1) towards the patient's right, ``y`` (H, W, 1) anterior, ``z`` (1, 1, D)
    superior; ``to_index`` (4x4) maps patient mm to (fractional) array indices.
    """

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    to_index: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.x.shape[:2], self.z.shape[2])

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index box around the voxels with patient coordinates in ``[lo, hi]``; None if empty."""
        inside = (self.x >= lo[0]) & (self.x <= hi[0]) & (self.y >= lo[1]) & (self.y <= hi[1])
        rows = np.flatnonzero(inside.any(axis=(1, 2)))
        cols = np.flatnonzero(inside.any(axis=(0, 2)))
        ks = np.flatnonzero((self.z[0, 0] >= lo[2]) & (self.z[0, 0] <= hi[2]))
        if not (rows.size and cols.size and ks.size):
            return None
        return tuple(slice(a[0], a[-1] + 1) for a in (rows, cols, ks))

    def index(self, points: np.ndarray) -> np.ndarray:
        """Patient points (..., 3) mm -> array indices (..., 3), float."""
        return points @ self.to_index[:3, :3].T + self.to_index[:3, 3]


def _grid_affine(shape, spacing) -> np.ndarray:
    """RAS+ voxel-to-world affine (mm) with the world origin at the grid centre."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    return affine


def _make_grid(shape, spacing, anat: _Anatomy) -> _Grid:
    """The grid seen from the (rotated, shifted) patient."""
    affine = _grid_affine(shape, spacing)
    xw, yw, zw = (affine[i, i] * np.arange(n) + affine[i, 3] for i, n in enumerate(shape))
    c, s = np.cos(np.radians(anat.yaw)), np.sin(np.radians(anat.yaw))
    dx, dy = xw[:, None] - anat.shift[0], yw[None, :] - anat.shift[1]
    patient_to_world = np.eye(4)
    patient_to_world[:2, :2] = [[c, -s], [s, c]]
    patient_to_world[:3, 3] = anat.shift
    return _Grid(
        x=(c * dx + s * dy).astype(np.float32)[..., None],
        y=(-s * dx + c * dy).astype(np.float32)[..., None],
        z=(zw - anat.shift[2]).astype(np.float32)[None, None, :],
        to_index=np.linalg.inv(affine) @ patient_to_world,
    )


def _tube(grid: _Grid, knots, radii, margin: float = 6.0) -> np.ndarray:
    """Signed distance (mm) to a tube of ``radii`` (K,) around the polyline ``knots`` (K, 3).

    Returns float32 (H, W, D): negative inside; ``inf`` further than ``margin`` outside.
    """
    knots = np.asarray(knots, dtype=np.float32)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float32), knots.shape[:1])
    out = np.full(grid.shape, np.inf, dtype=np.float32)
    for a, b, ra, rb in zip(knots[:-1], knots[1:], radii[:-1], radii[1:]):
        pad = max(ra, rb) + margin
        box = grid.box(np.minimum(a, b) - pad, np.maximum(a, b) + pad)
        if box is None:
            continue
        ab = b - a
        px, py = grid.x[box[:2]] - a[0], grid.y[box[:2]] - a[1]
        pz = grid.z[..., box[2]] - a[2]
        t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / max(float(ab @ ab), 1e-6), 0, 1)
        dist = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
        np.minimum(out[box], dist - (ra + t * (rb - ra)), out=out[box])
    return out


def _bezier(p0, p1, p2, n: int) -> np.ndarray:
    """``n`` points (n, 3) along the quadratic Bezier curve p0 -> p2 pulled towards p1."""
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * t * (1 - t) * np.asarray(p1) + t**2 * np.asarray(p2)


def _ellipse(x, y, cx, cy, ax, ay):
    """Squared normalised radius of an axis-aligned ellipse (< 1 inside); broadcasts."""
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2


def _superellipse(x, y, a, b_front, b_back, p: float = 2.4):
    """Normalised radius (1 on the outline) of a rounded-rectangle body section; broadcasts."""
    b = np.where(y > 0, b_front, b_back)
    return ((np.abs(x) / a) ** p + (np.abs(y) / b) ** p) ** (1 / p)


def _diaphragm(anat: _Anatomy, grid: _Grid) -> np.ndarray:
    """Height (mm) of the diaphragm under each column, (H, W, 1): two domes, the right one
    higher, sloping down to deep recesses at the sides and the back."""
    left = 1 / (1 + np.exp(grid.x / 15.0))  # ~1 on the patient's left (x < 0)
    bowl = ((np.abs(grid.x) - 55) / 90) ** 2 + (grid.y / np.where(grid.y > 0, 140, 85)) ** 2
    return anat.dome_z - anat.dome_drop * left - 65.0 * np.minimum(bowl, 2.0)


def _heart(anat: _Anatomy, grid: _Grid) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Squared normalised radius (H, W, D) of the heart ellipsoid, and its centre (mm).

    The long axis points left-anterior and the apex also inferior (a shear with height).
    """
    s = anat.heart_scale
    cx, cy = anat.heart_x, anat.spine_y + 34 + 46 * s + anat.heart_dy
    cz = anat.dome_z + 36 * s
    dz = grid.z - cz
    px, py = grid.x - (cx + 0.3 * dz), grid.y - (cy - 0.2 * dz)
    th = np.radians(anat.heart_angle)
    along = -np.cos(th) * px + np.sin(th) * py
    across = np.sin(th) * px + np.cos(th) * py
    return (along / (64 * s)) ** 2 + (across / (46 * s)) ** 2 + (dz / (52 * s)) ** 2, (cx, cy, cz)


def _airways(anat: _Anatomy, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Signed distances (H, W, D) to the trachea + main bronchi lumen, and to all airways."""
    car = anat.carina_z
    zs = np.linspace(float(grid.z.max()) + 30, car, 4)
    trachea_y = anat.trachea_y_at(zs)
    c = np.array([0.0, trachea_y[-1], car])
    right = [c, c + (16, -4, -24), c + (30, -10, -48)]  # short and steep
    left = [c, c + (-32, -4, -28), c + (-50, -12, -48)]  # long and flatter
    r = anat.trachea_r
    main = np.minimum.reduce(
        [
            _tube(grid, np.stack([np.zeros_like(zs), trachea_y, zs], axis=1), r),
            _tube(grid, right[:2], (0.8 * r, 0.75 * r)),
            _tube(grid, left[:2], (0.75 * r, 0.7 * r)),
        ]
    )
    lobar = np.minimum(
        _tube(grid, right[1:], (0.75 * r, 0.5 * r)), _tube(grid, left[1:], (0.7 * r, 0.45 * r))
    )
    return main, np.minimum(main, lobar)


def _vessels(anat: _Anatomy, grid: _Grid, heart_c) -> dict[str, np.ndarray]:
    """Signed distances (H, W, D) to the ascending aorta + arch, the descending aorta, the
    unlabelled great vessels and the esophagus."""
    s, (hx, hy, hz) = anat.heart_scale, heart_c
    ty = float(anat.trachea_y_at(anat.arch_z))
    top, bottom = float(grid.z.max()) + 30, float(grid.z.min()) - 30
    a_lo = anat.arch_z - 22
    arch = _bezier((10, ty + 40, a_lo), (-40, ty + 20, anat.arch_z + 22), (-26, ty - 28, a_lo), 8)
    zd = np.linspace(a_lo, bottom, 5)
    toward_mid = np.clip((anat.dome_z - zd) / 60, 0, 1)  # the abdominal aorta nears the midline
    desc = np.stack([-26 + 14 * toward_mid, anat.spine_y_at(zd) + 18 + 4 * toward_mid, zd], axis=1)
    root = (hx + 14 * s, hy - 6, hz + 25 * s)
    r = anat.aorta_r
    ascending = _tube(grid, np.concatenate([[root], arch]), r * np.linspace(1.1, 0.9, 9))
    descending = _tube(grid, desc, r * np.linspace(0.9, 0.75, len(desc)))

    cz = anat.carina_z
    bifurcation = (-14, ty + 22, cz - 20)
    others = [
        _tube(grid, [arch[1], (22, ty + 25, top)], 7),  # brachiocephalic trunk
        _tube(grid, [arch[3], (-14, ty + 12, top)], 5),  # left common carotid
        _tube(grid, [arch[5], (-32, ty, top)], 6),  # left subclavian
        _tube(grid, [(34, ty + 28, hz + 15 * s), (34, ty + 28, top)], 9),  # superior vena cava
        _tube(grid, [(hx - 8, hy + 12, hz + 25 * s), bifurcation], 13),  # pulmonary trunk
        _tube(grid, [bifurcation, (-48, ty - 2, cz - 14)], 10),  # left pulmonary artery
        _tube(grid, [bifurcation, (36, ty + 6, cz - 26)], 10),  # right pulmonary artery
    ]
    ze = np.linspace(top, anat.dome_z + 15, 5)
    low = np.clip((cz - ze) / (cz - anat.dome_z), 0, 1)  # the lower esophagus drifts left-forward
    eso = np.stack([-4 - 8 * low, anat.spine_y_at(ze) + 24 + 6 * low, ze], axis=1)
    ge_junction = (-35, float(anat.spine_y_at(anat.dome_z)) + 50, anat.dome_z - 20)
    esophagus = _tube(grid, np.concatenate([eso, [ge_junction]]), anat.esophagus_r)
    return {
        "ascending": ascending,
        "descending": descending,
        "others": np.minimum.reduce(others),
        "esophagus": esophagus,
    }


def _spine(anat: _Anatomy, grid: _Grid) -> dict[str, np.ndarray]:
    """Masks (H, W, D) of the vertebral column parts, the paraspinal muscles and the cord."""
    y_vb = anat.spine_y_at(grid.z)
    body = _ellipse(grid.x, grid.y, 0, y_vb, 17, 14)
    zk = np.linspace(float(grid.z.max()) + 30, float(grid.z.min()) - 30, 6)
    canal_knots = np.stack([np.zeros_like(zk), anat.spine_y_at(zk) - 24, zk], axis=1)
    canal_d = _tube(grid, canal_knots, 0, margin=40)  # distance to the canal's centreline
    yc = grid.y - (y_vb - 24)  # y relative to the spinal canal
    level = ((grid.z + 200) / 26.0) % 1  # 26 mm vertebral levels
    disc = level < 0.2
    arch = (canal_d > 8.5) & (canal_d <= 14) & (yc < 3)
    spinous = _ellipse(grid.x, yc, 0, -27, 4.5, 15) <= 1
    transverse = _ellipse(np.abs(grid.x), yc, 24, 0, 13, 5.5) <= 1
    return {
        "block": (body <= 1.5)
        | (canal_d <= 17)
        | (_ellipse(np.abs(grid.x), yc, 30, -14, 26, 24) <= 1),
        "paraspinal": _ellipse(np.abs(grid.x), yc, 30, -14, 24, 22) <= 1,
        "disc": (body <= 1) & disc,
        "cancellous": (body <= (1 - 3.5 / 14) ** 2) & ~disc,
        "cortex": (body <= 1) & ~disc,
        "posterior": (arch | ((spinous | transverse) & (level > 0.3))),
        "canal": canal_d <= 8.5,
        "cord": canal_d <= anat.cord_r,
    }


def _abdomen(anat: _Anatomy, grid: _Grid, below: np.ndarray) -> dict[str, np.ndarray]:
    """Masks (H, W, D) of the liver, spleen, stomach and gastric gas under the diaphragm."""
    x, y, z = grid.x, grid.y, grid.z
    a, b = anat.cavity_a, anat.cavity_b
    left_dome = anat.dome_z - anat.dome_drop
    stomach_c = (-0.45 * a, 0.15 * b, left_dome - 40)
    stomach = below & (
        _ellipse(x, y, *stomach_c[:2], 0.33 * a, 0.45 * b) + ((z - stomach_c[2]) / 45) ** 2 <= 1
    )
    spleen = _ellipse(x, y, -0.72 * a, -0.45 * b, 22, 38) + ((z - left_dome + 35) / 45) ** 2 <= 1
    gas = stomach & (y > stomach_c[1] + 0.2 * b) if anat.stomach_gas else np.zeros_like(stomach)
    return {
        "liver": below & (x > -20 - 0.35 * y),
        "spleen": below & spleen,
        "stomach": stomach,
        "gas": gas,
    }


def _draw_lines(field: np.ndarray, starts, ends, w0: float, w1: float) -> None:
    """Rasterise lines ``starts`` -> ``ends`` (N, 3) voxel indices into ``field`` (running max),
    their weight tapering from ``w0`` to ``w1``."""
    t = np.linspace(0, 1, 64)[:, None, None]
    pts = np.rint(starts + t * (ends - starts)).astype(np.intp)  # (64, N, 3)
    pts = np.clip(pts, 0, np.asarray(field.shape) - 1).reshape(-1, 3)
    weights = np.broadcast_to(w0 + (w1 - w0) * t[..., 0], (64, len(ends)))
    np.maximum.at(field, tuple(pts.T), weights.ravel().astype(np.float32))


def _lung_vessels(rng, grid: _Grid, spacing, lungs, hila) -> np.ndarray:
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


def _keep_largest(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (face connectivity)."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    return lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))


def _trunk(anat: _Anatomy, grid: _Grid) -> dict[str, np.ndarray]:
    """Body section, chest wall and thoracic cavity (masks broadcastable to (H, W, D)).

    ``cage`` is the normalised radius of the cavity section and ``scale`` (1, 1, D) how much the
    cage narrows towards the thoracic inlet; ``inlet`` (1, 1, D) runs 0 -> 1 up to the apices.
    """
    x, y, z = grid.x, grid.y, grid.z
    a, b, f, m = anat.cavity_a, anat.cavity_b, anat.fat, anat.muscle
    inlet = np.clip((z - (anat.apex_z - 110)) / 110, 0, 1)
    scale = 1 - 0.45 * inlet**1.5
    cage = _superellipse(x, y, a, b, b)
    return {
        "body": _superellipse(x, y, a + m + f, b + m + f, b + 1.3 * m + f) <= 1,
        "wall": _superellipse(x, y, a + m, b + m, b + 1.3 * m) <= 1,
        "cage": cage,
        "scale": scale,
        "inlet": inlet,
        "cavity": cage <= scale,
        "diaphragm": _diaphragm(anat, grid),
    }


def _lungs(
    anat: _Anatomy, grid: _Grid, trunk: dict, mediastinum: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Left and right lung masks (H, W, D): the cavity above the diaphragm minus the
    mediastinum, tapering to the apices."""
    x, y, z = grid.x, grid.y, grid.z
    a, b = anat.cavity_a, anat.cavity_b
    envelope = (
        _ellipse(np.abs(x), y, 0.45 * a, -0.1 * b, 0.6 * a, 1.2 * b) <= 1 - trunk["inlet"] ** 2
    )
    lungs = trunk["cavity"] & envelope & (z > trunk["diaphragm"] + 4) & (z < anat.apex_z)
    lungs &= ~mediastinum
    return _keep_largest(lungs & (x < 0)), _keep_largest(lungs & (x >= 0))


def _ribs(anat: _Anatomy, grid: _Grid, trunk: dict) -> np.ndarray:
    """Rib mask (H, W, D): oblique bands (26 mm apart, falling anteriorly) around the cage."""
    x, y, z = grid.x, grid.y, grid.z
    cage, scale = trunk["cage"], trunk["scale"]
    return (
        (cage > scale)
        & (cage <= scale * (1 + 7 / np.sqrt(anat.cavity_a * anat.cavity_b)))
        & (((z + 0.45 * y) / 26 + anat.rib_phase) % 1 < 0.4)
        & (z > anat.dome_z - 50)
        & (z < anat.apex_z + 15)
        & ~((np.abs(x) < 0.15 * anat.cavity_a) & (y > 0))  # the sternum's gap
    )


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
        organ[(organ == i) & ~_keep_largest(organ == i)] = 0
    return organ


def _render(anat: _Anatomy, grid: _Grid, spacing, rng) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free textured HU (H, W, D) float32 and the organ map (H, W, D) uint8."""
    x, y, z = grid.x, grid.y, grid.z
    trunk = _trunk(anat, grid)
    cavity, z_d = trunk["cavity"], trunk["diaphragm"]
    below = cavity & (z < z_d)
    heart_r2, heart_c = _heart(anat, grid)
    main_airway, airway = _airways(anat, grid)
    vessels = _vessels(anat, grid, heart_c)
    aorta = np.minimum(vessels["ascending"], vessels["descending"])
    great_vessels, esophagus = vessels["others"], vessels["esophagus"]
    spine = _spine(anat, grid)
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
    left_lung, right_lung = _lungs(anat, grid, trunk, mediastinum)
    lungs = left_lung | right_lung
    cty = float(anat.trachea_y_at(anat.carina_z))
    hila = ((-45, cty - 6, anat.carina_z - 25), (40, cty - 6, anat.carina_z - 28))
    lung_vessels = _lung_vessels(rng, grid, spacing, (left_lung, right_lung), hila)
    sternum = (_ellipse(x, y, 0, anat.cavity_b + 6, 15, 6) <= 1) & (z > heart_c[2])
    organs = _abdomen(anat, grid, below)

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
        (_ribs(anat, grid, trunk), np.where(y > 0.45 * anat.cavity_b, 120, 450), 60),
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
    anat = _Anatomy.sample(rng)
    hu, organ = _render(anat, _make_grid(shape, spacing, anat), spacing, rng)
    hu = ndimage.gaussian_filter(hu, (0.6, 0.6, 0.4))  # partial volume
    hu += anat.noise_sd * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)
    return image, lut[organ], _grid_affine(shape, spacing)


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
