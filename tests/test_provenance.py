"""Provenance and the leakage guard: generator checkpoints record the real cases they were
trained on (by content hash), synthetic datalists carry those records, and a segmentation
test on a case a generator saw is refused unless allowed (common.core.provenance)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import REPO
from ignite.engine import Engine
from monai.bundle import run
from monai.handlers import CheckpointLoader

from common.core.bundle_configs import bundle_parser, config_files
from common.core.errors import DataError, find_data_error
from common.core.io import load_weights, save_nifti, start_from
from common.core.provenance import (
    TrainingCases,
    case_id,
    checkpoint_record,
    content_hash,
    require_unseen,
    training_record,
)
from common.core.training import GlobalRNG, ResumeCheckpoint
from common.data.datalists import read_datalist, write_datalist
from common.data.labels import load_label_set
from common.data.splits import split_datalist
from medgen3d.cli import main
from medgen3d.pairs import generate_pairs

BUNDLES = REPO / "bundles"


def shipped(folder: str = "") -> dict:
    """The shipped generator weights in ``models/<folder>`` (the base's: standard, thorax)."""
    return {
        "mask_generator": BUNDLES / "mask_diffusion" / "models" / folder / "model.pt",
        "sequence_generator": BUNDLES / "image_synthesis" / "models" / folder / "model.pt",
        **{
            f"refiner_{v}": BUNDLES / "image_synthesis" / "models" / folder / f"refiner_{v}.pt"
            for v in ("axial", "coronal", "sagittal")
        },
    }


SHIPPED = shipped()


def _pair(root, name, shift=0):
    """A small CT pair ``root/{images,labels}/name.nii.gz``; ``shift`` changes the voxels."""
    rng = np.random.default_rng(shift)
    image = rng.normal(-500, 50, (12, 10, 8)).astype(np.int16)
    label = np.zeros((12, 10, 8), np.uint8)
    label[3 + shift : 8, 2:7, 1:7] = 2
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    save_nifti(image, affine, root / "images" / f"{name}.nii.gz")
    save_nifti(label, affine, root / "labels" / f"{name}.nii.gz")
    return {
        "image": str(root / "images" / f"{name}.nii.gz"),
        "label": str(root / "labels" / f"{name}.nii.gz"),
    }


def _synthetic(path, record):
    """A synthetic datalist that records one generator trained as ``record`` says."""
    labels = load_label_set("segthor")
    return write_datalist(path, [], labels, "CT", "syn", generator_training_cases={"gen": record})


# ---------------------------------------------------------------- content hashes and records


def test_hash_is_of_the_content_and_stable_across_a_rewrite(tmp_path):
    case = _pair(tmp_path, "a")
    image = nib.load(case["image"])
    again = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header)
    nib.save(again, tmp_path / "rewritten.nii")  # another name, header and no gzip
    assert (tmp_path / "rewritten.nii").read_bytes() != Path(case["image"]).read_bytes()
    assert content_hash(tmp_path / "rewritten.nii") == content_hash(case["image"])
    voxels = np.asanyarray(image.dataobj).copy()
    voxels[0, 0, 0] += 1
    save_nifti(voxels, image.affine, tmp_path / "one_voxel.nii.gz")
    shifted = image.affine.copy()
    shifted[0, 3] += 1.0
    save_nifti(np.asanyarray(image.dataobj), shifted, tmp_path / "moved.nii.gz")
    others = {content_hash(tmp_path / f) for f in ("one_voxel.nii.gz", "moved.nii.gz")}
    assert content_hash(case["image"]) not in others and len(others) == 2


def test_record_merges_a_resumed_run_and_the_checkpoint_it_started_from(tmp_path):
    a, b, c = (_pair(tmp_path, n, s) for n, s in (("a", 0), ("b", 1), ("c", 2)))
    first = training_record({"train": [a], "val": [b]}, "first.json")
    ckpt = tmp_path / "first.pt"
    torch.save({"model": {}, "provenance": first}, ckpt)
    record = training_record({"train": [b, c]}, "second.json", start_from=str(ckpt))
    roles = {case["id"]: case["role"] for case in record["cases"]}
    assert roles == {"a": "train", "b": "train", "c": "train"}  # b trained in the second run
    assert record["datalists"] == ["second.json", "first.json"] and record["unknown"] == []
    torch.save({}, tmp_path / "old.pt")  # a checkpoint without a record
    assert training_record({"train": [c]}, start_from=str(tmp_path / "old.pt"))["unknown"] == [
        str(tmp_path / "old.pt")
    ]
    resumed = TrainingCases({"train": [c]})
    resumed.load_state_dict(first)  # the run it resumes saw a and b
    assert sorted(case["id"] for case in resumed.state_dict()["cases"]) == ["a", "b", "c"]


