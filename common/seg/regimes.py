"""The regimes of the downstream study (MedGen3D, Table 2) and the case pools they train on.

Regimes (the paper's names)::

    E2-1 real only                 E2-4 synthetic, then fine-tuned on real
    E2-2 synthetic only            E2-5 real + synthetic, then fine-tuned on real
    E2-3 real + synthetic          E3-scratch / E3-<E2 regime>: fine-tune on a few real cases
                                   of another dataset from scratch / from that regime's model
    E2-1-control: real only, as many optimiser steps as the longest regime of the study

A regime is a list of training stages; a stage trains on the concatenation of case pools
(``real``, ``synthetic``, ``transfer``) for a number of optimiser steps (``max_iterations``,
``finetune_iterations``; or epochs) and starts from scratch or from another stage's best
checkpoint. A regime's budget is the sum of its stages' steps: E2-4 and E2-5 train longer than
E2-1, so the control row trains E2-1 as long, and a fine-tuning gain is not a budget gain.
Held-out test cases (an explicit test datalist, or split off first, seeded) never enter a
pool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.core.errors import DataError
from common.seg.cases import paired_dataset

CONTROL = "E2-1-control"
REGIMES = {
    "E2-1": "real only",
    "E2-2": "synthetic only",
    "E2-3": "real + synthetic",
    "E2-4": "synthetic, then fine-tuned on real",
    "E2-5": "real + synthetic, then fine-tuned on real",
    "E3-scratch": "few real cases of another dataset, from scratch",
    CONTROL: "real only, as many steps as the longest regime (budget control)",
}
E2_REGIMES = tuple(r for r in REGIMES if r.startswith("E2-") and r != CONTROL)


@dataclass(frozen=True)
class Stage:
    """One training run, named after the regime it completes.

    ``pools``: the case pools it trains on, in order (``real``, ``synthetic``, ``transfer``);
    ``init``: the stage whose best checkpoint it starts from (None: from scratch);
    ``finetune``: it uses the fine-tuning steps (or epochs) and learning rate;
    ``control``: it trains as many steps as the study's longest regime.
    """

    name: str
    pools: tuple[str, ...]
    init: str | None = None
    finetune: bool = False
    control: bool = False

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
        CONTROL: [Stage(CONTROL, real, control=True)],
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


def stage_iterations(stage: Stage, settings: Mapping, regimes: Sequence[str]) -> int | None:
    """Optimiser steps of ``stage`` (None: budgets in epochs, ``max_iterations`` 0 or null).

    ``settings``: max_iterations, finetune_iterations. The control stage trains as long as the
    longest of ``regimes`` that test on the real dataset.
    """
    if not settings["max_iterations"]:
        return None
    if stage.control:
        tested_on_real = [r for r in regimes if r != CONTROL and regime_dataset(r) == "real"]
        budgets = [regime_iterations(r, settings) for r in tested_on_real]
        return max(budgets, default=int(settings["max_iterations"]))
    return int(settings["finetune_iterations" if stage.finetune else "max_iterations"])


def regime_iterations(regime: str, settings: Mapping, regimes: Sequence[str] = ()) -> int | None:
    """A regime's budget: the optimiser steps of all its stages (None: budgets in epochs)."""
    steps = [stage_iterations(s, settings, regimes) for s in regime_stages(regime)]
    return None if None in steps else sum(steps)


def with_control(regimes: Sequence[str], settings: Mapping) -> list[str]:
    """``regimes`` and, when E2-1 is one and another real-data regime trains more steps, the
    control: E2-1 at that largest budget (budgets in steps only)."""
    regimes = list(regimes)
    if "E2-1" not in regimes or CONTROL in regimes or not settings["max_iterations"]:
        return regimes
    control = stage_iterations(regime_stages(CONTROL)[0], settings, regimes)
    return regimes + [CONTROL] if control > regime_iterations("E2-1", settings) else regimes


def split_cases(
    cases: Sequence[dict], test_cases: int, val_cases: int, seed: int, source: str = "datalist"
) -> dict[str, list[dict]]:
    """Seeded split ``{"train", "val", "test"}`` of ``cases``; each part in a seeded order.

    The same cases and seed always give the same split; test cases never enter train or val.
    ``test_cases`` 0: every case trains or validates (the test cases come from elsewhere).
    """
    n = len(cases)
    if test_cases < 0 or val_cases < 1 or n < test_cases + val_cases + 1:
        raise DataError(
            source,
            f"{n} cases cannot give {test_cases} test, {val_cases} validation and >= 1 training "
            "case (validation and training need >= 1 each)",
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


def _same_labels(path: str, dataset: Mapping, real: Mapping, what: str) -> None:
    """DataError unless ``dataset`` has the real datalist's label names."""
    names, real_names = dataset["label_set"].names, real["label_set"].names
    if names != real_names:
        raise DataError(
            path,
            f"labels {list(names)} differ from the real datalist's {list(real_names)}",
            f"use {what} with the real data's label set",
        )


def _files(case: Mapping) -> set[str]:
    return {str(Path(case[k]).resolve()) for k in ("image", "label")}


def held_out(test: str, real: Mapping) -> list[dict]:
    """The cases of an explicit test datalist; DataError when a file is also a real case."""
    dataset = paired_dataset(test)
    _same_labels(test, dataset, real, "test cases")
    seen = set().union(*(_files(c) for c in real["cases"]))
    shared = [c["image"] for c in dataset["cases"] if _files(c) & seen]
    if shared:
        raise DataError(
            test,
            f"{len(shared)} test cases are also real training/validation cases: "
            + ", ".join(shared),
            "test on cases that --real does not hold (e.g. a held-out datalist)",
        )
    return dataset["cases"]


def assemble(
    plan: Sequence[Stage],
    real: str,
    synthetic: str | None,
    transfer: str | None,
    settings: Mapping,
    test: str | None = None,
) -> tuple[dict, dict, dict]:
    """Validate the datalists the plan needs; ``(datasets, splits, pools)`` of the study.

    ``datasets[d]`` (``real``, ``transfer``): cases, label set, modality; ``splits[d]``: its
    train / val / test cases; ``pools[p]`` (``real``, ``synthetic``, ``transfer``): the
    training cases the stages draw on. ``settings``: test_cases, val_cases, seed,
    synthetic_ratio, transfer_cases. ``test``: a datalist of the real test cases; then every
    real case trains or validates, else ``test_cases`` of them are split off.
    """
    needed = {p for stage in plan for p in stage.pools}
    for pool, path in (("synthetic", synthetic), ("transfer", transfer)):
        if pool in needed and not path:
            raise DataError(
                f"--{pool}", f"the regimes need a {pool} datalist", f"pass --{pool} DATALIST"
            )
    n_test, n_val, seed = settings["test_cases"], settings["val_cases"], settings["seed"]
    datasets = {"real": paired_dataset(real)}
    real_cases = datasets["real"]["cases"]
    splits = {"real": split_cases(real_cases, 0 if test else n_test, n_val, seed, real)}
    if test:
        splits["real"]["test"] = held_out(test, datasets["real"])
    pools = {"real": splits["real"]["train"]}
    if "synthetic" in needed:
        syn = paired_dataset(synthetic)
        _same_labels(synthetic, syn, datasets["real"], "synthetic pairs generated")
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
