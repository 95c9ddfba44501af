"""`medgen3d demo` end to end at a tiny scale: shipped thorax weights, and brain with --train."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from benchmarks import fidelity
from common.core.errors import DataError
from common.data.validate import validate_datalist
from common.masks.mcdpm import keep_single_components
from medgen3d.cli import main
from medgen3d.demo import run_demo

FIGURES = ("real_vs_synthetic", "masks", "from_real_masks", "label_volumes")


def check_report(out, n):
    report = (out / "report.md").read_text()
    sections = ("## Timings", "## Masks", "As sampled", "paired", "## Downstream segmentation")
    for section in (*sections, "## Mask-image agreement"):
        assert section in report
    for name in FIGURES:
        png = out / "figures" / f"{name}.png"
        assert png.stat().st_size > 5000 and f"figures/{name}.png" in report
    synthetic = out / "synthetic" / "datalist.json"
    assert validate_datalist(synthetic) == []
    assert len(json.loads(synthetic.read_text())["training"]) == n
    results = json.loads((out / "seg_study" / "results.json").read_text())
    # E2-1 and E2-3, 2 seeds each, the same 2 optimiser steps each
    assert sorted((r["regime"], r["seed"], r["steps"]) for r in results) == [
        ("E2-1", 0, [2]),
        ("E2-1", 1, [2]),
        ("E2-3", 0, [2]),
        ("E2-3", 1, [2]),
    ]
    for r in results:  # the table's mean is the mean over the labels of the held-out cases
        per_label = [v for k, v in r["dice"].items() if k != "mean"]
        assert len(per_label) >= 3 and r["dice"]["mean"] == pytest.approx(np.nanmean(per_label))
    # the paper's protocol: the segmenter learns from the generators' training cases and is
    # tested on every held-out case, which nothing trained on
    splits = json.loads((out / "seg_study" / "splits.json").read_text())
    cohort = out / "cohort"
    names = {
        part: {
            Path(c["image"]).name
            for c in json.loads((cohort / f"{part}.json").read_text())["training"]
        }
        for part in ("train", "heldout")
    }
    assert {Path(p).name for p in splits["real_train"] + splits["real_val"]} == names["train"]
    assert {Path(p).name for p in splits["real_test"]} == names["heldout"]
    assert "The paper's protocol" in report and "difference to E2-1" in report


@pytest.mark.slow
def test_thorax_demo_with_shipped_weights(tmp_path, capsys):
    out = tmp_path / "demo"
    # the shipped weights learned from cases 0-15 (seed 0): only cases 16, 17, 18 are unseen
    small = {"cases": 19, "heldout": 3, "steps": 2, "seg_iterations": 2, "seeds": 2}
    report = run_demo("thorax", out, n=2, **small)
    assert report == out / "report.md"
    check_report(out, 2)
    printed = capsys.readouterr().out
    assert "[1/7]" in printed and "[7/7] done" in printed
    mask = nib.load(out / "synthetic" / "masks" / "labels" / "synthetic_0000.nii.gz")
    assert mask.shape == (64, 64, 64)  # the standard scale, the shipped weights'
    # the raw masks evaluated are the written ones before keep-largest (one sampling run)
    raw = nib.load(out / "synthetic" / "raw_masks" / "labels" / "synthetic_0000.nii.gz")
    kept = keep_single_components(torch.from_numpy(np.asarray(raw.dataobj)).long(), [1, 2, 3, 4])
    assert np.array_equal(kept.numpy(), np.asarray(mask.dataobj))
    summaries = [
        json.loads((out / "evaluation" / f / "mask_metrics.json").read_text())["summary"]
        for f in ("masks", "masks_raw")
    ]
    assert summaries[0]["components_gen"] == 1.0  # one piece per organ after keep-largest
    assert summaries[1]["components_gen"] >= 1.0 and summaries[1] != summaries[0]
    # the #18 fidelity table reads the same files
    rows = fidelity.run_rows(out)
    raw = json.loads((out / "evaluation" / "masks_raw" / "mask_metrics.json").read_text())
    pieces, real = (raw["labels"]["heart"][f"components_{k}"] for k in ("gen", "real"))
    cell = f"{pieces:.1f} (1.0) / {real:.1f}"
    assert rows["heart: pieces, raw (kept) / real"] == (
        cell,
        pieces <= fidelity.pieces_target(real),
    )
    assert fidelity.pieces_target(104.5) == pytest.approx(114.95)  # brain CSF: many pieces
    assert set(rows) >= {
        "mean: agreement (Dice synthetic / real)",
        "refiner: paired MAE, generator -> refined",
    }
    assert "| heart: pieces, raw (kept) / real |" in fidelity.table([out, out], ["a", "b"])


@pytest.mark.slow
def test_brain_demo_trains_every_generator_stage(tmp_path):
    out = tmp_path / "demo"
    small = {"cases": 6, "heldout": 3, "steps": 2, "epochs": 1, "seg_iterations": 2, "seeds": 2}
    run_demo("brain", out, train=True, n=2, scale="demo", **small)
    check_report(out, 2)
    models = out / "models"
    assert (models / "mask_diffusion" / "models" / "model.pt").is_file()
    for name in ("model", "refiner_axial", "refiner_coronal", "refiner_sagittal"):
        assert (models / "image_synthesis" / "models" / f"{name}.pt").is_file()
    assert "brain_tissue" in (out / "synthetic" / "datalist.json").read_text()


def test_brain_demo_without_weights_says_to_train(tmp_path, capsys):
    with pytest.raises(DataError, match="--train"):
        run_demo("brain", tmp_path / "demo", scale="demo")  # demo-scale brain weights: none
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--dataset", "mars", "--out", str(tmp_path / "x")])
    assert stop.value.code == 2 and "unknown demo dataset" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
