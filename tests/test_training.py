"""Resume after a kill, and a non-finite loss stops training with the weights intact."""

import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from bundle_helpers import REPO, overrides
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from common.core.bundle_configs import config_files
from common.core.training import FiniteLoss, GlobalRNG, ResumeCheckpoint

BUNDLE = REPO / "bundles" / "mask_diffusion"


def test_global_rng_round_trip(tmp_path):
    rng = GlobalRNG()
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(rng.state_dict(), tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), random.random())
    rng.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2] == second[2]


def _trainer(loss, epochs=2):
    net = torch.nn.Linear(2, 1)
    data = [{"image": torch.ones(4, 2), "label": torch.zeros(4, 1)}] * 3
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=loss,
        decollate=False,
    )
    return trainer, net


def test_nan_loss_stops_before_the_weights_change():
    trainer, net = _trainer(FiniteLoss(lambda p, t: (p - t).sum() * float("nan")))
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(FloatingPointError, match="stopped before the weights were changed"):
        trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_nan_loss_in_epoch_two_keeps_the_epoch_one_checkpoint(tmp_path):
    calls = []

    def loss(pred, target):  # finite for the 3 iterations of epoch 1, then NaN
        calls.append(1)
        return torch.nn.functional.mse_loss(pred, target) * (1.0 if len(calls) <= 3 else np.nan)

    trainer, net = _trainer(FiniteLoss(loss), epochs=3)
    ResumeCheckpoint(tmp_path, {"model": net, "optimizer": trainer.optimizer}).attach(trainer)
    with pytest.raises(FloatingPointError, match="training loss is nan: stopped"):
        trainer.run()
    state = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert state["engine"]["iteration"] == 3
    assert all(torch.equal(v, state["model"][k]) for k, v in net.state_dict().items())


def test_resume_checkpoint_continues_from_last_epoch(tmp_path):
    trainer, net = _trainer(torch.nn.MSELoss(), epochs=2)
    ResumeCheckpoint(tmp_path, {"model": net, "optimizer": trainer.optimizer}).attach(trainer)
    trainer.run()
    trained = [p.clone() for p in net.parameters()]
    again, net2 = _trainer(torch.nn.MSELoss(), epochs=3)
    ResumeCheckpoint(tmp_path, {"model": net2, "optimizer": again.optimizer}).attach(again)
    seen = []
    again.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(e.state.epoch))
    again.run()
    assert seen == [3]  # epochs 1-2 were restored, only epoch 3 ran
    assert not all(torch.equal(a, b) for a, b in zip(trained, net2.parameters()))


def _bundle_training(datalist, root, epochs: int) -> list[str]:
    """The command line of a mask_diffusion training at the tiny preset into ``root``."""
    files = config_files(BUNDLE, ["inference.yaml", "train.yaml"], "tiny", "thorax")
    values = {"dataset_dir": str(datalist.parent), "bundle_root": str(root), "max_epochs": epochs}
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        repr([str(f) for f in files]),
    ] + overrides(values)


@pytest.mark.slow
def test_killed_bundle_training_resumes_to_the_same_weights(tiny_segthor_datalist, tmp_path):
    epochs, quiet = 3, {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    straight = subprocess.Popen(
        _bundle_training(tiny_segthor_datalist, tmp_path / "a", epochs), cwd=BUNDLE, **quiet
    )
    args = _bundle_training(tiny_segthor_datalist, tmp_path / "b", epochs)
    killed = subprocess.Popen(args, cwd=BUNDLE, **quiet)
    resume = tmp_path / "b" / "models" / "resume.pt"
    deadline = time.time() + 240
    while not resume.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.kill()
    killed.wait()
    engine = torch.load(resume, weights_only=True)["engine"]
    epoch = engine["iteration"] // engine["epoch_length"]
    assert 1 <= epoch < epochs, "the training finished before it was killed"
    out = subprocess.run(args, cwd=BUNDLE, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {resume} at epoch {epoch}" in out.stdout + out.stderr
    assert straight.wait(timeout=300) == 0
    a, b = (torch.load(tmp_path / r / "models" / "model.pt", weights_only=True) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
