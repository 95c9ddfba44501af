"""image_synthesis: the base config alone with the shipped weights, the ImagePipeline it builds,
and end to end at the tiny preset (train both stages, synthesise, evaluate)."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import REPO, monai_bundle, overrides
from monai.bundle import ConfigParser, verify_net_in_out

from common.core.bundle_configs import bundle_parser, config_files
from common.core.io import load_weights
from common.data.datalists import read_datalist, write_datalist
from common.data.labels import load_label_set
from common.data.validate import validate_datalist
from common.images.pipeline import ImagePipeline

BUNDLE = REPO / "bundles" / "image_synthesis"
MODELS = BUNDLE / "models"
TRAIN = {
    "generator": ("inference.yaml", "train.yaml", "train_generator.yaml"),
    "refiner": ("inference.yaml", "train.yaml", "train_refiner.yaml"),
}


def _base(**values) -> ConfigParser:
    """``configs/inference.yaml`` alone, as MONAI Label and the model zoo read it."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
    parser.update({"bundle_root": str(BUNDLE), "device": "cpu", **values})
    return parser


def _masks(b: int, shape=(16, 16, 8), seed: int = 0) -> torch.Tensor:
    """One-hot SegTHOR-like masks ``(b, 5, *shape)``: random blocks of the four organs."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(b, *shape, dtype=torch.long)
    for i in range(b):
        for organ in range(1, 5):
            x, y = torch.randint(0, shape[0] - 6, (2,), generator=g).tolist()
            labels[i, x : x + 6, y : y + 6, 1:-1] = organ
    return torch.nn.functional.one_hot(labels, 5).movedim(-1, 1).float()


def test_base_config_alone_loads_the_shipped_weights_strictly():
    pipeline = _base().get_parsed_content("pipeline")
    assert isinstance(pipeline, ImagePipeline) and pipeline.refine
    assert sorted(pipeline.refiners) == ["axial", "coronal", "sagittal"]
    nets = {f"refiner_{view}": net for view, net in pipeline.refiners.items()}
    nets["model"] = pipeline.generator  # the sequence generator
    for name, net in nets.items():
        saved = torch.load(MODELS / f"{name}.pt", map_location="cpu", weights_only=True)
        own = net.state_dict()
        assert own.keys() == saved.keys()  # every key, none missing or unexpected
        for key, value in saved.items():
            assert torch.equal(own[key], value), f"{name}: {key}"


def test_pipeline_is_seeded_and_a_volume_does_not_depend_on_its_batch():
    pipeline = _base().get_parsed_content("pipeline")
    masks = _masks(2)
    sequence, refined = pipeline(masks, [11, 12])
    again = pipeline(masks, [11, 12])
    alone = pipeline(masks[1:], [12])
    other = pipeline(masks[1:], [13])
    assert sequence.shape == refined.shape == (2, 1, 16, 16, 8)
    assert refined.abs().max() <= 1.0 and not torch.equal(sequence, refined)
    assert torch.equal(sequence, again[0]) and torch.equal(refined, again[1])
    torch.testing.assert_close(alone[0], sequence[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[1], refined[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other[0], alone[0])  # the generator takes no noise
    assert not torch.allclose(other[1], alone[1])


def test_pipeline_without_refinement_needs_no_refiner_weights(tmp_path):
    shutil.copy(MODELS / "model.pt", tmp_path / "model.pt")
    pipeline = _base(refine=False, ckpt_dir=str(tmp_path)).get_parsed_content("pipeline")
    sequence, refined = pipeline(_masks(1), [0])
    assert not pipeline.refiners and refined is sequence
    with pytest.raises(ValueError, match="refiners"):
        ImagePipeline(pipeline.generator, {}, pipeline.scheduler)


@pytest.mark.slow
def test_base_config_alone_synthesises_from_the_bundle_root(tiny_segthor_datalist, tmp_path):
    """`monai.bundle run inference` with configs/inference.yaml alone (MONAI Label, model zoo)."""
    doc = read_datalist(tiny_segthor_datalist)
    one = write_datalist(
        tmp_path / "one.json", doc["training"][:1], load_label_set("segthor"), "CT", "one"
    )
    out = tmp_path / "images"
    monai_bundle(
        *("run", "inference", "--config_file", "configs/inference.yaml"),
        *("--mask_datalist", str(one), "--output_dir", str(out)),
        cwd=BUNDLE,
    )
    doc = json.loads((out / "datalist.json").read_text())
    assert len(doc["training"]) == 1 and doc["refined"] is True
    assert (doc["t0"], doc["guidance"], doc["steps"]) == (10, 3.0, 100)
    image = nib.load(out / doc["training"][0]["image"])
    assert image.shape == (40, 40, 24)


@pytest.mark.slow
def test_train_synthesise_evaluate(tiny_segthor_datalist, tmp_path):
    root = tmp_path / "bundle"
    values = overrides({"bundle_root": str(root), "dataset_dir": str(tiny_segthor_datalist.parent)})

    def run(run_id: str, stage: tuple[str, ...], *args: str) -> str:
        configs = str([str(f) for f in config_files(BUNDLE, stage, "tiny", "thorax")])
        return monai_bundle("run", run_id, "--config_file", configs, *values, *args, cwd=BUNDLE)

    run("training", TRAIN["generator"])
    for view in ("axial", "coronal"):
        run("training", TRAIN["refiner"], "--view", view)
    run("export_real", ("inference.yaml",))
    real = root / "outputs" / "real_model_space" / "datalist.json"
    run("inference", ("inference.yaml",), "--mask_datalist", str(real), "--batch_size", "3")
    paired = root / "outputs" / "datalist.json"
    doc = json.loads(paired.read_text())
    assert len(doc["training"]) == 4 and validate_datalist(paired) == []
    first = doc["training"][0]
    image = nib.load(paired.parent / first["image"])
    label = nib.load(paired.parent / first["label"])
    assert image.shape == label.shape == (16, 16, 12)
    np.testing.assert_allclose(image.affine, label.affine)
    hu = np.asarray(image.dataobj)
    assert -1000.0 <= hu.min() and hu.max() <= 1000.0  # back in HU
    out = run("evaluating", ("inference.yaml",), "--mask_datalist", str(real))
    assert "sequence generator only" in out and "refined" in out
    metrics = json.loads((root / "outputs" / "image_metrics.json").read_text())
    assert np.isfinite(metrics["refined"]["paired_metrics"]["psnr_mean"])


def test_verify_net_in_out():
    """The sequence generator of the base config against metadata.json (17 input channels)."""
    verify_net_in_out(  # MONAI's own check, in-process to save an interpreter start
        net_id="network_def",
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        config_file=str(BUNDLE / "configs" / "inference.yaml"),
    )


def test_shipped_generator_exports_to_torchscript(tmp_path):
    """The model zoo's TorchScript check on models/model.pt (the sequence generator)."""
    from monai.bundle import ckpt_export

    ts = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(MODELS / "model.pt"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        config_file=str(BUNDLE / "configs" / "inference.yaml"),
        bundle_root=str(BUNDLE),
    )
    parser = bundle_parser(BUNDLE, ("inference.yaml",), None, None)
    eager = load_weights(parser.get_parsed_content("network_def"), MODELS / "model.pt").eval()
    x = torch.rand(1, 17, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(ts))(x), eager(x))
