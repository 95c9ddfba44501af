"""MC-DPM trained with the DDPM objective (noise) vs rectified flow (velocity), side by side.

Both checkpoints train on the same cases with the same preset and budget; each samples the
same seeds with its own samplers (DDPM-1000, DDIM-20/50 for the noise model; RFlow-10/30 for
the flow model). Quality is measured on the raw masks (before keep-largest) and after it,
against held-out real masks nothing trained on; time is seconds per volume on this machine.
Each sampled volume is kept (``OUT/<objective>_volumes/<sampler>/seed<k>.npz``, with its
seconds), so a stopped run resumes at the next volume (DDPM-1000 at 64^3 takes most of an hour
a volume on one CPU thread)::

    OMP_NUM_THREADS=1 python benchmarks/objectives.py --ddpm N16/models/model.pt \\
        --rflow RFLOW/models/model.pt --real cohort/heldout.json --volumes 8 --out OUT \\
        [--scale standard]
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import fire
import numpy as np
import torch

from benchmarks import suite
from common.core.errors import DataError
from common.core.io import atomic_path, read_json, write_json
from common.masks.mcdpm import keep_single_components

SETTINGS = {
    "ddpm": ("ddpm:1000", "ddim:50", "ddim:20"),
    "rflow": ("rflow:30", "rflow:10"),
}


def sample_kept(sampling, seeds: range, folder: Path) -> tuple[list[np.ndarray], list[float]]:
    """Raw volumes and seconds per volume of ``seeds`` (``suite.sample_timed``, one volume a
    call), each read from ``folder/seed<k>.npz`` when a run before made it, else sampled and
    written there (atomically)."""
    masks, seconds = [], []
    for seed in seeds:
        path = folder / f"seed{seed}.npz"
        if not path.is_file():
            volume, took = suite.sample_timed(sampling, [seed])
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez_compressed(f, mask=volume[0], seconds=took[0])
        with np.load(path) as kept:
            masks.append(kept["mask"])
            seconds.append(float(kept["seconds"]))
    return masks, seconds


def sample_rows(
    ckpt: str, objective: str, volumes: int, real: tuple, scale: str, folder: Path, bf16: bool
) -> list[dict]:
    """Every sampler of ``objective`` on ``ckpt`` (trained at ``scale``), under bf16 autocast
    if ``bf16``: seconds per volume, raw and kept quality; volumes kept in
    ``folder/<sampler>/``."""
    kind = SETTINGS[objective][-1].split(":")[0]
    config = suite.mask_config(scale, sampler=kind, scheduler_kind=objective)
    pipeline = suite.mask_pipeline(config, ckpt)
    rows = []
    for text in SETTINGS[objective]:
        sampler = suite.Sampler.parse_setting(text + (":bf16" if bf16 else ""), volumes)
        sampling = suite.with_sampler(pipeline, config, sampler)
        masks, seconds = sample_kept(sampling, range(volumes), folder / sampler.name)
        single = pipeline.single_component
        kept = [keep_single_components(torch.from_numpy(v), single) for v in masks]
        rows.append(
            {
                "objective": objective,
                "sampler": sampler.name,
                "s_per_volume": float(np.median(seconds)),
                "raw": suite.quality(masks, real),
                "kept": suite.quality([v.numpy() for v in kept], real),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _cell(q: dict, key: str) -> str:
    sd = q.get(f"{key}_sd")
    return f"{q[key]:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def table(rows: list[dict]) -> str:
    """Markdown: one row per sampler, raw and kept quality, seconds and speed-up."""
    ref = next(r for r in rows if r["sampler"].startswith("DDPM-1000"))
    keys = suite.QUALITY_KEYS
    head = ["objective", "sampler", "s / volume", "speed-up vs DDPM-1000"]
    head += [f"raw {k}" for k in keys] + [f"kept {k}" for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["objective"], r["sampler"], f"{r['s_per_volume']:.1f}"]
        cells.append(f"{ref['s_per_volume'] / r['s_per_volume']:.0f}x")
        cells += [_cell(r["raw"], k) for k in keys] + [_cell(r["kept"], k) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    real = ref["raw"]
    lines.append(
        f"\nReal held-out masks: components {real['components_real']:.2f}, "
        f"z-continuity {real['z_continuity_real']:.3f} (W1 0 by definition)."
    )
    return "\n".join(lines)


def main(
    real: str,
    ddpm: str | None = None,
    rflow: str | None = None,
    volumes: int = 8,
    out: str = "outputs/bench/objectives",
    objectives: str | tuple = ("ddpm", "rflow"),
    scale: str = "demo",
    bf16: bool = False,
):
    """Sample each checkpoint (trained at ``scale``) into ``OUT/<objective>.json`` (kept on
    a rerun); once both exist, write ``OUT/objectives.md``. ``--objectives rflow`` runs one
    side only. ``--bf16``: every sampler under bf16 autocast (the standard preset samples so;
    on a CPU with avx512_bf16 about twice as fast)."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = suite.real_masks(real, scale)
    ckpts = {"ddpm": ddpm, "rflow": rflow}
    todo = objectives.split(",") if isinstance(objectives, str) else objectives
    for objective in todo:
        path = out_dir / f"{objective}.json"
        if path.is_file():
            kept = read_json(path)["meta"]
            asked = {"scale": scale, "real": real, "volumes": volumes, "bf16": bf16}
            before = {k: kept.get(k) for k in asked} | {"bf16": kept.get("bf16", False)}
            if before != asked:
                raise DataError(
                    str(path),
                    f"was sampled with {before}, not {asked}",
                    "use another --out, or delete it to sample again",
                )
            continue
        if ckpts[objective] is None:
            raise SystemExit(f"--{objective} CKPT is needed to sample the {objective} side")
        start = time.time()
        folder = out_dir / f"{objective}_volumes"
        made_by = {"ckpt": ckpts[objective], "scale": scale}
        if (folder / "made_by.json").is_file() and read_json(folder / "made_by.json") != made_by:
            raise DataError(
                str(folder),
                f"holds volumes of {read_json(folder / 'made_by.json')}, not {made_by}",
                "use another --out, or delete it to sample again",
            )
        write_json(made_by, folder / "made_by.json")
        rows = sample_rows(ckpts[objective], objective, volumes, reference, scale, folder, bf16)
        meta = {
            "ckpt": ckpts[objective],
            "scale": scale,
            "bf16": bf16,
            "real": real,
            "volumes": volumes,
            "seeds": list(range(volumes)),
            "threads": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())),
            "cpu": platform.processor() or platform.machine(),
            "seconds": round(time.time() - start),
        }
        write_json({"meta": meta, "rows": rows}, path)
    parts = [out_dir / f"{o}.json" for o in ckpts]
    if all(p.is_file() for p in parts):
        rows = [r for p in parts for r in read_json(p)["rows"]]
        (out_dir / "objectives.md").write_text(table(rows) + "\n")
        print(table(rows))


if __name__ == "__main__":
    fire.Fire(main)
