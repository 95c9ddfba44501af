"""torchrun on 2 CPU processes (gloo), tiny sizes: data-parallel training of every bundle,
sharded generation and sharded evaluation give what one process gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import REPO
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run

from common.core.bundle_configs import config_files
from common.core.distributed import shard
from medgen3d.bundles import EVALUATE_STAGES, TRAIN_STAGES
from medgen3d.pairs import generate_pairs

BUNDLES = REPO / "bundles"


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Two processes on two cores: one thread each (and in this process)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun(*args: str, cwd: Path = REPO, timeout: int = 300) -> str:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (a free port); returns the output."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*run, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def tiny_configs(bundle: str, files: tuple[str, ...], *last: str) -> list[str]:
    """A bundle's ``files``, the tiny scale preset, then the ``last`` config files."""
    root = BUNDLES / bundle
    return [str(f) for f in config_files(root, files, "tiny", None)] + [
        str(root / "configs" / name) for name in last
    ]


def train_2_ranks(stage: str, values: dict, tmp_path: Path) -> str:
    """The bundle training ``stage`` (tiny) with ``multi_gpu_train.yaml`` on 2 ranks.

    The overrides go through ``--args_file``: torchrun would read ``--m``/``--n`` as its own.
    """
    bundle, files, run_id = TRAIN_STAGES[stage]
    args = tmp_path / "args.json"
    args.write_text(json.dumps(values))
    configs = str(tiny_configs(bundle, files, "multi_gpu_train.yaml"))
    run = ("-m", "monai.bundle", "run", run_id, "--config_file", configs)
    return torchrun(*run, "--args_file", str(args), cwd=BUNDLES / bundle)


def assert_trained_on_2_ranks(out: str, root: Path, resume: str, nets: tuple[str, ...]):
    """2 iterations logged once (rank 0); TensorBoard from one process; ranks' weights equal."""
    assert out.count("Epoch: 1/2, Iter: 1/1") == 1 and out.count("Epoch: 2/2, Iter: 1/1") == 1
    events = list((root / "runs").rglob("events.out.tfevents.*"))
    assert events and len({p.name.split(".")[-2] for p in events}) == 1  # one writer pid
    states = [torch.load(root / "models" / f"rank{r}" / resume, weights_only=False) for r in (0, 1)]
    for net in nets:
        weights = [k for k in states[0][net] if "running_" not in k and "num_batches" not in k]
        assert weights and not weights[0].startswith("module.")
        for key in weights:  # DDP averaged the gradients: the ranks hold the same weights
            torch.testing.assert_close(states[0][net][key], states[1][net][key])
    assert states[0]["engine"]["iteration"] == states[1]["engine"]["iteration"] == 2


def common_values(tiny_segthor_datalist, root: Path) -> dict:
    """4 cases: 2 to train (one per rank), 2 to validate (one per rank)."""
    return {
        "bundle_root": str(root),
        "dataset_dir": str(tiny_segthor_datalist.parent),
        "output_dir": str(root / "runs"),
        "val_cases": 2,
    }


def test_shard_without_torchrun_keeps_everything():
    assert shard([3, 1, 2]) == [3, 1, 2]


@pytest.mark.slow
def test_mask_diffusion_trains_on_2_ranks(tiny_segthor_datalist, tmp_path):
    root = tmp_path / "bundle"
    values = {**common_values(tiny_segthor_datalist, root), "max_epochs": 2, "val_interval": 1}
    out = train_2_ranks("masks", values, tmp_path)
    assert (root / "models" / "model.pt").exists() and (root / "models" / "model_best.pt").exists()
    assert_trained_on_2_ranks(out, root, "resume.pt", ("model",))


@pytest.mark.slow
def test_image_generator_trains_on_2_ranks(tiny_segthor_datalist, tmp_path):
    root = tmp_path / "bundle"
    values = {
        **common_values(tiny_segthor_datalist, root),
        "gen_batch_size": 1,
        "gen_max_epochs": 2,
    }
    out = train_2_ranks("generator", values, tmp_path)
    assert "val_psnr" in out and (root / "models" / "model.pt").exists()
    nets = ("generator", "image_discriminator", "temporal_discriminator")
    assert_trained_on_2_ranks(out, root, "resume_generator.pt", nets)


