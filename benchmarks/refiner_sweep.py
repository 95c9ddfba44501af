"""Refiner t0 and guidance sweep (issue #18): is the three-view refiner better than the sequence
generator alone, and at which noise level ``t0`` and guidance?

The real cases of ``--real`` go to the model grid once (the bundle's ``export_real``, into
``OUT/real_model_space``); the sequence generator makes each case's rough volume once; the
refiner then refines those same volumes for every setting (t0, guidance, bf16) with the same
per-case seeds (``case_seed(seed, k)``, as the bundle's ``inference``), so settings differ only
in themselves. ``t0 = 0`` is the sequence generator alone. Each volume is scored against the
real image of its mask: MAE (HU), PSNR, SSIM, per-label |Δ median| and IQR generated / real;
FID and MMD use one slice encoder, trained once on the real slices, for every setting::

    OMP_NUM_THREADS=1 python -m benchmarks.refiner_sweep --real cohort/heldout.json \\
        --t0s 0,10,25,50,100,200,400 --guidances 1.5 --out OUT
    OMP_NUM_THREADS=1 python -m benchmarks.refiner_sweep --real cohort/heldout.json \\
        --t0s 50,100 --guidances 1.0,3.0 --out OUT        # more rows in the same table

Every volume is kept in ``OUT/volumes/<setting>/<case>.pt`` with its seconds, so a rerun
resumes an interrupted sweep; ``OUT/refiner_sweep.{md,json}`` hold a row for every finished
setting in OUT. Weights: ``--ckpt_dir`` (default the bundle's models/), at the ``--scale`` and
``--dataset`` presets; sampler and steps are the config's (``sdm_sampler``, ``sdm_steps``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import fire
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.core.errors import DataError
from common.core.io import atomic_path, read_json, remove_temporaries, write_json
from common.core.savers import as_flag
from common.core.seeds import case_seed
from common.data.datalists import read_datalist
from common.images.generation import (
    export_model_space,
    model_space_images,
    model_space_labels,
)
from common.images.metrics import (
    evaluate_images,
    intensity_agreement,
    label_intensity_stats,
    original_digits,
)
from common.images.qc import intensity_unit
from common.images.refiner import refine_volume, start_timestep
from common.images.sequence_generator import generate_volume
from common.images.slice_encoder import axial_slices, train_slice_encoder
from common.seg.statistics import bootstrap_difference
from medgen3d.bundles import bundle_config

PER_CASE = ("mae_original", "psnr", "ssim", "abs_median_diff")  # scores with one value per case
HIGHER_BETTER = ("psnr", "ssim")


@dataclass(frozen=True)
class Setting:
    """A refinement setting; ``t0 = 0`` is the sequence generator alone."""

    t0: int
    guidance: float
    bf16: bool

    @property
    def name(self) -> str:
        if self.t0 == 0:
            return "t0_0000"  # guidance and bf16 play no part
        return f"t0_{self.t0:04d}_g{self.guidance:g}" + ("_bf16" if self.bf16 else "")


ROUGH = Setting(0, 0.0, False)


def _values(x) -> list:
    """``--t0s 0,10`` (fire: a tuple), ``--t0s 10`` or ``"0,10"`` -> a list."""
    if isinstance(x, str):
        return [v for v in x.split(",") if v]
    return list(x) if isinstance(x, (list, tuple)) else [x]


def model_grid_cases(real: str | Path, config, out: Path) -> tuple[list[str], torch.Tensor, list]:
    """The real cases on the model grid, as the bundle's ``export_real`` writes them: case
    names, images ``(N, 1, H, W, D)`` in [-1, 1] (the config's ``value_range``) and label
    volumes ``(H, W, D)`` (int64)."""
    datalist = export_model_space(
        real, config.get_parsed_content("preprocessing"), out / "real_model_space"
    )
    cases = read_datalist(datalist)["training"]
    images = model_space_images([c["image"] for c in cases], config["value_range"])
    labels = model_space_labels([c["label"] for c in cases])
    return [c["case"] for c in cases], images, labels


def _cached(path: Path, make: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """``path``'s volume and seconds, or ``make()`` timed and saved there atomically."""
    remove_temporaries(path)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["volume"], float(saved["seconds"])
    start = time.perf_counter()
    volume = make().cpu()
    seconds = time.perf_counter() - start
    with atomic_path(path) as tmp:
        torch.save({"volume": volume, "seconds": seconds}, tmp)
    return volume, seconds


def _volume(pipeline, setting: Setting, onehot, seed: int, rough: Path) -> torch.Tensor:
    """One case's volume ``(1, 1, H, W, D)`` at ``setting``: the sequence generator's for
    ``t0 = 0``, else the refinement of the rough volume saved at ``rough``, as
    ``ImagePipeline`` refines it."""
    onehot = onehot.to(pipeline.device)
    if setting.t0 == 0:
        with torch.inference_mode():
            return generate_volume(pipeline.generator, onehot)
    start = torch.load(rough, map_location=pipeline.device, weights_only=True)["volume"]
    return refine_volume(
        pipeline.refiners,
        pipeline.scheduler,
        start,
        onehot,
        setting.t0,
        setting.guidance,
        pipeline.steps,
        [seed],
        pipeline.slice_batch,
        bf16=setting.bf16,
    )


def run_setting(pipeline, setting: Setting, onehots: list, seeds: list, out: Path) -> None:
    """The volumes of ``setting`` for every case (kept ones are not remade) into
    ``OUT/volumes/<name>/<k>.pt``; writes its record ``OUT/settings/<name>.json`` (seconds per
    volume, start timestep, denoising steps per view). Refined settings start from the
    ``t0 = 0`` volumes, so that one runs first."""
    t_start, n_steps = 0, 0
    if setting.t0:
        t_start = start_timestep(pipeline.scheduler, pipeline.steps, setting.t0)
        n_steps = sum(int(t) <= t_start for t in pipeline.scheduler.timesteps)
    seconds = []
    for k, (onehot, seed) in enumerate(tqdm(list(zip(onehots, seeds)), desc=setting.name)):
        rough = out / "volumes" / ROUGH.name / f"{k}.pt"
        path = out / "volumes" / setting.name / f"{k}.pt"
        make = partial(_volume, pipeline, setting, onehot, seed, rough)
        seconds.append(_cached(path, make)[1])
    record = {"setting": asdict(setting), "t_start": t_start, "steps_per_view": n_steps}
    write_json({**record, "seconds": seconds}, out / "settings" / f"{setting.name}.json")


def _check_context(context: dict, out: Path) -> None:
    """Write ``OUT/context.json``, or refuse an OUT made with other weights, cases or presets."""
    path = out / "context.json"
    if path.is_file():
        before = read_json(path)
        changed = sorted(k for k in set(before) | set(context) if before.get(k) != context.get(k))
        if changed:
            raise DataError(
                str(path),
                f"this sweep was made with other {', '.join(changed)}",
                "use another --out, or delete this folder to start over",
            )
    write_json(context, path)


def _spread(values: list) -> dict:
    """``{"mean", "sd", "values"}`` of per-case values (sd with ddof 1)."""
    a = np.asarray([np.nan if v is None else v for v in values], np.float64)
    sd = float(np.nanstd(a, ddof=1)) if np.isfinite(a).sum() > 1 else None
    return {"mean": float(np.nanmean(a)), "sd": sd, "values": values}


def score(volumes, real, labels, label_set, value_range, extractor, real_stats) -> dict:
    """Metrics of volumes ``(N, 1, H, W, D)`` made from the real masks ``labels`` against the
    real images ``real``: ``evaluate_images``' distribution, diversity and pooled per-label
    intensity scores, and per case (mean, sd) MAE (HU), PSNR, SSIM and mean |Δ median|."""
    r = evaluate_images(
        volumes, real, labels, labels, label_set, value_range, extractor=extractor, paired=True
    )
    abs_diff = [
        intensity_agreement(
            label_intensity_stats(volumes[k : k + 1], [labels[k]], label_set, value_range),
            real_stats[k],
        )["mean_abs_median_diff"]
        for k in range(len(labels))
    ]
    per_case = {key: r["paired_metrics"][key] for key in PER_CASE[:3]}
    per_case["abs_median_diff"] = abs_diff
    return {
        "fid": r["fid"],
        "mmd": r["mmd"],
        "ms_ssim_gen": r["diversity_gen"]["ms_ssim"],
        "ms_ssim_real": r["diversity_real"]["ms_ssim"],
        "pooled_abs_median_diff": r["intensity"]["mean_abs_median_diff"],
        "labels": r["intensity"]["labels"],
        **{key: _spread(v) for key, v in per_case.items()},
    }


def score_all(out: Path, real, labels, label_set, value_range, seed: int) -> list[dict]:
    """A row (record + ``score``) per finished setting in OUT, sorted by (t0, guidance, bf16),
    with paired differences to ``t0 = 0`` (mean, 95% bootstrap CI over cases, cases better)."""
    extractor = train_slice_encoder(axial_slices(real), seed=seed)
    real_stats = [
        label_intensity_stats(real[k : k + 1], [labels[k]], label_set, value_range)
        for k in range(len(labels))
    ]
    rows = []
    for path in sorted((out / "settings").glob("*.json")):
        record = read_json(path)
        name = Setting(**record["setting"]).name
        vols = [out / "volumes" / name / f"{k}.pt" for k in range(len(labels))]
        volumes = torch.cat([torch.load(p, weights_only=True)["volume"] for p in vols])
        metrics = score(volumes, real, labels, label_set, value_range, extractor, real_stats)
        rows.append({"name": name, **record, **metrics})
    rows.sort(key=lambda r: tuple(r["setting"].values()))
    ref = next((r for r in rows if r["setting"]["t0"] == 0), None)
    for row in rows if ref else ():
        if row is ref:
            continue
        for key in PER_CASE:
            a, b = row[key]["values"], ref[key]["values"]
            diff, lo, hi = bootstrap_difference([a], [b])
            sign = 1 if key in HIGHER_BETTER else -1
            better = sum(sign * (x - y) > 0 for x, y in zip(a, b))
            row[key]["vs_t0_0"] = {"diff": diff, "ci95": [lo, hi], "better": better}
    return rows


def _pm(cell: dict, digits: int) -> str:
    sd = "" if cell["sd"] is None else f" ± {cell['sd']:.{digits}f}"
    return f"{cell['mean']:.{digits}f}{sd}"


def _vs(cell: dict, digits: int, n: int) -> str:
    d = cell.get("vs_t0_0")
    if not d:
        return "–"
    lo, hi = d["ci95"]
    return f"{d['diff']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] ({d['better']}/{n})"


def _iqr_ratio(info: dict) -> float | None:
    gen, real = info["iqr_gen"], info["iqr_real"]
    return gen / real if gen is not None and real else None


def table(rows: list[dict], value_range: tuple[float, float], unit: str = "HU") -> str:
    """Markdown: the main table (one row per setting), then per label Δ median and IQR ratio;
    intensities in ``unit`` with the decimals ``value_range`` needs (MRI in [0, 1]: 4)."""
    d = original_digits(value_range)
    d_label = 0 if d == 1 else d  # per-label medians: whole HU
    head = [
        "t0 (start)", "guidance", "bf16", "steps / view", "s / volume", "FID", "MMD",
        "MS-SSIM gen (real)", f"MAE {unit}", "Δ MAE vs t0=0 [95% CI] (better)", "PSNR dB",
        "SSIM", f"mean \\|Δ median\\| {unit} pooled", f"per-case \\|Δ median\\| {unit}",
        "Δ vs t0=0 [95% CI] (better)", "IQR gen / real (mean over labels)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s, n = r["setting"], len(r["mae_original"]["values"])
        ratios = [_iqr_ratio(v) for v in r["labels"].values()]
        ratio = np.mean([x for x in ratios if x is not None])
        cells = [
            f"{s['t0']} ({r['t_start']})" if s["t0"] else "0 (sequence generator only)",
            f"{s['guidance']:g}" if s["t0"] else "–",
            ("yes" if s["bf16"] else "no") if s["t0"] else "–",
            str(r["steps_per_view"]),
            f"{np.median(r['seconds']):.2f}",
            f"{r['fid']:.3f}",
            f"{r['mmd']:.4f}",
            f"{r['ms_ssim_gen']:.3f} ({r['ms_ssim_real']:.3f})",
            _pm(r["mae_original"], d),
            _vs(r["mae_original"], d, n),
            _pm(r["psnr"], 2),
            _pm(r["ssim"], 3),
            f"{r['pooled_abs_median_diff']:.{d}f}",
            _pm(r["abs_median_diff"], d),
            _vs(r["abs_median_diff"], d, n),
            f"{ratio:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    names = list(rows[0]["labels"])
    lines += ["", "| t0 | guidance | bf16 | " + " | ".join(names) + " |"]
    lines.append("|" + "---|" * (3 + len(names)))
    for r in rows:
        s = r["setting"]
        cells = [str(s["t0"]), f"{s['guidance']:g}" if s["t0"] else "–"]
        cells.append(("yes" if s["bf16"] else "no") if s["t0"] else "–")
        for info in r["labels"].values():
            ratio = _iqr_ratio(info)
            diff = info["median_diff"]
            cells.append(
                "–"
                if diff is None
                else f"{diff:+.{d_label}f}" + (f" / {ratio:.1f}x" if ratio else "")
            )
        lines.append("| " + " | ".join(cells) + " |")
    real = ", ".join(
        f"{k} {v['median_real']:.{d_label}f} ({v['iqr_real']:.{d_label}f})"
        for k, v in rows[0]["labels"].items()
        if v["median_real"] is not None
    )
    lines.append(f"\nCells: median generated − real ({unit}) / IQR generated ÷ real. Real: {real}.")
    lines.append(
        "t0 (start): the requested t0 and the scheduled timestep refinement starts from. "
        "s / volume: median seconds of the sequence generator (t0 = 0) or of the refinement "
        "alone (others), one volume per call. MAE, PSNR, SSIM, per-case |Δ median|: mean ± sd "
        "over cases; Δ vs t0=0: paired mean difference, 95% bootstrap CI over cases, cases "
        "better than t0 = 0. Pooled |Δ median|: voxels of all cases pooled per label (the "
        "bundle's evaluating). FID / MMD: one slice encoder trained on the real slices."
    )
    best_mae = min(rows, key=lambda r: r["mae_original"]["mean"])
    best_med = min(rows, key=lambda r: r["abs_median_diff"]["mean"])
    lines.append(f"Best on MAE: {best_mae['name']}; on per-case |Δ median|: {best_med['name']}.")
    return "\n".join(lines) + "\n"


def main(
    real: str,
    out: str = "outputs/bench/refiner_sweep",
    ckpt_dir: str | None = None,
    scale: str = "demo",
    dataset: str = "thorax",
    t0s=(0, 10, 25, 50, 100, 200, 400),
    guidances=None,
    bf16=None,
    device: str | None = None,
    seed: int | None = None,
):
    """Sweep every ``t0`` in ``t0s`` x every guidance in ``guidances`` (default the config's
    ``sdm_guidance``) at ``bf16`` (default ``sdm_bf16``) on the real cases of the datalist
    ``real``; the sequence generator alone (t0 = 0) always runs. ``ckpt_dir`` (default the
    bundle's models/), ``device`` and ``seed`` (case k: ``case_seed(seed, k)``) default to
    the config's. Writes OUT/refiner_sweep.{md,json} with every finished setting in OUT."""
    out = Path(out)
    overrides = {"device": device, "ckpt_dir": ckpt_dir, "seed": seed}
    config = bundle_config(
        "image_synthesis", scale, dataset, **{k: v for k, v in overrides.items() if v is not None}
    )
    pipeline = config.get_parsed_content("pipeline")
    guidances = _values(config["sdm_guidance"] if guidances is None else guidances)
    bf16 = as_flag(config["sdm_bf16"] if bf16 is None else bf16, "bf16")
    t0s = sorted({int(t) for t in _values(t0s)})
    fixed = {k: v for k, v in pipeline.settings.items() if k not in ("t0", "guidance", "bf16")}
    base_seed = int(config["seed"])
    context = {
        "real": str(Path(real).absolute()),
        "cases": [c["label"] for c in read_datalist(real)["training"]],
        "pipeline": fixed,
        "scale": scale,
        "dataset": dataset,
        "seed": base_seed,
        "device": str(pipeline.device),
    }
    out.mkdir(parents=True, exist_ok=True)
    _check_context(context, out)
    names, images, labels = model_grid_cases(real, config, out)
    num_classes = int(config.get_parsed_content("num_classes"))
    onehots = [F.one_hot(torch.from_numpy(v), num_classes).movedim(-1, 0)[None] for v in labels]
    seeds = [case_seed(base_seed, k) for k in range(len(names))]
    settings = [ROUGH] + [Setting(t, float(g), bf16) for t in t0s if t for g in guidances]
    for setting in settings:
        run_setting(pipeline, setting, onehots, seeds, out)
    label_set = config.get_parsed_content("labels")
    value_range = tuple(float(v) for v in config["value_range"])
    rows = score_all(out, images, labels, label_set, value_range, base_seed)
    meta = {**context, "names": names, "seeds": seeds, "threads": torch.get_num_threads()}
    write_json({"meta": meta, "rows": rows}, out / "refiner_sweep.json")
    text = table(rows, value_range, intensity_unit(config["modality"]))
    with atomic_path(out / "refiner_sweep.md") as tmp:
        tmp.write_text(text)
    print(text)


if __name__ == "__main__":
    fire.Fire(main)
