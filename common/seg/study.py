"""The downstream segmentation study (MedGen3D, Table 2): does synthetic data help a network?

``seg_study`` trains every network under every regime (``common.seg.regimes``), with each of
``seeds`` training seeds, and tests each final model on held-out cases. Every stage and every
evaluation is a run of the seg_downstream bundle's own configs (``monai.bundle.run``) with the
chosen scale and dataset presets and per-run overrides, so the bundle stays the source of
truth. Stages train for a number of optimiser steps (``max_iterations``,
``finetune_iterations``), the same for every regime whatever its cases; the tables show each
regime's steps and a control (E2-1 as long as the longest regime). Stages shared by regimes
(E2-4 starts from E2-2's model) are trained once per network and seed, and a rerun keeps every
stage that finished with the same cases, settings and configs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.core.bundle_configs import BASE_SCALE, bundle_parser, config_files
from common.core.errors import DataError
from common.core.io import read_json, write_json
from common.core.provenance import require_unseen
from common.seg.cases import write_cases
from common.seg.metrics import write_results
from common.seg.networks import NETWORKS
from common.seg.regimes import (
    E2_REGIMES,
    Stage,
    assemble,
    plan_stages,
    regime_dataset,
    regime_stages,
    stage_cases,
    stage_iterations,
    with_control,
)

REPO_BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "seg_downstream"
# the study's settings: the presets' values unless seg_study is given others
STUDY_KEYS = (
    "test_cases",
    "val_cases",
    "synthetic_ratio",
    "transfer_cases",
    "seed",
    "max_iterations",
    "finetune_iterations",
    "max_epochs",
    "finetune_epochs",
    "lr",
    "finetune_lr",
)


@dataclass
class _Study:
    """What every run of a study shares: bundle, presets, settings and the case pools."""

    bundle: Path
    scale: str
    dataset: str | None
    settings: dict
    overrides: dict
    regimes: list[str]  # the control included
    datasets: dict[str, dict]  # real / transfer: cases, label_set, modality
    splits: dict[str, dict[str, list[dict]]]  # real / transfer: train, val, test
    pools: dict[str, list[dict]]  # real / synthetic / transfer: training cases
    test_datalists: dict[str, Path] = field(default_factory=dict)
    # per (network, seed, stage): the stage's record and the optimiser steps it ran
    records: dict[tuple[str, int, str], dict] = field(default_factory=dict)
    steps: dict[tuple[str, int, str], int] = field(default_factory=dict)

    def configs(self, *stage_files: str) -> list[Path]:
        """The bundle's stage files, then the scale and the dataset preset."""
        return config_files(self.bundle, stage_files, self.scale, self.dataset)

    def run(self, run_id: str, configs: list[Path], overrides: dict) -> None:
        """``monai.bundle.run`` of ``run_id`` in this process, user overrides under ours."""
        from monai.bundle import run

        run(
            run_id,
            config_file=[str(c) for c in configs],
            meta_file=str(self.bundle / "configs" / "metadata.json"),
            logging_file=str(self.bundle / "configs" / "logging.conf"),
            **{**self.overrides, **overrides},
        )

    def dataset_overrides(self, dataset: str) -> dict:
        """``num_classes`` and ``modality`` of a dataset's datalist."""
        ds = self.datasets[dataset]
        return {"num_classes": ds["label_set"].num_classes, "modality": ds["modality"]}


