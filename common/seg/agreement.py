"""Mask-image agreement (as MAISI measures it): does a segmenter trained on real cases find the
generated masks in the generated images?

A seg_downstream checkpoint, loaded through the bundle's inference config (its network,
preprocessing and sliding-window inferer, so the images are prepared as that bundle prepares
them), segments every synthetic image and every held-out real image. Per label:

- the Dice of its raw prediction (argmax of the logits, no post-processing) to each synthetic
  case's generated mask ("agreement"), next to its Dice on the real images against their real
  labels, and the ratio of the two;
- the median intensity inside the label, synthetic vs real, from the files on disk (HU for CT).

Dice is measured on the grid the segmenter predicts on (the model grid): each label file is
brought there by nearest-neighbour resampling, zero outside the image, so the synthetic and
the real Dice are measured alike. A label absent from a case's label file leaves that case out
of its mean (MONAI's ``ignore_empty``), as in the segmentation study.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from monai.transforms import LoadImage, ResampleToMatch
from torch import nn
from tqdm import tqdm

from common.core.bundle_configs import BASE_SCALE, bundle_parser
from common.core.errors import DataError
from common.core.io import atomic_path, write_json
from common.data.labels import LabelSet
from common.images.qc import intensity_unit, label_medians, paired_cases
from common.seg.metrics import summarise

SEG_BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "seg_downstream"


@dataclass
class Segmenter:
    """A trained segmentation network with the preprocessing and inferer it was made for.

    ``preprocessing``: ``{"image": path} -> {"image": (1, H, W, D) MetaTensor}`` on the model
    grid; ``inferer(inputs (1, 1, H, W, D), network) -> logits (1, K, H, W, D)``.
    """

    network: nn.Module
    preprocessing: Callable
    inferer: Callable
    device: torch.device

    def predict(self, image: str) -> MetaTensor:
        """Labels ``(1, H, W, D)`` on the model grid (argmax of the logits), with its affine."""
        item = self.preprocessing({"image": image})["image"]
        self.network.eval()
        with torch.no_grad():
            logits = self.inferer(item[None].to(self.device), self.network)
        return MetaTensor(logits.argmax(1).cpu().numpy(), affine=item.affine)


def load_segmenter(
    ckpt: str | Path,
    num_classes: int,
    modality: str,
    scale: str | None = BASE_SCALE,
    dataset: str | None = None,
    network: str | None = None,
    bundle: str | Path | None = None,
) -> Segmenter:
    """The checkpoint's network, preprocessing and inferer from the seg_downstream inference
    config with the ``scale`` and ``dataset`` presets it was trained with (``network``: the
    config's ``network_name``, default the config's)."""
    overrides = {"ckpt_path": str(ckpt), "num_classes": num_classes, "modality": modality}
    if network:
        overrides["network_name"] = network
    parser = bundle_parser(bundle or SEG_BUNDLE, ["inference.yaml"], scale, dataset, overrides)
    parser.get_parsed_content("load_model")  # loads the weights into the config's network
    return Segmenter(
        parser.get_parsed_content("network"),
        parser.get_parsed_content("preprocessing"),
        parser.get_parsed_content("inferer"),
        parser.get_parsed_content("device"),
    )


def case_dice(prediction: MetaTensor, label: str, label_set: LabelSet) -> list[float]:
    """Dice per label (background excluded, NaN where ``label`` lacks it) of ``prediction``
    ``(1, H, W, D)`` to the label file, resampled (nearest) to the prediction's grid."""
    target = LoadImage(image_only=True, ensure_channel_first=True)(label)
    values = label_set.remap(np.rint(target.numpy()).astype(np.int64))
    target = MetaTensor(torch.as_tensor(values, dtype=torch.float32), meta=target.meta)
    on_grid = ResampleToMatch(mode="nearest", padding_mode="zeros")(target, img_dst=prediction)
    k = label_set.num_classes
    dice = compute_dice(
        one_hot(torch.as_tensor(prediction)[None].long(), k),
        one_hot(torch.as_tensor(on_grid)[None].round().long(), k),
        include_background=False,
        ignore_empty=True,
    )
    return dice[0].tolist()


def _median(values: Sequence[float | None]) -> float | None:
    """Median of the values that are not None; None if there are none."""
    found = [v for v in values if v is not None]
    return float(np.median(found)) if found else None


def measure(
    predict: Callable[[str], MetaTensor], cases: Sequence[dict], label_set: LabelSet
) -> dict:
    """Dice and intensity medians of ``cases`` (``{"image", "label"}``) under ``predict``.

    Returns ``{"dice": {"mean", <label>: mean Dice}, "median": {<label>: median over the cases
    of each case's median inside the label}, "cases": [per case]}``.
    """
    per_case = []
    for case in tqdm(cases, desc="agreement"):
        dice = [_finite(d) for d in case_dice(predict(case["image"]), case["label"], label_set)]
        medians = label_medians(case["image"], case["label"], label_set)
        per_case.append(
            {
                "case": case.get("case", Path(case["image"]).name),
                "dice": dict(zip(label_set.names[1:], dice)),
                "median": medians,
            }
        )
    values = [[math.nan if d is None else d for d in c["dice"].values()] for c in per_case]
    dice = summarise({"dice": values}, label_set.names)
    medians = {n: _median([c["median"][n] for c in per_case]) for n in label_set.names[1:]}
    return {
        "dice": {k: _finite(v) for k, v in dice["dice"].items()},
        "median": medians,
        "cases": per_case,
    }


