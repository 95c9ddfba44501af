"""The downstream segmentation study (MedGen3D, Table 2): does synthetic data help a network?

Regimes (the paper's names)::

    E2-1 real only                 E2-4 synthetic, then fine-tuned on real
    E2-2 synthetic only            E2-5 real + synthetic, then fine-tuned on real
    E2-3 real + synthetic          E3-scratch / E3-<E2 regime>: fine-tune on a few real cases
                                   of another dataset from scratch / from that regime's model

A regime is a list of training stages; a stage trains on the concatenation of case pools and
starts from scratch or from another stage's best checkpoint. Stages shared by regimes (E2-4
starts from E2-2's model) are trained once per network. Every stage and every evaluation is a
run of the seg_downstream bundle's own configs (``monai.bundle.run``) with overrides, so the
bundle stays the source of truth. Held-out test cases are split off first (seeded) and are
never used for training or model selection.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import UNETR, SwinUNETR, UNet
from torch import nn

from common.datalist import SECTIONS, datalist_label_set, datalist_modality, read_datalist
from common.errors import DataError
from common.io import atomic_path, read_json, write_json
from common.seg_metrics import markdown_table
from common.validate import require_valid, validate_image

NETWORKS = ("unet2d", "unet3d", "unetr", "swinunetr")
REGIMES = {
    "E2-1": "real only",
    "E2-2": "synthetic only",
    "E2-3": "real + synthetic",
    "E2-4": "synthetic, then fine-tuned on real",
    "E2-5": "real + synthetic, then fine-tuned on real",
    "E3-scratch": "few real cases of another dataset, from scratch",
}
E2_REGIMES = tuple(r for r in REGIMES if r.startswith("E2-"))
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mgz")
REPO_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "seg_downstream"
logger = logging.getLogger(__name__)
STUDY_KEYS = (
    "test_cases",
    "val_cases",
    "synthetic_ratio",
    "transfer_cases",
    "seed",
    "max_epochs",
    "finetune_epochs",
    "lr",
    "finetune_lr",
)


# ---------------------------------------------------------------- networks


class SliceWise(nn.Module):
    """A 2D network applied to every axial slice: ``(B, C, H, W, D) -> (B, K, H, W, D)``.

    The D slices of each volume go through the 2D network as a batch of ``B * D`` images,
    so training sees independent slices and inference segments slice by slice.
    """

    def __init__(self, net2d: nn.Module):
        super().__init__()
        self.net = net2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w, d = x.shape
        out = self.net(x.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w))
        return out.reshape(b, d, out.shape[1], h, w).permute(0, 2, 3, 4, 1)


def _check_divisible(name: str, size: Sequence[int], factor: int, why: str) -> None:
    """Raise ValueError unless every entry of ``size`` is a multiple of ``factor``."""
    if any(int(s) % factor for s in size):
        raise ValueError(
            f"{name}: roi_size {list(size)} must be a multiple of {factor} ({why}); "
            f"set roi_size (and spatial_size) to multiples of {factor}"
        )


def make_network(
    name: str,
    num_classes: int,
    spatial_size: Sequence[int],
    sizes: Mapping | None = None,
    in_channels: int = 1,
) -> nn.Module:
    """The segmentation network ``(B, in_channels, H, W, D) -> (B, num_classes, H, W, D)`` logits.

    ``name``: ``unet2d`` (a 2D MONAI UNet applied slice-wise), ``unet3d`` (MONAI UNet,
    ``spatial_dims=3``), ``unetr`` or ``swinunetr``. ``spatial_size`` is the network's input
    window ``(H, W, D)`` (UNETR's ``img_size``); ``sizes`` are the keyword arguments of the
    MONAI class (``channels``/``strides``/``num_res_units``; ``feature_size``/``hidden_size``/
    ``mlp_dim``/``num_heads``; ``feature_size``/``depths``/``num_heads``).
    """
    sizes = dict(sizes or {})
    size = [int(s) for s in spatial_size]
    try:
        if name in ("unet2d", "unet3d"):
            dims = 2 if name == "unet2d" else 3
            factor = math.prod(int(s) for s in sizes.get("strides", ()))
            _check_divisible(name, size[:dims], factor, "the UNet halves the grid at each stride")
            net = UNet(dims, in_channels, num_classes, **sizes)
            return SliceWise(net) if dims == 2 else net
        if name == "unetr":
            _check_divisible(name, size, 16, "UNETR embeds 16x16x16 patches")
            return UNETR(in_channels, num_classes, img_size=size, **sizes)
        if name == "swinunetr":
            _check_divisible(name, size, 32, "SwinUNETR halves the grid five times")
            norm = str(sizes.get("norm_name", "instance")).lower()
            if math.prod(s // 32 for s in size) == 1 and "instance" in norm:
                raise ValueError(
                    f"swinunetr: at roi_size {size} the deepest features are one voxel, which "
                    "instance norm cannot train on; set network_sizes#swinunetr#norm_name to "
                    "['group', {num_groups: 4}] or use a larger roi_size"
                )
            return SwinUNETR(in_channels, num_classes, **sizes)
    except TypeError as e:
        raise ValueError(f"network_sizes#{name} {sizes} do not fit the network: {e}") from e
    raise ValueError(f"unknown network {name!r}; set network to one of {NETWORKS}")


# ---------------------------------------------------------------- case lists for the configs


def image_cases(path: str | Path) -> list[dict]:
    """``[{"image": file}, ...]`` to segment: a folder of NIfTI/MGZ images, one image, or a
    datalist JSON (every image of every section)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.name.endswith(IMAGE_SUFFIXES))
    elif path.name.endswith(".json"):
        doc = read_datalist(path)
        files = [c["image"] for s in SECTIONS for c in doc.get(s, []) if c.get("image")]
    else:
        files = [str(path)] if path.name.endswith(IMAGE_SUFFIXES) and path.exists() else []
    if not files:
        raise DataError(
            str(path),
            f"holds no images ({', '.join(IMAGE_SUFFIXES)}) and is no datalist",
            "set dataset_dir to a folder of images, an image or a datalist.json",
        )
    problems = [str(p) for f in files for p in validate_image(f)]
    if problems:
        report = "\n".join([f"{len(problems)} problems:", *problems])
        raise DataError(str(path), report, "fix or remove the images listed above")
    return [{"image": f} for f in files]


