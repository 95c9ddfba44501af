"""``medgen3d``: the command line (python-fire). ``medgen3d --help`` lists the commands."""

from __future__ import annotations

import inspect
import sys
import time

import fire

from common.core.bundle_configs import BASE_SCALE
from common.core.errors import DataError, find_data_error


def demo_data(
    dataset: str = "thorax",
    cases: int = 12,
    seed: int = 0,
    out: str | None = None,
    convention: str = "segthor",
    heldout: int = 0,
) -> str:
    """Make a demo cohort (NIfTI pairs + datalist.json) that needs no download.

    Args:
        dataset: ``thorax`` (CT phantoms) or ``brain`` (MRI built from the MNI152 template).
        cases: number of cases.
        seed: cohort seed; case k depends only on (seed, k).
        out: output folder (default ``data/<dataset>_demo``).
        convention: thorax labels, ``segthor`` (4 organs) or ``structseg`` (6 organs).
        heldout: also write train.json (the first cases - heldout cases) and heldout.json
            (the last heldout); the shipped weights learned from train.json of 24 / 8.
    Returns the path of the datalist.
    """
    from common.data.splits import split_datalist
    from medgen3d.demo_data import make_demo_cohort

    datalist = make_demo_cohort(dataset, out or f"data/{dataset}_demo", cases, seed, convention)
    if heldout:
        parts = (datalist.parent / "train.json", datalist.parent / "heldout.json")
        split_datalist(datalist, cases - heldout, *parts)
    return str(datalist)


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
    from common.data.importers import import_dataset as run_import

    return str(run_import(layout, src, out, label_set=label_set, modality=modality))


def validate(datalist: str, affine_tol: float = 1e-3) -> str:
    """Check every image/label pair of a datalist before training; changes no file.

    Reports every bad case (file, problem, what to do) and exits with status 1 if any.

    Args:
        datalist: path of datalist.json.
        affine_tol: largest allowed difference between image and label affines.
    """
    from common.data.validate import count_cases, format_report, validate_datalist

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
    from medgen3d.preview import preview_datalist

    return str(preview_datalist(datalist, out, cases=cases))


