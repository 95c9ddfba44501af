"""``medgen3d demo``: cohort -> (training) -> paired generation -> evaluation -> report.

Every step writes into one output folder and is timed; ``report.md`` gathers the tables,
timings and figures. Steps whose outputs exist are kept on a rerun (generation and the
segmentation study resume case by case / stage by stage).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.core.errors import DataError
from common.data.datalists import read_datalist
from common.data.splits import split_datalist
from common.data.validate import require_valid
from common.images.generation import evaluate_synthesis, export_model_space
from common.masks.metrics import evaluate_against_real
from common.seg.agreement import agreement
from medgen3d.bundles import BUNDLES, TRAIN_STAGES, bundle_config, run_stage, train_overrides
from medgen3d.demo_data import make_demo_cohort
from medgen3d.pairs import generate_pairs

DATASETS = ("thorax", "brain")
SCALE = "demo"
VIEWS = ("axial", "coronal", "sagittal")
EPOCH_KEYS = {"masks": "max_epochs", "generator": "gen_max_epochs", "refiner": "sdm_max_epochs"}


@dataclass
class DemoRun:
    """Where a demo writes, what it has measured so far and how it reports progress."""

    out: Path
    dataset: str
    timings: list[tuple[str, float]] = field(default_factory=list)
    steps: int = 7

    def step(self, title: str, fn: Callable, *args, **kwargs):
        """Run one numbered step, print its progress and record its wall time."""
        number = len(self.timings) + 1
        print(f"\n[{number}/{self.steps}] {title}", flush=True)
        start = time.time()
        result = fn(*args, **kwargs)
        seconds = time.time() - start
        self.timings.append((title, seconds))
        print(f"[{number}/{self.steps}] done in {seconds:.0f} s", flush=True)
        return result


@dataclass
class Weights:
    """The generator weights a demo uses: MC-DPM checkpoint and the image models' folder."""

    mask_ckpt: Path
    image_models: Path
    source: str


def shipped_weights(dataset: str) -> Weights:
    """The bundles' own ``models/`` (thorax demo weights); other datasets need ``--train``."""
    mask_ckpt = BUNDLES / "mask_diffusion" / "models" / "model.pt"
    image_models = BUNDLES / "image_synthesis" / "models"
    needed = [mask_ckpt, image_models / "model.pt"]
    needed += [image_models / f"refiner_{v}.pt" for v in VIEWS]
    missing = [str(p) for p in needed if not p.is_file()]
    if dataset != "thorax" or missing:
        raise DataError(
            ", ".join(missing) or f"{dataset} demo",
            "no shipped weights for this dataset (only the thorax demo weights ship)",
            "add --train to train every generator stage first (see README for the time)",
        )
    return Weights(mask_ckpt, image_models, "shipped demo weights (bundles/*/models)")


def train_generators(
    train_datalist: Path, dataset: str, models: Path, epochs: int | Mapping[str, int] | None = None
) -> Weights:
    """Train MC-DPM, the sequence generator and the three refiners on ``train_datalist``.

    ``epochs``: one number for every stage, or per stage (``masks``, ``generator``,
    ``refiner``); ``None`` keeps the presets'.

    Each stage is the bundle's own training run (``medgen3d train``); the checkpoint with the
    best validation loss (``*_best.pt``) is used when one was written, as for the shipped
    weights, else the final one.
    """
    data = {"dataset_dir": str(train_datalist.parent), "datalist": str(train_datalist)}
    runs = [("masks", {}, "model"), ("generator", {}, "model")]
    runs += [("refiner", {"view": v}, f"refiner_{v}") for v in VIEWS]
    for stage, extra, name in runs:
        folder = models / TRAIN_STAGES[stage].bundle
        overrides = {**data, **extra}
        stage_epochs = epochs.get(stage) if isinstance(epochs, Mapping) else epochs
        if stage_epochs is not None:
            overrides[EPOCH_KEYS[stage]] = stage_epochs
        overrides = train_overrides(stage, str(folder), overrides)
        run_stage(TRAIN_STAGES, stage, SCALE, dataset, overrides)
        best = folder / "models" / f"{name}_best.pt"
        if best.is_file():
            shutil.copyfile(best, folder / "models" / f"{name}.pt")
    return Weights(
        models / "mask_diffusion" / "models" / "model.pt",
        models / "image_synthesis" / "models",
        f"trained by this demo ({models})",
    )


