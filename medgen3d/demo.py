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

from common.core.bundle_configs import BASE_SCALE, SCALES
from common.core.errors import DataError
from common.core.io import load_weights
from common.data.datalists import read_datalist
from common.data.splits import split_datalist
from common.data.validate import require_valid
from common.images.generation import evaluate_synthesis, export_model_space, real_encoder
from common.masks.metrics import evaluate_against_real
from common.seg.agreement import agreement
from medgen3d.bundles import TRAIN_STAGES, bundle_config, run_stage, train_overrides
from medgen3d.demo_data import make_demo_cohort
from medgen3d.pairs import generate_pairs

DATASETS = ("thorax", "brain")
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


def _missing(weights: Weights, scale: str, dataset: str) -> list[str]:
    """The files of ``weights`` that the generation at ``scale`` reads and that do not exist:
    the MC-DPM checkpoint, the sequence generator and a refiner per view of the preset."""
    views = bundle_config("image_synthesis", scale, dataset).get_parsed_content("sdm_views")
    needed = [weights.mask_ckpt, weights.image_models / "model.pt"]
    needed += [weights.image_models / f"refiner_{v}.pt" for v in views]
    return [str(p) for p in needed if not p.is_file()]


def _unfit(weights: Weights, scale: str, dataset: str) -> str | None:
    """Why a file of ``weights`` does not load into the networks of ``scale`` and ``dataset``
    (weights of another scale or label set), or None; checked before any work."""
    masks = bundle_config("mask_diffusion", scale, dataset)
    images = bundle_config("image_synthesis", scale, dataset)
    checks = [(masks.get_parsed_content("network_def"), weights.mask_ckpt)]
    checks.append((images.get_parsed_content("network_def"), weights.image_models / "model.pt"))
    for view in images.get_parsed_content("sdm_views"):
        refiner = images.get_parsed_content("refiner_def", lazy=False)
        checks.append((refiner, weights.image_models / f"refiner_{view}.pt"))
    for network, path in checks:
        try:
            load_weights(network, path)
        except DataError as error:
            return str(error)
    return None


def _shipped(dataset: str, scale: str) -> Weights:
    """Where the bundle configs of ``scale`` and ``dataset`` put their weights (``models/`` for
    the base configs' standard thorax, ``models/<scale>/<dataset>/`` for the others)."""
    mask = bundle_config("mask_diffusion", scale, dataset).get_parsed_content("ckpt_path")
    images = bundle_config("image_synthesis", scale, dataset).get_parsed_content("ckpt_dir")
    return Weights(Path(mask), Path(images), f"shipped {scale} {dataset} weights")


def _ships(weights: Weights, scale: str, dataset: str) -> bool:
    """Whether ``weights`` are all there and fit the networks of ``scale`` and ``dataset``."""
    return not _missing(weights, scale, dataset) and _unfit(weights, scale, dataset) is None


def shipped_weights(dataset: str, scale: str) -> Weights:
    """The weights the bundles ship for ``dataset`` at ``scale`` (present, and fitting that
    scale's networks); others need ``--train`` or ``--weights``."""
    weights = _shipped(dataset, scale)
    if not _ships(weights, scale, dataset):
        shipped = [
            f"{d} at the {s} scale"
            for s in SCALES
            for d in DATASETS
            if _ships(_shipped(d, s), s, d)
        ]
        raise DataError(
            ", ".join(_missing(weights, scale, dataset)) or str(weights.mask_ckpt.parent),
            f"no shipped weights for the {dataset} demo at the {scale} scale (shipped: "
            f"{'; '.join(shipped) or 'none'})",
            "add --train to train every generator stage first (see README for the time), or "
            "--weights DIR with weights trained at this scale",
        )
    return weights


