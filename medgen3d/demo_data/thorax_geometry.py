"""Geometry of the thorax phantoms: one case's anatomy, the grid seen from the patient, shapes.

Patient coordinates are millimetres: +x towards the patient's right, +y anterior, +z superior.
Shapes are signed distances (negative inside) or normalised radii (< 1 inside) on a ``Grid``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Anatomy:
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
    def sample(cls, rng: np.random.Generator) -> Anatomy:
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
class Grid:
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


def grid_affine(shape, spacing) -> np.ndarray:
    """RAS+ voxel-to-world affine (mm) with the world origin at the grid centre."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    return affine


def make_grid(shape, spacing, anat: Anatomy) -> Grid:
    """The grid seen from the (rotated, shifted) patient."""
    affine = grid_affine(shape, spacing)
    xw, yw, zw = (affine[i, i] * np.arange(n) + affine[i, 3] for i, n in enumerate(shape))
    c, s = np.cos(np.radians(anat.yaw)), np.sin(np.radians(anat.yaw))
    dx, dy = xw[:, None] - anat.shift[0], yw[None, :] - anat.shift[1]
    patient_to_world = np.eye(4)
    patient_to_world[:2, :2] = [[c, -s], [s, c]]
    patient_to_world[:3, 3] = anat.shift
    return Grid(
        x=(c * dx + s * dy).astype(np.float32)[..., None],
        y=(-s * dx + c * dy).astype(np.float32)[..., None],
        z=(zw - anat.shift[2]).astype(np.float32)[None, None, :],
        to_index=np.linalg.inv(affine) @ patient_to_world,
    )


def tube(grid: Grid, knots, radii, margin: float = 6.0) -> np.ndarray:
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


def bezier(p0, p1, p2, n: int) -> np.ndarray:
    """``n`` points (n, 3) along the quadratic Bezier curve p0 -> p2 pulled towards p1."""
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * t * (1 - t) * np.asarray(p1) + t**2 * np.asarray(p2)


def ellipse(x, y, cx, cy, ax, ay):
    """Squared normalised radius of an axis-aligned ellipse (< 1 inside); broadcasts."""
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2


def superellipse(x, y, a, b_front, b_back, p: float = 2.4):
    """Normalised radius (1 on the outline) of a rounded-rectangle body section; broadcasts."""
    b = np.where(y > 0, b_front, b_back)
    return ((np.abs(x) / a) ** p + (np.abs(y) / b) ** p) ** (1 / p)
