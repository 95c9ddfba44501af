"""The data-efficiency curve: does synthetic data help more when real cases are few?

For each size N (default 4, 8, 16) of real training cases, taken from the thorax demo
cohort's generator-training cases (the first 16 of 24, seed 0; the last 8 are the test set
nothing trains on):

1. MC-DPM, the sequence generator and the three refiners train on those N cases (the demo
   scale's presets, as ``medgen3d demo --train`` does) for the same number of optimiser steps
   whatever N is (``BUDGET``: the steps the shipped demo weights trained for; MC-DPM: their
   first, from-scratch phase), so a small cohort is not also an undertrained one;
2. N synthetic pairs are generated with them;
3. the segmentation study trains E2-1 (real only) and E2-3 (real + synthetic) on the N cases
   at the same number of optimiser steps, over several seeds, and tests every model on the
   same held-out cases.

Every step keeps what a previous run finished, so the command resumes after an interruption::

    OMP_NUM_THREADS=1 python benchmarks/data_efficiency.py --out outputs/bench/data_efficiency

``--stage generators`` stops after step 1 (the long part).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import fire

from common.core.bundle_configs import bundle_parser
from common.core.io import write_json
from common.data.splits import split_datalist
from common.seg.study import seg_study
from medgen3d.bundles import BUNDLES, TRAIN_STAGES
from medgen3d.demo import make_cohort, train_generators
from medgen3d.pairs import generate_pairs

SCALE = "demo"  # the presets of every stage (the results in benchmarks/results.md)

COHORT_CASES, HELDOUT, COHORT_SEED = 24, 8, 0
# optimiser steps per generator stage, and the config key of the stage's batch size
BUDGET = {"masks": 2400, "generator": 800, "refiner": 600}
BATCH_KEYS = {"masks": "batch_size", "generator": "gen_batch_size", "refiner": "sdm_batch_size"}


def stage_epochs(n_cases: int) -> dict[str, int]:
    """Epochs per stage that give ``BUDGET`` steps on ``n_cases`` (less the validation cases)."""
    epochs = {}
    for stage, steps in BUDGET.items():
        spec = TRAIN_STAGES[stage]
        config = bundle_parser(BUNDLES / spec.bundle, spec.configs, SCALE, "thorax")
        train_cases = n_cases - int(config["val_cases"])
        per_epoch = math.ceil(train_cases / int(config[BATCH_KEYS[stage]]))
        epochs[stage] = math.ceil(steps / per_epoch)
    return epochs


def subset(train: Path, n: int, folder: Path) -> Path:
    """The first ``n`` generator-training cases as ``folder/train.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = json.loads(train.read_text())["training"]
    if n == len(cases):
        return train
    first, _ = split_datalist(train, n, folder / "train.json", folder / "unused.json")
    return first


def generators(train: Path, n: int, folder: Path) -> Path:
    """Train every generator stage on ``train`` (``n`` cases) once, for ``BUDGET`` steps;
    ``folder/models`` holds the weights (an interrupted stage resumes from its checkpoint)."""
    done = folder / "generators.json"
    if not done.is_file():
        start = time.time()
        epochs = stage_epochs(n)
        train_generators(train, "thorax", folder / "models", epochs, SCALE)
        record = {"datalist": str(train), "epochs": epochs, "steps": BUDGET}
        write_json({**record, "seconds": round(time.time() - start)}, done)
    return folder / "models"


def pairs(models: Path, n: int, folder: Path) -> Path:
    """``n`` synthetic pairs from the generators in ``models`` (kept on a rerun)."""
    image_models = models / "image_synthesis" / "models"
    mask_ckpt = models / "mask_diffusion" / "models" / "model.pt"
    return generate_pairs(
        n,
        folder / "synthetic",
        seed=0,
        scale=SCALE,
        dataset="thorax",
        mask_ckpt=mask_ckpt,
        image_models=image_models,
    )


def study(train: Path, synthetic: Path, heldout: Path, folder: Path, seeds: int) -> dict:
    """E2-1 vs E2-3 (unet3d, the demo preset's step budget, ``seeds`` seeds) tested on the
    held-out cases; returns the study's statistics for unet3d."""
    seg_study(
        str(train),
        str(synthetic),
        networks="unet3d",
        regimes="E2-1,E2-3",
        out=str(folder / "seg_study"),
        scale=SCALE,
        dataset="thorax",
        test=str(heldout),
        seeds=seeds,
        val_cases=1,
    )
    return json.loads((folder / "seg_study" / "statistics.json").read_text())["unet3d"]


def _mean_sd(cell) -> str:
    return f"{cell[0]:.3f} ± {cell[1]:.3f}"


def table(rows: dict[int, dict]) -> str:
    """Markdown: per N, E2-1 and E2-3 mean Dice ± sd over seeds, steps, the difference."""
    lines = [
        "| real cases | steps | E2-1 mean Dice | E2-3 mean Dice | E2-3 - E2-1 [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for n, stats in sorted(rows.items()):
        real, mixed = stats["E2-1"], stats["E2-3"]
        diff, lo, hi = mixed["difference"]["mean"]
        lines.append(
            f"| {n} | {real['steps']} | {_mean_sd(real['dice']['mean'])} | "
            f"{_mean_sd(mixed['dice']['mean'])} | {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] |"
        )
    return "\n".join(lines)


def plot(rows: dict[int, dict], path: Path) -> Path:
    """Mean Dice ± sd against the number of real cases, E2-1 and E2-3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(rows)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for regime, label in (("E2-1", "real only (E2-1)"), ("E2-3", "real + synthetic (E2-3)")):
        cells = [rows[n][regime]["dice"]["mean"] for n in sizes]
        ax.errorbar(
            sizes,
            [c[0] for c in cells],
            yerr=[c[1] for c in cells],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.set(xlabel="real training cases", ylabel="mean Dice (held-out 8)", xticks=sizes)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(
    out: str = "outputs/bench/data_efficiency",
    sizes=(4, 8, 16),
    stage: str = "all",
    seeds: int = 3,
):
    """Run (or resume) the curve for ``sizes`` real cases (``--sizes 4,8``) into ``out``;
    ``--stage generators`` trains only. Writes OUT/data_efficiency.md and .png."""
    out = Path(out)
    train, heldout = out / "cohort" / "train.json", out / "cohort" / "heldout.json"
    if not (train.is_file() and heldout.is_file()):  # a rerun keeps what the stages trained on
        train, heldout = make_cohort("thorax", out, COHORT_CASES, HELDOUT, COHORT_SEED)
    sizes = sizes if isinstance(sizes, (tuple, list)) else (sizes,)
    rows = {}
    for n in (int(s) for s in sizes):
        folder = out / f"n{n:02d}"
        cases = subset(train, n, folder)
        models = generators(cases, n, folder)
        if stage == "generators":
            continue
        rows[n] = study(cases, pairs(models, n, folder), heldout, folder, seeds)
    if rows:
        (out / "data_efficiency.md").write_text(table(rows) + "\n")
        plot(rows, out / "data_efficiency.png")
        print(table(rows))


if __name__ == "__main__":
    fire.Fire(main)