def datalist_cases(datalist: str | Path, section: str) -> list[dict]:
    """The ``section`` cases (absolute paths) of a datalist; none raises DataError."""
    cases = read_datalist(datalist).get(section, [])
    if not cases:
        raise DataError(
            str(datalist), f"has no {section!r} cases", f"add a {section!r} section or set it"
        )
    return cases


def label_names(datalist: str | Path) -> list[str]:
    """The K label names (background first) a datalist declares."""
    return list(datalist_label_set(read_datalist(datalist), datalist).names)


# ---------------------------------------------------------------- regime assembly (pure)


@dataclass(frozen=True)
class Stage:
    """One training run, named after the regime it completes.

    ``pools``: the case pools it trains on, in order (``real``, ``synthetic``, ``transfer``);
    ``init``: the stage whose best checkpoint it starts from (None: from scratch);
    ``finetune``: it uses the fine-tuning epochs and learning rate.
    """

    name: str
    pools: tuple[str, ...]
    init: str | None = None
    finetune: bool = False

    @property
    def dataset(self) -> str:
        """``transfer`` or ``real``: the dataset whose validation cases pick the best model."""
        return "transfer" if "transfer" in self.pools else "real"


def regime_stages(regime: str) -> list[Stage]:
    """The stages of ``regime`` in training order; each stage's ``init`` comes before it."""
    real, synthetic, both = ("real",), ("synthetic",), ("real", "synthetic")
    stages = {
        "E2-1": [Stage("E2-1", real)],
        "E2-2": [Stage("E2-2", synthetic)],
        "E2-3": [Stage("E2-3", both)],
        "E2-4": [Stage("E2-2", synthetic), Stage("E2-4", real, "E2-2", True)],
        "E2-5": [Stage("E2-3", both), Stage("E2-5", real, "E2-3", True)],
        "E3-scratch": [Stage("E3-scratch", ("transfer",))],
    }
    if regime in stages:
        return stages[regime]
    source = regime.removeprefix("E3-")
    if source in E2_REGIMES:
        return [*regime_stages(source), Stage(regime, ("transfer",), source, True)]
    known = [*REGIMES, *(f"E3-{r}" for r in E2_REGIMES)]
    raise DataError("regimes", f"unknown regime {regime!r}", f"use some of {known}")


