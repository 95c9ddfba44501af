"""The benchmark suite's functions at a toy size, so the suite does not rot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import gpu, mask_windows, run, suite, training
from benchmarks.report import report
from common.masks.mcdpm import plan_rounds
from common.masks.windows import extension_plan

CKPT = suite.REPO / "bundles" / "mask_diffusion" / "models" / "demo" / "model.pt"


def test_plan_rounds_cover_every_window_once():
    for z0 in (0, 5, 12, 24):
        plan = extension_plan(32, 8, 2, z0)
        rounds = plan_rounds(plan)
        assert sorted(s.start for r in rounds for s in r) == sorted(s.start for s in plan)
        up = sum(s.direction == "forward" for s in plan)
        assert rounds[0] == [plan[0]] and len(rounds) == 1 + max(up, len(plan) - 1 - up)


@pytest.mark.slow
def test_suite_sections_and_report(tiny_segthor_datalist, tmp_path):
    memory: dict = {}
    real = suite.real_masks(tiny_segthor_datalist)
    samplers = [suite.Sampler.parse(s) for s in ("ddpm:2:1", "ddim:1:2", "ddim:1:1:bf16:eta=0")]
    samplers.append(suite.Sampler("rflow", 1, 1))
    mask = suite.mask_sampling(samplers, CKPT, 2, samplers[1], memory, real)
    rows = {r["sampler"].name: r for r in mask["rows"]}
    assert list(rows) == ["DDPM-2", "DDIM-1 eta=1", "DDIM-1 eta=0 bf16", "RFLOW-1"]
    assert rows["RFLOW-1"]["quality"] is None  # a DDPM checkpoint: timing only
    quality, kept = rows["DDIM-1 eta=1"]["quality"], rows["DDIM-1 eta=1"]["quality_kept"]
    assert kept["components_gen"] == 1 <= quality["components_gen"]  # keep-largest merges
    assert quality["components_real"] == 1.0 and quality["z_continuity_real"] > 0.8  # tubes
    assert mask["batched"]["ratio"] > 0 and mask["n_real"] == 4
    image = suite.image_stage(1, [64], memory, tiny_segthor_datalist)
    assert [r["bf16"] for r in image["refiner"]] == [False, True]
    assert image["refiner"][0]["forward_calls"] == image["t_steps"] * 3
    rows = training.training(1, memory, tiny_segthor_datalist, training.TRAININGS[-1:])
    assert 0 < rows[0]["loader_share"] < 1 and rows[0]["samples_per_iter"] == 2
    scaling = suite.scaling([16, 24], [16, 32], (16, 16), 1)
    assert [(r["windows"], r["rounds"]) for r in scaling["by_depth"]] == [(3, 2), (5, 3)]
    assert all(m["peak_rss_mb"] > 0 for m in memory.values())

    args = run.parse_args(
        ["--quick", "--out", str(tmp_path / "r.md"), "--datalist", str(tiny_segthor_datalist)]
    )
    results = {"context": _context(), "memory": memory, "mask": mask, "image": image}
    results.update(training=rows, scaling=scaling)
    text = report(results, args.train_iters)
    for heading in ("MC-DPM", "Image stage", "Training", "Peak resident", "Scaling", "Targets"):
        assert f"## {heading}" in text
    assert "timing only" in text and "speed-up vs DDPM-2" in text and "## Notes" in text
    assert run.default_sampler(args) == suite.Sampler("ddim", 20, 2)


def _context() -> dict:
    return {
        "date": "today",
        "platform": "test",
        "processor": "cpu",
        "cpu_count": 1,
        "threads": 1,
        "python": "3",
        "torch": "2",
        "monai": "1",
        "command": "pytest",
        "load_start": (0.0, 0.0, 0.0),
        "load_end": (0.0, 0.0, 0.0),
        "wall_s": 1.0,
        "quick": True,
        "cpu_bf16": "none",
    }


def test_parse_args_rejects_unknown_sections_and_missing_data(tmp_path):
    with pytest.raises(SystemExit):
        run.parse_args(["--sections", "mask,nope", "--datalist", str(CKPT)])
    with pytest.raises(SystemExit):
        run.parse_args(["--datalist", str(tmp_path / "missing.json")])


def test_gpu_script_runs_on_cpu_at_demo_size(capsys):
    rows = gpu.main(
        ["--scale", "demo", "--device", "cpu", "--mask-sampler", "ddim:1"]
        + ["--fast-sampler", "ddim:1", "--batch-volumes", "2"]
    )
    assert len(rows) == 8 and all(seconds > 0 for _, seconds, _ in rows)
    assert "Batched generation" in capsys.readouterr().out


def test_mask_windows_splits_slice_pairs_at_seams(tiny_segthor_datalist, tmp_path):
    """Seams of the plan from the middle of a 12-slice grid (m=4, n=2): the first window at 4
    (slices 4-7), upward windows add slices 8-9 and 10-11, downward 2-3 and 0-1; a seam is
    each window's first new slice next to its given ones. A tiny untrained run reports both
    given counts."""
    assert mask_windows.seam_slices(12, 4, 2, 4) == {8, 10, 4, 2}
    volume = np.zeros((4, 4, 4), int)
    volume[:2, :2, 0:2] = 1
    volume[:2, :1, 2] = 1
    # pairs (0, 1): 1, (1, 2): 2/3, (2, 3): 0 (the organ ends), as z-continuity counts them
    table = mask_windows.seam_table([volume], {2}, ["background", "organ"])
    assert table["organ"] == {
        "seam": pytest.approx(2 / 3),
        "seam_pairs": 1,
        "inside": 0.5,
        "inside_pairs": 2,
    }
    out = tmp_path / "windows.json"
    rows = mask_windows.main(
        str(tiny_segthor_datalist), None, scale="tiny", given="2,3", volumes=1, out=str(out)
    )
    assert [r["given"] for r in rows] == [2, 3] and out.is_file()
    assert set(rows[0]["slice_dice"]) == {"esophagus", "heart", "trachea", "aorta"}


def test_mask_guidance_rows_per_guidance(tiny_segthor_datalist, tmp_path):
    from benchmarks import mask_guidance

    out = tmp_path / "guidance.json"
    rows = mask_guidance.main(
        str(tiny_segthor_datalist), None, scale="tiny", guidance="1,3", volumes=1, out=str(out)
    )
    assert [r["guidance"] for r in rows] == [1.0, 3.0] and out.is_file()
    assert rows[0]["raw"]["components_real"] > 0 and rows[1]["s_per_volume"] > 0


def test_objectives_resume_volume_by_volume(tiny_segthor_datalist, tmp_path, monkeypatch):
    """A stopped comparison keeps every volume it sampled: the rerun reads them (same
    table), and volumes of another checkpoint in the same folder are refused."""
    import torch

    from benchmarks import objectives
    from common.core.errors import DataError
    from medgen3d.bundles import bundle_config

    ckpt = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    network = bundle_config("mask_diffusion", "tiny", "thorax").get_parsed_content("network_def")
    torch.save(network.state_dict(), ckpt)
    monkeypatch.setattr(objectives, "SETTINGS", {"ddpm": ("ddpm:3", "ddim:2")})
    run = {"real": str(tiny_segthor_datalist), "volumes": 2, "scale": "tiny"}
    out = tmp_path / "out"
    objectives.main(**run, ddpm=str(ckpt), out=str(out), objectives="ddpm")
    first = (out / "ddpm.json").read_text()
    kept = sorted((out / "ddpm_volumes").rglob("seed*.npz"))
    assert [p.parent.name + "/" + p.name for p in kept] == [
        "DDIM-2 eta=1/seed0.npz",
        "DDIM-2 eta=1/seed1.npz",
        "DDPM-3/seed0.npz",
        "DDPM-3/seed1.npz",
    ]
    stamps = [p.stat().st_mtime_ns for p in kept]
    (out / "ddpm.json").unlink()  # as if stopped before the end
    objectives.main(**run, ddpm=str(ckpt), out=str(out), objectives="ddpm")
    assert [p.stat().st_mtime_ns for p in kept] == stamps  # read, not sampled again
    assert objectives.read_json(out / "ddpm.json")["rows"] == json.loads(first)["rows"]
    (out / "ddpm.json").unlink()
    with pytest.raises(DataError, match="holds volumes of"):
        objectives.main(**run, ddpm=str(tmp_path / "other.pt"), out=str(out), objectives="ddpm")


def test_mask_pieces_splits_specks_from_fragments():
    from benchmarks.mask_pieces import label_row

    mask = np.zeros((12, 12, 12), np.uint8)
    mask[1:3, 1:3, 1:4] = 1  # 12 voxels
    mask[8, 8, 8] = mask[10, 2, 10] = 1  # two one-voxel specks
    mask[5:8, 5:8, 0] = 1  # a 9-voxel fragment
    row = label_row([mask, np.zeros_like(mask)], 1)  # the second volume has no label 1
    assert row["pieces"] == 2.0 and row["large"] == 1.0  # means over the two volumes
    assert row["speck_share"] == pytest.approx(0.25)  # (2 of 4) / 2
    assert row["outside_largest"] == pytest.approx((1 - 12 / 23) / 2)


def test_mask_pieces_says_where_the_specks_are():
    from benchmarks.mask_pieces import speck_places

    mask = np.zeros((16, 16, 16), np.uint8)
    mask[2:6, 2:6, 2:6] = 1  # the largest piece of label 1
    mask[10, 3, 3] = 1  # a speck 5 voxels beyond it (x 10 vs its last voxel at x 5), in background
    mask[9:14, 9:14, 9:14] = 2  # another organ
    mask[11, 11, 11] = 1  # a speck of label 1 inside it
    places = speck_places([mask], 1)
    assert places["count"] == 2 and places["inside_other"] == 0.5 and places["near"] == 0.0
    assert places["median_distance"] == pytest.approx((5 + np.sqrt(3 * 6**2)) / 2)
    assert speck_places([mask], 2)["count"] == 0
