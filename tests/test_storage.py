"""Half-precision storage of checkpoints (common.core.storage, `medgen3d store-half`): the file
shrinks, every loader reads it into float32 networks, the provenance record and non-float
buffers survive, and tensors that float16 cannot hold are refused."""

import json

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ckpt_export
from monai.handlers import CheckpointLoader

from common.core.errors import DataError
from common.core.io import load_weights, start_from
from common.core.provenance import RECORD_KEY, attach_record, checkpoint_record
from common.core.storage import STORAGE_KEY, store_half
from medgen3d.cli import main

RECORD = {"hashed": "x", "datalists": ["d.json"], "unknown": [], "cases": [{"id": "c0"}]}


# conv + batch norm (an int64 buffer) + linear, 4.8 k parameters; also a bundle config's network
NETWORK = (
    "torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.BatchNorm2d(16), "
    "torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 16))"
)


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return eval(NETWORK)


@pytest.fixture
def checkpoint(tmp_path):
    """A plain state dict with a provenance record, as the savers write the final weights."""
    net = tiny_net()
    net.train()(torch.randn(4, 1, 6, 6))  # running stats and num_batches_tracked move
    path = tmp_path / "model.pt"
    torch.save(attach_record(net.state_dict(), RECORD), path)
    return path


def test_round_trip_keeps_keys_record_buffers_and_strict_loading(checkpoint, tmp_path):
    before = torch.load(checkpoint, weights_only=True)
    out = tmp_path / "half.pt"
    summary = store_half(checkpoint, out)
    after = torch.load(out, weights_only=True)
    assert list(after) == list(before)
    for key, old in before.items():
        new = after[key]
        assert new.shape == old.shape, key
        if old.is_floating_point():
            assert new.dtype == torch.float16, key
            # float16 rounding: at most 2^-11 of a value (and 2^-25 absolute for tiny ones)
            torch.testing.assert_close(new.float(), old, rtol=2**-11, atol=2**-25)
        else:
            assert new.dtype == old.dtype and torch.equal(new, old), key
    assert after["1.num_batches_tracked"] == 1
    assert checkpoint_record(out) == RECORD  # the provenance reader
    assert after._metadata[RECORD_KEY] == RECORD
    assert after._metadata[""] == before._metadata[""]  # torch's per-module versions
    stored = after._metadata[STORAGE_KEY]
    assert stored["dtype"] == "float16" and stored["from"] == ["float32"]
    assert 0 < stored["max_rel_change"] <= 2**-11
    assert summary["tensors"] == len([v for v in before.values() if v.is_floating_point()])
    assert summary["max_abs_change"] == stored["max_abs_change"] > 0
    assert summary["bytes_after"] < 0.65 * summary["bytes_before"]
    assert torch.equal(torch.load(checkpoint, weights_only=True)["0.weight"], before["0.weight"])
    # every loader gives a float32 network holding the float16 values
    expected = {k: v.float() if v.is_floating_point() else v for k, v in after.items()}
    strict = tiny_net()
    strict.load_state_dict(after, strict=True)
    loaded = [strict, load_weights(tiny_net(), out), start_from(tiny_net(), out)]
    handler = tiny_net()
    CheckpointLoader(str(out), {"model": handler})(Engine(lambda e, b: None))
    for net in [*loaded, handler]:
        for key, value in net.state_dict().items():
            assert value.dtype == before[key].dtype and torch.equal(value, expected[key]), key


def test_torchscript_export_reads_the_stored_weights(checkpoint, tmp_path):
    """MONAI's ckpt_export (`python -m monai.bundle ckpt_export`, the model zoo's check)."""
    config = tmp_path / "inference.json"
    config.write_text(json.dumps({"imports": ["$import torch"], "network_def": f"${NETWORK}"}))
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps({"version": "0.1.0"}))
    store_half(checkpoint)  # in place
    ts = tmp_path / "model.ts"
    ckpt_export(
        "network_def",
        filepath=str(ts),
        ckpt_file=str(checkpoint),
        meta_file=str(meta),
        config_file=str(config),
    )
    x = torch.randn(2, 1, 6, 6)
    eager = load_weights(tiny_net(), checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(ts))(x), eager(x))


