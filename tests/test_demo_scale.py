"""`medgen3d demo --scale S --weights DIR`: every stage runs at the scale's presets with the
given weights (tiny here), and bad weights are refused before any work starts."""

import json
import shutil

import nibabel as nib
import pytest
import torch

import common.seg.study
import medgen3d.demo as demo
from common.core.errors import DataError
from medgen3d.bundles import BUNDLES, bundle_config
from medgen3d.cli import main
from medgen3d.demo import run_demo, train_generators

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """Untrained tiny-preset generators in the layout `medgen3d demo --train` writes."""
    root = tmp_path_factory.mktemp("weights")
    masks = bundle_config("mask_diffusion", "tiny", "thorax")
    images = bundle_config("image_synthesis", "tiny", "thorax")
    torch.manual_seed(0)
    networks = {
        "mask_diffusion/models/model.pt": masks.get_parsed_content("network_def"),
        "image_synthesis/models/model.pt": images.get_parsed_content("network_def"),
    }
    for view in images.get_parsed_content("sdm_views"):
        networks[f"image_synthesis/models/refiner_{view}.pt"] = images.get_parsed_content(
            "refiner_def"
        )
    for name, network in networks.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(network.state_dict(), root / name)
    return root


def _record(monkeypatch, module, name, scale_of) -> list:
    """Wrap ``module.name`` so that each call appends the scale it was given."""
    seen, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        seen.append(scale_of(args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return seen


@pytest.mark.slow
def test_tiny_demo_with_given_weights_runs_every_stage_at_the_scale(
    tmp_path, tiny_weights, monkeypatch
):
    scales = {
        "bundle_config": _record(monkeypatch, demo, "bundle_config", lambda a, k: a[1]),
        "generate_pairs": _record(monkeypatch, demo, "generate_pairs", lambda a, k: k["scale"]),
        "agreement": _record(monkeypatch, demo, "agreement", lambda a, k: a[4]),
        "seg_study": _record(monkeypatch, common.seg.study, "seg_study", lambda a, k: k["scale"]),
        "study_settings": _record(
            monkeypatch, common.seg.study, "study_settings", lambda a, k: a[1]
        ),
    }
    out = tmp_path / "demo"
    small = {"cases": 4, "heldout": 2, "n": 2, "seeds": 1, "seg_regimes": "E2-1"}
    report = run_demo("thorax", out, scale="tiny", weights=tiny_weights, **small)
    for stage, seen in scales.items():
        assert seen and set(seen) == {"tiny"}, (stage, seen)
    text = report.read_text()
    assert "scale `tiny`" in text and f"given weights ({tiny_weights})" in text
    # the tiny grid everywhere: the synthetic pairs, the real cases exported for evaluation and
    # the images made from their masks
    for folder in ("synthetic", "real_model_space", "from_real_masks"):
        datalist = out / folder / "datalist.json"
        case = json.loads(datalist.read_text())["training"][0]
        for key in ("image", "label"):
            assert nib.load(datalist.parent / case[key]).shape == (16, 16, 12), (folder, key)
    # the segmentation budget defaults to the tiny preset's max_iterations (2), not the demo's
    results = json.loads((out / "seg_study" / "results.json").read_text())
    assert [(r["regime"], r["steps"]) for r in results] == [("E2-1", [2])]


def test_train_generators_trains_at_the_given_scale(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_stage", lambda stages, name, *rest: calls.append((name, *rest)))
    weights = train_generators(tmp_path / "train.json", "thorax", tmp_path / "models", 1, "tiny")
    assert [c[:3] for c in calls] == [
        ("masks", "tiny", "thorax"),
        ("generator", "tiny", "thorax"),
        *[("refiner", "tiny", "thorax")] * 3,
    ]
    assert calls[0][3]["max_epochs"] == 1
    assert weights.mask_ckpt == tmp_path / "models" / "mask_diffusion" / "models" / "model.pt"
    calls.clear()
    train_generators(tmp_path / "train.json", "thorax", tmp_path / "models")
    assert {c[1] for c in calls} == {"standard"}  # the default: the base configs' scale


def test_bad_weights_are_refused_before_any_work(tmp_path, tiny_weights, capsys):
    out = tmp_path / "demo"
    with pytest.raises(DataError, match=r"mask_diffusion/models/model.pt.*--weights"):
        run_demo("thorax", out, scale="tiny", weights=tmp_path / "nowhere")
    partial = tmp_path / "partial"
    (partial / "mask_diffusion" / "models").mkdir(parents=True)
    (partial / "mask_diffusion" / "models" / "model.pt").write_bytes(
        (tiny_weights / "mask_diffusion" / "models" / "model.pt").read_bytes()
    )
    with pytest.raises(DataError, match=r"image_synthesis/models/refiner_coronal.pt"):
        run_demo("thorax", out, scale="tiny", weights=partial)
    with pytest.raises(DataError, match="--weights and --train given together"):
        run_demo("thorax", out, train=True, scale="tiny", weights=tiny_weights)
    with pytest.raises(DataError, match="no shipped weights for the brain demo at the demo scale"):
        run_demo("brain", out, scale="demo")  # demo-scale weights ship for the thorax only
    # tiny weights live in models/ like the standard ones, which do not fit the tiny networks
    with pytest.raises(DataError, match="no shipped weights for the thorax demo at the tiny"):
        run_demo("thorax", out, scale="tiny")
    other_scale = tmp_path / "other_scale"  # demo-scale weights given for the tiny scale
    for bundle in ("mask_diffusion", "image_synthesis"):
        shutil.copytree(BUNDLES / bundle / "models" / "demo", other_scale / bundle / "models")
    with pytest.raises(DataError, match="does not fit this network"):
        run_demo("thorax", out, scale="tiny", weights=other_scale)
    assert not out.exists()
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--out", str(out), "--train", "--weights", str(tiny_weights)])
    assert stop.value.code == 2 and "--weights and --train" in capsys.readouterr().err
    assert not out.exists()