def test_a_resume_file_from_before_records_still_resumes(tmp_path):
    """A resume file without training cases (written before they were recorded) resumes, and
    the resumed run records its own cases; a run that resumes a record adds its cases."""
    case = _pair(tmp_path, "a")
    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    old = {
        "model": net.state_dict(),
        "engine": engine.state_dict(),
        "rng": GlobalRNG().state_dict(),
    }
    torch.save(old, tmp_path / "resume.pt")
    cases = TrainingCases({"train": [case]})
    resume = ResumeCheckpoint(tmp_path, {"model": net, "provenance": cases})
    resume.attach(engine)
    engine.run([0], max_epochs=2)
    saved = torch.load(tmp_path / "resume.pt", weights_only=True)["provenance"]
    assert [c["id"] for c in saved["cases"]] == ["a"]
    assert checkpoint_record(tmp_path / "resume.pt") == saved


@pytest.mark.slow
def test_generator_trainings_record_their_cases_in_every_checkpoint(
    tiny_segthor_datalist, tmp_path
):
    """MC-DPM, the sequence generator and a refiner at the tiny preset: final, best and resume
    files record the 3 training and 1 validation cases; every loader still reads the weights."""
    images = tiny_segthor_datalist.parent / "imagesTr"
    expected = {
        (f"c{i}", "val" if i == 3 else "train", content_hash(images / f"c{i}.nii.gz"))
        for i in range(4)
    }
    stages = {
        "mask_diffusion": (
            ("inference.yaml", "train.yaml"),
            {},
            ["model.pt", "model_best.pt", "resume.pt"],
        ),
        "image_synthesis": (
            ("inference.yaml", "train.yaml", "train_generator.yaml"),
            {"gen_batch_size": 3},
            ["model.pt", "model_best.pt", "resume_generator.pt"],
        ),
        "refiner": (
            ("inference.yaml", "train.yaml", "train_refiner.yaml"),
            {"view": "axial"},
            ["refiner_axial.pt", "refiner_axial_best.pt", "resume_refiner_axial.pt"],
        ),
    }
    for stage, (files, values, written) in stages.items():
        bundle = BUNDLES / ("image_synthesis" if stage == "refiner" else stage)
        root = tmp_path / stage
        configs = [str(f) for f in config_files(bundle, files, "tiny", "thorax")]
        run(
            "training",
            config_file=configs,
            meta_file=str(bundle / "configs" / "metadata.json"),
            bundle_root=str(root),
            dataset_dir=str(tiny_segthor_datalist.parent),
            write_logs=False,
            **values,
        )
        for name in written:
            record = checkpoint_record(root / "models" / name)
            assert record is not None, f"{stage} {name}"
            got = {(c["id"], c["role"], c["image"]) for c in record["cases"]}
            assert got == expected, f"{stage} {name}"
        final = root / "models" / written[0]
        network = bundle_parser(bundle, files, "tiny", "thorax").get_parsed_content(
            "refiner_def" if stage == "refiner" else "network_def"
        )
        state = torch.load(final, weights_only=True)
        network.load_state_dict(state, strict=True)  # a plain state dict: the tensors only
        load_weights(network, final)
        start_from(network, final)
        CheckpointLoader(str(final), {"model": network})(Engine(lambda e, b: None))


@pytest.mark.parametrize("folder", ["", "demo", "brain"])
def test_shipped_weights_record_the_first_16_demo_cases(folder):
    """The standard and the demo thorax weights and the standard brain weights: `medgen3d
    demo-data --dataset thorax|brain --cases 24 --seed 0`, the first 16 cases (15 train, case
    015 validating), as each models/PROVENANCE.md says; stored in float16 (`medgen3d
    store-half`)."""
    dataset = "brain" if folder == "brain" else "thorax"
    for name, path in shipped(folder).items():
        record = checkpoint_record(path)
        assert [c["id"] for c in record["cases"]] == [f"{dataset}_{i:03d}" for i in range(16)]
        assert [c["role"] for c in record["cases"]] == ["train"] * 15 + ["val"], name
        assert [Path(p).name for p in record["datalists"]] == ["train.json"], name
        state = torch.load(path, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values()), name
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}


# ---------------------------------------------------------------- synthetic datalists


@pytest.fixture(scope="module")
def shipped_pairs(tmp_path_factory):
    """One pair from the shipped weights (DDIM-2 masks, no refinement): the datalist."""
    return generate_pairs(1, tmp_path_factory.mktemp("pairs"), seed=0, steps=2, refine=False)


@pytest.mark.slow
def test_generated_datalists_carry_the_generators_records(shipped_pairs, tmp_path):
    doc = json.loads(shipped_pairs.read_text())
    masks = json.loads((shipped_pairs.parent / "masks" / "datalist.json").read_text())
    assert list(masks["generator_training_cases"]) == ["mask_generator"]
    records = doc["generator_training_cases"]
    assert list(records) == ["mask_generator", "sequence_generator"]  # no refiner ran
    for name, record in records.items():
        assert record == checkpoint_record(SHIPPED[name])
    # masks without any record: the pairs say that the mask generator is unknown
    masks["generator_training_cases"] = {}
    unrecorded = shipped_pairs.parent / "masks" / "unrecorded.json"  # paths stay relative
    unrecorded.write_text(json.dumps(masks))
    parser = bundle_parser(BUNDLES / "image_synthesis", ("inference.yaml",), None, None)
    parser.update({"bundle_root": str(BUNDLES / "image_synthesis"), "device": "cpu"})
    parser.update({"mask_datalist": str(unrecorded), "output_dir": str(tmp_path / "out")})
    parser.update({"refine": False})
    pairs = json.loads(parser.get_parsed_content("synthesize")().read_text())
    assert list(pairs["generator_training_cases"]) == ["masks", "sequence_generator"]
    assert pairs["generator_training_cases"]["masks"] is None


