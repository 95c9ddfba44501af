"""benchmarks.refiner_sweep at the tiny preset with random weights: a row per setting, t0 = 0
is the sequence generator's volume and a refined setting the bundle pipeline's (same masks and
seeds), a rerun keeps finished settings and adds the new ones, another config is refused."""

import json
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks import refiner_sweep
from common.core.errors import DataError
from medgen3d.bundles import bundle_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_models(tmp_path):
    """Random tiny-preset weights: ``model.pt`` and ``refiner_<view>.pt`` of the tiny views."""
    config = bundle_config("image_synthesis", "tiny", "thorax")
    folder = tmp_path / "models"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(config.get_parsed_content("network_def").state_dict(), folder / "model.pt")
    for view in config["sdm_views"]:
        refiner = config.get_parsed_content("refiner_def", lazy=False)
        # the output conv starts at zero: without this, guidance and masks would change nothing
        torch.nn.init.normal_(refiner.out[2].conv.weight, std=0.02)
        torch.save(refiner.state_dict(), folder / f"refiner_{view}.pt")
    return folder


def _volume(out, name: str, k: int) -> torch.Tensor:
    return torch.load(out / "volumes" / name / f"{k}.pt", weights_only=True)["volume"]


@pytest.mark.slow
def test_sweep_rows_match_the_bundle_pipeline_and_a_rerun_keeps_them(
    tiny_segthor_datalist, tiny_models, tmp_path
):
    out = tmp_path / "sweep"
    run = partial(
        refiner_sweep.main, str(tiny_segthor_datalist), str(out), str(tiny_models), "tiny"
    )
    run(t0s=(0, 10), guidances=1.5, device="cpu")
    doc = json.loads((out / "refiner_sweep.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["t0_0000", "t0_0010_g1.5"]
    assert doc["rows"][1]["steps_per_view"] == 2  # DDIM-100: t = 10, 0

    config = bundle_config(
        "image_synthesis",
        "tiny",
        "thorax",
        ckpt_dir=str(tiny_models),
        device="cpu",
        sdm_guidance=1.5,
    )
    names, _, labels = refiner_sweep.model_grid_cases(tiny_segthor_datalist, config, tmp_path)
    onehot = F.one_hot(torch.from_numpy(np.stack(labels)), 5).movedim(-1, 1).float()
    rough, refined = config.get_parsed_content("pipeline")(onehot, doc["meta"]["seeds"])
    for k in range(len(names)):
        assert torch.equal(_volume(out, "t0_0000", k), rough[k : k + 1])
        assert torch.equal(_volume(out, "t0_0010_g1.5", k), refined[k : k + 1])

    kept = out / "volumes" / "t0_0010_g1.5" / "0.pt"
    before = kept.stat().st_mtime_ns
    run(t0s=10, guidances="1.0,1.5", device="cpu")
    assert kept.stat().st_mtime_ns == before
    doc = json.loads((out / "refiner_sweep.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["t0_0000", "t0_0010_g1", "t0_0010_g1.5"]
    assert not torch.equal(_volume(out, "t0_0010_g1", 0), _volume(out, "t0_0010_g1.5", 0))
    main_table = (out / "refiner_sweep.md").read_text().split("\n\n")[0].splitlines()
    assert len(main_table) == 2 + 3  # header, rule, a row per setting
    assert doc["rows"][1]["mae_original"]["vs_t0_0"]["ci95"][0] is not None

    with pytest.raises(DataError, match="context.json: this sweep was made with other seed"):
        run(t0s=10, device="cpu", seed=5)