def make_cohort(dataset: str, out: Path, cases: int, heldout: int, seed: int) -> tuple[Path, Path]:
    """Demo cohort in ``out/cohort`` (validated), split into generator-training and held-out
    datalists (``train.json``: the first ``cases - heldout`` cases, ``heldout.json``)."""
    datalist = make_demo_cohort(dataset, out / "cohort", cases, seed)
    require_valid(datalist)
    return split_datalist(
        datalist, cases - heldout, datalist.parent / "train.json", datalist.parent / "heldout.json"
    )


def evaluate_generation(
    run: DemoRun, heldout: Path, synthetic: Path, weights: Weights, dataset: str, seed: int
) -> dict:
    """Masks against the held-out real masks; images made from the held-out real masks
    against their real images (paired); the synthetic pairs' images against the real ones."""
    masks = bundle_config("mask_diffusion", SCALE, dataset)
    images = bundle_config("image_synthesis", SCALE, dataset)
    preprocessing = images.get_parsed_content("preprocessing")
    mask_metrics = evaluate_against_real(
        synthetic.parent / "masks" / "datalist.json",
        heldout,
        preprocessing,
        masks.get_parsed_content("output_pixdim"),
        out_dir=run.out / "evaluation" / "masks",
    )
    real_grid = export_model_space(heldout, preprocessing, run.out / "real_model_space")
    from_real = bundle_config(
        "image_synthesis",
        SCALE,
        dataset,
        mask_datalist=str(real_grid),
        output_dir=str(run.out / "from_real_masks"),
        seed=seed,
        ckpt_dir=str(weights.image_models),
    ).get_parsed_content("synthesize")()
    value_range = images.get_parsed_content("value_range")
    paired = evaluate_synthesis(
        from_real, real_grid, value_range, run.out / "evaluation" / "images_from_real_masks", seed
    )
    unpaired = evaluate_synthesis(
        synthetic, real_grid, value_range, run.out / "evaluation" / "synthetic_pairs", seed
    )
    return {
        "masks": mask_metrics,
        "images_paired": paired,
        "images_unpaired": unpaired,
        "real_grid": real_grid,
        "from_real": from_real,
    }


