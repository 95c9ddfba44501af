"""A quality gate for generated pairs (as MAISI does): per-label intensity ranges learned from
real cases, a check of every generated pair, and new seeds for the pairs that fail.

Intensities are read from the NIfTI files as they lie on disk (HU for CT, the files' own units
for MRI) inside each label of the case's own label file; nothing is resampled.

- ``label_medians``: per label, the median intensity inside the label of one case.
- ``learn_ranges``: per label, the range a generated pair's median must fall in and whether
  the label must be present or absent, learned from real cases.
- ``check_pair``: every check of one pair.
- ``quality_gate``: checks a datalist of pairs, regenerates the failing ones with new seeds
  (up to ``retries`` rounds), writes ``qc.json`` beside the datalist and marks each entry.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from common.core.distributed import rank0_writes
from common.core.errors import DataError
from common.core.io import load_volume, read_json, write_json
from common.data.datalists import (
    PATH_KEYS,
    SECTIONS,
    datalist_label_set,
    datalist_modality,
    read_datalist,
)
from common.data.labels import LabelSet

PERCENTILES = (5.0, 95.0)  # of the real cases' per-label medians
CT_MARGIN_HU = 50.0  # CT: the range widened by 50 HU on each side
MRI_MARGIN = 0.10  # MRI: by 10% of the real intensity range (0.5-99.5 percentiles)
MRI_RANGE_PERCENTILES = (0.5, 99.5)
QC_STREAM = 1  # retry seeds come from a seed stream apart from the run's case seeds


def intensity_unit(modality: str) -> str:
    """The unit image intensities are read in: HU for CT, the files' own units for MRI."""
    return "HU" if modality == "CT" else "image units"


def _arrays(image: str, label: str, label_set: LabelSet) -> tuple[np.ndarray, np.ndarray]:
    """A case's image ``(H, W, D)`` float32 and label values ``0..K-1`` ``(H, W, D)``."""
    img, lab = load_volume(image), load_volume(label)
    if img.shape[:3] != lab.shape[:3]:
        raise DataError(
            label,
            f"shape {lab.shape[:3]} differs from its image's {img.shape[:3]} ({image})",
            "check the pair with medgen3d validate",
        )
    values = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
    labels = np.rint(np.asarray(lab.dataobj)).astype(np.int64).reshape(lab.shape[:3])
    return values, label_set.remap(labels)


def label_medians(image: str, label: str, label_set: LabelSet) -> dict[str, float | None]:
    """Per label (background excluded): the median of the image inside it, None where absent."""
    values, labels = _arrays(image, label, label_set)
    medians = {}
    for value, name in enumerate(label_set.names[1:], 1):
        inside = values[labels == value]
        medians[name] = float(np.median(inside)) if inside.size else None
    return medians


def _span(image: str) -> float:
    """The span of an image's intensities between its 0.5 and 99.5 percentiles."""
    low, high = np.percentile(np.asarray(load_volume(image).dataobj), MRI_RANGE_PERCENTILES)
    return float(high - low)


def paired_cases(datalist: str | Path) -> tuple[list[dict], LabelSet, str]:
    """Every case with an image and a label (all sections), the label set and the modality."""
    doc = read_datalist(datalist)
    cases = [c for s in SECTIONS for c in doc.get(s, []) if c.get("image") and c.get("label")]
    if not cases:
        raise DataError(str(datalist), "has no case with an image and a label", "give pairs")
    return cases, datalist_label_set(doc, datalist), datalist_modality(doc, datalist)