# ---------------------------------------------------------------- the guard


def test_guard_names_the_cases_a_generator_saw_and_allow_overlap_passes(tmp_path, capsys):
    t0, v0, new = (_pair(tmp_path, n, s) for n, s in (("t0", 0), ("v0", 1), ("new", 2)))
    renamed = _pair(tmp_path / "copy", "renamed", 0)  # t0's volumes under another name
    syn = _synthetic(tmp_path / "syn.json", training_record({"train": [t0], "val": [v0]}))
    test = [new, renamed, v0]
    with pytest.raises(DataError) as err:
        require_unseen(syn, test, source="real.json")
    assert str(err.value) == (
        f"real.json: 2 of 3 test cases were seen in training by the generators of {syn}: "
        "renamed (train case t0 of gen), v0 (val case of gen). test on cases no generator "
        "saw (e.g. the held-out cases), or pass --allow_overlap True to go on knowingly "
        "(the results record it)"
    )
    with pytest.raises(DataError):
        require_unseen(syn, test, allow_overlap="false")  # as a command line gives it
    record = tmp_path / "leakage.json"
    summary = require_unseen(syn, test, allow_overlap=True, record_to=record)
    assert json.loads(record.read_text()) == summary
    assert summary["allow_overlap"] and summary["checked"] == 3 and len(summary["overlap"]) == 2
    assert require_unseen(syn, [new])["overlap"] == []
    unrecorded = write_datalist(tmp_path / "old.json", [], load_label_set("segthor"), "CT", "x")
    assert require_unseen(unrecorded, test)["unrecorded"] == ["its generators"]
    assert "no record of the cases that trained its generators" in capsys.readouterr().out


def test_seg_evaluate_refuses_a_test_case_a_generator_saw(tmp_path):
    seen = _pair(tmp_path, "seen")
    syn = _synthetic(tmp_path / "syn.json", training_record({"train": [seen]}))
    test = write_datalist(
        tmp_path / "test.json", [seen], load_label_set("segthor"), "CT", "t", "test"
    )
    bundle = BUNDLES / "seg_downstream"
    values = {
        "bundle_root": str(tmp_path / "b"),
        "datalist": str(test),
        "synthetic_datalist": str(syn),
    }
    parser = bundle_parser(bundle, ("train.yaml", "evaluate.yaml"), "tiny", None, values)
    assert parser["evaluating"][0] == "@leakage_guard"  # before the model loads
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("leakage_guard")
    message = str(find_data_error(err.value))
    assert message.startswith(f"{test}: 1 of 1 test cases were seen in training by the generators")
    values["allow_overlap"] = True
    parser = bundle_parser(bundle, ("train.yaml", "evaluate.yaml"), "tiny", None, values)
    assert parser.get_parsed_content("leakage_guard")["overlap"] == ["seen (train case of gen)"]
    assert json.loads((tmp_path / "b" / "eval" / "leakage.json").read_text())["allow_overlap"]


@pytest.mark.slow
def test_old_readme_recipe_is_refused_and_the_new_one_tests_on_unseen_cases(
    shipped_pairs, tmp_path, capsys
):
    """Old: `demo-data --cases 12`, seg-study on that cohort with pairs from the shipped weights:
    its seeded test cases are among the 16 the generators learned from. New: `demo-data
    --cases 24 --heldout 8`, the generators' 16 to train, the held-out 8 to test."""
    main(["demo-data", "--cases", "24", "--heldout", "8", "--out", str(tmp_path / "demo")])
    cohort = tmp_path / "demo" / "datalist.json"
    capsys.readouterr()
    # case k depends only on (seed, k): the first 12 of 24 are the cohort of `--cases 12`
    old, _ = split_datalist(cohort, 12, tmp_path / "old.json", tmp_path / "rest.json")
    args = ["seg-study", "--real", str(old), "--synthetic", str(shipped_pairs)]
    args += ["--networks", "unet3d", "--synthetic_ratio", "0.1", "--out", str(tmp_path / "study")]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(f"error: {old}: 4 of 4 test cases were seen in training by the ")
    assert "(train case of every generator)" in err and "--allow_overlap True" in err
    heldout = read_datalist(tmp_path / "demo" / "heldout.json")["training"]
    assert [case_id(c) for c in heldout] == [f"thorax_{i:03d}" for i in range(16, 24)]
    summary = require_unseen(shipped_pairs, heldout)
    assert summary["checked"] == 8 and summary["overlap"] == [] and summary["unrecorded"] == []
