"""The quality gate on constructed volumes: ranges learned from known medians, each check, and
the retry loop (a failing pair remade with a new seed, recorded; one that keeps failing stays,
marked failed); `generate --qc` end to end with the shipped weights."""

import json

import numpy as np
import pytest

from common.core.errors import DataError
from common.core.io import save_nifti
from common.core.seeds import case_seed
from common.data.datalists import read_datalist, write_datalist
from common.data.labels import load_label_set
from common.images.qc import (
    CT_MARGIN_HU,
    check_pair,
    label_medians,
    learn_ranges,
    qc_summary,
    quality_gate,
    retry_seed,
)
from medgen3d.cli import main

SEGTHOR = load_label_set("segthor")  # background, esophagus, heart, trachea, aorta
SHAPE = (12, 12, 8)


def _label(aorta: bool = True, trachea: bool = False) -> np.ndarray:
    """Esophagus (1) and heart (2) always, aorta (4) if asked, trachea (3) if asked."""
    label = np.zeros(SHAPE, np.uint8)
    label[1:4, 1:4, 1:7] = 1
    label[5:11, 5:11, 2:6] = 2
    if trachea:
        label[1:4, 8:11, 1:7] = 3
    if aorta:
        label[6:9, 1:4, 1:7] = 4
    return label


def _write(folder, name, label, hu_by_label, noise=0.0):
    """A pair whose label ``k`` voxels hold ``hu_by_label[k]`` HU (background -900)."""
    rng = np.random.default_rng(len(name))
    image = np.full(SHAPE, -900.0, np.float32)
    for k, hu in hu_by_label.items():
        inside = label == k
        image[inside] = hu + noise * rng.standard_normal(inside.sum())
    affine = np.diag([3.0, 3.0, 5.0, 1.0])
    save_nifti(image, affine, folder / f"{name}_img.nii.gz")
    save_nifti(label, affine, folder / f"{name}_lab.nii.gz")
    return {
        "image": folder / f"{name}_img.nii.gz",
        "label": folder / f"{name}_lab.nii.gz",
        "case": name,
    }


def _real(folder):
    """Five real cases: label k at 100 k - 500 + 10 i HU in case i; the aorta missing from
    case 0, the trachea from all."""
    cases = [
        _write(folder, f"r{i}", _label(aorta=i > 0), {k: 100 * k - 500 + 10 * i for k in (1, 2, 4)})
        for i in range(5)
    ]
    return write_datalist(folder / "real.json", cases, SEGTHOR, "CT", "real")


GOOD = {1: -380.0, 2: -280.0, 4: -80.0}  # inside every learned range


def test_label_medians_of_a_constructed_pair(tmp_path):
    case = _write(tmp_path, "a", _label(), {1: -400.0, 2: 40.0, 4: 300.0}, noise=5.0)
    medians = label_medians(str(case["image"]), str(case["label"]), SEGTHOR)
    assert medians["trachea"] is None
    for name, hu in (("esophagus", -400.0), ("heart", 40.0), ("aorta", 300.0)):
        assert medians[name] == pytest.approx(hu, abs=3.0)  # noise sd 5 HU around hu


def test_ranges_are_percentiles_of_the_real_medians_plus_the_margin(tmp_path):
    ranges = learn_ranges(_real(tmp_path))
    heart = ranges["labels"]["heart"]  # per-case medians -300, -290, ..., -260
    assert heart["medians"] == [-300.0, -290.0, -280.0, -270.0, -260.0]
    low, high = np.percentile(heart["medians"], [5, 95])
    assert (heart["low"], heart["high"]) == (low - CT_MARGIN_HU, high + CT_MARGIN_HU)
    assert heart["low"] == pytest.approx(-298.0 - 50.0) and heart["presence"] == 1.0
    assert ranges["labels"]["aorta"]["presence"] == 0.8  # missing from one real case
    assert ranges["labels"]["trachea"] == {
        "low": None,
        "high": None,
        "presence": 0.0,
        "medians": [],
    }
    assert ranges["unit"] == "HU" and ranges["n_cases"] == 5


def test_each_check(tmp_path):
    ranges = learn_ranges(_real(tmp_path))

    def problems(label, hu):
        case = _write(tmp_path, "g", label, hu)
        result = check_pair(str(case["image"]), str(case["label"]), SEGTHOR, ranges)
        assert result["passed"] == all(c["ok"] for c in result["checks"])
        return {c["label"]: c["problem"] for c in result["checks"] if not c["ok"]}

    assert problems(_label(), GOOD) == {}
    assert problems(_label(aorta=False), GOOD) == {}  # the aorta may be absent
    assert problems(_label(), {**GOOD, 2: 100.0}) == {
        "heart": "median 100.0 HU outside [-348.0, -212.0]"
    }
    no_heart = _label()
    no_heart[no_heart == 2] = 0
    assert problems(no_heart, GOOD) == {"heart": "missing (every real case has it)"}
    assert problems(_label(trachea=True), {**GOOD, 3: -800.0}) == {
        "trachea": "present (no real case has it)"
    }