def plan_stages(regimes: Sequence[str]) -> list[Stage]:
    """Every stage the regimes need, each once, every stage after the one it starts from."""
    plan: dict[str, Stage] = {}
    for regime in regimes:
        for stage in regime_stages(regime):
            plan.setdefault(stage.name, stage)
    return list(plan.values())


def regime_dataset(regime: str) -> str:
    """``real`` or ``transfer``: the dataset whose held-out cases test the regime."""
    return regime_stages(regime)[-1].dataset


def split_cases(
    cases: Sequence[dict], test_cases: int, val_cases: int, seed: int, source: str = "datalist"
) -> dict[str, list[dict]]:
    """Seeded split ``{"train", "val", "test"}`` of ``cases``; each part in a seeded order.

    The same cases and seed always give the same split; test cases never enter train or val.
    """
    n = len(cases)
    if test_cases < 1 or val_cases < 1 or n < test_cases + val_cases + 1:
        raise DataError(
            source,
            f"{n} cases cannot give {test_cases} test, {val_cases} validation and >= 1 training "
            "case (each needs >= 1)",
            "add cases or lower test_cases / val_cases",
        )
    order = np.random.default_rng([seed, 0]).permutation(n)
    picked = [cases[i] for i in order]
    return {
        "test": picked[:test_cases],
        "val": picked[test_cases : test_cases + val_cases],
        "train": picked[test_cases + val_cases :],
    }


def pick_synthetic(
    cases: Sequence[dict], n_real: int, ratio: float, seed: int, source: str = "synthetic"
) -> list[dict]:
    """``round(ratio * n_real)`` synthetic cases drawn without replacement (seeded)."""
    n = round(ratio * n_real)
    if n < 1 or n > len(cases):
        raise DataError(
            source,
            f"synthetic_ratio={ratio} x {n_real} real training cases needs {n} synthetic "
            f"cases, the datalist has {len(cases)}",
            "generate more synthetic cases or change synthetic_ratio (> 0)",
        )
    order = np.random.default_rng([seed, 1]).permutation(len(cases))[:n]
    return [cases[i] for i in order]


def stage_cases(stage: Stage, pools: Mapping[str, Sequence[dict]]) -> list[dict]:
    """The training cases of ``stage``: its pools concatenated in order."""
    return [case for pool in stage.pools for case in pools[pool]]


# ---------------------------------------------------------------- running the grid


@dataclass
class _Study:
    """What every run of a study shares: bundle configs, settings and the case pools."""

    bundle: Path
    preset: Path
    settings: dict
    overrides: dict
    datasets: dict[str, dict]  # real / transfer: path, cases, label_set, modality
    splits: dict[str, dict[str, list[dict]]]  # real / transfer: train, val, test
    pools: dict[str, list[dict]]  # real / synthetic / transfer: training cases
    test_datalists: dict[str, Path] = field(default_factory=dict)
    records: dict[tuple[str, str], dict] = field(default_factory=dict)

    def configs(self, *names: str) -> list[Path]:
        """The bundle's ``configs/<name>.yaml`` files, then the preset."""
        return [*(self.bundle / "configs" / f"{n}.yaml" for n in names), self.preset]

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
        """``num_classes`` and ``modality`` of a dataset's label set."""
        ds = self.datasets[dataset]
        return {"num_classes": ds["label_set"].num_classes, "modality": ds["modality"]}