def _names(value: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``."""
    items = value.split(",") if isinstance(value, str) else value
    return [str(v).strip() for v in items if str(v).strip()]


def study_settings(
    bundle: Path, scale: str, dataset: str | None, overrides: Mapping, given: Mapping
) -> dict:
    """``STUDY_KEYS`` values: ``given`` (where not None) over ``overrides`` over the configs
    (train.yaml, then the presets). A training stage's steps are ``study_iterations`` where
    the configs set it (and ``overrides`` do not set ``max_iterations``), else
    ``max_iterations``, a single training's."""
    parser = bundle_parser(bundle, ["train.yaml"], scale, dataset, overrides)
    configured = {k: parser.get_parsed_content(k) for k in STUDY_KEYS}
    study_steps = parser.get("study_iterations")
    if study_steps is not None and "max_iterations" not in overrides:
        configured["max_iterations"] = int(study_steps)
    return {k: given[k] if given.get(k) is not None else configured[k] for k in STUDY_KEYS}


def _budget(study: _Study, stage: Stage) -> dict:
    """The overrides that set how long ``stage`` trains: its optimiser steps, or its epochs
    when the study counts epochs (``max_iterations`` null)."""
    steps = stage_iterations(stage, study.settings, study.regimes)
    if steps is not None:
        return {"max_iterations": steps}
    epochs = study.settings["finetune_epochs" if stage.finetune else "max_epochs"]
    return {"max_iterations": 0, "max_epochs": epochs}


def _steps_run(stage_dir: Path) -> int:
    """The optimiser steps a finished training ran (its resume checkpoint's engine state)."""
    import torch

    state = torch.load(stage_dir / "models" / "resume.pt", map_location="cpu", weights_only=True)
    return int(state["engine"]["iteration"])


def _train_stage(study: _Study, stage: Stage, network: str, seed: int, root: Path) -> None:
    """Train one stage in ``root/<network>/seed<seed>/<stage>`` unless an identical run
    finished there; its record (cases, settings, starting point) and the steps it ran go to
    stage.json and ``study.records`` / ``study.steps``."""
    stage_dir = root / network / f"seed{seed}" / stage.name
    configs = study.configs("train.yaml")
    cases = stage_cases(stage, study.pools)
    val = study.splits[stage.dataset]["val"]
    budget = _budget(study, stage)
    lr = study.settings["finetune_lr" if stage.finetune else "lr"]
    key = (network, seed, stage.name)
    record = {
        "network": network,
        "seed": seed,
        "train": [c["image"] for c in cases],
        "val": [c["image"] for c in val],
        "budget": budget,
        "lr": lr,
        "init": study.records[(network, seed, stage.init)] if stage.init else None,
        "overrides": json.loads(json.dumps(study.overrides, default=str)),
        "configs": hashlib.sha256(b"".join(c.read_bytes() for c in configs)).hexdigest(),
    }
    study.records[key] = record
    model, done = stage_dir / "models" / "model.pt", stage_dir / "stage.json"
    finished = read_json(done) if model.exists() and done.exists() else {}
    if {k: v for k, v in finished.items() if k != "steps"} == record:
        study.steps[key] = finished["steps"]
        print(f"  {network} seed {seed} {stage.name}: finished before, kept")
        return
    done.unlink(missing_ok=True)
    started = stage_dir / "started.json"  # a killed run of this record resumes; others restart
    if not (started.exists() and read_json(started) == record):
        model.unlink(missing_ok=True)
        (stage_dir / "models" / "resume.pt").unlink(missing_ok=True)
    write_json(record, started)
    sections = {"training": cases, "validation": val}
    datalist = write_cases(stage_dir / "datalist.json", study.datasets[stage.dataset], sections)
    init = stage_dir.parent / str(stage.init) / "models" / "model.pt" if stage.init else ""
    start = time.time()
    study.run(
        "training",
        configs,
        {
            "bundle_root": str(stage_dir),
            "ckpt_dir": str(stage_dir / "models"),
            "output_dir": str(stage_dir / "runs"),
            "datalist": str(datalist),
            "network_name": network,
            **study.dataset_overrides(stage.dataset),
            **budget,
            "lr": lr,
            "init_ckpt": str(init),
            "seed": seed,
            "validate_data": False,
        },
    )
    if not model.exists():
        fix = "validate at least once: set val_interval <= the stage's optimiser steps"
        raise DataError(str(stage_dir), "training saved no models/model.pt", fix)
    study.steps[key] = _steps_run(stage_dir)
    write_json({**record, "steps": study.steps[key]}, done)
    print(
        f"  {network} seed {seed} {stage.name}: {len(cases)} cases, {study.steps[key]} steps, "
        f"{time.time() - start:.0f} s"
    )


def _evaluate(study: _Study, regime: str, network: str, seed: int, root: Path) -> dict:
    """Test the regime's model on its dataset's held-out cases: the evaluation's summary
    with the per-case values, its seed and the steps of each of its stages."""
    stage_dir = root / network / f"seed{seed}" / regime
    dataset = regime_dataset(regime)
    study.run(
        "evaluating",
        study.configs("train.yaml", "evaluate.yaml"),
        {
            "bundle_root": str(stage_dir),
            "ckpt_dir": str(stage_dir / "models"),
            "datalist": str(study.test_datalists[dataset]),
            "network_name": network,
            **study.dataset_overrides(dataset),
        },
    )
    steps = [study.steps[(network, seed, s.name)] for s in regime_stages(regime)]
    summary = read_json(stage_dir / "eval" / "metrics.json")
    return {"regime": regime, "network": network, "seed": seed, "steps": steps, **summary}


def seg_study(
    real: str,
    synthetic: str | None = None,
    networks: str | Sequence[str] = "unet3d",
    regimes: str | Sequence[str] = ",".join(E2_REGIMES),
    out: str = "outputs/seg_study",
    scale: str = BASE_SCALE,
    dataset: str | None = None,
    test: str | None = None,
    seeds: int = 1,
    test_cases: int | None = None,
    val_cases: int | None = None,
    synthetic_ratio: float | None = None,
    transfer: str | None = None,
    transfer_cases: int | None = None,
    seed: int | None = None,
    max_iterations: int | None = None,
    finetune_iterations: int | None = None,
    max_epochs: int | None = None,
    finetune_epochs: int | None = None,
    lr: float | None = None,
    finetune_lr: float | None = None,
    overrides: Mapping | None = None,
    bundle: str | None = None,
    allow_overlap: bool = False,
) -> str:
    """Train and test segmentation networks on real, synthetic and mixed data (MedGen3D E2/E3).

    Tests on the ``test`` datalist's cases, or splits the real datalist (seeded) into held-out
    test, validation and training cases; trains every network under every regime with the
    seg_downstream bundle, each with ``seeds`` training seeds, for the same number of
    optimiser steps per stage; tests each final model on the held-out real cases (Dice,
    HD95). With E2-1 and a longer regime (E2-4, E2-5: pre-training + fine-tuning) it adds the
    control E2-1-control: E2-1 trained as many steps as the longest regime. Writes
    OUT/results.md (rows = regimes, columns = networks: mean ± sd over seeds; per network
    each regime's steps, Dice per label, and its difference to E2-1 with a 95% bootstrap
    interval over test cases and seeds), results.csv/.json, statistics.json, splits.json and a
    folder per network, seed and stage (datalist, models/model.pt, TensorBoard runs/, eval/).
    A rerun keeps the stages that finished with the same cases and settings.

    Args:
        real: datalist.json of the real cases (training pool; held-out test cases too unless
            ``test`` is given).
        synthetic: datalist.json of synthetic pairs (from the generator bundles), same labels.
        networks: comma-separated: unet2d, unet3d, unetr, swinunetr.
        regimes: comma-separated: E2-1..E2-5, E3-scratch, E3-E2-1..E3-E2-5 (transfer).
        out: output folder.
        scale: the bundle's scale preset: standard (the base, 64^3), tiny (tests), demo (CPU,
            32^3, minutes), paper (GPU) or the path of a YAML file.
        dataset: the bundle's dataset preset (thorax, brain or a YAML file), merged after the
            scale for its geometry (field_of_view); None keeps the base configs' (thorax).
            num_classes and modality always come from each run's datalist.
        test: datalist.json of the real test cases (none of them may be a case of ``real``);
            then every real case trains or validates. Default: split off test_cases.
        seeds: training repeats: seeds seed, seed + 1, ... (the split and the synthetic draw
            keep ``seed``).
        test_cases: held-out real test cases without ``test`` (default: the presets').
        val_cases: real validation cases that pick the best checkpoint (presets').
        synthetic_ratio: synthetic cases per real training case (presets').
        transfer: datalist.json of another dataset, for the E3 regimes.
        transfer_cases: training cases taken from the transfer dataset (presets').
        seed: seed of the split, the synthetic draw and the first training (presets').
        max_iterations: optimiser steps of a training stage (presets': study_iterations, else
            max_iterations); a multiple of
            val_interval (steps between validations); 0 counts epochs instead
            (max_epochs, finetune_epochs).
        finetune_iterations: optimiser steps of a fine-tuning stage (presets').
        max_epochs, finetune_epochs: epochs of a training / fine-tuning stage when
            max_iterations is 0 (presets').
        lr, finetune_lr: learning rate of a training / fine-tuning stage (presets').
        overrides: further bundle config overrides for every run, e.g. "{'batch_size': 4}".
        bundle: the seg_downstream bundle folder (default: this repository's).
        allow_overlap: test even on cases a generator of ``synthetic`` saw in training
            (refused otherwise, ``common.core.provenance``); OUT/leakage.json records it.
    Returns the results tables (markdown).
    """
    start = time.time()
    networks, regimes = _names(networks), _names(regimes)
    unknown = sorted(set(networks) - set(NETWORKS))
    if unknown or not networks:
        raise DataError("--networks", f"unknown or no networks {unknown}", f"use {NETWORKS}")
    if int(seeds) < 1:
        raise DataError("--seeds", f"is {seeds}", "train each regime with >= 1 seed")
    bundle_dir = Path(bundle) if bundle else REPO_BUNDLE
    overrides = dict(overrides or {})
    given = {
        "test_cases": test_cases,
        "val_cases": val_cases,
        "synthetic_ratio": synthetic_ratio,
        "transfer_cases": transfer_cases,
        "seed": seed,
        "max_iterations": max_iterations,
        "finetune_iterations": finetune_iterations,
        "max_epochs": max_epochs,
        "finetune_epochs": finetune_epochs,
        "lr": lr,
        "finetune_lr": finetune_lr,
    }
    settings = study_settings(bundle_dir, scale, dataset, overrides, given)
    regimes = with_control(regimes, settings)
    plan = plan_stages(regimes)
    study = _Study(
        bundle_dir,
        scale,
        dataset,
        settings,
        overrides,
        regimes,
        *assemble(plan, real, synthetic, transfer, settings, test),
    )
    root = Path(out)
    syn, held_out = synthetic if "synthetic" in study.pools else "", study.splits["real"]["test"]
    require_unseen(syn, held_out, allow_overlap, test or real, root / "leakage.json")
    images = {
        f"{d}_{k}": [c["image"] for c in v] for d, s in study.splits.items() for k, v in s.items()
    }
    pools = {f"{p}_pool": [c["image"] for c in v] for p, v in study.pools.items()}
    write_json({"settings": settings, **images, **pools}, root / "splits.json")
    for d, split in study.splits.items():
        held = {"test": split["test"]}
        study.test_datalists[d] = write_cases(root / f"{d}_test.json", study.datasets[d], held)
    repeats = [settings["seed"] + k for k in range(int(seeds))]
    runs = []
    for network in networks:
        for run_seed in repeats:
            for i, stage in enumerate(plan, 1):
                source = f", from {stage.init}" if stage.init else ""
                pools = " + ".join(stage.pools)
                print(f"[{network} seed {run_seed} {i}/{len(plan)}] {stage.name}: {pools}{source}")
                _train_stage(study, stage, network, run_seed, root)
            runs += [_evaluate(study, g, network, run_seed, root) for g in regimes]
    compared = [g for g in regimes if g != "E2-1" and regime_dataset(g) == "real"]
    compared = compared if "E2-1" in regimes else []
    table = write_results(runs, regimes, networks, root, compared, "E2-1", settings["seed"])
    return f"{table}\nresults: {root / 'results.md'}\ntook {time.time() - start:.0f} s"