def _finite(value: float) -> float | None:
    """``value``, None where it is NaN or infinite (JSON has neither)."""
    return float(value) if math.isfinite(value) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, None where either is missing or ``b`` is 0."""
    return a / b if a is not None and b else None


def compare(synthetic: Mapping, real: Mapping, unit: str) -> dict:
    """Per label (and the mean): agreement Dice, real Dice, their ratio, medians and their
    difference (``synthetic``, ``real``: ``measure`` results)."""
    rows = {}
    for name, dice in synthetic["dice"].items():
        syn_median, real_median = synthetic["median"].get(name), real["median"].get(name)
        rows[name] = {
            "dice_synthetic": dice,
            "dice_real": real["dice"][name],
            "ratio": _ratio(dice, real["dice"][name]),
            "median_synthetic": syn_median,
            "median_real": real_median,
            "median_difference": None
            if syn_median is None or real_median is None
            else syn_median - real_median,
        }
    return {"unit": unit, "labels": rows}


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def markdown_table(comparison: Mapping) -> str:
    """One row per label and the mean: agreement Dice, real Dice, ratio, medians."""
    unit = comparison["unit"]
    # HU in whole units; MRI image units of any scale to three figures
    number, signed = ("{:.0f}", "{:+.0f}") if unit == "HU" else ("{:.3g}", "{:+.3g}")
    lines = [
        f"| label | agreement Dice (synthetic) | Dice (real) | ratio | median synthetic ({unit}) "
        f"| median real ({unit}) | difference ({unit}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in comparison["labels"].items():
        cells = [
            _cell(r["dice_synthetic"], "{:.3f}"),
            _cell(r["dice_real"], "{:.3f}"),
            _cell(r["ratio"], "{:.2f}"),
            *(_cell(r[k], number) for k in ("median_synthetic", "median_real")),
            _cell(r["median_difference"], signed),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement(
    segmenter: str | Path,
    synthetic: str | Path,
    real: str | Path,
    out: str | Path,
    scale: str | None = BASE_SCALE,
    dataset: str | None = None,
    network: str | None = None,
) -> dict:
    """Agreement of the synthetic pairs by a segmenter trained on real cases; writes
    ``out/agreement.json`` (settings, per-label table, every case) and ``out/agreement.md``.

    Args:
        segmenter: a seg_downstream checkpoint (e.g. a study's ``E2-1/models/model.pt``).
        synthetic: datalist of synthetic pairs (image + generated mask).
        real: datalist of held-out real cases (every section's pairs), unseen by the segmenter.
        scale, dataset, network: the presets and network the segmenter was trained with.
    Returns the ``agreement.json`` content (``markdown_table`` lays out its table).
    """
    syn_cases, syn_labels, _ = paired_cases(synthetic)
    real_cases, label_set, modality = paired_cases(real)
    if syn_labels.names != label_set.names:
        raise DataError(
            str(synthetic),
            f"labels {list(syn_labels.names)} differ from the real {list(label_set.names)}",
            "compare pairs and real cases of one label set",
        )
    seg = load_segmenter(segmenter, label_set.num_classes, modality, scale, dataset, network)
    measured = {
        "synthetic": measure(seg.predict, syn_cases, label_set),
        "real": measure(seg.predict, real_cases, label_set),
    }
    table = compare(*measured.values(), unit=intensity_unit(modality))
    result = {
        "segmenter": str(segmenter),
        "synthetic": str(synthetic),
        "real": str(real),
        "settings": {"scale": scale, "dataset": dataset, "network": network},
        "n_cases": {k: len(v["cases"]) for k, v in measured.items()},
        **table,
        "cases": {k: v["cases"] for k, v in measured.items()},
    }
    out = Path(out)
    write_json(result, out / "agreement.json")
    with atomic_path(out / "agreement.md") as tmp:
        tmp.write_text(agreement_markdown(result))
    return result


def agreement_markdown(result: Mapping) -> str:
    """``agreement.md``: what was measured, then the table."""
    n = result["n_cases"]
    return (
        f"# Mask-image agreement\n\nSegmenter `{result['segmenter']}` (trained on real cases) "
        f"on {n['synthetic']} synthetic pairs (Dice to their generated masks) and "
        f"{n['real']} held-out real cases (Dice to their labels): raw argmax on the model grid, "
        "no post-processing; ratio = synthetic / real. Median intensity inside each label, "
        "the median over cases of each case's median, from the files.\n\n"
        f"{markdown_table(result)}\n"
    )
