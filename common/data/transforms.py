"""MONAI transform chains that bring a (image, label) pair to the model's fixed geometry.

Chain (dictionary transforms, keys ``image`` and ``label``), in one of two z framings::

    load (NIfTI/MGZ) -> channel first -> orient RAS -> resample to ``pixdim``
    -> label remap (source values -> 0..K-1)
    labelled_range: -> crop to the labelled z-range +- ``z_margin`` -> intensity to [-1, 1]
                    -> resize z to D (a slice index is a relative anatomical position)
    field_of_view:  -> intensity to [-1, 1] -> the D slices centred on the labelled z-range,
                    padded past the scan's ends (every axis keeps the grid spacing ``pixdim``);
                    for training, ``random_z_window`` shifts them by a random number of slices
    -> pad/crop H, W -> optional one-hot label

Intensity: CT window / MRI percentiles. Every spatial step and the intensity step are
invertible, so ``invert_image`` brings a model-space image back to the source grid, affine
and HU / original range. Output tensors are ``(1, H, W, D)`` (image) and ``(1 or K, H, W, D)``
(label).

``image_transforms`` is the chain for an image alone (segmentation inference, MONAI Label):
the same grid and field of view without a label to frame by.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    AsDiscreted,
    Compose,
    Crop,
    CropForegroundd,
    EnsureTyped,
    Invertd,
    InvertibleTransform,
    LoadImaged,
    MapTransform,
    Orientationd,
    Pad,
    Randomizable,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)
from monai.utils import ensure_tuple_rep

CT_WINDOW = (-1000.0, 1000.0)
MRI_PERCENTILES = (0.5, 99.5)
# z framings: the labelled z-range resized to D slices, or D slices at the grid spacing
FRAMINGS = ("labelled_range", "field_of_view")


def check_framing(z_framing: str) -> str:
    """``z_framing`` when it is one of ``FRAMINGS``, else ValueError."""
    if z_framing not in FRAMINGS:
        raise ValueError(f"z_framing must be one of {FRAMINGS}, got {z_framing!r}")
    return z_framing


def any_label_in_slice(label: torch.Tensor) -> torch.Tensor:
    """``(C, H, W, D)`` label -> bool mask, True on whole axial slices that hold any label.

    Used as CropForegroundd's ``select_fn`` so the crop acts on z only.
    """
    return (
        (label > 0)
        .any(dim=0, keepdim=True)
        .any(dim=1, keepdim=True)
        .any(dim=2, keepdim=True)
        .expand(1, *label.shape[1:])
    )


class ZWindowd(MapTransform, InvertibleTransform):
    """``depth`` axial slices centred on the labelled slices of ``source_key``; invertible.

    ``(C, H, W, Z)`` -> ``(C, H, W, depth)``: the window is centred on the middle of the
    labelled z-range (the volume's middle when ``source_key`` holds no label),
    cropped from the scan and padded with ``value`` (one per key) where it runs past the
    scan's ends. MONAI's ``Crop`` and ``Pad`` do the work, so the affine follows and
    ``inverse`` (``Invertd``) restores the scan's z extent.
    """

    def __init__(self, keys, depth: int, source_key: str, value=0.0):
        super().__init__(keys)
        self.depth, self.source_key = int(depth), source_key
        self.values = ensure_tuple_rep(value, len(self.keys))
        self.cropper, self.padder = Crop(), Pad()

    def start(self, data: Mapping[Hashable, torch.Tensor], slices: int) -> int:
        """First slice of the window (below 0 or past the end where it is padded)."""
        label = data[self.source_key]
        labelled = torch.nonzero((label > 0).reshape(-1, label.shape[-1]).any(0))[:, 0]
        centre = (labelled[0] + labelled[-1] + 1) / 2.0 if labelled.numel() else slices / 2.0
        return math.floor(float(centre) - self.depth / 2.0 + 0.5)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]):
        d = dict(data)
        slices = d[self.first_key(d)].shape[-1]
        start = self.start(d, slices)
        lo, hi = max(start, 0), min(start + self.depth, slices)
        pad = ((0, 0), (0, 0), (0, 0), (lo - start, start + self.depth - hi))
        for key, value in self.key_iterator(d, self.values):
            cropped = self.cropper(d[key], (slice(None), slice(None), slice(lo, hi)))
            d[key] = self.padder(cropped, pad, value=value)
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cropper.inverse(self.padder.inverse(d[key]))
        return d


class RandZWindowd(ZWindowd, Randomizable):
    """``ZWindowd``'s window moved by a random number of slices in ``[-shift_max, shift_max]``.

    ``(C, H, W, Z)`` -> ``(C, H, W, depth)``, padded past the scan's ends as ``ZWindowd`` pads;
    ``shift_max <= (depth - 1) // 2`` keeps the labelled z-range's middle slice (the scan's
    middle slice without labels) in the window, so a window always holds part of the scan.
    Seeded through MONAI's ``set_random_state`` (``Compose`` does it from ``set_determinism``).
    """

    def __init__(self, keys, depth: int, source_key: str, value=0.0, shift_max: int = 0):
        super().__init__(keys, depth, source_key, value)
        if not 0 <= int(shift_max) <= (self.depth - 1) // 2:
            raise ValueError(f"z_shift_max must be in 0..{(self.depth - 1) // 2}: (D - 1) // 2")
        self.shift_max, self.shift = int(shift_max), 0

    def randomize(self, data=None) -> None:
        self.shift = int(self.R.randint(-self.shift_max, self.shift_max + 1))

    def start(self, data: Mapping[Hashable, torch.Tensor], slices: int) -> int:
        return super().start(data, slices) + self.shift

    def __call__(self, data: Mapping[Hashable, torch.Tensor]):
        self.randomize()
        return super().__call__(data)


def random_z_window(transforms: Compose, z_shift_max: int) -> Compose:
    """The training chain: ``volume_transforms``' chain with its ``ZWindowd`` (``field_of_view``)
    replaced by a ``RandZWindowd`` shifting it up to ``z_shift_max`` slices either way.

    ``z_shift_max`` 0 returns the chain's own transforms (deterministic); ``labelled_range``
    has no window to shift, so it needs 0.
    """
    steps = list(transforms.flatten().transforms)
    windows = [k for k, t in enumerate(steps) if type(t) is ZWindowd] if z_shift_max else []
    if z_shift_max and not windows:
        raise ValueError(
            f"z_shift_max {z_shift_max} shifts the field_of_view window; "
            "with z_framing labelled_range set it to 0"
        )
    for k in windows:
        w = steps[k]
        steps[k] = RandZWindowd(w.keys, w.depth, w.source_key, w.values, z_shift_max)
    return Compose(steps)


class OwnKeysSpacingd(Spacingd):
    """MONAI's ``Spacingd`` that leaves the data's other entries alone.

    Since MONAI 1.6, ``Spacingd`` calls ``.update`` on every entry whose name starts with
    ``<key>_`` (meant for ``<key>_meta_dict``); MONAI Label puts the string ``image_path``
    there, which fails. Here only the transformed keys and their dictionary-valued
    ``<key>_*`` entries go through ``Spacingd``; everything else passes unchanged.
    """

    def __call__(self, data, lazy: bool | None = None):
        prefixes = tuple(f"{k}_" for k in self.keys)
        own = {
            k: v
            for k, v in data.items()
            if k in self.keys or (str(k).startswith(prefixes) and isinstance(v, dict))
        }
        return {**data, **super().__call__(own, lazy=lazy)}


class RemapLabelsd(MapTransform):
    """Map source label values to ``0..K-1`` with a lookup table (e.g. FreeSurfer codes)."""

    def __init__(self, keys, source_map: Mapping[int, int] | None):
        super().__init__(keys)
        self.source_map = {int(k): int(v) for k, v in (source_map or {}).items()}

    def __call__(self, data):
        d = dict(data)
        if not self.source_map:
            return d
        src = torch.tensor(sorted(self.source_map))
        dst = torch.tensor([self.source_map[k] for k in sorted(self.source_map)])
        for key in self.key_iterator(d):
            lab = d[key]
            values = torch.as_tensor(lab).round().long()
            idx = torch.searchsorted(src, values.flatten()).clamp(max=len(src) - 1)
            if not torch.equal(src[idx], values.flatten()):
                unknown = sorted(set(values.unique().tolist()) - set(self.source_map))
                raise ValueError(f"label values {unknown} are not in the label set's source_map")
            out = dst[idx].reshape(values.shape).to(torch.float32)
            d[key] = MetaTensor(out, meta=lab.meta) if isinstance(lab, MetaTensor) else out
        return d


class NormaliseIntensityd(MapTransform, InvertibleTransform):
    """Linear map of ``[lo, hi]`` to ``[-1, 1]`` with clipping; invertible.

    CT: ``lo, hi`` is a fixed HU window. MRI: the volume's percentiles ``lo_pct, hi_pct``.
    The values used are recorded, so ``inverse`` returns HU / the original range.
    """

    def __init__(
        self,
        keys,
        window: Sequence[float] | None = None,
        percentiles: Sequence[float] | None = None,
    ):
        super().__init__(keys)
        if (window is None) == (percentiles is None):
            raise ValueError("give exactly one of window (CT) or percentiles (MRI)")
        self.window, self.percentiles = window, percentiles

    def _range(self, img: torch.Tensor) -> tuple[float, float]:
        if self.window is not None:
            return float(self.window[0]), float(self.window[1])
        flat = img.detach().float().flatten()
        q = torch.tensor([p / 100.0 for p in self.percentiles])
        lo, hi = torch.quantile(flat[:: max(1, flat.numel() // 2_000_000)], q).tolist()
        return lo, max(hi, lo + 1e-6)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]):
        d = dict(data)
        for key in self.key_iterator(d):
            lo, hi = self._range(d[key])
            out = ((d[key].float() - lo) / (hi - lo) * 2.0 - 1.0).clamp(-1.0, 1.0)
            d[key] = out
            self.push_transform(d[key], extra_info={"lo": lo, "hi": hi})
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]):
        d = dict(data)
        for key in self.key_iterator(d):
            info = self.pop_transform(d[key])["extra_info"]
            d[key] = to_original_intensity(d[key], info["lo"], info["hi"])
        return d


def to_original_intensity(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """[-1, 1] -> ``[lo, hi]`` (HU for CT), the inverse of the normalisation."""
    return (x + 1.0) / 2.0 * (hi - lo) + lo


def volume_transforms(
    modality: str,
    pixdim: Sequence[float],
    spatial_size: Sequence[int],
    num_classes: int,
    source_map: Mapping[int, int] | None = None,
    z_margin: int = 2,
    one_hot: bool = False,
    ct_window: Sequence[float] = CT_WINDOW,
    mri_percentiles: Sequence[float] = MRI_PERCENTILES,
    load: bool = True,
    z_framing: str = "labelled_range",
) -> Compose:
    """The preprocessing chain for ``{"image": path, "label": path}`` cases.

    Returns ``image (1, H, W, D)`` in [-1, 1] and ``label (1, H, W, D)`` with values
    ``0..num_classes-1`` (``(num_classes, H, W, D)`` {0, 1} when ``one_hot``).
    ``spatial_size = (H, W, D)``: H, W are padded/cropped at ``pixdim``. Along z
    (``z_framing``): ``labelled_range`` resizes the labelled z-range (+- ``z_margin``) to D
    slices, so a slice index means the same anatomy in every case; ``field_of_view`` keeps
    ``pixdim[2]`` and takes the D slices centred on the labelled z-range (``ZWindowd``).
    """
    keys = ["image", "label"]
    if modality not in ("CT", "MRI"):
        raise ValueError(f"modality must be CT or MRI, got {modality!r}")
    h, w, depth = (int(s) for s in spatial_size)
    intensity = (
        NormaliseIntensityd("image", window=ct_window)
        if modality == "CT"
        else NormaliseIntensityd("image", percentiles=mri_percentiles)
    )
    steps = [
        LoadImaged(keys, reader="NibabelReader", ensure_channel_first=True, image_only=True)
        if load
        else EnsureTyped(keys, track_meta=True),
        EnsureTyped(keys, dtype=torch.float32, track_meta=True),
        Orientationd(keys, axcodes="RAS", labels=None),
        OwnKeysSpacingd(keys, pixdim=pixdim, mode=("bilinear", "nearest")),
        RemapLabelsd("label", source_map),
    ]
    if check_framing(z_framing) == "labelled_range":
        steps += [
            CropForegroundd(
                keys,
                source_key="label",
                select_fn=any_label_in_slice,
                margin=(0, 0, int(z_margin)),
                allow_smaller=True,
            ),
            intensity,
            Resized("image", spatial_size=(-1, -1, depth), mode="trilinear", anti_aliasing=False),
            Resized("label", spatial_size=(-1, -1, depth), mode="nearest-exact"),
        ]
    else:
        steps += [intensity, ZWindowd(keys, depth, "label", value=(-1.0, 0.0))]
    steps += [
        ResizeWithPadOrCropd("image", spatial_size=(h, w, -1), value=-1.0),
        ResizeWithPadOrCropd("label", spatial_size=(h, w, -1)),
    ]
    if one_hot:
        steps.append(AsDiscreted("label", to_onehot=num_classes))
    return Compose(steps)


def image_transforms(
    modality: str,
    pixdim: Sequence[float],
    spatial_size: Sequence[int],
    ct_window: Sequence[float] = CT_WINDOW,
    mri_percentiles: Sequence[float] = MRI_PERCENTILES,
    z_framing: str = "labelled_range",
) -> Compose:
    """``{"image": path}`` -> ``image (1, H, W, Z)`` in [-1, 1] on the model grid, no label.

    RAS, resampled to ``pixdim``, intensities as in ``volume_transforms``, the centre H x W
    (padded with -1, air), then along z (``z_framing``): ``labelled_range`` takes the centre
    D slices (``Z = D``; the field of view training sees when a case's labelled z-range spans
    about D slices at ``pixdim``, as in the demo cohorts); ``field_of_view`` keeps the whole
    scan, padded around its middle to at least D slices (``Z >= D``), for a sliding-window
    inferer with a ``(H, W, D)`` window. The spatial steps are invertible, so ``Invertd``
    brings a prediction back to the input's grid and affine; the intensity step is left out
    of the inversion (MONAI's ScaleIntensity*).
    """
    if modality not in ("CT", "MRI"):
        raise ValueError(f"modality must be CT or MRI, got {modality!r}")
    h, w, depth = (int(s) for s in spatial_size)
    intensity = (
        ScaleIntensityRanged(
            "image", a_min=ct_window[0], a_max=ct_window[1], b_min=-1.0, b_max=1.0, clip=True
        )
        if modality == "CT"
        else ScaleIntensityRangePercentilesd(
            "image",
            lower=mri_percentiles[0],
            upper=mri_percentiles[1],
            b_min=-1.0,
            b_max=1.0,
            clip=True,
        )
    )
    framing = (
        [
            ResizeWithPadOrCropd("image", spatial_size=(h, w, -1), value=-1.0),
            SpatialPadd("image", spatial_size=(h, w, depth), value=-1.0),
        ]
        if check_framing(z_framing) == "field_of_view"
        else [ResizeWithPadOrCropd("image", spatial_size=(h, w, depth), value=-1.0)]
    )
    return Compose(
        [
            LoadImaged("image", reader="NibabelReader", ensure_channel_first=True, image_only=True),
            EnsureTyped("image", dtype=torch.float32, track_meta=True),
            Orientationd("image", axcodes="RAS", labels=None),
            OwnKeysSpacingd("image", pixdim=pixdim, mode="bilinear"),
            intensity,
            *framing,
        ]
    )


def invert_image(model_image: torch.Tensor, reference: dict, transforms: Compose) -> MetaTensor:
    """Bring a model-space image ``(1, H, W, D)`` back to the source grid and intensity range.

    ``reference`` is the output of ``transforms`` for the case (its ``image`` carries the
    applied operations); the result has the source shape, affine and HU / original values.
    """
    ref = reference["image"]
    pred = MetaTensor(
        model_image, meta=dict(ref.meta), applied_operations=list(ref.applied_operations)
    )
    inverter = Invertd(
        keys="pred", transform=transforms, orig_keys="image", nearest_interp=False, to_tensor=True
    )
    return inverter({"pred": pred, "image": ref})["pred"]


def grid_pixdim(
    field_of_view: Sequence[float],
    spatial_size: Sequence[int],
    z_spacing: float | None = None,
    z_framing: str = "labelled_range",
) -> list[float]:
    """Voxel size (mm) of a model grid of ``spatial_size`` covering ``field_of_view`` (mm).

    ``z_spacing`` replaces the axial spacing, for the resampling step that runs before the
    labelled z-range is resized to the grid's depth (``z_framing: labelled_range``). The
    ``field_of_view`` framing resamples to the grid itself, so there it must be None (or equal
    the grid's), else the written volumes' affine would not match their voxels.
    """
    pixdim = [float(f) / int(s) for f, s in zip(field_of_view, spatial_size)]
    if z_spacing is None:
        return pixdim
    if check_framing(z_framing) == "field_of_view" and not math.isclose(z_spacing, pixdim[2]):
        raise ValueError(
            f"z_resample_mm {z_spacing} differs from the grid's z spacing {pixdim[2]} "
            "(field_of_view / spatial_size); with z_framing field_of_view set it to null"
        )
    return [*pixdim[:2], float(z_spacing)]


def model_space_affine(pixdim: Sequence[float], spatial_size: Sequence[int]) -> np.ndarray:
    """RAS affine ``4x4`` for a generated volume: spacing ``pixdim``, centred on the origin."""
    affine = np.diag([*map(float, pixdim), 1.0])
    affine[:3, 3] = -np.asarray(pixdim, float) * (np.asarray(spatial_size, float) - 1) / 2.0
    return affine