def given_weights(folder: str | Path, scale: str, dataset: str) -> Weights:
    """Weights trained before, in ``folder`` as ``train_generators`` writes them:
    ``mask_diffusion/models/model.pt`` and ``image_synthesis/models/`` (``model.pt``, the
    sequence generator, and ``refiner_<view>.pt`` for each view of the scale's preset)."""
    folder = Path(folder).absolute()
    weights = Weights(
        folder / "mask_diffusion" / "models" / "model.pt",
        folder / "image_synthesis" / "models",
        f"given weights ({folder})",
    )
    missing = _missing(weights, scale, dataset)
    if missing:
        raise DataError(
            ", ".join(missing),
            "--weights: checkpoint not found",
            "pass a folder laid out as `medgen3d demo --train` writes OUT/models "
            f"(trained at the {scale} scale), or leave --weights out",
        )
    unfit = _unfit(weights, scale, dataset)
    if unfit:
        raise DataError(
            "--weights", unfit, f"pass weights trained at the {scale} scale for the {dataset}"
        )
    return weights


def train_generators(
    train_datalist: Path,
    dataset: str,
    models: Path,
    epochs: int | Mapping[str, int] | None = None,
    scale: str = BASE_SCALE,
) -> Weights:
    """Train MC-DPM, the sequence generator and the three refiners on ``train_datalist``.

    ``epochs``: one number for every stage, or per stage (``masks``, ``generator``,
    ``refiner``); ``None`` keeps the presets'. ``scale``: the presets every stage trains with.

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
        run_stage(TRAIN_STAGES, stage, scale, dataset, overrides)
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
    run: DemoRun,
    heldout: Path,
    synthetic: Path,
    weights: Weights,
    scale: str,
    dataset: str,
    seed: int,
) -> dict:
    """Masks against the held-out real masks, as written (after keep-largest) and as sampled
    (``raw``: the same volumes before keep-largest, written by the generation step); images
    made from the held-out real masks against their real images (paired); the synthetic pairs'
    images against the real ones. Everything on the model grid of ``scale``'s presets."""
    masks = bundle_config("mask_diffusion", scale, dataset)
    images = bundle_config("image_synthesis", scale, dataset)
    preprocessing = images.get_parsed_content("preprocessing")
    written = synthetic.parent / "masks" / "datalist.json"
    raw = synthetic.parent / "raw_masks" / "datalist.json"
    pixdim = masks.get_parsed_content("output_pixdim")
    mask_metrics, raw_metrics = (
        evaluate_against_real(datalist, heldout, preprocessing, pixdim, out_dir=folder)
        for datalist, folder in (
            (written, run.out / "evaluation" / "masks"),
            (raw, run.out / "evaluation" / "masks_raw"),
        )
    )
    real_grid = export_model_space(heldout, preprocessing, run.out / "real_model_space")
    from_real = bundle_config(
        "image_synthesis",
        scale,
        dataset,
        mask_datalist=str(real_grid),
        output_dir=str(run.out / "from_real_masks"),
        seed=seed,
        ckpt_dir=str(weights.image_models),
    ).get_parsed_content("synthesize")()
    value_range = images.get_parsed_content("value_range")
    encoder = real_encoder(real_grid, value_range, seed)  # one for both comparisons
    paired, unpaired = (
        evaluate_synthesis(
            made, real_grid, value_range, run.out / "evaluation" / name, seed, encoder
        )
        for made, name in ((from_real, "images_from_real_masks"), (synthetic, "synthetic_pairs"))
    )
    return {
        "masks": mask_metrics,
        "masks_raw": raw_metrics,
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
    seeds: int = 2,
    seg_regimes: str = "E2-1,E2-3",
    scale: str = BASE_SCALE,
    weights: str | Path | None = None,
) -> Path:
    """The whole demo; returns the path of ``OUT/report.md``.

    Args:
        dataset: ``thorax`` or ``brain`` (shipped weights where they ship for ``scale``, else
            ``train`` or ``weights``).
        train: first train every generator stage at ``scale`` on the cohort.
        cases, heldout: cohort size and the last cases kept out of generator training; the
            shipped weights were trained on the first 16 of 24 cases with seed 0.
        n: synthetic pairs to generate. sampler, steps: the mask sampler (default: the
            mask_diffusion config's).
        epochs: override the epochs of every generator training stage (default: preset's).
        seg_iterations: optimiser steps of each segmentation training (default: the
            seg_downstream ``scale`` preset's study budget, ``study_iterations``).
        seeds: segmentation trainings per regime (seeds seed, seed + 1, ...).
        seg_regimes: the regimes of the segmentation study, e.g. E2-1,E2-2,E2-3.
        scale: the presets of every stage (``standard``: 64^3, the base configs and the
            shipped thorax and brain weights; ``demo``: 32^3, shipped thorax weights;
            ``tiny``: tests), their grid, networks and budgets.
        weights: a folder of generator weights trained at ``scale`` before, laid out as
            ``train`` writes ``OUT/models`` (default: the shipped weights).
    """
    from common.seg.study import REPO_BUNDLE, study_settings
    from medgen3d.report import demo_figures, write_report

    if dataset not in DATASETS:
        raise DataError(dataset, "unknown demo dataset", f"use one of {', '.join(DATASETS)}")
    if train and weights:
        raise DataError(
            str(weights),
            "--weights and --train given together",
            "pass --train to train new weights into OUT/models, or --weights DIR to use "
            "weights trained before, not both",
        )
    out = Path(out)
    mask_config = bundle_config("mask_diffusion", scale, dataset)
    sampler = sampler or mask_config.get_parsed_content("sampler")
    steps = steps or mask_config.get_parsed_content("steps")
    seg_settings = study_settings(
        REPO_BUNDLE, scale, dataset, {}, {"max_iterations": seg_iterations}
    )
    seg_steps = seg_settings["max_iterations"]  # 0: epochs
    seg_budget = f"{seg_steps} steps" if seg_steps else "the preset's epochs"
    run = DemoRun(out, dataset, steps=8 if train else 7)
    if weights:
        weights = given_weights(weights, scale, dataset)
    elif not train:
        weights = shipped_weights(dataset, scale)
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
            f"training MC-DPM, sequence generator and 3 refiners ({scale} scale)",
            train_generators,
            train_json,
            dataset,
            out / "models",
            epochs,
            scale,
        )
    synthetic = run.step(
        f"generating {n} paired volumes ({sampler}-{steps} masks, refined images)",
        generate_pairs,
        n,
        out / "synthetic",
        seed=seed,
        sampler=sampler,
        steps=steps,
        scale=scale,
        dataset=dataset,
        mask_ckpt=weights.mask_ckpt,
        image_models=weights.image_models,
        raw_masks=out / "synthetic" / "raw_masks",
    )
    results = run.step(
        "evaluating masks and images against the held-out real cases",
        evaluate_generation,
        run,
        heldout_json,
        synthetic,
        weights,
        scale,
        dataset,
        seed,
    )
    seg = run.step(
        f"segmentation study: {seg_regimes}, {seg_budget} each, unet3d, {seeds} seeds",
        _seg_study,
        train_json,
        heldout_json,
        synthetic,
        out / "seg_study",
        dataset,
        {
            "scale": scale,
            "val_cases": seg_settings["val_cases"],
            "seed": seed,
            "seeds": seeds,
            "regimes": seg_regimes,
            "max_iterations": seg_iterations,
        },
    )
    results["agreement"] = run.step(
        f"mask-image agreement: the E2-1 segmenter (seed {seed}), synthetic vs held-out real",
        agreement,
        out / "seg_study" / "unet3d" / f"seed{seed}" / "E2-1" / "models" / "model.pt",
        synthetic,
        out / "seg_study" / "real_test.json",  # the study's test cases: unseen by the segmenter
        out / "agreement",
        scale,
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
            "scale": scale,
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
    ``options``: scale, val_cases (the preset's), seed, seeds, regimes, max_iterations (None:
    the scale preset's)."""
    from common.seg.study import seg_study

    n_real = len(read_datalist(train)["training"]) - options["val_cases"]
    n_synthetic = len(read_datalist(synthetic)["training"])
    iterations = options["max_iterations"]
    seg_study(
        str(train),
        str(synthetic),
        networks="unet3d",
        regimes=options["regimes"],
        out=str(out),
        scale=options["scale"],
        dataset=dataset,
        test=str(heldout),
        seeds=options["seeds"],
        synthetic_ratio=n_synthetic / max(1, n_real),  # every synthetic pair
        seed=options["seed"],
        max_iterations=iterations,
        overrides={"val_interval": _val_interval(iterations)} if iterations else None,
    )
    return (out / "results.md").read_text()
