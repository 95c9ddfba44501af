"""Regimes, budgets, case pools, networks, checkpoint starts and metrics of the downstream
study, and a tiny study with seeds and an explicit test datalist."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_helpers import REPO
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.metrics import DiceMetric

from common.core.bundle_configs import bundle_parser
from common.core.errors import DataError
from common.core.io import save_nifti, start_from
from common.data.splits import split_datalist
from common.seg.cases import image_cases
from common.seg.metrics import HausdorffDistance95, markdown_table, summarise
from common.seg.networks import make_network
from common.seg.regimes import (
    CONTROL,
    E2_REGIMES,
    Stage,
    assemble,
    pick_synthetic,
    plan_stages,
    regime_dataset,
    regime_iterations,
    regime_stages,
    split_cases,
    stage_cases,
    with_control,
)
from common.seg.schedule import StepSampler, StepSchedule, step_schedule
from common.seg.study import REPO_BUNDLE, seg_study, study_settings

REAL = [{"image": f"r{i}.nii.gz", "label": f"r{i}_lab.nii.gz"} for i in range(16)]
SYNTHETIC = [{"image": f"s{i}.nii.gz", "label": f"s{i}_lab.nii.gz"} for i in range(30)]
# the tests' network sizes: the bundle's tiny preset
SIZES = ConfigParser.load_config_file(
    REPO / "bundles" / "seg_downstream" / "configs" / "tiny.yaml"
)["network_sizes"]


def images(cases):
    return [c["image"] for c in cases]


# ---------------------------------------------------------------- splits and pools


def test_split_is_seeded_disjoint_and_complete():
    split = split_cases(REAL, test_cases=4, val_cases=2, seed=0)
    assert [len(split[k]) for k in ("test", "val", "train")] == [4, 2, 10]
    parts = [set(images(split[k])) for k in ("test", "val", "train")]
    assert set.union(*parts) == set(images(REAL)) and sum(map(len, parts)) == 16
    assert split_cases(REAL, 4, 2, seed=0) == split
    assert images(split_cases(REAL, 4, 2, seed=1)["test"]) != images(split["test"])


def test_split_needs_enough_cases():
    with pytest.raises(DataError, match="add cases or lower test_cases"):
        split_cases(REAL[:5], test_cases=4, val_cases=1, seed=0)
    split = split_cases(REAL[:5], test_cases=0, val_cases=1, seed=0)  # tests come from elsewhere
    assert split["test"] == [] and len(split["train"]) == 4


@pytest.fixture(scope="module")
def real_and_test(tiny_segthor_datalist, tmp_path_factory):
    """The tiny cohort's first 3 cases as the real datalist, the 4th as the test datalist."""
    folder = tiny_segthor_datalist.parent
    out = tmp_path_factory.mktemp("real_and_test")
    real, test = split_datalist(tiny_segthor_datalist, 3, out / "real.json", out / "test.json")
    # the files stay in the cohort folder: both datalists name them by absolute path
    for path in (real, test):
        doc = json.loads(path.read_text())
        for case in doc["training"]:
            case.update({k: str(folder / v) for k, v in case.items() if k in ("image", "label")})
        path.write_text(json.dumps(doc))
    return real, test


SETTINGS = {"test_cases": 1, "val_cases": 1, "seed": 0, "synthetic_ratio": 1.0}


def test_an_explicit_test_datalist_never_trains_or_validates(real_and_test):
    real, test = real_and_test
    plan = plan_stages(["E2-1", "E2-3"])
    _, splits, pools = assemble(plan, str(real), str(real), None, SETTINGS, str(test))
    held = images(json.loads(test.read_text())["training"])
    assert [Path(p).name for p in images(splits["real"]["test"])] == ["c3.nii.gz"]
    assert len(splits["real"]["train"]) == 2 and len(splits["real"]["val"]) == 1
    trained = images(splits["real"]["train"] + splits["real"]["val"] + pools["synthetic"])
    assert not {Path(p).name for p in trained} & {Path(p).name for p in held}


def test_a_test_case_that_is_also_a_real_case_is_refused(real_and_test, tiny_segthor_datalist):
    real, _ = real_and_test
    shared = r"3 test cases are also real .*c0\.nii\.gz, .*c2\.nii\.gz"
    with pytest.raises(DataError, match=shared) as err:
        assemble(plan_stages(["E2-1"]), str(tiny_segthor_datalist), None, None, SETTINGS, str(real))
    assert str(err.value).startswith(str(real))