def test_gate_regenerates_failing_pairs_with_new_seeds_and_keeps_the_ones_that_still_fail(
    tmp_path,
):
    ranges = learn_ranges(_real(tmp_path))
    gen = tmp_path / "gen"
    cases = [
        _write(gen, "a", _label(), GOOD),  # passes at once
        _write(gen, "b", _label(), {**GOOD, 2: 300.0}),  # fails, its first retry passes
        _write(gen, "c", _label(), {**GOOD, 4: 500.0}),  # fails every time
    ]
    for k, case in enumerate(cases):
        case["seed"] = case_seed(7, k)
    datalist = write_datalist(gen / "datalist.json", cases, SEGTHOR, "CT", "gen", refined=True)
    calls = []

    def regenerate(count, run_seed, name):
        """Pair j of a round: good when it remakes b, a bad aorta when it remakes c."""
        calls.append((count, run_seed, name))
        folder = gen / "qc" / name
        made = []
        for j in range(count):
            remakes_c = j == count - 1
            pair = _write(folder, f"n{j}", _label(), {**GOOD, 4: 500.0} if remakes_c else GOOD)
            made.append({**pair, "seed": case_seed(run_seed, j)})
        return write_datalist(folder / "datalist.json", made, SEGTHOR, "CT", name)

    report = quality_gate(datalist, ranges, regenerate, seed=7, retries=2)
    assert calls == [(2, retry_seed(7, 1), "retry_1"), (1, retry_seed(7, 2), "retry_2")]
    assert retry_seed(7, 1) not in {case_seed(7, k) for k in range(1000)}
    assert report["summary"] == {
        "pairs": 3,
        "passed_first": 1,
        "passed_after_retry": 1,
        "failed": 1,
        "regenerated": 3,
    }
    assert [r["cases"] for r in report["rounds"]] == [["b", "c"], ["c"]]
    assert json.loads((gen / "qc.json").read_text())["summary"] == report["summary"]
    entries = {e["case"]: e for e in read_datalist(datalist)["training"]}
    assert list(entries) == ["a", "b", "c"]  # no pair dropped, in order
    assert entries["a"]["qc"] == {"passed": True, "attempts": 1, "round": 0, "failed": []}
    b = entries["b"]
    assert b["image"] == str(gen / "qc" / "retry_1" / "n0_img.nii.gz")
    assert b["seed"] == case_seed(retry_seed(7, 1), 0)
    assert b["qc"] == {
        "passed": True,
        "attempts": 2,
        "round": 1,
        "run_seed": retry_seed(7, 1),
        "index": 0,
        "failed": [],
    }
    c = entries["c"]
    assert c["qc"]["passed"] is False and c["qc"]["attempts"] == 3
    assert c["qc"]["failed"] == ["aorta median 500.0 HU outside [-138.5, -11.5]"]
    assert c["image"] == str(gen / "c_img.nii.gz")  # every attempt failed once: the first
    assert read_datalist(datalist)["refined"] is True  # the datalist's own keys stay
    assert json.loads(datalist.read_text())["training"][1]["image"].startswith("qc/")
    text = qc_summary(report)
    assert "1 passed at once, 1 after retries, 1 still fail" in text
    assert "b: heart median 300.0 HU outside" in text and "passed in round 1" in text
    assert "c: aorta median 500.0 HU outside" in text and "still fails" in text


def test_gate_refuses_pairs_of_another_label_set(tmp_path):
    ranges = learn_ranges(_real(tmp_path))
    case = _write(tmp_path, "x", _label(), GOOD)
    other = load_label_set("structseg")
    datalist = write_datalist(tmp_path / "other.json", [case], other, "CT", "other")
    with pytest.raises(DataError, match="differ from the real cases'"):
        quality_gate(datalist, ranges, lambda *a: None)


def test_generate_qc_needs_real_cases(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--n", "1", "--qc"])
    assert exit_.value.code == 2
    assert "--qc/--real: go together" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_qc_retries_through_the_bundles_and_lists_what_it_did(tmp_path, capsys):
    """Real cases no generated pair can match (every label at +900 HU): one retry, the pair
    is remade by the same bundle pipelines with a new seed and stays, marked failed."""
    real = write_datalist(
        tmp_path / "real.json",
        [_write(tmp_path, "r", _label(trachea=True), {1: 900, 2: 900, 3: 900, 4: 900})],
        SEGTHOR,
        "CT",
        "real",
    )
    out = tmp_path / "gen"
    argv = ["generate", "--n", "1", "--out", str(out), "--steps", "2", "--qc", "--real", str(real)]
    main([*argv, "--qc_retries", "1"])
    assert "1 still fail (1 pairs regenerated in 1 rounds, up to 1)" in capsys.readouterr().out
    qc = json.loads((out / "qc.json").read_text())
    assert [len(c["attempts"]) for c in qc["cases"]] == [2]
    first, retry = qc["cases"][0]["attempts"]
    assert retry["seed"] == case_seed(retry_seed(0, 1), 0) != first["seed"] == case_seed(0, 0)
    assert (out / "qc" / "retry_1" / "datalist.json").exists()
    entry = read_datalist(out / "datalist.json")["training"][0]
    assert entry["qc"]["passed"] is False and entry["qc"]["attempts"] == 2
