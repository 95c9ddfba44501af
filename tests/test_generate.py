"""`medgen3d generate` and its writers: paired, valid, seeded; each case records how it was
made, a rerun keeps only the cases made with the same settings, a resumed run is bit for bit
an uninterrupted one, and a killed run's temporaries and a full disk are dealt with."""

import errno
import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import REPO

from common.core.bundle_configs import bundle_parser
from common.core.errors import DataError
from common.core.io import read_record, save_nifti
from common.data.datalists import read_datalist, write_datalist
from common.data.labels import load_label_set
from common.data.validate import validate_datalist
from common.images.generation import synthesize_images
from common.masks.generation import generate_mask_cases
from medgen3d.bundles import bundle_config
from medgen3d.pairs import generate_pairs

HU = (-1000.0, 1000.0)


def test_generate_one_pair_and_rerun_keeps_it(tmp_path):
    datalist = generate_pairs(1, tmp_path / "gen", seed=3, steps=2, scale="demo")
    assert validate_datalist(datalist) == []
    case = json.loads(datalist.read_text())["training"][0]
    image = nib.load(datalist.parent / case["image"])
    label = nib.load(datalist.parent / case["label"])
    assert image.shape == label.shape == (32, 32, 32)
    np.testing.assert_allclose(image.affine, label.affine)
    assert (datalist.parent / case["image_sequence"]).exists() and "seed" in case
    assert case["settings"]["mask"]["settings"]["steps"] == 2  # the mask's own record
    before = (datalist.parent / case["image"]).stat().st_mtime_ns
    generate_pairs(1, tmp_path / "gen", seed=3, steps=2, scale="demo")  # rerun: kept
    assert (datalist.parent / case["image"]).stat().st_mtime_ns == before


def _mask_pipeline(**values):
    """The mask bundle's pipeline at the tiny preset (16x16x12, DDIM-2), untrained."""
    values = {"pipeline#network": "@network_def", "device": "cpu", **values}
    parser = bundle_parser(REPO / "bundles" / "mask_diffusion", ["inference.yaml"], "tiny", None)
    parser.update(values)
    torch.manual_seed(0)
    return parser.get_parsed_content("pipeline"), parser.get_parsed_content("output_pixdim")


def _masks(out, n, **values):
    pipeline, pixdim = _mask_pipeline(**values)
    return generate_mask_cases(pipeline, load_label_set("segthor"), out, n, pixdim, seed=1)


def _image_pipeline(**values):
    """The image bundle's pipeline with the shipped weights (it runs on 16x16 slices too)."""
    return bundle_config("image_synthesis", None, None, device="cpu", **values).get_parsed_content(
        "pipeline"
    )


def _entries(datalist) -> dict:
    return {c["case"]: c for c in read_datalist(datalist)["training"]}


def _mtimes(folder) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.nii.gz")}


def _datalist_tells_the_truth(datalist, keys=("label",)):
    """Every file holds the settings its datalist entry states."""
    for case in read_datalist(datalist)["training"]:
        for key in keys:
            assert read_record(case[key]) == case["settings"], (case["case"], key)


def test_mask_rerun_remakes_exactly_the_cases_made_with_other_settings(tmp_path, capsys):
    out = tmp_path / "masks"
    datalist = _masks(out, 2, steps=3)
    first = _mtimes(out)
    _masks(out, 2, steps=3)
    assert _mtimes(out) == first  # same settings: kept
    _masks(out, 1, steps=2)  # another setting for case 0 only
    assert (
        "synthetic_0000.nii.gz: made with other settings (steps 3 -> 2)" in capsys.readouterr().out
    )
    assert _mtimes(out).keys() == first.keys()
    second = _mtimes(out)
    assert second["labels/synthetic_0000.nii.gz"] != first["labels/synthetic_0000.nii.gz"]
    assert second["labels/synthetic_0001.nii.gz"] == first["labels/synthetic_0001.nii.gz"]
    assert [c["settings"]["steps"] for c in _entries(datalist).values()] == [2]
    _datalist_tells_the_truth(datalist)
    _masks(out, 2, steps=3)  # case 0 back to 3 steps: remade; case 1 was made so: kept
    third = _mtimes(out)
    assert third["labels/synthetic_0000.nii.gz"] != second["labels/synthetic_0000.nii.gz"]
    assert third["labels/synthetic_0001.nii.gz"] == first["labels/synthetic_0001.nii.gz"]
    doc = json.loads(datalist.read_text())
    assert doc["steps"] == 3 and [c["settings"]["steps"] for c in doc["training"]] == [3, 3]
    _datalist_tells_the_truth(datalist)


