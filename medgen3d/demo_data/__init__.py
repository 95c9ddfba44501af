"""Demo cohorts made offline: thorax CT phantoms and brain MRI from the MNI152 template."""

from __future__ import annotations

from pathlib import Path

from common.core.errors import DataError


def make_demo_cohort(
    dataset: str, out: str | Path, cases: int, seed: int = 0, convention: str = "segthor"
) -> Path:
    """Write a ``thorax`` or ``brain`` demo cohort to ``out``; returns its datalist path."""
    if dataset == "thorax":
        from medgen3d.demo_data.thorax import make_thorax_cohort

        return Path(make_thorax_cohort(out, cases, seed=seed, convention=convention))
    if dataset == "brain":
        from medgen3d.demo_data.brain import make_brain_cohort

        return Path(make_brain_cohort(out, cases, seed=seed))
    raise DataError(dataset, "unknown demo dataset", "use --dataset thorax or --dataset brain")