def learn_ranges(real_datalist: str | Path) -> dict:
    """Per label of the real cases: the range a generated pair's median must fall in.

    How: each real case gives the median intensity inside each label (robust to stray voxels
    and independent of the organ's size); a label's range is the 5th to 95th percentile of
    those per-case medians (one odd case does not widen it; with few cases it is close to
    their min..max), widened on each side by a margin: 50 HU for CT, and for MRI 10% of the
    real intensity range (the median over the real cases of their 0.5-99.5 percentile span).
    Why the margin: these are the project's fidelity targets (a label's median within 50 HU
    of real, MRI within 10% of the real range), and the generated pairs sit on the coarser
    model grid, where partial volume shifts the medians of thin organs a little. Presence: a
    label found in every real case must be in a generated pair, one found in none must not;
    otherwise either passes.

    Returns ``{"source", "modality", "unit", "margin", "percentiles", "n_cases", "labels":
    {name: {"low", "high", "presence", "medians"}}}`` (low/high None for a label no real case
    has).
    """
    cases, label_set, modality = paired_cases(real_datalist)
    medians = [label_medians(c["image"], c["label"], label_set) for c in cases]
    if modality == "CT":
        margin = CT_MARGIN_HU
    else:
        margin = MRI_MARGIN * float(np.median([_span(c["image"]) for c in cases]))
    labels = {}
    for name in label_set.names[1:]:
        found = [m[name] for m in medians if m[name] is not None]
        low, high = np.percentile(found, PERCENTILES) if found else (None, None)
        labels[name] = {
            "low": None if low is None else float(low) - margin,
            "high": None if high is None else float(high) + margin,
            "presence": len(found) / len(cases),
            "medians": found,
        }
    return {
        "source": str(real_datalist),
        "modality": modality,
        "unit": intensity_unit(modality),
        "margin": margin,
        "percentiles": list(PERCENTILES),
        "n_cases": len(cases),
        "labels": labels,
    }


def check_pair(image: str, label: str, label_set: LabelSet, ranges: Mapping) -> dict:
    """Every check of one pair: ``{"passed", "checks": [{"label", "present", "median", "low",
    "high", "ok", "problem"}]}`` (``problem`` None where the check passed)."""
    medians = label_medians(image, label, label_set)
    checks = []
    for name, median in medians.items():
        want = ranges["labels"][name]
        low, high, present = want["low"], want["high"], median is not None
        problem = None
        if not present and want["presence"] == 1.0:
            problem = "missing (every real case has it)"
        elif present and want["presence"] == 0.0:
            problem = "present (no real case has it)"
        elif present and not low <= median <= high:
            problem = f"median {median:.1f} {ranges['unit']} outside [{low:.1f}, {high:.1f}]"
        checks.append(
            {
                "label": name,
                "present": present,
                "median": median,
                "low": low,
                "high": high,
                "ok": problem is None,
                "problem": problem,
            }
        )
    return {"passed": all(c["ok"] for c in checks), "checks": checks}


def retry_seed(seed: int, attempt: int) -> int:
    """The run seed of retry round ``attempt`` (1, 2, ...) of a run seeded with ``seed``."""
    sequence = np.random.SeedSequence([int(seed), int(attempt)], spawn_key=(QC_STREAM,))
    return int(sequence.generate_state(1)[0])


def _attempt(case: dict, label_set: LabelSet, ranges: Mapping, attempt: int, index: int) -> dict:
    """One checked attempt at a pair: its round, index in that round, seed, files and checks."""
    result = check_pair(case["image"], case["label"], label_set, ranges)
    files = {"image": case["image"], "label": case["label"]}
    return {"round": attempt, "index": index, "seed": case.get("seed"), **files, **result}


def _failures(attempt: dict) -> int:
    """How many checks of an attempt failed."""
    return sum(not c["ok"] for c in attempt["checks"])


def _problems(attempt: dict) -> str:
    """The failed checks of an attempt, ``label problem; ...``."""
    return "; ".join(f"{c['label']} {c['problem']}" for c in attempt["checks"] if not c["ok"])


def _relative(entry: dict, base: Path) -> dict:
    """``entry`` with its file paths relative to ``base`` (how datalists store them)."""
    return {k: os.path.relpath(v, base) if k in PATH_KEYS else v for k, v in entry.items()}


def summary_counts(report: Mapping) -> dict:
    """How many pairs passed at once, passed after retries, still fail; pairs regenerated."""
    cases = report["cases"]
    return {
        "pairs": len(cases),
        "passed_first": sum(c["passed"] and c["kept"] == 0 for c in cases),
        "passed_after_retry": sum(c["passed"] and c["kept"] > 0 for c in cases),
        "failed": sum(not c["passed"] for c in cases),
        "regenerated": sum(len(r["cases"]) for r in report["rounds"]),
    }