def run_demo(
    dataset: str = "thorax",
    out: str | Path = "outputs/demo",
    train: bool = False,
    cases: int = 24,
    heldout: int = 8,
    n: int = 8,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    epochs: int | None = None,
    seg_iterations: int | None = None,
    seeds: int = 3,
    seg_regimes: str = "E2-1,E2-3",
) -> Path:
    """The whole demo; returns the path of ``OUT/report.md``.

    Args:
        dataset: ``thorax`` (shipped weights) or ``brain`` (needs ``train``).
        train: first train every generator stage at the demo scale on the cohort.
        cases, heldout: cohort size and the last cases kept out of generator training; the
            shipped thorax weights were trained on the first 16 of 24 cases with seed 0.
        n: synthetic pairs to generate. sampler, steps: the mask sampler (default: the
            mask_diffusion config's).
        epochs: override the epochs of every generator training stage (default: preset's).
        seg_iterations: optimiser steps of each segmentation training (default: the
            seg_downstream demo preset's max_iterations).
        seeds: segmentation trainings per regime (seeds seed, seed + 1, ...).
        seg_regimes: the regimes of the segmentation study, e.g. E2-1,E2-2,E2-3.
    """
    from medgen3d.report import demo_figures, write_report

    if dataset not in DATASETS:
        raise DataError(dataset, "unknown demo dataset", f"use one of {', '.join(DATASETS)}")
    out = Path(out)
    mask_config = bundle_config("mask_diffusion", SCALE, dataset)
    sampler = sampler or mask_config.get_parsed_content("sampler")
    steps = steps or mask_config.get_parsed_content("steps")
    run = DemoRun(out, dataset, steps=8 if train else 7)
    weights = None if train else shipped_weights(dataset)
    train_json, heldout_json = run.step(
        f"{dataset} demo cohort: {cases} cases, the last {heldout} held out",
        make_cohort,
        dataset,
        out,
        cases,
        heldout,
        seed,
    )
    if train:
        weights = run.step(
            f"training MC-DPM, sequence generator and 3 refiners ({SCALE} scale)",
            train_generators,
            train_json,
            dataset,
            out / "models",
            epochs,
        )
    synthetic = run.step(
        f"generating {n} paired volumes ({sampler}-{steps} masks, refined images)",
        generate_pairs,
        n,
        out / "synthetic",
        seed=seed,
        sampler=sampler,
        steps=steps,
        scale=SCALE,
        dataset=dataset,
        mask_ckpt=weights.mask_ckpt,
        image_models=weights.image_models,
    )
    results = run.step(
        "evaluating masks and images against the held-out real cases",
        evaluate_generation,
        run,
        heldout_json,
        synthetic,
        weights,
        dataset,
        seed,
    )
    seg = run.step(
        f"segmentation study: {seg_regimes} at equal steps, unet3d, {seeds} seeds",
        _seg_study,
        train_json,
        heldout_json,
        synthetic,
        out / "seg_study",
        dataset,
        {"seed": seed, "seeds": seeds, "regimes": seg_regimes, "max_iterations": seg_iterations},
    )
    results["agreement"] = run.step(
        f"mask-image agreement: the E2-1 segmenter (seed {seed}), synthetic vs held-out real",
        agreement,
        out / "seg_study" / "unet3d" / f"seed{seed}" / "E2-1" / "models" / "model.pt",
        synthetic,
        out / "seg_study" / "real_test.json",  # the study's test cases: unseen by the segmenter
        out / "agreement",
        SCALE,
        dataset,
    )
    figures = run.step(
        "figures",
        demo_figures,
        out / "figures",
        results["real_grid"],
        synthetic,
        results["from_real"],
    )
    return run.step(
        "report",
        write_report,
        run,
        weights,
        results,
        seg,
        figures,
        {
            "cases": cases,
            "heldout": heldout,
            "n": n,
            "seed": seed,
            "sampler": sampler,
            "steps": steps,
            "scale": SCALE,
            "train": train,
        },
    )


def _val_interval(iterations: int) -> int:
    """About six validations: the largest divisor of ``iterations`` up to a sixth of it."""
    return max(d for d in range(1, max(1, iterations // 6) + 1) if iterations % d == 0)


def _seg_study(
    train: Path, heldout: Path, synthetic: Path, out: Path, dataset: str, options: dict
) -> str:
    """The paper's protocol for unet3d: the segmenter trains and validates on the generators'
    training cases (``train``; with all the synthetic pairs) and is tested on the held-out
    cases nothing saw (``heldout``); every regime the same steps, ``options["seeds"]`` times.
    ``options``: seed, seeds, regimes, max_iterations (None: the preset's)."""
    from common.seg.study import REPO_BUNDLE, seg_study, study_settings

    val_cases = study_settings(REPO_BUNDLE, SCALE, dataset, {}, {})["val_cases"]
    n_real = len(read_datalist(train)["training"]) - val_cases
    n_synthetic = len(read_datalist(synthetic)["training"])
    iterations = options["max_iterations"]
    seg_study(
        str(train),
        str(synthetic),
        networks="unet3d",
        regimes=options["regimes"],
        out=str(out),
        scale=SCALE,
        dataset=dataset,
        test=str(heldout),
        seeds=options["seeds"],
        synthetic_ratio=n_synthetic / max(1, n_real),  # every synthetic pair
        seed=options["seed"],
        max_iterations=iterations,
        overrides={"val_interval": _val_interval(iterations)} if iterations else None,
    )
    return (out / "results.md").read_text()
