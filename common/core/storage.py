"""Final weights stored in half precision: floating-point tensors as float16 (or bfloat16),
the rest as it was, so that shipped weights take half the space. Not for resume checkpoints:
their optimiser state needs float32.

Networks stay float32: ``load_state_dict`` casts each tensor to its parameter's dtype, so every
loader (``load_weights``, ``start_from``, MONAI's ``CheckpointLoader``, ``ckpt_export``) reads
the stored file as before. Each plain state dict in the file (the file itself, or ``model`` of a
nested one) says how it is stored in its ``_metadata`` under ``storage``, beside the provenance
record (``common.core.provenance``)::

    {"dtype": "float16", "from": ["float32"], "max_abs_change": 4.9e-4, "max_rel_change": 4.8e-4}

When a tensor is refused: rounding a float32 value to float16 changes it by at most 2^-11 of
itself (bfloat16: 2^-8) if it is a normal number; values under 6.1e-5 (float16's smallest
normal) are rounded to multiples of 6e-8 (off by up to 3e-8), those under 3e-8 become 0. A weight
tensor works at the scale of its largest values, so each tensor's change is measured as
``max |half - x| / max |x|``: at most 2^-11 for every tensor whose largest value is a normal
number, whatever its small entries lose. A tensor is refused when that exceeds the format's
epsilon (twice the rounding bound: 9.8e-4 for float16, 7.8e-3 for bfloat16), i.e. when all of
it is so small (max |x| under about 3e-5) that the rounding changes it materially, or when a
value overflows (|x| > 65504 for float16).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from common.core.errors import DataError
from common.core.io import atomic_path, read_checkpoint

STORAGE_KEY = "storage"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
FIX = "keep this checkpoint in float32"
FIX_FLOAT16 = f"{FIX}, or store it with --dtype bfloat16 (float32's range, 2^-8 precision)"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Store:
    """The conversion of one checkpoint: tensors seen, largest changes, refusals naming
    ``path``."""

    def __init__(self, path: Path, dtype: torch.dtype):
        self.path, self.dtype = path, dtype
        self.fix = FIX_FLOAT16 if dtype == torch.float16 else FIX
        self.name, self.finfo = _name(dtype), torch.finfo(dtype)
        self.tensors, self.max_abs, self.max_rel, self.worst = 0, 0.0, 0.0, ""

    def tensor(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``x`` (any shape) in the storage dtype if it is floating point, else unchanged."""
        if not x.is_floating_point() or x.dtype == self.dtype:
            return x
        half = x.to(self.dtype)
        finite = torch.isfinite(x)
        if not finite.any():
            return half
        values = x[finite].double()
        scale = values.abs().max().item()
        if not torch.isfinite(half[finite]).all():
            raise DataError(
                str(self.path),
                f"tensor {name} holds values up to {scale:.6g}, beyond {self.name}'s largest "
                f"{self.finfo.max:.6g}",
                self.fix,
            )
        change = (half[finite].double() - values).abs().max().item()
        rel = change / scale if scale else 0.0
        if rel > self.finfo.eps:
            zeroed = int(((half[finite] == 0) & (values != 0)).sum())
            raise DataError(
                str(self.path),
                f"tensor {name} would change by {rel:.2g} of its largest value {scale:.3g} in "
                f"{self.name} (its values are too small: {zeroed} of {values.numel()} become 0; "
                f"the limit is {self.finfo.eps:.2g})",
                self.fix,
            )
        self.tensors += 1
        self.max_abs = max(self.max_abs, change)
        if rel >= self.max_rel:
            self.max_rel, self.worst = rel, name
        return half

    def convert(self, obj, name: str = ""):
        """``obj`` (a checkpoint or a part of it) with its float tensors converted; a plain
        state dict (every value a tensor) keeps its ``_metadata`` and gains the storage
        record."""
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, name)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.convert(v, f"{name}[{i}]") for i, v in enumerate(obj))
        if not isinstance(obj, Mapping):
            return obj
        prefix = f"{name}." if name else ""
        outer = self.max_abs, self.max_rel, self.worst
        self.max_abs, self.max_rel = 0.0, 0.0  # this mapping's own changes, for its record
        items = [(k, self.convert(v, f"{prefix}{k}")) for k, v in obj.items()]
        record = {"max_abs_change": self.max_abs, "max_rel_change": self.max_rel}
        self.max_abs = max(self.max_abs, outer[0])
        if outer[1] > self.max_rel:
            self.max_rel, self.worst = outer[1], outer[2]
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if not tensors or len(tensors) < len(obj):
            return type(obj)(items)
        out = OrderedDict(items)
        out._metadata = OrderedDict(getattr(obj, "_metadata", {}))
        out._metadata[STORAGE_KEY] = {
            "dtype": self.name,
            "from": sorted({_name(t.dtype) for t in tensors if t.is_floating_point()}),
        } | record
        return out


def store_half(src: str | Path, dst: str | Path | None = None, dtype: str = "float16") -> dict:
    """Write checkpoint ``src`` to ``dst`` (default: ``src`` itself) with its floating-point
    tensors in ``dtype`` (``float16`` or ``bfloat16``), atomically; integer and bool tensors,
    other values and ``_metadata`` (the provenance record) are kept. A tensor that would not
    survive the rounding (module docstring) raises DataError naming ``src`` and the tensor,
    and nothing is written.

    Returns ``{"src", "dst", "dtype", "bytes_before", "bytes_after", "tensors" (converted),
    "max_abs_change", "max_rel_change" (of a tensor's largest value), "worst" (its name)}``.
    """
    if dtype not in DTYPES:
        raise DataError(f"--dtype {dtype}", "unknown storage type", f"use {' or '.join(DTYPES)}")
    src = Path(src)
    dst = Path(dst) if dst else src
    store = _Store(src, DTYPES[dtype])
    state = store.convert(read_checkpoint(src, "give the path of a checkpoint (.pt)"))
    before = src.stat().st_size
    with atomic_path(dst) as tmp:
        torch.save(state, tmp)
    summary = {"src": str(src), "dst": str(dst), "dtype": dtype, "bytes_before": before}
    summary |= {"bytes_after": dst.stat().st_size, "tensors": store.tensors}
    summary |= {"max_abs_change": store.max_abs, "max_rel_change": store.max_rel}
    return summary | {"worst": store.worst}
