"""The bundles' entry points check their input first: bad cases, oversized volumes and a
checkpoint of another bundle, preset or label set stop with a message naming the file."""

import json

import numpy as np
import pytest
from bundle_helpers import REPO
from monai.bundle import ConfigParser

from common.core.errors import DataError
from common.core.io import save_nifti
from medgen3d.bundles import TRAIN_STAGES

BUNDLES = REPO / "bundles"
# every training run's config files, in merge order (the bundles' own stages)
TRAIN_CONFIGS = {
    name: [f"{stage.bundle}/configs/{c}" for c in stage.configs]
    for name, stage in TRAIN_STAGES.items()
}


def _parser(*configs: str, **values) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / c) for c in configs])
    parser.update(values)
    return parser


def _error(parser: ConfigParser, key: str) -> str:
    """The message of the DataError that parsing ``key`` raises (MONAI may wrap it)."""
    with pytest.raises(Exception) as info:
        parser.get_parsed_content(key)
    error = info.value
    while not isinstance(error, DataError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, DataError), repr(info.value)
    return str(error)


def _truncated_big_case(tmp_path):
    """A datalist of one 16^3 case whose image is truncated: only reading it would notice."""
    from common.data.datalists import write_datalist
    from common.data.labels import load_label_set

    label = np.zeros((16, 16, 16), np.uint8)
    label[4:8, 4:8, 4:8] = 1
    image = save_nifti(
        np.random.default_rng(0).random((16, 16, 16)), np.eye(4), tmp_path / "i.nii.gz"
    )
    image.write_bytes(image.read_bytes()[:5000])
    cases = [{"image": image, "label": save_nifti(label, np.eye(4), tmp_path / "l.nii.gz")}]
    return write_datalist(tmp_path / "datalist.json", cases, load_label_set("segthor"), "CT", "t")


@pytest.mark.parametrize("stage", TRAIN_CONFIGS)
def test_training_refuses_a_volume_over_the_memory_budget_from_its_header(stage, tmp_path):
    datalist = _truncated_big_case(tmp_path)
    parser = _parser(*TRAIN_CONFIGS[stage], datalist=str(datalist), max_voxels=1000)
    message = _error(parser, "split")
    assert message.startswith(f"{datalist}: 1 of 1 cases have problems:")
    assert f"{tmp_path / 'i.nii.gz'}: has 4096 voxels (shape (16, 16, 16)), more than " in message
    assert "max_voxels=1000" in message and "truncated" not in message


def test_image_synthesis_inference_validates_the_masks_first(tmp_path):
    from common.data.datalists import write_datalist
    from common.data.labels import load_label_set

    empty = save_nifti(np.zeros((8, 8, 8), np.uint8), np.eye(4), tmp_path / "m.nii.gz")
    masks = write_datalist(
        tmp_path / "masks.json", [{"label": empty}], load_label_set("segthor"), "CT", "m"
    )
    doc = json.loads(masks.read_text())
    masks.write_text(json.dumps({**doc, "masks_only": True}))
    parser = _parser(
        "image_synthesis/configs/inference.yaml",
        mask_datalist=str(masks),
        ckpt_dir=str(tmp_path / "no_models"),
        output_dir=str(tmp_path / "out"),
    )
    message = _error(parser, "inference")
    assert f"{empty}: label is empty: every voxel is background" in message
    assert not (tmp_path / "out").exists()


def test_seg_inference_validates_the_images_first(tmp_path):
    image = np.zeros((8, 8, 8), np.float32)
    image[0, 0, 0] = np.nan
    save_nifti(image, np.eye(4), tmp_path / "images" / "bad.nii.gz")
    save_nifti(image[..., 0], np.eye(4), tmp_path / "images" / "flat.nii.gz")
    parser = _parser("seg_downstream/configs/inference.yaml", dataset_dir=str(tmp_path / "images"))
    message = _error(parser, "dataset")
    assert f"{tmp_path / 'images' / 'bad.nii.gz'}: contains 1 NaN/inf voxels" in message
    assert f"{tmp_path / 'images' / 'flat.nii.gz'}: is 2D with shape (8, 8)" in message


def test_mask_generation_refuses_another_bundles_checkpoint(tmp_path):
    generator = BUNDLES / "image_synthesis" / "models" / "model.pt"
    parser = _parser(
        "mask_diffusion/configs/inference.yaml",
        ckpt_path=str(generator),
        output_dir=str(tmp_path),
    )
    message = _error(parser, "inference")
    assert message.startswith(f"{generator}: does not fit this network (")
    assert "missing keys" in message and "unexpected keys" in message
    assert "use the checkpoint trained with the same bundle, preset and label set" in message


def test_mask_generation_refuses_a_checkpoint_of_another_label_set(tmp_path):
    parser = _parser(
        "mask_diffusion/configs/inference.yaml",
        "mask_diffusion/configs/demo.yaml",
        bundle_root=str(BUNDLES / "mask_diffusion"),
        num_classes=3,
        output_dir=str(tmp_path),
    )
    message = _error(parser, "inference")
    assert "shape mismatches" in message
    assert "checkpoint (16, 11, 3, 3, 3) vs network (16, 7, 3, 3, 3)" in message


def test_seg_inference_refuses_another_bundles_checkpoint():
    ckpt = BUNDLES / "mask_diffusion" / "models" / "model.pt"
    message = _error(
        _parser("seg_downstream/configs/inference.yaml", ckpt_path=str(ckpt)), "load_model"
    )
    assert message.startswith(f"{ckpt}: does not fit this network (")