# ---------------------------------------------------------------- budgets in optimiser steps


def test_schedule_counts_optimiser_steps_in_blocks_of_val_interval():
    # 6 "epochs" of 40 steps, each validated, whatever the number of cases
    assert step_schedule(240, 30, 40, num_cases=14, batch_size=2) == StepSchedule(6, 40, 1)
    assert step_schedule(240, 30, 40, num_cases=3, batch_size=2) == StepSchedule(6, 40, 1)
    # by epochs: passes over the cases (7 steps each), validated every 6 epochs = 42 steps
    assert step_schedule(None, 30, 40, 14, 2) == StepSchedule(30, None, 6)
    assert step_schedule(None, 30, 1, 14, 2) == StepSchedule(30, None, 1)
    with pytest.raises(ValueError, match="not a multiple of val_interval=40.*e.g. 25"):
        step_schedule(250, 30, 40, 14, 2)
    assert step_schedule(0, 30, 40, 14, 2) == StepSchedule(30, None, 6)  # 0 as null
    with pytest.raises(ValueError, match=">= 1"):
        step_schedule(-5, 30, 40, 14, 2)


def test_sampler_streams_seeded_permutations_block_by_block():
    sampler = StepSampler(num_cases=3, batch_size=2, epoch_length=4, seed=5)  # 8 of 3 cases
    blocks = []
    for epoch in (1, 2, 3):
        sampler.set_epoch(epoch)
        blocks.append(list(sampler))
    assert [len(b) for b in blocks] == [8, 8, 8] and len(sampler) == 8
    stream = sum(blocks, [])
    for p in range(8):  # every 3 indices: a whole permutation, so each case equally often
        assert sorted(stream[3 * p : 3 * p + 3]) == [0, 1, 2]
    again = StepSampler(3, 2, 4, seed=5)
    again.set_epoch(2)  # a resumed training's block 2 is the uninterrupted one's
    assert list(again) == blocks[1]
    passes = StepSampler(num_cases=5, batch_size=2, epoch_length=None, seed=5)
    passes.set_epoch(2)
    assert sorted(passes) == [0, 1, 2, 3, 4]  # epochs: one pass each


def test_every_regime_has_its_budget_and_the_control_the_longest():
    steps = {"max_iterations": 240, "finetune_iterations": 120}
    budgets = {r: regime_iterations(r, steps) for r in E2_REGIMES}
    assert budgets == {"E2-1": 240, "E2-2": 240, "E2-3": 240, "E2-4": 360, "E2-5": 360}
    regimes = with_control(["E2-1", "E2-3", "E2-5"], steps)
    assert regimes == ["E2-1", "E2-3", "E2-5", CONTROL]
    assert regime_iterations(CONTROL, steps, regimes) == 360
    assert regime_stages(CONTROL) == [Stage(CONTROL, ("real",), control=True)]
    assert with_control(["E2-1", "E2-3"], steps) == ["E2-1", "E2-3"]  # all equal: no control
    assert with_control(["E2-3", "E2-5"], steps) == ["E2-3", "E2-5"]  # no E2-1 to control
    epochs = {"max_iterations": 0, "finetune_iterations": 120}
    assert with_control(["E2-1", "E2-5"], epochs) == ["E2-1", "E2-5"]
    assert regime_iterations("E2-5", epochs) is None


def test_synthetic_draw_follows_the_ratio():
    picked = pick_synthetic(SYNTHETIC, n_real=10, ratio=1.5, seed=0)
    assert len(picked) == 15 and len(set(images(picked))) == 15
    assert set(images(picked)) <= set(images(SYNTHETIC))
    assert pick_synthetic(SYNTHETIC, 10, 1.5, seed=0) == picked
    with pytest.raises(DataError, match="needs 40 synthetic cases, the datalist has 30"):
        pick_synthetic(SYNTHETIC, n_real=10, ratio=4.0, seed=0)


# ---------------------------------------------------------------- regimes