def test_raw_masks_come_from_the_same_sampling_run_as_the_written_ones(tmp_path):
    pipeline, pixdim = _mask_pipeline(steps=2)
    labels = load_label_set("segthor")
    out, raw_out = tmp_path / "masks", tmp_path / "raw"
    generate_mask_cases(pipeline, labels, out, 2, pixdim, seed=1)
    written = _mtimes(out)
    datalist = generate_mask_cases(pipeline, labels, out, 2, pixdim, seed=1, raw_output_dir=raw_out)
    assert _mtimes(out) != written  # no raw file yet: the cases are sampled again, both written
    raw_entries, kept_entries = _entries(raw_out / "datalist.json"), _entries(datalist)
    seeds = [c["seed"] for c in kept_entries.values()]
    alone = pipeline(seeds, postprocess=False)  # the raw volumes are the unprocessed samples
    for k, (raw, kept) in enumerate(zip(raw_entries.values(), kept_entries.values())):
        raw_volume = torch.from_numpy(np.asarray(nib.load(raw["label"]).dataobj)).long()
        kept_volume = np.asarray(nib.load(kept["label"]).dataobj)
        assert torch.equal(raw_volume, alone[k])
        assert np.array_equal(pipeline._keep_largest(raw_volume[None])[0].numpy(), kept_volume)
        assert raw["settings"]["keep_largest"] is False and kept["settings"]["keep_largest"]
    assert not all(torch.equal(alone[k], pipeline(seeds)[k]) for k in range(2))  # it did cut
    _datalist_tells_the_truth(datalist)
    _datalist_tells_the_truth(raw_out / "datalist.json")
    both = (_mtimes(out), _mtimes(raw_out))
    generate_mask_cases(pipeline, labels, out, 2, pixdim, seed=1, raw_output_dir=raw_out)
    assert (_mtimes(out), _mtimes(raw_out)) == both  # rerun: kept


def test_image_rerun_remakes_the_cases_whose_settings_or_mask_changed(tmp_path):
    masks = _masks(tmp_path / "masks", 2, steps=2)
    out = tmp_path / "pairs"
    pairs = synthesize_images(_image_pipeline(refine=False), masks, out, HU)
    first = _mtimes(out)
    synthesize_images(_image_pipeline(refine=False), masks, out, HU)
    assert _mtimes(out) == first
    pairs = synthesize_images(_image_pipeline(sdm_t0=20), masks, out, HU)  # refined now
    second = _mtimes(out)
    assert all(second[k] != first[k] for k in first)
    doc = json.loads(pairs.read_text())
    assert doc["refined"] and doc["t0"] == 20
    assert all(c["settings"]["refine"] and c["settings"]["t0"] == 20 for c in doc["training"])
    _datalist_tells_the_truth(pairs, ("image", "image_sequence"))
    _masks(tmp_path / "masks", 1, steps=3)  # mask 0 remade: its images must follow
    pairs = synthesize_images(_image_pipeline(sdm_t0=20), masks, out, HU)
    third = _mtimes(out)
    assert [third[k] != second[k] for k in sorted(second)] == [True, False, True, False]
    _datalist_tells_the_truth(pairs, ("image", "image_sequence"))
    entry = _entries(pairs)["synthetic_0000"]
    assert entry["settings"]["mask"]["settings"] == read_record(entry["label"])