def test_nested_checkpoint_keeps_its_other_entries(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    nested = {"model": state, RECORD_KEY: RECORD, "epoch": 3, "scale": torch.tensor([2.0])}
    src, out = tmp_path / "nested.pt", tmp_path / "nested_half.pt"
    torch.save(nested, src)
    store_half(src, out, dtype="bfloat16")
    after = torch.load(out, weights_only=True)
    assert after[RECORD_KEY] == RECORD and after["epoch"] == 3 and checkpoint_record(out) == RECORD
    assert after["scale"].dtype == torch.bfloat16
    assert after["model"]["0.weight"].dtype == torch.bfloat16
    assert after["model"]._metadata[STORAGE_KEY]["dtype"] == "bfloat16"
    assert after["model"]._metadata[RECORD_KEY] == RECORD
    net = load_weights(tiny_net(), out)
    torch.testing.assert_close(net[0].weight, state["0.weight"], rtol=2**-8, atol=0)


@pytest.mark.parametrize(
    "value, problem",
    [
        (1e5, r"tensor big holds values up to 100000, beyond float16's largest 65504"),
        (1e-7, r"tensor big would change by 0.\d+ of its largest value 1e-07 in float16"),
    ],
)
def test_values_float16_cannot_hold_are_refused_and_nothing_is_written(
    checkpoint, tmp_path, value, problem
):
    state = torch.load(checkpoint, weights_only=True)
    state["big"] = torch.full((3,), value)
    torch.save(state, checkpoint)
    original = checkpoint.read_bytes()
    with pytest.raises(DataError, match=f"^{checkpoint}: {problem}.*--dtype bfloat16"):
        store_half(checkpoint, tmp_path / "out.pt")
    with pytest.raises(DataError, match="beyond|would change"):
        store_half(checkpoint)
    assert checkpoint.read_bytes() == original and not (tmp_path / "out.pt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries
    store_half(checkpoint, tmp_path / "out.pt", dtype="bfloat16")  # float32's range
    half = torch.load(tmp_path / "out.pt", weights_only=True)["big"]
    torch.testing.assert_close(half.float(), state["big"], rtol=2**-8, atol=0)


def test_small_values_beside_large_ones_are_kept(checkpoint, tmp_path):
    """A tensor is measured at its largest value's scale: entries that flush to 0 next to
    normal ones change it by far less than float16's rounding of those."""
    state = torch.load(checkpoint, weights_only=True)
    state["mixed"] = torch.tensor([0.5, 1e-9, -3e-6])
    torch.save(state, checkpoint)
    summary = store_half(checkpoint, tmp_path / "out.pt")
    assert torch.load(tmp_path / "out.pt", weights_only=True)["mixed"][1] == 0
    assert summary["max_rel_change"] <= 2**-11


def test_bad_inputs(tmp_path, checkpoint):
    with pytest.raises(DataError, match="unknown storage type. use float16 or bfloat16"):
        store_half(checkpoint, dtype="int8")
    with pytest.raises(DataError, match="missing.pt: file not found"):
        store_half(tmp_path / "missing.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(DataError, match="notes.pt: cannot be read as a checkpoint"):
        store_half(tmp_path / "notes.pt")


def test_cli_prints_sizes_and_changes(checkpoint, tmp_path, capsys):
    main(["store-half", str(checkpoint), str(tmp_path / "half.pt")])
    out = capsys.readouterr().out
    assert f"{tmp_path / 'half.pt'}: float16" in out and "largest change" in out
    assert " MB -> " in out
    with pytest.raises(SystemExit) as stop:
        main(["store-half", str(tmp_path / "missing.pt")])
    assert stop.value.code == 2
