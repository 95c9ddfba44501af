"""The weight average (EMA) a diffusion training validates and saves: its update rule, off at 0,
its resume state, and the MC-DPM bundle saving the average while resume.pt keeps both."""

import pytest
import torch
from bundle_helpers import REPO, monai_bundle
from ignite.engine import Engine, Events
from torch import nn

from common.core.bundle_configs import config_files
from common.core.ema import WeightAverage
from common.core.training import GlobalRNG, ResumeCheckpoint


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _set(net: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
        net[1].num_batches_tracked.fill_(int(value))


def test_the_first_update_copies_then_each_moves_by_one_minus_decay():
    net = _net()
    ema = WeightAverage(net, decay=0.5)
    assert ema.network is not net and not any(p.requires_grad for p in ema.network.parameters())
    _set(net, 2.0)
    ema.update()  # d = 0: a copy
    assert torch.equal(ema.network[0].weight, torch.full((4, 3), 2.0))
    _set(net, 4.0)
    ema.update()  # d = min(0.5, 1/11)
    expected = 2.0 + (4.0 - 2.0) * (1 - 1 / 11)
    torch.testing.assert_close(ema.network[0].bias, torch.full((4,), expected))
    assert int(ema.network[1].num_batches_tracked) == 4  # integer buffers are copied
    for _ in range(200):
        ema.update()  # the warm-up fades: d reaches the decay
    assert ema.updates == 202
    torch.testing.assert_close(ema.network[0].weight, torch.full((4, 3), 4.0))


def test_decay_zero_is_the_network_itself_and_a_bad_decay_is_refused():
    net = _net()
    off = WeightAverage(net, decay=0.0)
    assert off.network is net
    off.update()
    assert off.state_dict() == {"network": {}, "updates": 1}
    with pytest.raises(ValueError, match="ema_decay must be in"):
        WeightAverage(net, decay=1.0)


def test_a_wrapped_network_is_averaged_through_its_module():
    class Wrapper(nn.Module):  # what DistributedDataParallel looks like from here
        def __init__(self, module):
            super().__init__()
            self.module = module

    net = _net()
    ema = WeightAverage(Wrapper(net), decay=0.9)
    assert set(ema.network.state_dict()) == set(net.state_dict())
    _set(net, 3.0)
    ema.update()
    assert torch.equal(ema.network[0].weight, net[0].weight)


def test_resume_state_round_trips_and_an_empty_one_restarts_the_average():
    net = _net()
    ema = WeightAverage(net, decay=0.9)
    _set(net, 1.0)
    ema.update()
    ema.update()
    state = ema.state_dict()
    again = WeightAverage(_net(), decay=0.9)
    again.load_state_dict(state)
    assert again.updates == 2 and torch.equal(again.network[0].weight, ema.network[0].weight)
    fresh = WeightAverage(_net(), decay=0.9)
    fresh.load_state_dict({"network": {}, "updates": 0})  # written with ema_decay 0
    assert fresh.updates == 0  # the next update copies the resumed weights


@pytest.mark.parametrize("ema_state", [None, {"network": {}, "updates": 0}])
def test_a_resumed_run_without_an_average_saves_the_resumed_weights(ema_state, tmp_path):
    """A finished run resumed with the average switched on (its resume file from before the
    average, or written with ema_decay 0) runs no iteration, yet the final saver writes the
    average at COMPLETED: it must be the resumed weights, not the network as constructed."""
    trained = _net()
    _set(trained, 5.0)
    done = Engine(lambda e, b: None)
    done.run([0], max_epochs=1)
    state = {"model": trained.state_dict(), "engine": done.state_dict()}
    state["rng"] = GlobalRNG().state_dict()
    if ema_state is not None:
        state["ema"] = ema_state
    torch.save(state, tmp_path / "resume.pt")
    net = _net()
    ema = WeightAverage(net, decay=0.9)
    engine = Engine(lambda e, b: None)
    ema.attach(engine)
    ResumeCheckpoint(tmp_path, {"model": net, "ema": ema}).attach(engine)
    final = {}
    engine.add_event_handler(Events.COMPLETED, lambda e: final.update(ema.network.state_dict()))
    engine.run([0], max_epochs=1)
    assert engine.state.iteration == 1 and ema.updates == 0  # nothing left to train
    for name, value in trained.state_dict().items():
        assert torch.equal(final[name], value), name


@pytest.mark.slow
def test_mcdpm_training_saves_the_average_and_resumes_it(tiny_segthor_datalist, tmp_path):
    """2 tiny epochs with ema_decay 0.5: model.pt is the average in resume.pt, not the raw
    weights; a resume file without an average (from before) is accepted and restarts it."""
    bundle = REPO / "bundles" / "mask_diffusion"
    configs = str(
        [str(f) for f in config_files(bundle, ("inference.yaml", "train.yaml"), "tiny", "thorax")]
    )
    root = tmp_path / "bundle"
    args = ["--bundle_root", str(root), "--dataset_dir", str(tiny_segthor_datalist.parent)]
    monai_bundle("run", "training", "--config_file", configs, *args, "--ema_decay", "0.5")
    models = root / "models"
    resume = torch.load(models / "resume.pt", weights_only=True)
    final = torch.load(models / "model.pt", weights_only=True)
    assert resume["ema"]["updates"] == 4  # 2 epochs of 2 iterations
    for name, value in resume["ema"]["network"].items():
        assert torch.equal(final[name], value), name
    assert any(not torch.equal(final[k], v) for k, v in resume["model"].items())
    del resume["ema"]
    torch.save(resume, models / "resume.pt")
    more = ["--ema_decay", "0.5", "--max_epochs", "3"]
    monai_bundle("run", "training", "--config_file", configs, *args, *more)
    assert torch.load(models / "resume.pt", weights_only=True)["ema"]["updates"] == 2