def _one_hot_masks(n, shape=(16, 16, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(n, *shape, dtype=torch.long)
    for i in range(n):
        for organ in range(1, 5):
            x, y = torch.randint(0, shape[0] - 6, (2,), generator=g).tolist()
            labels[i, x : x + 6, y : y + 6, 1:-1] = organ
    return torch.nn.functional.one_hot(labels, 5).movedim(-1, 1).float()


def test_an_image_is_bit_for_bit_the_same_in_any_batch():
    pipeline = _image_pipeline()
    masks = _one_hot_masks(3)
    sequence, refined = pipeline(masks, [1, 2, 3])
    for k in range(3):
        alone = pipeline(masks[k : k + 1], [k + 1])
        assert torch.equal(alone[0][0], sequence[k]) and torch.equal(alone[1][0], refined[k])


def test_resumed_synthesis_is_bit_for_bit_an_uninterrupted_one(tmp_path):
    """A kill after case 0 (its files written, case 1's a hidden temporary): the rerun makes
    case 1 and removes the temporary; every file equals the uninterrupted run's."""
    labels = torch.argmax(_one_hot_masks(2), 1).numpy().astype(np.uint8)
    cases = [
        {"label": save_nifti(v, np.diag([20.0, 20, 20, 1]), tmp_path / f"m{k}.nii.gz")}
        for k, v in enumerate(labels)
    ]
    masks = write_datalist(tmp_path / "masks.json", cases, load_label_set("segthor"), "CT", "m")
    pipeline = _image_pipeline()
    synthesize_images(pipeline, masks, tmp_path / "a", HU)
    synthesize_images(pipeline, masks, tmp_path / "b", HU)
    for folder in ("images", "images_sequence"):
        killed = tmp_path / "b" / folder / "m1.nii.gz"
        killed.unlink()
        (killed.parent / ".m1.nii.gz.k1ll3d.tmp.nii.gz").write_bytes(b"half a volume")
    (tmp_path / "b" / "datalist.json").unlink()
    synthesize_images(pipeline, masks, tmp_path / "b", HU)
    names = sorted(str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*"))
    assert names == sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*"))
    for name in names:
        a, b = (tmp_path / run / name for run in "ab")
        if name.endswith(".nii.gz"):
            assert gzip.decompress(a.read_bytes()) == gzip.decompress(b.read_bytes()), name
    assert not list((tmp_path / "b").rglob(".*"))  # the killed run's temporary is gone


def test_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    def full(img, path):
        with open(path, "wb") as f:
            f.write(b"\x1f\x8b partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nib, "save", full)
    target = tmp_path / "images" / "case.nii.gz"
    with pytest.raises(DataError) as err:
        save_nifti(np.zeros((2, 2, 2), np.float32), np.eye(4), target)
    assert str(err.value) == (
        f"{target}: could not be written (No space left on device, errno 28). "
        "free disk space or choose a writable output folder, then rerun"
    )
    assert list((tmp_path / "images").iterdir()) == []


def _can_mount_tmpfs() -> bool:
    import subprocess

    probe = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c"]
    try:
        return subprocess.run([*probe, "mount -t tmpfs none /mnt"], timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs user namespaces to mount a tmpfs")
def test_generate_on_a_full_disk_exits_2_naming_the_file(tmp_path):
    """A real full disk: the output folder is a 40 kB tmpfs (room for the masks only)."""
    import subprocess
    import sys

    out = tmp_path / "disk"
    out.mkdir()
    generate = [sys.executable, "-m", "medgen3d.cli", "generate", "--n", "2", "--steps", "2"]
    script = f'mount -t tmpfs -o size=40k none {out} && exec "$@"'
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"]
        + [*generate, "--norefine", "--out", str(out / "gen")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        f"error: {out}/gen/images_sequence/synthetic_0000.nii.gz: could not be written (No space "
        "left on device, errno 28). free disk space or choose a writable output folder, then rerun"
    )