def _names(value: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``."""
    items = value.split(",") if isinstance(value, str) else value
    return [str(v).strip() for v in items if str(v).strip()]


def _dataset(path: str | Path) -> dict:
    """Validate a datalist of paired cases; its cases, label set and modality."""
    require_valid(path)
    doc = read_datalist(path)
    cases = [c for s in ("training", "validation") for c in doc.get(s, [])]
    if not cases or not all(c.get("image") and c.get("label") for c in cases):
        raise DataError(
            str(path),
            "has cases without an image or a label (a masks-only datalist?)",
            "use paired cases (synthetic masks get their images from image_synthesis)",
        )
    return {
        "cases": cases,
        "label_set": datalist_label_set(doc, path),
        "modality": datalist_modality(doc, path),
    }


def _write_datalist(path: Path, dataset: dict, sections: Mapping[str, list[dict]]) -> Path:
    """A datalist (absolute paths) with ``dataset``'s label set and the given sections."""
    doc = {
        "name": path.parent.name,
        "modality": {"0": dataset["modality"]},
        **dataset["label_set"].to_dict(),
        **{s: [{"image": c["image"], "label": c["label"]} for c in v] for s, v in sections.items()},
    }
    return write_json(doc, path)


def _preset_file(bundle: Path, preset: str) -> Path:
    """``configs/<preset>.yaml`` of the bundle, or a YAML file of the user's."""
    for path in (bundle / "configs" / f"{preset}.yaml", Path(preset)):
        if path.is_file():
            return path
    raise DataError(preset, "no such preset", "use demo, paper or the path of a YAML file")


def study_settings(configs: list[Path], overrides: Mapping, given: Mapping) -> dict:
    """``STUDY_KEYS`` values: ``given`` (where not None) over ``overrides`` over the configs."""
    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    parser.update(dict(overrides))
    return {
        k: given[k] if given.get(k) is not None else parser.get_parsed_content(k)
        for k in STUDY_KEYS
    }


def assemble(
    plan: Sequence[Stage], real: str, synthetic: str | None, transfer: str | None, settings: dict
) -> tuple[dict, dict, dict]:
    """Validate the datalists the plan needs; ``(datasets, splits, pools)`` of the study."""
    needed = {p for stage in plan for p in stage.pools}
    for pool, path in (("synthetic", synthetic), ("transfer", transfer)):
        if pool in needed and not path:
            raise DataError(
                f"--{pool}", f"the regimes need a {pool} datalist", f"pass --{pool} DATALIST"
            )
    n_test, n_val, seed = settings["test_cases"], settings["val_cases"], settings["seed"]
    datasets = {"real": _dataset(real)}
    splits = {"real": split_cases(datasets["real"]["cases"], n_test, n_val, seed, real)}
    pools = {"real": splits["real"]["train"]}
    if "synthetic" in needed:
        syn = _dataset(synthetic)
        names, real_names = syn["label_set"].names, datasets["real"]["label_set"].names
        if names != real_names:
            raise DataError(
                synthetic,
                f"labels {list(names)} differ from the real datalist's {list(real_names)}",
                "generate the synthetic pairs with the real data's label set",
            )
        ratio = settings["synthetic_ratio"]
        pools["synthetic"] = pick_synthetic(
            syn["cases"], len(pools["real"]), ratio, seed, synthetic
        )
    if "transfer" in needed:
        datasets["transfer"] = _dataset(transfer)
        cases = datasets["transfer"]["cases"]
        splits["transfer"] = split_cases(cases, n_test, n_val, seed, transfer)
        pools["transfer"] = splits["transfer"]["train"][: settings["transfer_cases"]]
    return datasets, splits, pools


def _train_stage(study: _Study, stage: Stage, network: str, root: Path) -> dict:
    """Train one stage in ``root/<network>/<stage>`` unless an identical run finished there.

    Returns the stage's record (its cases, settings and starting point), kept in stage.json.
    """
    stage_dir = root / network / stage.name
    configs = study.configs("train")
    cases = stage_cases(stage, study.pools)
    val = study.splits[stage.dataset]["val"]
    epochs = study.settings["finetune_epochs" if stage.finetune else "max_epochs"]
    lr = study.settings["finetune_lr" if stage.finetune else "lr"]
    record = {
        "network": network,
        "train": [c["image"] for c in cases],
        "val": [c["image"] for c in val],
        "epochs": epochs,
        "lr": lr,
        "init": study.records[(network, stage.init)] if stage.init else None,
        "overrides": json.loads(json.dumps(study.overrides, default=str)),
        "configs": hashlib.sha256(b"".join(c.read_bytes() for c in configs)).hexdigest(),
    }
    model, done = stage_dir / "models" / "model.pt", stage_dir / "stage.json"
    if model.exists() and done.exists() and read_json(done) == record:
        print(f"  {network} {stage.name}: finished before, kept")
        return record
    done.unlink(missing_ok=True)
    started = stage_dir / "started.json"  # a killed run of this record resumes; others restart
    if not (started.exists() and read_json(started) == record):
        model.unlink(missing_ok=True)
        (stage_dir / "models" / "resume.pt").unlink(missing_ok=True)
    write_json(record, started)
    sections = {"training": cases, "validation": val}
    datalist = _write_datalist(stage_dir / "datalist.json", study.datasets[stage.dataset], sections)
    init = root / network / str(stage.init) / "models" / "model.pt" if stage.init else ""
    start = time.time()
    study.run(
        "training",
        configs,
        {
            "bundle_root": str(stage_dir),
            "datalist": str(datalist),
            "network": network,
            **study.dataset_overrides(stage.dataset),
            "max_epochs": epochs,
            "lr": lr,
            "init_ckpt": str(init),
            "seed": study.settings["seed"],
            "validate_data": False,
        },
    )
    if not model.exists():
        raise DataError(
            str(stage_dir), "training saved no models/model.pt", "set val_interval <= max_epochs"
        )
    write_json(record, done)
    print(f"  {network} {stage.name}: {len(cases)} cases, {time.time() - start:.0f} s")
    return record


def _evaluate(study: _Study, regime: str, network: str, root: Path) -> dict:
    """Test the regime's model on its dataset's held-out cases; the metrics summary."""
    stage_dir = root / network / regime
    dataset = regime_dataset(regime)
    study.run(
        "evaluating",
        study.configs("train", "evaluate"),
        {
            "bundle_root": str(stage_dir),
            "datalist": str(study.test_datalists[dataset]),
            "network": network,
            **study.dataset_overrides(dataset),
        },
    )
    return read_json(stage_dir / "eval" / "metrics.json")


def write_results(
    results: Mapping[tuple[str, str], dict],
    regimes: Sequence[str],
    networks: Sequence[str],
    out: Path,
) -> str:
    """``results.{csv,json,md}`` of the grid ``results[(regime, network)]`` (metric summaries).

    Returns the markdown: mean Dice and mean HD95 with rows = regimes, columns = networks (the
    paper's layout), then Dice per label for each network.
    """
    rows = [
        [network, regime, label, f"{r['dice'][label]:.4f}", f"{r['hd95'][label]:.2f}"]
        for (regime, network), r in results.items()
        for label in r["dice"]
    ]
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([["network", "regime", "label", "dice", "hd95_mm"], *rows])
    write_json(
        [{"regime": k[0], "network": k[1], **v} for k, v in results.items()], out / "results.json"
    )

    def mean(metric: str) -> dict:
        return {key: r[metric]["mean"] for key, r in results.items()}

    n_test = next(iter(results.values()))["n_cases"]
    md = [
        f"## Mean Dice on {n_test} held-out real cases (background excluded)",
        "",
        markdown_table(mean("dice"), regimes, networks),
        "",
        "## Mean HD95 (mm)",
        "",
        markdown_table(mean("hd95"), regimes, networks, "{:.1f}"),
    ]
    for network in networks:
        labels = [k for k in results[(regimes[0], network)]["dice"] if k != "mean"]
        cells = {
            (g, label): results[(g, network)]["dice"][label] for g in regimes for label in labels
        }
        md += ["", f"## Dice per label, {network}", "", markdown_table(cells, regimes, labels)]
    text = "\n".join(md) + "\n"
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(text)
    return text


def seg_study(
    real: str,
    synthetic: str | None = None,
    networks: str | Sequence[str] = "unet3d",
    regimes: str | Sequence[str] = ",".join(E2_REGIMES),
    out: str = "outputs/seg_study",
    preset: str = "demo",
    test_cases: int | None = None,
    val_cases: int | None = None,
    synthetic_ratio: float | None = None,
    transfer: str | None = None,
    transfer_cases: int | None = None,
    seed: int | None = None,
    max_epochs: int | None = None,
    finetune_epochs: int | None = None,
    overrides: Mapping | None = None,
    bundle: str | None = None,
) -> str:
    """Train and test segmentation networks on real, synthetic and mixed data (MedGen3D E2/E3).

    Splits the real datalist (seeded) into held-out test, validation and training cases, trains
    every network under every regime with the seg_downstream bundle and tests each final model
    on the held-out real cases (Dice, HD95). Writes OUT/results.md (rows = regimes, columns =
    networks), results.csv/.json, splits.json and a folder per network and stage (datalist,
    models/model.pt, TensorBoard runs/, eval/). A rerun keeps the stages that finished with
    the same cases and settings.

    Args:
        real: datalist.json of the real cases (training pool and held-out test cases).
        synthetic: datalist.json of synthetic pairs (from the generator bundles), same labels.
        networks: comma-separated: unet2d, unet3d, unetr, swinunetr.
        regimes: comma-separated: E2-1..E2-5, E3-scratch, E3-E2-1..E3-E2-5 (transfer).
        out: output folder.
        preset: demo (CPU, minutes), paper (GPU) or the path of a YAML preset.
        test_cases: held-out real test cases (default: the preset's test_cases).
        val_cases: real validation cases that pick the best checkpoint (preset's).
        synthetic_ratio: synthetic cases per real training case (preset's).
        transfer: datalist.json of another dataset, for the E3 regimes.
        transfer_cases: training cases taken from the transfer dataset (preset's).
        seed: seed of the split, the synthetic draw and training (preset's).
        max_epochs: epochs of a training stage (preset's).
        finetune_epochs: epochs of a fine-tuning stage (preset's).
        overrides: further bundle config overrides for every run, e.g. "{'batch_size': 4}".
        bundle: the seg_downstream bundle folder (default: this repository's).
    Returns the results tables (markdown).
    """
    start = time.time()
    networks, regimes = _names(networks), _names(regimes)
    unknown = sorted(set(networks) - set(NETWORKS))
    if unknown or not networks:
        raise DataError("--networks", f"unknown or no networks {unknown}", f"use {NETWORKS}")
    plan = plan_stages(regimes)
    bundle_dir = Path(bundle) if bundle else REPO_BUNDLE
    preset_file = _preset_file(bundle_dir, preset)
    overrides = dict(overrides or {})
    given = {
        "test_cases": test_cases,
        "val_cases": val_cases,
        "synthetic_ratio": synthetic_ratio,
        "transfer_cases": transfer_cases,
        "seed": seed,
        "max_epochs": max_epochs,
        "finetune_epochs": finetune_epochs,
    }
    settings = study_settings(
        [bundle_dir / "configs" / "train.yaml", preset_file], overrides, given
    )
    study = _Study(
        bundle_dir,
        preset_file,
        settings,
        overrides,
        *assemble(plan, real, synthetic, transfer, settings),
    )
    root = Path(out)
    images = {
        f"{d}_{k}": [c["image"] for c in v] for d, s in study.splits.items() for k, v in s.items()
    }
    pools = {f"{p}_pool": [c["image"] for c in v] for p, v in study.pools.items()}
    write_json({"settings": settings, **images, **pools}, root / "splits.json")
    for d, split in study.splits.items():
        test = {"test": split["test"]}
        study.test_datalists[d] = _write_datalist(root / f"{d}_test.json", study.datasets[d], test)
    results = {}
    for network in networks:
        for i, stage in enumerate(plan, 1):
            source = f", from {stage.init}" if stage.init else ""
            print(f"[{network} {i}/{len(plan)}] {stage.name}: {' + '.join(stage.pools)}{source}")
            study.records[(network, stage.name)] = _train_stage(study, stage, network, root)
        for regime in regimes:
            results[(regime, network)] = _evaluate(study, regime, network, root)
    table = write_results(results, regimes, networks, root)
    return f"{table}\nresults: {root / 'results.md'}\ntook {time.time() - start:.0f} s"