def quality_gate(
    datalist: str | Path,
    ranges: Mapping,
    regenerate: Callable[[int, int, str], Path],
    seed: int = 0,
    retries: int = 3,
) -> dict:
    """Check every pair of ``datalist`` against ``ranges`` (``learn_ranges``); regenerate the
    failing ones, up to ``retries`` rounds; returns the report also written to ``qc.json``.

    Round ``r`` makes the pairs still failing, in case order, with
    ``regenerate(count, retry_seed(seed, r), f"retry_{r}")``, which returns the datalist of
    ``count`` new pairs (pair ``j`` made from ``(run seed, j)``, as ``medgen3d generate``
    makes it). Each training entry of the rewritten datalist is the pair's first passing
    attempt or, when every attempt failed, the one with the fewest failed checks (the
    earliest of those), marked ``"qc": {"passed": false, ...}``: a failing pair is never
    dropped. Every attempt's files stay on disk; ``qc.json`` lists every check, failure and
    retry.
    """
    datalist = Path(datalist).absolute()
    doc = read_datalist(datalist)
    label_set, cases = datalist_label_set(doc, datalist), doc.get("training", [])
    names = tuple(ranges["labels"])
    if names != label_set.names[1:]:
        raise DataError(
            str(datalist),
            f"labels {list(label_set.names[1:])} differ from the real cases' {list(names)}",
            "check the pairs against real cases of the same label set",
        )
    entries = [[c] for c in cases]
    history = [[_attempt(c, label_set, ranges, 0, i)] for i, c in enumerate(cases)]
    rounds = []
    for attempt in range(1, retries + 1):
        failing = [i for i, h in enumerate(history) if not h[-1]["passed"]]
        if not failing:
            break
        run_seed = retry_seed(seed, attempt)
        made = read_datalist(regenerate(len(failing), run_seed, f"retry_{attempt}"))["training"]
        for index, (i, case) in enumerate(zip(failing, made)):
            entries[i].append(case)
            history[i].append(_attempt(case, label_set, ranges, attempt, index))
        remade = [cases[i].get("case", i) for i in failing]
        rounds.append({"round": attempt, "run_seed": run_seed, "cases": remade})
    report = {"seed": seed, "retries": retries, "real": ranges, "rounds": rounds, "cases": []}
    kept_entries = []
    for i, (case, attempts) in enumerate(zip(cases, history)):
        passing = [a for a, t in enumerate(attempts) if t["passed"]]
        kept = (
            passing[0]
            if passing
            else min(range(len(attempts)), key=lambda a: _failures(attempts[a]))
        )
        chosen = attempts[kept]
        qc = {"passed": chosen["passed"], "attempts": len(attempts), "round": chosen["round"]}
        if chosen["round"]:
            qc.update(run_seed=rounds[chosen["round"] - 1]["run_seed"], index=chosen["index"])
        qc["failed"] = [f"{c['label']} {c['problem']}" for c in chosen["checks"] if not c["ok"]]
        kept_entries.append({**entries[i][kept], "case": case.get("case", i), "qc": qc})
        report["cases"].append(
            {
                "case": case.get("case", i),
                "passed": chosen["passed"],
                "kept": kept,
                "attempts": attempts,
            }
        )
    report["summary"] = summary_counts(report)

    def write() -> None:
        write_json(report, datalist.parent / "qc.json")
        raw = read_json(datalist)
        raw["training"] = [_relative(e, datalist.parent) for e in kept_entries]
        raw["qc"] = {**report["summary"], "report": "qc.json"}
        write_json(raw, datalist)

    rank0_writes(write)  # under torchrun every rank checks, rank 0 writes
    return report


def qc_summary(report: Mapping) -> str:
    """What the gate did, in lines: the counts, then each regenerated or failing pair."""
    s = report["summary"]
    lines = [
        f"qc: {s['pairs']} pairs, {s['passed_first']} passed at once, {s['passed_after_retry']} "
        f"after retries, {s['failed']} still fail ({s['regenerated']} pairs regenerated in "
        f"{len(report['rounds'])} rounds, up to {report['retries']})"
    ]
    for case in report["cases"]:
        first, kept = case["attempts"][0], case["attempts"][case["kept"]]
        if first["passed"]:
            continue
        outcome = (
            f"passed in round {kept['round']} (seed {kept['seed']})"
            if case["passed"]
            else f"still fails, kept round {kept['round']} (seed {kept['seed']}, marked failed): "
            + _problems(kept)
        )
        lines.append(
            f"  {case['case']}: {_problems(first)}; {len(case['attempts']) - 1} retries; {outcome}"
        )
    return "\n".join(lines)
