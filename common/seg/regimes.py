"""The regimes of the downstream study (MedGen3D, Table 2) and the case pools they train on.

Regimes (the paper's names)::

    E2-1 real only                 E2-4 synthetic, then fine-tuned on real
    E2-2 synthetic only            E2-5 real + synthetic, then fine-tuned on real
    E2-3 real + synthetic          E3-scratch / E3-<E2 regime>: fine-tune on a few real cases
                                   of another dataset from scratch / from that regime's model

A regime is a list of training stages; a stage trains on the concatenation of case pools
(``real``, ``synthetic``, ``transfer``) and starts from scratch or from another stage's best
checkpoint. Held-out test cases are split off first (seeded) and never enter a pool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.core.errors import DataError
from common.seg.cases import paired_dataset

REGIMES = {
    "E2-1": "real only",
    "E2-2": "synthetic only",
    "E2-3": "real + synthetic",
    "E2-4": "synthetic, then fine-tuned on real",
    "E2-5": "real + synthetic, then fine-tuned on real",
    "E3-scratch": "few real cases of another dataset, from scratch",
}
E2_REGIMES = tuple(r for r in REGIMES if r.startswith("E2-"))


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


def assemble(
    plan: Sequence[Stage],
    real: str,
    synthetic: str | None,
    transfer: str | None,
    settings: Mapping,
) -> tuple[dict, dict, dict]:
    """Validate the datalists the plan needs; ``(datasets, splits, pools)`` of the study.

    ``datasets[d]`` (``real``, ``transfer``): cases, label set, modality; ``splits[d]``: its
    train / val / test cases; ``pools[p]`` (``real``, ``synthetic``, ``transfer``): the
    training cases the stages draw on. ``settings``: test_cases, val_cases, seed,
    synthetic_ratio, transfer_cases.
    """
    needed = {p for stage in plan for p in stage.pools}
    for pool, path in (("synthetic", synthetic), ("transfer", transfer)):
        if pool in needed and not path:
            raise DataError(
                f"--{pool}", f"the regimes need a {pool} datalist", f"pass --{pool} DATALIST"
            )
    n_test, n_val, seed = settings["test_cases"], settings["val_cases"], settings["seed"]
    datasets = {"real": paired_dataset(real)}
    splits = {"real": split_cases(datasets["real"]["cases"], n_test, n_val, seed, real)}
    pools = {"real": splits["real"]["train"]}
    if "synthetic" in needed:
        syn = paired_dataset(synthetic)
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
        datasets["transfer"] = paired_dataset(transfer)
        cases = datasets["transfer"]["cases"]
        splits["transfer"] = split_cases(cases, n_test, n_val, seed, transfer)
        pools["transfer"] = splits["transfer"]["train"][: settings["transfer_cases"]]
    return datasets, splits, pools