def test_regimes_train_on_the_right_cases_in_order():
    pools = {"real": REAL[:3], "synthetic": SYNTHETIC[:2], "transfer": REAL[10:12]}
    cases = {r: images(stage_cases(regime_stages(r)[0], pools)) for r in E2_REGIMES}
    real, syn = images(REAL[:3]), images(SYNTHETIC[:2])
    assert cases == {"E2-1": real, "E2-2": syn, "E2-3": real + syn, "E2-4": syn, "E2-5": real + syn}
    for regime in ("E2-4", "E2-5"):  # the fine-tuning stage sees real cases only
        assert images(stage_cases(regime_stages(regime)[-1], pools)) == real
    assert images(stage_cases(regime_stages("E3-E2-5")[-1], pools)) == images(REAL[10:12])


def test_fine_tuning_starts_from_the_right_checkpoint():
    assert regime_stages("E2-1") == [Stage("E2-1", ("real",))]
    assert regime_stages("E2-4") == [
        Stage("E2-2", ("synthetic",)),
        Stage("E2-4", ("real",), init="E2-2", finetune=True),
    ]
    assert regime_stages("E2-5") == [
        Stage("E2-3", ("real", "synthetic")),
        Stage("E2-5", ("real",), init="E2-3", finetune=True),
    ]
    transfer = regime_stages("E3-E2-5")
    assert [s.name for s in transfer] == ["E2-3", "E2-5", "E3-E2-5"]
    assert transfer[-1] == Stage("E3-E2-5", ("transfer",), init="E2-5", finetune=True)
    assert regime_stages("E3-scratch") == [Stage("E3-scratch", ("transfer",))]
    assert regime_dataset("E3-E2-5") == "transfer" and regime_dataset("E2-5") == "real"
    with pytest.raises(DataError, match="unknown regime 'E2-9'"):
        regime_stages("E2-9")


def test_plan_trains_shared_stages_once_and_parents_first():
    plan = plan_stages(list(E2_REGIMES))
    assert [s.name for s in plan] == ["E2-1", "E2-2", "E2-3", "E2-4", "E2-5"]
    plan = plan_stages(["E2-5", "E2-4", "E2-3"])
    names = [s.name for s in plan]
    assert names == ["E2-3", "E2-5", "E2-2", "E2-4"]
    assert all(names.index(s.init) < names.index(s.name) for s in plan if s.init)


# ---------------------------------------------------------------- networks and checkpoints


@pytest.mark.parametrize("name", ["unet2d", "unet3d", "unetr", "swinunetr"])
def test_networks_map_a_volume_to_class_logits(name):
    size = [32, 32, 32] if name == "swinunetr" else [16, 16, 16]
    net = make_network(name, num_classes=3, spatial_size=size, sizes=SIZES).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *size))
    assert out.shape == (1, 3, *size)


def test_unet2d_segments_slice_by_slice_and_scripts():
    net = make_network("unet2d", 3, [16, 16, 8], SIZES).eval()
    x = torch.randn(2, 1, 16, 16, 8)
    with torch.no_grad():
        out = net(x)
        one_slice = net.net(x[..., 5])  # (2, 3, 16, 16): the 2D UNet on axial slice 5
        scripted = torch.jit.script(net)(x)
    assert torch.allclose(out[..., 5], one_slice, atol=1e-5)
    assert torch.allclose(scripted, out, atol=1e-5)


def test_network_size_errors_say_what_to_change():
    with pytest.raises(ValueError, match="multiple of 16"):
        make_network("unetr", 3, [24, 24, 24], SIZES)
    with pytest.raises(ValueError, match="norm_name"):
        make_network("swinunetr", 3, [32, 32, 32], {"swinunetr": {"feature_size": 12}})
    with pytest.raises(ValueError, match="unknown network 'vnet'"):
        make_network("vnet", 3, [32, 32, 32], SIZES)
    with pytest.raises(ValueError, match="add network_sizes#unetr"):
        make_network("unetr", 3, [16, 16, 16], {"unet3d": SIZES["unet3d"]})
    bad = {"unet3d": {**SIZES["unet3d"], "depth": 3}}
    with pytest.raises(ValueError, match="network_sizes#unet3d"):
        make_network("unet3d", 3, [16, 16, 16], bad)


