"""``medgen3d``: the command line (python-fire). ``medgen3d --help`` lists the commands."""

from __future__ import annotations

import sys
import time

import fire

from common.errors import DataError


def demo_data(
    dataset: str = "thorax",
    cases: int = 12,
    seed: int = 0,
    out: str | None = None,
    convention: str = "segthor",
) -> str:
    """Make a demo cohort (NIfTI pairs + datalist.json) that needs no download.

    Args:
        dataset: ``thorax`` (CT phantoms) or ``brain`` (MRI built from the MNI152 template).
        cases: number of cases.
        seed: cohort seed; case k depends only on (seed, k).
        out: output folder (default ``data/<dataset>_demo``).
        convention: thorax labels, ``segthor`` (4 organs) or ``structseg`` (6 organs).
    Returns the path of the datalist.
    """
    out = out or f"data/{dataset}_demo"
    if dataset == "thorax":
        from common.demo_data.thorax import make_thorax_cohort

        path = make_thorax_cohort(out, cases, seed=seed, convention=convention)
    elif dataset == "brain":
        from common.demo_data.brain import make_brain_cohort

        path = make_brain_cohort(out, cases, seed=seed)
    else:
        raise DataError(dataset, "unknown demo dataset", "use --dataset thorax or --dataset brain")
    return str(path)


def import_dataset(
    layout: str, src: str, out: str, label_set: str | None = None, modality: str | None = None
) -> str:
    """Write a datalist.json for a dataset on disk; source files are never changed.

    Args:
        layout: ``segthor``, ``structseg``, ``freesurfer`` or ``folders`` (imagesTr/ + labelsTr/).
        src: the dataset's root folder.
        out: path of the datalist to write (e.g. DIR/datalist.json).
        label_set: a built-in label set name or a YAML file (required for ``folders``).
        modality: ``CT`` or ``MRI`` (default from the layout).
    Returns the path of the datalist.
    """
    from common.importers import import_dataset as run_import

    return str(run_import(layout, src, out, label_set=label_set, modality=modality))


def validate(datalist: str, affine_tol: float = 1e-3) -> str:
    """Check every image/label pair of a datalist before training; changes no file.

    Reports every bad case (file, problem, what to do) and exits with status 1 if any.

    Args:
        datalist: path of datalist.json.
        affine_tol: largest allowed difference between image and label affines.
    """
    from common.validate import count_cases, format_report, validate_datalist

    problems = validate_datalist(datalist, affine_tol=affine_tol)
    n_cases = count_cases(datalist)
    report = format_report(problems, n_cases)
    if problems:
        print(report, file=sys.stderr)
        raise SystemExit(1)
    return report


def preview(datalist: str, out: str, cases: int = 3) -> str:
    """Write a PNG montage of the first cases with their masks overlaid.

    Args:
        datalist: path of datalist.json.
        out: PNG path to write.
        cases: how many cases (rows).
    """
    from common.preview import preview_datalist

    return str(preview_datalist(datalist, out, cases=cases))


def seg_study(
    real: str,
    synthetic: str | None = None,
    networks: str = "unet3d",
    regimes: str = "E2-1,E2-2,E2-3,E2-4,E2-5",
    out: str = "outputs/seg_study",
    preset: str = "demo",
    **options,
) -> str:
    """Does synthetic data help segmentation? Train and test networks on real, synthetic and
    mixed data (MedGen3D E2-1..E2-5, E3 transfer) and write results.md/csv/json to OUT.

    Args:
        real: datalist of real cases (split, seeded, into train / validation / held-out test).
        synthetic: datalist of synthetic pairs (e.g. from `medgen3d generate`).
        networks: comma-separated: unet2d, unet3d, unetr, swinunetr.
        regimes: comma-separated: E2-1 real, E2-2 synthetic, E2-3 real+synthetic,
            E2-4 synthetic then real, E2-5 real+synthetic then real, E3 transfer.
        out: output folder; finished stages are kept on a rerun.
        preset: the seg_downstream bundle preset (demo or paper).
        options: test_cases, val_cases, synthetic_ratio, transfer, transfer_cases, seed,
            max_epochs, finetune_epochs (default: the preset's values).
    Returns the markdown tables.
    """
    from common.seg_study import seg_study as run_study

    return run_study(real, synthetic, networks, regimes, out, preset, **options)


