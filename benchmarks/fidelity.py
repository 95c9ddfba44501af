"""The fidelity table of issue #18 from `medgen3d demo` output folders, side by side.

Each folder is one finished demo run (a dataset at a scale). Every number is read from the
files the demo wrote, on held-out real cases nothing trained on; the masks are scored as
sampled (before keep-largest) and as written::

    python -m benchmarks.fidelity OUT_DEMO32 OUT_STANDARD --names "32^3,64^3" --out table.md

Targets (standard preset): raw masks at most 1.5 pieces per label (a label in many pieces in
the real cases too: within 10% of the real count); z-continuity (Dice of
consecutive slices) within 10% of real; label-volume W1 at most 0.15 of the real mean;
median intensity per label within 50 HU of real (MRI: 10% of the value range); agreement
(a segmenter trained on real cases, on the synthetic images, Dice to the generated masks) at
least 0.9 of its Dice on real images; the refiner better than the sequence generator alone
(paired MAE, images made from the held-out real masks).
"""

from __future__ import annotations

from pathlib import Path

import fire

from common.core.io import read_json
from common.images.metrics import original_digits

PIECES, Z_CONTINUITY, W1, AGREEMENT, MRI_SHARE = 1.5, 0.1, 0.15, 0.9, 0.1
MANY_PIECES_SHARE = 0.1  # a label in many pieces in the real cases: within 10% of their count


def pieces_target(real_pieces: float) -> float:
    """Most raw pieces a label may have: ``PIECES``, or ``MANY_PIECES_SHARE`` above the real
    count where the real label is itself in many pieces (the brain's CSF, about 100 at 32^3)."""
    return PIECES if real_pieces <= PIECES else real_pieces * (1 + MANY_PIECES_SHARE)


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def run_rows(folder: str | Path) -> dict[str, tuple[str, bool | None]]:
    """``{row name: (cell text, target met or None)}`` of one demo output folder."""
    folder = Path(folder)
    raw = read_json(folder / "evaluation" / "masks_raw" / "mask_metrics.json")["labels"]
    kept = read_json(folder / "evaluation" / "masks" / "mask_metrics.json")["labels"]
    stages = read_json(folder / "evaluation" / "images_from_real_masks" / "image_metrics.json")
    pairs = read_json(folder / "evaluation" / "synthetic_pairs" / "image_metrics.json")["refined"]
    agreement = read_json(folder / "agreement" / "agreement.json")
    agree = agreement["labels"]
    low, high = pairs["value_range"]
    ct = agreement["unit"] == "HU"
    limit = 50.0 if ct else MRI_SHARE * (high - low)
    rows: dict[str, tuple[str, bool | None]] = {}
    for label, r in raw.items():
        k = kept[label]
        real_pieces = r["components_real"]
        rows[f"{label}: pieces, raw (kept) / real"] = (
            f"{r['components_gen']:.1f} ({k['components_gen']:.1f}) / {real_pieces:.1f}",
            r["components_gen"] <= pieces_target(real_pieces),
        )
        share = r["z_continuity_gen"] / r["z_continuity_real"]
        rows[f"{label}: z-continuity raw / real (kept)"] = (
            f"{r['z_continuity_gen']:.2f} / {r['z_continuity_real']:.2f} "
            f"({k['z_continuity_gen']:.2f})",
            abs(share - 1) <= Z_CONTINUITY,
        )
        rows[f"{label}: volume W1 / real mean, raw (kept)"] = (
            f"{r['volume_w1_rel']:.2f} ({k['volume_w1_rel']:.2f})",
            r["volume_w1_rel"] <= W1,
        )
    unit = "HU" if ct else "of the range"
    for label, m in pairs["intensity"]["labels"].items():
        diff = m["median_diff"]
        text = f"{m['median_gen']:.0f} vs {m['median_real']:.0f} ({diff:+.0f})"
        if not ct:
            text = f"{m['median_gen']:.3f} vs {m['median_real']:.3f} ({diff / (high - low):+.1%})"
        rows[f"{label}: median intensity vs real ({unit})"] = (text, abs(diff) <= limit)
    for label, a in agree.items():
        rows[f"{label}: agreement (Dice synthetic / real)"] = (
            f"{a['ratio']:.2f} ({a['dice_synthetic']:.2f} / {a['dice_real']:.2f})",
            a["ratio"] >= AGREEMENT,
        )
    alone = stages["sequence generator only"]["paired_metrics"]
    refined = stages["refined"]["paired_metrics"]
    better = sum(r < a for r, a in zip(refined["mae"], alone["mae"], strict=True))
    scale = (high - low) / 2  # MAE is measured on [-1, 1]
    digits = original_digits((low, high))
    rows["refiner: paired MAE, generator -> refined"] = (
        f"{alone['mae_mean'] * scale:.{digits}f} -> {refined['mae_mean'] * scale:.{digits}f} "
        f"({better} of {len(refined['mae'])} cases better)",
        better == len(refined["mae"]),
    )
    return rows


def table(folders: list[str | Path], names: list[str]) -> str:
    """Markdown: one row per measure, one column per run (``names``), "target met" after each."""
    runs = [run_rows(f) for f in folders]
    order = list(dict.fromkeys(row for run in runs for row in run))
    head = ["measure", *[c for n in names for c in (n, "met")]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in order:
        cells = [row]
        for run in runs:
            text, ok = run.get(row, ("", None))
            cells += [text, "" if ok is None else _mark(ok)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(*folders: str, names: str | tuple = "", out: str | None = None) -> None:
    """Print (and write to ``out``) the table of the demo output ``folders``."""
    labels = names.split(",") if isinstance(names, str) and names else list(names)
    labels = labels or [Path(f).name for f in folders]
    text = table(list(folders), labels)
    if out:
        Path(out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    fire.Fire(main)