def test_start_from_loads_all_but_a_new_output_head(tmp_path):
    source = make_network("unet3d", 5, [16, 16, 16], SIZES)
    torch.save(source.state_dict(), tmp_path / "model.pt")
    same = start_from(make_network("unet3d", 5, [16, 16, 16], SIZES), tmp_path / "model.pt")
    assert all(
        torch.equal(a, b) for a, b in zip(same.state_dict().values(), source.state_dict().values())
    )
    other = start_from(make_network("unet3d", 3, [16, 16, 16], SIZES), tmp_path / "model.pt")
    kept = [k for k, v in other.state_dict().items() if torch.equal(v, source.state_dict()[k])]
    assert 0 < len(kept) < len(source.state_dict())
    with pytest.raises(DataError, match="no tensor of this checkpoint fits"):
        start_from(make_network("unetr", 5, [16, 16, 16], SIZES), tmp_path / "model.pt")
    with pytest.raises(DataError, match="not found"):
        start_from(same, tmp_path / "missing.pt")


def test_image_cases_reads_a_folder_or_explains(tmp_path):
    save_nifti(np.zeros((4, 4, 4), np.float32), np.eye(4), tmp_path / "b.nii.gz")
    save_nifti(np.zeros((4, 4, 4), np.float32), np.eye(4), tmp_path / "a.nii.gz")
    assert [c["image"] for c in image_cases(tmp_path)] == [
        str(tmp_path / "a.nii.gz"),
        str(tmp_path / "b.nii.gz"),
    ]
    with pytest.raises(DataError, match="holds no images"):
        image_cases(tmp_path / "nothing_here")


# ---------------------------------------------------------------- metrics


def onehot(labels: np.ndarray, num_classes: int, spacing=(1.0, 1.0, 1.0)) -> MetaTensor:
    """``(H, W, D)`` labels -> ``(1, K, H, W, D)`` one-hot MetaTensor with a diagonal affine."""
    x = torch.nn.functional.one_hot(torch.as_tensor(labels).long(), num_classes)
    return MetaTensor(
        x.permute(3, 0, 1, 2)[None].float(), affine=torch.diag(torch.tensor([*spacing, 1.0]))
    )


def cube_labels(shift: int = 0) -> np.ndarray:
    labels = np.zeros((20, 20, 20), np.int64)
    labels[4 + shift : 12 + shift, 4:12, 4:12] = 1
    labels[14:18, 14:18, 14:18] = 2
    return labels


def test_identical_masks_give_dice_one_and_hd95_zero():
    y = onehot(cube_labels(), 3, spacing=(2.0, 2.0, 3.0))
    dice = DiceMetric(include_background=False, reduction="none")(y, y)
    hd95 = HausdorffDistance95(reduction="none")(y, y)
    assert torch.allclose(dice, torch.ones(1, 2)) and torch.allclose(hd95, torch.zeros(1, 2))


def test_hd95_is_in_millimetres_from_the_label_affine():
    truth = onehot(cube_labels(), 3, spacing=(3.0, 1.0, 1.0))
    shifted = onehot(cube_labels(shift=2), 3, spacing=(3.0, 1.0, 1.0))
    hd95 = HausdorffDistance95(reduction="none")(shifted, truth)
    assert hd95[0, 0].item() == pytest.approx(6.0)  # 2 voxels of 3 mm
    assert hd95[0, 1].item() == pytest.approx(0.0)


def test_summary_averages_labels_and_skips_missing_ones():
    details = {
        "dice": torch.tensor([[1.0, 0.5], [0.0, float("nan")]]),
        "hd95": torch.tensor([[0.0, 4.0], [float("inf"), float("nan")]]),
    }
    summary = summarise(details, ["background", "heart", "aorta"])
    assert summary["n_cases"] == 2
    assert summary["dice"] == {"mean": 0.5, "heart": 0.5, "aorta": 0.5}
    assert summary["hd95"] == {"mean": 2.0, "heart": 0.0, "aorta": 4.0}
    all_missing = summarise({"hd95": torch.tensor([[float("nan")]])}, ["background", "x"])
    assert math.isnan(all_missing["hd95"]["mean"])


