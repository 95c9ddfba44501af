"""Preview montages: a legend names each label colour, in the label set's values."""

import json

import nibabel as nib
import numpy as np
import pytest
from matplotlib.colors import to_rgba

from common.data.labels import load_label_set
from medgen3d import preview
from medgen3d.preview import PreviewCase, montage, preview_datalist


@pytest.fixture
def legends(monkeypatch):
    """The (name, colour) of every legend entry drawn."""
    drawn = []
    real_legend = preview.plt.Figure.legend

    def legend(fig, *args, **kwargs):
        drawn.extend((h.get_label(), h.get_facecolor()) for h in kwargs["handles"])
        return real_legend(fig, *args, **kwargs)

    monkeypatch.setattr(preview.plt.Figure, "legend", legend)
    return drawn


def _colour(value: int) -> tuple:
    return tuple(round(x, 3) for x in to_rgba(preview.LABEL_COLOURS[(value - 1) % 10]))


def test_the_legend_names_each_colour(tmp_path, legends):
    label = np.zeros((8, 8, 6), np.int64)
    label[2:5, 2:5, 1:4], label[5:7, 5:7, 2:5] = 1, 2
    case = PreviewCase(np.random.default_rng(0).random((8, 8, 6)), label, (1.0, 1.0, 1.0), "c")
    out = montage([case], tmp_path / "m.png", n_axial=2, names=["background", "liver", "lung"])
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert [(n, tuple(round(x, 3) for x in c)) for n, c in legends] == [
        ("liver", _colour(1)),
        ("lung", _colour(2)),
    ]
    legends.clear()
    montage([case], tmp_path / "n.png", n_axial=2)  # no names: no legend
    assert legends == []


def test_source_codes_are_shown_as_the_label_set_names_them(tmp_path, legends, monkeypatch):
    """A FreeSurfer datalist's label files hold aseg codes (2 white matter, 3 cortex, 4
    ventricle); the legend named raw value v after label v until the codes were mapped."""
    label = np.zeros((8, 8, 6), np.int16)
    label[1:3, 1:3, 1:4], label[4:6, 4:6, 2:5], label[5:7, 1:3, 1:4] = 2, 3, 4
    image = np.random.default_rng(0).random((8, 8, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "i.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "l.nii.gz")
    label_set = load_label_set("freesurfer")
    doc = {**label_set.to_dict(), "training": [{"image": "i.nii.gz", "label": "l.nii.gz"}]}
    (tmp_path / "dl.json").write_text(json.dumps(doc))
    shown = []
    real_montage = preview.montage
    monkeypatch.setattr(
        preview, "montage", lambda rows, *a, **k: shown.extend(rows) or real_montage(rows, *a, **k)
    )
    preview_datalist(tmp_path / "dl.json", tmp_path / "p.png", cases=1)
    values = {label_set.names[v] for v in np.unique(shown[0].label) if v}
    assert values == {label_set.names[label_set.source_map[c]] for c in (2, 3, 4)}
    assert [n for n, _ in legends] == list(label_set.names[1:4])  # values 1-3 are shown