@pytest.mark.slow
def test_image_refiner_trains_on_2_ranks(tiny_segthor_datalist, tmp_path):
    root = tmp_path / "bundle"
    values = {
        **common_values(tiny_segthor_datalist, root),
        "sdm_batch_size": 1,
        "sdm_max_epochs": 2,
    }
    out = train_2_ranks("refiner", values, tmp_path)
    assert (root / "models" / "refiner_axial.pt").exists()
    assert_trained_on_2_ranks(out, root, "resume_refiner_axial.pt", ("model",))


@pytest.mark.slow
def test_seg_downstream_trains_on_2_ranks(tiny_segthor_datalist, tmp_path):
    root = tmp_path / "bundle"
    values = {**common_values(tiny_segthor_datalist, root), "batch_size": 1}
    out = train_2_ranks("seg", values, tmp_path)
    assert "val_mean_dice" in out and (root / "models" / "model.pt").exists()
    assert_trained_on_2_ranks(out, root, "resume.pt", ("model",))


@pytest.mark.slow
def test_seg_evaluation_on_2_ranks_gathers_the_same_dice(tiny_segthor_datalist, tmp_path):
    configs = tiny_configs("seg_downstream", EVALUATE_STAGES["seg"].configs)
    parser = ConfigParser()
    parser.read_config(configs)
    (tmp_path / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "models/model.pt")
    # 3 test cases: 2 on rank 0, 1 on rank 1
    doc = json.loads(tiny_segthor_datalist.read_text())
    base = tiny_segthor_datalist.parent
    doc["test"] = [{k: str(base / v) for k, v in c.items()} for c in doc["training"][:3]]
    (tmp_path / "test.json").write_text(json.dumps(doc))
    values = {"bundle_root": str(tmp_path), "datalist": str(tmp_path / "test.json")}
    bundle_run("evaluating", config_file=configs, eval_dir=str(tmp_path / "one"), **values)
    (tmp_path / "args.json").write_text(json.dumps({**values, "eval_dir": str(tmp_path / "two")}))
    configs.append(str(BUNDLES / "seg_downstream" / "configs" / "multi_gpu_evaluate.yaml"))
    run = ("-m", "monai.bundle", "run", "evaluating", "--config_file", str(configs))
    out = torchrun(*run, "--args_file", str(tmp_path / "args.json"))
    assert out.count("| heart |") == 1  # rank 0 reports
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert one["n_cases"] == two["n_cases"] == 3
    for metric in ("dice", "hd95"):
        for label, value in one[metric].items():
            assert two[metric][label] == pytest.approx(value, abs=1e-6, nan_ok=True)


@pytest.mark.slow
def test_generation_on_2_ranks_makes_the_same_cases(tmp_path):
    one = generate_pairs(4, tmp_path / "one", seed=3, steps=2, scale="demo")
    # n first: torchrun would read --n as an abbreviation of one of its own options
    gen = ("-m", "medgen3d.cli", "generate", "4", "--out", str(tmp_path / "two"), "--seed", "3")
    torchrun(*gen, "--steps", "2", "--scale", "demo")
    two = tmp_path / "two" / "datalist.json"
    assert json.loads(one.read_text()) == json.loads(two.read_text())  # same cases and seeds
    dirs = (one.parent, two.parent)
    for k in range(4):
        name = f"synthetic_{k:04d}.nii.gz"
        labels = [np.asarray(nib.load(d / "masks" / "labels" / name).dataobj) for d in dirs]
        np.testing.assert_array_equal(*labels)
        for folder in ("images", "images_sequence"):
            # HU / 1000: the model's [-1, 1] range of the [-1000, 1000] HU window
            images = [nib.load(d / folder / name).get_fdata() / 1000 for d in dirs]
            np.testing.assert_allclose(*images, rtol=0, atol=1e-5)