def test_table_has_regimes_as_rows_and_networks_as_columns():
    cells = {("E2-1", "unet3d"): 0.8734, ("E2-2", "unet3d"): 0.846, ("E2-1", "unetr"): math.nan}
    table = markdown_table(cells, ["E2-1", "E2-2"], ["unet3d", "unetr"])
    assert table.splitlines() == [
        "| | unet3d | unetr |",
        "|---|---|---|",
        "| E2-1 | 0.873 | - |",
        "| E2-2 | 0.846 | - |",
    ]


# ---------------------------------------------------------------- a tiny study


def _tiny_study(real_and_test, out: Path, **budget) -> tuple[str, list[dict]]:
    """E2-1 and E2-3 at the tiny preset on the test datalist: the table and results.json."""
    real, test = real_and_test
    table = seg_study(
        str(real),
        str(real),
        regimes="E2-1,E2-3",
        out=str(out),
        scale="tiny",
        test=str(test),
        **budget,
    )
    return table, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_tiny_study_repeats_seeds_at_equal_steps_on_the_test_datalist(real_and_test, tmp_path):
    """E2-1 (2 real cases) and E2-3 (2 real + 2 synthetic) run the same 2 steps (by epochs
    E2-3 would run twice E2-1's), 2 seeds each, tested on the explicit test datalist."""
    out = tmp_path / "study"
    table, runs = _tiny_study(real_and_test, out, seeds=2, seed=4)
    assert sorted((r["regime"], r["seed"], r["steps"]) for r in runs) == [
        ("E2-1", 4, [2]),
        ("E2-1", 5, [2]),
        ("E2-3", 4, [2]),
        ("E2-3", 5, [2]),
    ]
    for r in runs:
        assert r["n_cases"] == 1 and len(r["per_case"]["dice"]) == 1
        stage = json.loads(
            (out / "unet3d" / f"seed{r['seed']}" / r["regime"] / "stage.json").read_text()
        )
        assert stage["seed"] == r["seed"] and len(stage["train"]) == (
            2 if r["regime"] == "E2-1" else 4
        )
        assert not {Path(p).name for p in stage["train"] + stage["val"]} & {"c3.nii.gz"}
    assert "2 seed(s)" in table and " ± " in table and "| E2-3 | 2 |" in table
    assert "Dice difference to E2-1" in table and CONTROL not in table
    stats = json.loads((out / "statistics.json").read_text())["unet3d"]
    d, low, high = stats["E2-3"]["difference"]["mean"]
    assert low <= d <= high


@pytest.mark.slow
def test_tiny_study_by_epochs_shows_the_unequal_steps(real_and_test, tmp_path):
    """max_iterations 0: 2 epochs each, so E2-3 (4 cases) runs twice E2-1's steps."""
    table, runs = _tiny_study(real_and_test, tmp_path / "study", max_iterations=0, max_epochs=2)
    assert sorted((r["regime"], r["steps"]) for r in runs) == [("E2-1", [2]), ("E2-3", [4])]
    assert "| E2-1 | 2 |" in table and "| E2-3 | 4 |" in table and CONTROL not in table


def test_the_study_budget_is_study_iterations_where_a_preset_sets_it():
    """At 64^3 the study trains 160 steps a stage (the shipped model trained 2000); the other
    scales' study trains their max_iterations; a given or overridden budget wins."""

    def steps(scale, overrides=None, given=None):
        settings = study_settings(REPO_BUNDLE, scale, "thorax", overrides or {}, given or {})
        return settings["max_iterations"], settings["finetune_iterations"]

    assert steps("standard") == (160, 80)
    assert steps("demo") == (240, 120) and steps("tiny")[0] == 2 and steps("paper")[0] == 10000
    assert steps("standard", given={"max_iterations": 60})[0] == 60
    assert steps("standard", overrides={"max_iterations": 80})[0] == 80


@pytest.mark.parametrize("scale", ["tiny", "demo", "standard", "paper"])
def test_every_scale_validates_within_its_study_stages(scale):
    """The study's training and fine-tuning stages are whole multiples of the preset's
    val_interval (else step_schedule refuses them)."""
    settings = study_settings(REPO_BUNDLE, scale, "thorax", {}, {})
    every = bundle_parser(REPO_BUNDLE, ["train.yaml"], scale, "thorax")["val_interval"]
    for key in ("max_iterations", "finetune_iterations"):
        step_schedule(settings[key], settings["max_epochs"], every, 8, 2)