def generate(
    n: int = 8,
    out: str = "outputs/generated",
    seed: int = 0,
    sampler: str = "ddim",
    steps: int = 20,
    refine: bool = True,
    preset: str = "demo",
) -> str:
    """Paired synthetic volumes (mask + image NIfTI and a datalist) from the trained bundles.

    Uses the shipped demo weights unless the bundles' models/ hold others. A rerun keeps
    finished cases; each case records its seed so it can be remade exactly.

    Args:
        n: number of paired volumes.
        out: output folder: masks/, images/, images_sequence/ and datalist.json.
        seed: run seed; case k depends only on (seed, k).
        sampler: mask sampler, ddim or ddpm (the shipped model is DDPM-trained).
        steps: mask sampling steps (ddpm: up to 1000).
        refine: run the three-view diffusion refiner (--norefine: sequence generator only).
        preset: bundle preset the weights were trained with (demo or paper).
    Returns the path of the paired datalist.
    """
    from common.pipeline import generate_pairs

    start = time.time()
    path = generate_pairs(
        n, out, seed=seed, sampler=sampler, steps=steps, refine=refine, preset=preset
    )
    return f"{path}\ntook {time.time() - start:.0f} s"


def demo(
    dataset: str = "thorax",
    out: str = "outputs/demo",
    train: bool = False,
    n: int = 8,
    seed: int = 0,
    **options,
) -> str:
    """The main job: demo cohort -> paired generation -> evaluation -> segmentation study ->
    OUT/report.md with tables, timings and figures.

    Args:
        dataset: ``thorax`` (shipped weights, minutes) or ``brain`` (needs --train).
        out: output folder; a rerun keeps finished volumes and study stages.
        train: first retrain every generator stage with the demo preset (about 80 min on
            2 CPU cores for the thorax).
        n: synthetic pairs to generate.
        seed: cohort and generation seed.
        options: cases, heldout, sampler, steps, epochs (generator training), seg_epochs.
    Returns the path of the report.
    """
    from common.demo import run_demo

    start = time.time()
    report = run_demo(dataset, out, train=train, n=n, seed=seed, **options)
    return f"report: {report}\ntook {time.time() - start:.0f} s"


def train(stage: str, preset: str = "demo", out: str | None = None, **overrides) -> str:
    """Train one stage with its bundle's own config (the command is printed first).

    Args:
        stage: masks (mask_diffusion), generator / refiner (image_synthesis; refiner takes
            --view axial|coronal|sagittal) or seg (seg_downstream).
        preset: demo, demo_brain, paper or a YAML file merged over the train config.
        out: checkpoints go to OUT/models, logs to OUT/runs (default outputs/train/STAGE).
        overrides: any config key, e.g. --dataset_dir data/x --datalist data/x/train.json
            --max_epochs 10.
    """
    from common.bundles import TRAIN_STAGES, run_stage, train_overrides

    return run_stage(TRAIN_STAGES, stage, preset, train_overrides(stage, out, overrides))


def evaluate(stage: str, preset: str = "demo", **overrides) -> str:
    """Run one bundle's evaluation config (the command is printed first).

    Args:
        stage: masks (--generated_datalist G --datalist REAL), images (--mask_datalist M;
            after `export_real`) or seg (--ckpt_path C --datalist D with a test section).
        preset: demo, demo_brain, paper or a YAML file.
        overrides: any config key of that bundle.
    """
    from common.bundles import EVALUATE_STAGES, run_stage

    return run_stage(EVALUATE_STAGES, stage, preset, overrides)


def export(bundle: str, out: str = "outputs/export") -> str:
    """Write OUT/BUNDLE/ and OUT/BUNDLE.zip: a self-contained bundle (configs, models, docs,
    LICENSE, a copy of common/) that runs with `python -m monai.bundle run` anywhere.

    Args:
        bundle: mask_diffusion, image_synthesis or seg_downstream.
        out: output folder.
    """
    from common.bundles import export_bundle

    folder, archive = export_bundle(bundle, out)
    return f"{folder}\n{archive}"


COMMANDS = {
    "demo": demo,
    "demo-data": demo_data,
    "import-dataset": import_dataset,
    "validate": validate,
    "preview": preview,
    "seg-study": seg_study,
    "generate": generate,
    "train": train,
    "evaluate": evaluate,
    "export": export,
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``medgen3d`` console command."""
    try:
        fire.Fire(COMMANDS, command=argv, name="medgen3d")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
