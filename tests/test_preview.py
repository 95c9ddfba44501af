"""Preview montages: a legend names each label colour."""

import numpy as np
from matplotlib.colors import to_rgba

from medgen3d import preview
from medgen3d.preview import PreviewCase, label_names, montage


def test_label_names_follow_the_values_and_the_legend_names_each_colour(tmp_path, monkeypatch):
    doc = {"labels": {"10": "j", "2": "b", "0": "background", "1": "a"}}
    assert label_names(doc) == ["background", "a", "b", "j"] and label_names({}) == []
    label = np.zeros((8, 8, 6), np.int64)
    label[2:5, 2:5, 1:4], label[5:7, 5:7, 2:5] = 1, 2
    case = PreviewCase(np.random.default_rng(0).random((8, 8, 6)), label, (1.0, 1.0, 1.0), "c")
    drawn = []
    real_legend = preview.plt.Figure.legend

    def legend(fig, *args, **kwargs):
        drawn.extend((h.get_label(), h.get_facecolor()) for h in kwargs["handles"])
        return real_legend(fig, *args, **kwargs)

    monkeypatch.setattr(preview.plt.Figure, "legend", legend)
    out = montage([case], tmp_path / "m.png", n_axial=2, names=["background", "liver", "lung"])
    assert out.read_bytes()[:4] == b"\x89PNG"
    colours = [to_rgba(c) for c in preview.LABEL_COLOURS[:2]]
    assert [n for n, _ in drawn] == ["liver", "lung"]
    assert [tuple(round(x, 3) for x in c) for _, c in drawn] == [
        tuple(round(x, 3) for x in c) for c in colours
    ]
    drawn.clear()
    montage([case], tmp_path / "n.png", n_axial=2)  # no names: no legend
    assert drawn == []
