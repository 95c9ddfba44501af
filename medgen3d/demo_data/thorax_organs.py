"""Organs and body parts of the thorax phantoms as masks and distance fields on a ``Grid``.

Every function takes one case's ``Anatomy`` and the ``Grid`` (see ``thorax_geometry``) and
returns arrays broadcastable to (H, W, D); ``medgen3d.demo_data.thorax`` paints them into HU.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medgen3d.demo_data.thorax_geometry import Anatomy, Grid, bezier, ellipse, superellipse, tube


def keep_largest(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (face connectivity)."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    return lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))


def trunk_masks(anat: Anatomy, grid: Grid) -> dict[str, np.ndarray]:
    """Body section, chest wall and thoracic cavity (masks broadcastable to (H, W, D)).

    ``cage`` is the normalised radius of the cavity section and ``scale`` (1, 1, D) how much the
    cage narrows towards the thoracic inlet; ``inlet`` (1, 1, D) runs 0 -> 1 up to the apices.
    """
    x, y, z = grid.x, grid.y, grid.z
    a, b, f, m = anat.cavity_a, anat.cavity_b, anat.fat, anat.muscle
    inlet = np.clip((z - (anat.apex_z - 110)) / 110, 0, 1)
    scale = 1 - 0.45 * inlet**1.5
    cage = superellipse(x, y, a, b, b)
    return {
        "body": superellipse(x, y, a + m + f, b + m + f, b + 1.3 * m + f) <= 1,
        "wall": superellipse(x, y, a + m, b + m, b + 1.3 * m) <= 1,
        "cage": cage,
        "scale": scale,
        "inlet": inlet,
        "cavity": cage <= scale,
        "diaphragm": diaphragm_height(anat, grid),
    }


def diaphragm_height(anat: Anatomy, grid: Grid) -> np.ndarray:
    """Height (mm) of the diaphragm under each column, (H, W, 1): two domes, the right one
    higher, sloping down to deep recesses at the sides and the back."""
    left = 1 / (1 + np.exp(grid.x / 15.0))  # ~1 on the patient's left (x < 0)
    bowl = ((np.abs(grid.x) - 55) / 90) ** 2 + (grid.y / np.where(grid.y > 0, 140, 85)) ** 2
    return anat.dome_z - anat.dome_drop * left - 65.0 * np.minimum(bowl, 2.0)


def heart_ellipsoid(anat: Anatomy, grid: Grid) -> tuple[np.ndarray, tuple[float, float, float]]:
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


def airway_distances(anat: Anatomy, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
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
            tube(grid, np.stack([np.zeros_like(zs), trachea_y, zs], axis=1), r),
            tube(grid, right[:2], (0.8 * r, 0.75 * r)),
            tube(grid, left[:2], (0.75 * r, 0.7 * r)),
        ]
    )
    lobar = np.minimum(
        tube(grid, right[1:], (0.75 * r, 0.5 * r)), tube(grid, left[1:], (0.7 * r, 0.45 * r))
    )
    return main, np.minimum(main, lobar)


def vessel_distances(anat: Anatomy, grid: Grid, heart_c) -> dict[str, np.ndarray]:
    """Signed distances (H, W, D) to the ascending aorta + arch, the descending aorta, the
    unlabelled great vessels and the esophagus."""
    s, (hx, hy, hz) = anat.heart_scale, heart_c
    ty = float(anat.trachea_y_at(anat.arch_z))
    top, bottom = float(grid.z.max()) + 30, float(grid.z.min()) - 30
    a_lo = anat.arch_z - 22
    arch = bezier((10, ty + 40, a_lo), (-40, ty + 20, anat.arch_z + 22), (-26, ty - 28, a_lo), 8)
    zd = np.linspace(a_lo, bottom, 5)
    toward_mid = np.clip((anat.dome_z - zd) / 60, 0, 1)  # the abdominal aorta nears the midline
    desc = np.stack([-26 + 14 * toward_mid, anat.spine_y_at(zd) + 18 + 4 * toward_mid, zd], axis=1)
    root = (hx + 14 * s, hy - 6, hz + 25 * s)
    r = anat.aorta_r
    ascending = tube(grid, np.concatenate([[root], arch]), r * np.linspace(1.1, 0.9, 9))
    descending = tube(grid, desc, r * np.linspace(0.9, 0.75, len(desc)))

    cz = anat.carina_z
    bifurcation = (-14, ty + 22, cz - 20)
    others = [
        tube(grid, [arch[1], (22, ty + 25, top)], 7),  # brachiocephalic trunk
        tube(grid, [arch[3], (-14, ty + 12, top)], 5),  # left common carotid
        tube(grid, [arch[5], (-32, ty, top)], 6),  # left subclavian
        tube(grid, [(34, ty + 28, hz + 15 * s), (34, ty + 28, top)], 9),  # superior vena cava
        tube(grid, [(hx - 8, hy + 12, hz + 25 * s), bifurcation], 13),  # pulmonary trunk
        tube(grid, [bifurcation, (-48, ty - 2, cz - 14)], 10),  # left pulmonary artery
        tube(grid, [bifurcation, (36, ty + 6, cz - 26)], 10),  # right pulmonary artery
    ]
    ze = np.linspace(top, anat.dome_z + 15, 5)
    low = np.clip((cz - ze) / (cz - anat.dome_z), 0, 1)  # the lower esophagus drifts left-forward
    eso = np.stack([-4 - 8 * low, anat.spine_y_at(ze) + 24 + 6 * low, ze], axis=1)
    ge_junction = (-35, float(anat.spine_y_at(anat.dome_z)) + 50, anat.dome_z - 20)
    esophagus = tube(grid, np.concatenate([eso, [ge_junction]]), anat.esophagus_r)
    return {
        "ascending": ascending,
        "descending": descending,
        "others": np.minimum.reduce(others),
        "esophagus": esophagus,
    }


def spine_masks(anat: Anatomy, grid: Grid) -> dict[str, np.ndarray]:
    """Masks (H, W, D) of the vertebral column parts, the paraspinal muscles and the cord."""
    y_vb = anat.spine_y_at(grid.z)
    body = ellipse(grid.x, grid.y, 0, y_vb, 17, 14)
    zk = np.linspace(float(grid.z.max()) + 30, float(grid.z.min()) - 30, 6)
    canal_knots = np.stack([np.zeros_like(zk), anat.spine_y_at(zk) - 24, zk], axis=1)
    canal_d = tube(grid, canal_knots, 0, margin=40)  # distance to the canal's centreline
    yc = grid.y - (y_vb - 24)  # y relative to the spinal canal
    level = ((grid.z + 200) / 26.0) % 1  # 26 mm vertebral levels
    disc = level < 0.2
    arch = (canal_d > 8.5) & (canal_d <= 14) & (yc < 3)
    spinous = ellipse(grid.x, yc, 0, -27, 4.5, 15) <= 1
    transverse = ellipse(np.abs(grid.x), yc, 24, 0, 13, 5.5) <= 1
    return {
        "block": (body <= 1.5)
        | (canal_d <= 17)
        | (ellipse(np.abs(grid.x), yc, 30, -14, 26, 24) <= 1),
        "paraspinal": ellipse(np.abs(grid.x), yc, 30, -14, 24, 22) <= 1,
        "disc": (body <= 1) & disc,
        "cancellous": (body <= (1 - 3.5 / 14) ** 2) & ~disc,
        "cortex": (body <= 1) & ~disc,
        "posterior": (arch | ((spinous | transverse) & (level > 0.3))),
        "canal": canal_d <= 8.5,
        "cord": canal_d <= anat.cord_r,
    }


def lung_masks(
    anat: Anatomy, grid: Grid, trunk: dict, mediastinum: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Left and right lung masks (H, W, D): the cavity above the diaphragm minus the
    mediastinum, tapering to the apices."""
    x, y, z = grid.x, grid.y, grid.z
    a, b = anat.cavity_a, anat.cavity_b
    envelope = (
        ellipse(np.abs(x), y, 0.45 * a, -0.1 * b, 0.6 * a, 1.2 * b) <= 1 - trunk["inlet"] ** 2
    )
    lungs = trunk["cavity"] & envelope & (z > trunk["diaphragm"] + 4) & (z < anat.apex_z)
    lungs &= ~mediastinum
    return keep_largest(lungs & (x < 0)), keep_largest(lungs & (x >= 0))


def rib_mask(anat: Anatomy, grid: Grid, trunk: dict) -> np.ndarray:
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


def abdomen_masks(anat: Anatomy, grid: Grid, below: np.ndarray) -> dict[str, np.ndarray]:
    """Masks (H, W, D) of the liver, spleen, stomach and gastric gas under the diaphragm."""
    x, y, z = grid.x, grid.y, grid.z
    a, b = anat.cavity_a, anat.cavity_b
    left_dome = anat.dome_z - anat.dome_drop
    stomach_c = (-0.45 * a, 0.15 * b, left_dome - 40)
    stomach = below & (
        ellipse(x, y, *stomach_c[:2], 0.33 * a, 0.45 * b) + ((z - stomach_c[2]) / 45) ** 2 <= 1
    )
    spleen = ellipse(x, y, -0.72 * a, -0.45 * b, 22, 38) + ((z - left_dome + 35) / 45) ** 2 <= 1
    gas = stomach & (y > stomach_c[1] + 0.2 * b) if anat.stomach_gas else np.zeros_like(stomach)
    return {
        "liver": below & (x > -20 - 0.35 * y),
        "spleen": below & spleen,
        "stomach": stomach,
        "gas": gas,
    }