def seg_study(
    real: str,
    synthetic: str | None = None,
    networks: str = "unet3d",
    regimes: str = "E2-1,E2-2,E2-3,E2-4,E2-5",
    out: str = "outputs/seg_study",
    scale: str = BASE_SCALE,
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
        scale: the seg_downstream scale preset (tiny, demo, standard, paper) or a YAML file.
        options: dataset (thorax or brain, for its field of view), test (a datalist of
            held-out test cases, none of them in REAL; test_cases split off REAL when not
            given), seeds (training repeats, for mean ± sd and 95% bootstrap intervals of the
            differences to E2-1), val_cases, synthetic_ratio, transfer, transfer_cases, seed,
            max_iterations, finetune_iterations (optimiser steps of a training / fine-tuning
            stage, equal for every regime), max_epochs, finetune_epochs (used when
            max_iterations is 0), lr, finetune_lr (the presets' values when not given); other
            bundle config keys go in --overrides, a dict of config keys and values.
    Returns the markdown tables.
    """
    from common.seg.study import seg_study as run_study

    given = ("real", "synthetic", "networks", "regimes", "out", "scale")
    known = [k for k in inspect.signature(run_study).parameters if k not in given]
    for key in options:
        if key not in known:
            raise DataError(
                f"--{key}",
                "is not an option of seg-study",
                f"use {', '.join('--' + k for k in known)}; a bundle config key goes in "
                f"--overrides, e.g. --overrides \"{{'{key}': VALUE}}\"",
            )
    return run_study(real, synthetic, networks, regimes, out, scale=scale, **options)


def generate(
    n: int = 8,
    out: str = "outputs/generated",
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    refine: bool = True,
    scale: str | None = None,
    dataset: str | None = None,
    depth: int | None = None,
    extent_mm: float | None = None,
    qc: bool = False,
    real: str | None = None,
    qc_retries: int = 3,
) -> str:
    """Paired synthetic volumes (mask + image NIfTI and a datalist) from the trained bundles.

    Uses the shipped weights of the scale and dataset (standard thorax: the bundles' models/).
    A rerun keeps finished cases; each case records its seed so it can be remade exactly.

    Args:
        n: number of paired volumes.
        out: output folder: masks/, images/, images_sequence/ and datalist.json.
        seed: run seed; case k depends only on (seed, k).
        sampler: the mask sampler, rflow for a flow-trained MC-DPM (the standard weights),
            ddim or ddpm for a noise-trained one (the demo weights); the bundle config's when
            not given. A sampler of the other objective is refused.
        steps: mask sampling steps, 1 to 1000 with any sampler (DDPM/DDIM respaced to them),
            the bundle config's when not given.
        refine: run the three-view diffusion refiner (--norefine: sequence generator only).
        scale: the scale preset of weights trained with others than the shipped ones, e.g.
            --scale paper (the base configs and the shipped weights when not given).
        dataset: the dataset preset, e.g. --dataset brain (the base configs' when not given).
        depth: axial slices per volume, any number >= 1 (the model grid's depth when not
            given), grown at the grid's depth and resampled along z, so each organ keeps its share
            of the length; the z spacing stays the grid's, so the volume is longer in mm.
        extent_mm: the axial length in mm instead (depth = extent_mm / z spacing, rounded).
        qc: quality gate: check every pair against per-label intensity ranges learned from
            the real cases of --real, regenerate a failing pair with a new seed, up to
            --qc_retries times; OUT/qc.json lists every check and retry, a pair that still
            fails stays, marked failed (common/images/qc.py says how the ranges are learned).
        real: datalist of real cases for --qc (e.g. the generators' training cases).
        qc_retries: rounds of regeneration for --qc.
    Returns the path of the paired datalist.
    """
    from medgen3d.pairs import check_pairs, generate_pairs

    if qc != (real is not None):
        raise DataError("--qc/--real", "go together", "pass --qc --real REAL_DATALIST")
    start = time.time()
    ranges = None
    if qc:  # first, so that a bad --real stops before any generation
        from common.images.qc import learn_ranges

        ranges = learn_ranges(real)
    options = dict(
        sampler=sampler,
        steps=steps,
        refine=refine,
        scale=scale,
        dataset=dataset,
        depth=depth,
        extent_mm=extent_mm,
    )
    path = generate_pairs(n, out, seed, **options)
    if qc:
        check_pairs(path, ranges, qc_retries, seed, **options)
    return f"{path}\ntook {time.time() - start:.0f} s"


def demo(
    dataset: str = "thorax",
    out: str = "outputs/demo",
    train: bool = False,
    n: int = 8,
    seed: int = 0,
    scale: str | None = None,
    weights: str | None = None,
    cases: int | None = None,
    heldout: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    epochs: int | None = None,
    seg_iterations: int | None = None,
    seeds: int | None = None,
    seg_regimes: str | None = None,
) -> str:
    """The main job: demo cohort -> paired generation -> evaluation -> segmentation study ->
    OUT/report.md with tables, timings and figures.

    Args:
        dataset: thorax or brain (shipped standard weights, minutes; the brain at --scale demo
            needs --train or --weights).
        out: output folder; a rerun keeps finished volumes and study stages.
        train: first retrain every generator stage at the scale (hours on 2 CPU cores at the
            standard scale, see models/PROVENANCE.md; about 80 min for the thorax at the demo
            scale).
        n: synthetic pairs to generate.
        seed: cohort and generation seed.
        scale: every stage's presets, standard (the default, 64^3), demo (32^3) or tiny.
        weights: a folder of generator weights trained at that scale, laid out as --train
            writes OUT/models (default is the shipped weights).
        cases: cohort size (24 when not given).
        heldout: the last cases kept out of generator training (8 when not given).
        sampler: the mask sampler (the mask_diffusion config's when not given).
        steps: the mask sampling steps (the config's when not given).
        epochs: epochs of every generator training stage (the presets' when not given).
        seg_iterations: optimiser steps of each segmentation training (the scale preset's
            study budget when not given).
        seeds: segmentation trainings per regime (2 when not given).
        seg_regimes: the regimes of the segmentation study (E2-1,E2-3 when not given).
    Returns the path of the report.
    """
    from medgen3d.demo import run_demo

    given = dict(
        scale=scale,
        weights=weights,
        cases=cases,
        heldout=heldout,
        sampler=sampler,
        steps=steps,
        epochs=epochs,
        seg_iterations=seg_iterations,
        seeds=seeds,
        seg_regimes=seg_regimes,
    )
    start = time.time()
    options = {k: v for k, v in given.items() if v is not None}
    report = run_demo(dataset, out, train=train, n=n, seed=seed, **options)
    return f"report: {report}\ntook {time.time() - start:.0f} s"


def train(
    stage: str,
    scale: str = BASE_SCALE,
    dataset: str = "thorax",
    out: str | None = None,
    **overrides,
) -> str:
    """Train one stage with its bundle's own config (the command is printed first).

    Args:
        stage: masks (mask_diffusion), generator / refiner (image_synthesis; refiner takes
            --view axial|coronal|sagittal) or seg (seg_downstream).
        scale: tiny, demo, standard, paper or a YAML file merged over the train config.
        dataset: thorax, brain or a YAML file, merged after the scale.
        out: checkpoints go to OUT/models, logs to OUT/runs (default outputs/train/STAGE).
        overrides: any config key, e.g. --dataset_dir data/x --datalist data/x/train.json
            --max_epochs 10.
    """
    from medgen3d.bundles import TRAIN_STAGES, run_stage, train_overrides

    overrides = train_overrides(stage, out, overrides)
    return run_stage(TRAIN_STAGES, stage, scale, dataset, overrides)


def evaluate(stage: str, scale: str = BASE_SCALE, dataset: str = "thorax", **overrides) -> str:
    """Run one bundle's evaluation config (the command is printed first).

    Args:
        stage: masks (--generated_datalist G --datalist REAL), images (--mask_datalist M;
            after `export_real`) or seg (--ckpt_path C --datalist D with a test section;
            --synthetic_datalist S refuses test cases that S's generators saw in training,
            --allow_overlap True goes on knowingly).
        scale: tiny, demo, standard, paper or a YAML file; dataset: thorax, brain or a YAML file.
        overrides: any config key of that bundle.
    """
    from medgen3d.bundles import EVALUATE_STAGES, run_stage

    return run_stage(EVALUATE_STAGES, stage, scale, dataset, overrides)


def agreement(
    segmenter: str,
    synthetic: str,
    real: str,
    out: str = "outputs/agreement",
    scale: str = BASE_SCALE,
    dataset: str | None = None,
    network: str | None = None,
) -> str:
    """Mask-image agreement: a segmenter trained on real cases segments the synthetic images;
    per label its Dice to the generated masks next to its Dice on held-out real cases, the
    ratio, and the median intensity inside each label, synthetic vs real (HU for CT).
    Writes OUT/agreement.json and OUT/agreement.md.

    Args:
        segmenter: a seg_downstream checkpoint trained on real cases (e.g. a seg-study's
            unet3d/seed0/E2-1/models/model.pt).
        synthetic: datalist of synthetic pairs (from `medgen3d generate`).
        real: datalist of held-out real cases that neither the segmenter nor the generators saw.
        out: output folder.
        scale: the seg_downstream scale preset the segmenter was trained with (standard).
        dataset: its dataset preset (the base configs' field of view when not given).
        network: its network (the config's when not given).
    Returns the table (markdown).
    """
    from common.seg.agreement import agreement as measure_agreement
    from common.seg.agreement import markdown_table

    result = measure_agreement(segmenter, synthetic, real, out, scale, dataset, network)
    return f"{markdown_table(result)}\nwritten: {out}/agreement.md"


def export(bundle: str, out: str = "outputs/export") -> str:
    """Write OUT/BUNDLE/ and OUT/BUNDLE.zip: a self-contained bundle (configs, models, docs,
    LICENSE, a copy of common/) that runs with `python -m monai.bundle run` anywhere.

    Args:
        bundle: mask_diffusion, image_synthesis or seg_downstream.
        out: output folder.
    """
    from medgen3d.export import export_bundle

    folder, archive = export_bundle(bundle, out)
    return f"{folder}\n{archive}"


def store_half(src: str, dst: str | None = None, dtype: str = "float16") -> str:
    """Rewrite checkpoint SRC with its floating-point tensors stored in float16 (half the size);
    networks still load it as float32. Refuses a tensor that float16 cannot hold.

    Args:
        src: final weights (.pt): a state dict or a nested one ({"model": ...}); not a
            resume checkpoint (its optimiser state needs float32).
        dst: where to write (default: SRC itself, replaced atomically).
        dtype: float16, or bfloat16 (float32's range, less precision).
    """
    from common.core.storage import store_half as store

    s = store(src, dst, dtype)
    return (
        f"{s['dst']}: {dtype}, {s['bytes_before'] / 1e6:.3f} MB -> {s['bytes_after'] / 1e6:.3f}"
        f" MB ({s['bytes_after'] / s['bytes_before']:.0%}), {s['tensors']} tensors converted\n"
        f"largest change {s['max_abs_change']:.2g} absolute, {s['max_rel_change']:.2g} of its "
        f"tensor's largest value ({s['worst'] or 'none'})"
    )


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
    "agreement": agreement,
    "export": export,
    "store-half": store_half,
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``medgen3d`` console command."""
    try:
        fire.Fire(COMMANDS, command=argv, name="medgen3d")
    except Exception as e:  # a DataError, also under a bundle config's evaluation error
        data_error = find_data_error(e)
        if data_error is None:
            raise
        print(f"error: {data_error}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
