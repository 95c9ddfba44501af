"""Does the paper preset fit one GPU? Memory, FLOPs and time per stage at full size (issue #16).

    OMP_NUM_THREADS=1 nice .venv/bin/python -m benchmarks.paper_memory --json runs/paper.json
    .venv/bin/python -m benchmarks.paper_memory --device cuda --samples default   # on a GPU

Per stage of the paper preset (128 x 128 x 96, thorax), built from the bundles' own training
configs (``train*.yaml`` + ``paper.yaml``, untrained weights; ``benchmarks.paper_step``):

- training: two steps of the bundle's trainer (``train#trainer``: its network, optimiser,
  loss, inferer, prepare-batch) on random data of the trained shape: MC-DPM windows
  ``(2K+1, 128, 128, 16)``, sequence-generator windows of ``2 + L`` slices (with both
  discriminators), refiner slices ``128 x 128``, seg volumes ``128 x 128 x 96`` (unet3d).
  FLOPs are counted in the first step, the second is measured (the counter changes what
  checkpointing keeps);
- sampling: the network's forward under ``inference_mode``: one denoising step of one MC-DPM
  window, one refiner slice batch, a whole volume of the sequence generator, one seg volume.

Modes (``paper_step.MODES``): ``fp32``; ``bf16`` (config key ``bf16``: autocast); ``+ckpt``
(``activation_checkpointing``); ``+flash`` (``flash_attention``: the diffusion networks'
attention through ``scaled_dot_product_attention``). Each measurement runs in a fresh
subprocess, one at a time, glibc returning large blocks at once (``MALLOC_MMAP_THRESHOLD_``),
killed when its resident memory passes ``--limit-gib``. Memory of the measured step or
forward (CPU: Linux ``VmHWM`` reset at its start; CUDA: ``torch.cuda.max_memory_allocated``)
minus what the process held at its start (weights, gradients, AdamW states, libraries) is
the activation memory, per sample. FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (with
checkpointing: the recomputation too).

Projections: GPU memory of a training step at the preset's batch = 16 B/parameter (fp32
weights, gradients, AdamW's two moments) + batch x the per-sample activations, plus, for bf16
without flash attention, 4 B per attention probability (CUDA's autocast keeps softmax in
float32, the CPU's in bf16; counted over the whole network, an upper bound with
checkpointing); CUDA context and allocator slack are not included. Time = FLOPs / (``--mfu``
x ``--peak-tflops``), by default 25% of an H100/H200 SXM's dense bf16 peak (989 TFLOP/s).
Per volume: the MC-DPM's windows x sampler steps, the sequence generator's slices, the
refiner's views x slices x steps from t0 (x2 with guidance).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.paper_step import ATTENTION, UNIT, config, measure_one
from common.images.refiner import start_timestep
from common.masks.windows import extension_plan

GIB = 2**30
CPU_SAMPLES = {"train": {"refiner": 8}, "sample": {"refiner": 16}}  # others: 1
TRAIN_MODES = ("bf16+flash+ckpt", "bf16+ckpt", "bf16+flash", "bf16", "fp32")
PLAN = [  # smallest memory first, so a measurement over the limit stops nothing before it
    (kind, stage, mode)
    for kind, modes in (("train", TRAIN_MODES), ("sample", ("bf16", "fp32")))
    for stage in ("refiner", "generator", "seg", "mcdpm")
    for mode in modes
    if "flash" not in mode or stage in ATTENTION
]


def run_child(spec: str, device: str, scale: str, limit_gib: float) -> dict:
    """``measure_one(spec)`` in a fresh subprocess; killed when its RSS passes the limit."""
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "benchmarks.paper_memory", "--one", spec, "--device", device]
    cmd += ["--scale", scale]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    status, peak = Path(f"/proc/{proc.pid}/status"), 0
    while proc.poll() is None:
        try:
            line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmRSS"))
            peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, StopIteration):
            pass
        if peak > limit_gib * GIB:
            proc.kill()
            proc.wait()
            return {"spec": spec, "over_limit": peak}
        time.sleep(0.1)
    out = proc.stdout.read().strip().splitlines()
    if proc.returncode or not out:
        return {"spec": spec, "failed": proc.returncode}
    return json.loads(out[-1])


def _attention_probs(results: dict, stage: str) -> float:
    """Attention probabilities per sample of ``stage``'s network, from its sampling rows."""
    counts = [
        r.get("attention_probs") for k, r in results.items() if k.startswith(f"sample:{stage}:")
    ]
    return next((c for c in counts if c is not None), 0.0)


def projections(results: dict, mfu: float, peak_tflops: float) -> dict:
    """Per result: activations per sample and the GPU memory / time at the preset's batch."""
    rate = mfu * peak_tflops * 1e12
    out = {}
    for spec, r in results.items():
        if "flops" not in r:
            continue
        (kind, stage, mode, _), n, b = spec.split(":"), r["samples"], r["default_samples"]
        extra = 0.0
        if r.get("gpu_peak") is not None:  # measured on a GPU at its batch
            act, gpu = (r["gpu_peak"] - r["gpu_start"]) / n, r["gpu_peak"] / GIB
        else:
            act = (r["rss_peak"] - r["rss_start"]) / n
            if kind == "train" and mode in ("bf16", "bf16+ckpt"):  # CUDA autocast: fp32 softmax
                extra = 4 * _attention_probs(results, stage)
            weights = 16 * r["trained_params"] if kind == "train" else 4 * r["params"]
            gpu = (weights + b * (act + extra)) / GIB
        out[spec] = {
            "act_gib": act / GIB,
            "extra_gib": extra / GIB,
            "gpu_gib": gpu,
            "gpu_s": b * r["flops"] / n / rate,
        }
    return out


def per_volume(results: dict, rate: float, scale: str) -> list[tuple[str, str, float, float]]:
    """``(stage, work, TFLOP, projected GPU s)`` per volume from the bf16 sampling rows, at
    ``rate`` FLOP/s: the MC-DPM's windows (first window in the middle) x sampler steps, the
    generator's whole volume, the refiner's views x ``D`` slice-equivalents (each view covers
    the volume once) x the steps from ``t0``; x2 where guidance runs both branches."""
    mask, image = config("mcdpm", scale=scale), config("refiner", scale=scale)

    def get(cfg, key):
        return cfg.get_parsed_content(key)

    depth, m, n, steps = (get(mask, k) for k in ("spatial_size", "m", "n", "steps"))
    depth = depth[2]
    windows = len(extension_plan(depth, m, n, (depth - m) // 2))
    guided = 2 if get(mask, "guidance") != 1 else 1
    scheduler = get(image, "scheduler")
    t_start = start_timestep(scheduler, get(image, "sdm_steps"), get(image, "sdm_t0"))
    runs = sum(int(t) <= t_start for t in scheduler.timesteps)
    views, d = len(get(image, "sdm_views")), get(image, "spatial_size")[2]
    sdm_guided = 2 if get(image, "sdm_guidance") != 1 else 1
    work = {
        "mcdpm": (windows * steps * guided, f"{windows} windows x {steps} steps x {guided}"),
        "generator": (1, f"{d} slices"),
        "refiner": (
            views * d * runs * sdm_guided,
            f"{views} views x {d} x {runs} steps x {sdm_guided}",
        ),
        "seg": (1, "1 window"),
    }
    rows = []
    for spec, r in results.items():
        kind, stage, mode, _ = spec.split(":")
        if kind == "sample" and mode == "bf16" and "flops" in r:
            times, what = work[stage]
            flops = times * r["flops"] / r["samples"]
            rows.append((stage, what, flops / 1e12, flops / rate))
    return rows


def _plan_order(item: tuple[str, dict]) -> int:
    """Where a result's ``kind:stage:mode`` comes in ``PLAN`` (train, then sampling)."""
    key = tuple(item[0].split(":")[:3])
    return PLAN.index(key) if key in PLAN else len(PLAN)


def report(results: dict, mfu: float, peak_tflops: float, budget_gib: float, scale: str) -> str:
    """Markdown tables: training steps, sampling forwards, time per volume, the verdict."""
    proj = projections(results, mfu, peak_tflops)
    rate = f"{mfu:.0%} of {peak_tflops:.0f} TFLOP/s"
    lines = [
        "| training step | mode | params M | measured at | CPU peak RSS GiB | activations "
        "GiB / sample (+ on CUDA: float32 softmax) | GFLOP / sample | CPU s / step | preset "
        "batch | projected GPU GiB | "
        f"fits {budget_gib:.0f} GB | projected GPU s / step ({rate}) |",
        "|" + "---|" * 12,
    ]
    sample_lines = [
        "| sampling forward | mode | params M | measured at | CPU peak RSS GiB | activations "
        "GiB / input | GFLOP / input | CPU s | inputs per forward at the preset | "
        "projected GPU GiB |",
        "|" + "---|" * 10,
    ]
    for spec, r in sorted(results.items(), key=_plan_order):
        kind, stage, mode, _ = spec.split(":")
        unit = UNIT[stage] if kind == "train" or stage not in ("generator",) else "volume"
        if "flops" not in r:
            why = (
                f"over the limit ({r['over_limit'] / GIB:.1f} GiB RSS)"
                if "over_limit" in r
                else "failed"
            )
            (lines if kind == "train" else sample_lines).append(f"| {stage} | {mode} | {why} |")
            continue
        p, n = proj[spec], r["samples"]
        cells = [
            stage,
            mode,
            f"{r['params'] / 1e6:.1f}" if kind == "sample" else f"{r['trained_params'] / 1e6:.1f}",
            f"{n} {unit}{'s' if n > 1 else ''}",
            f"{r['rss_peak'] / GIB:.2f}",
            f"{p['act_gib']:.2f}" + (f" (+{p['extra_gib']:.2f})" if p["extra_gib"] else ""),
            f"{r['flops'] / n / 1e9:.0f}",
            f"{r['seconds']:.1f}",
            str(r["default_samples"]),
            f"{p['gpu_gib']:.1f}",
        ]
        if kind == "train":
            cells += [
                "yes" if p["gpu_gib"] * GIB <= budget_gib * 1e9 else "**no**",
                f"{p['gpu_s']:.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        else:
            sample_lines.append("| " + " | ".join(cells) + " |")
    volume = ["| stage | work per volume | TFLOP | projected GPU s / volume |", "|---|---|---|---|"]
    total = 0.0
    for stage, what, tflop, seconds in per_volume(results, mfu * peak_tflops * 1e12, scale):
        volume.append(f"| {stage} | {what} | {tflop:.1f} | {seconds:.1f} |")
        total += seconds if stage != "seg" else 0.0
    volume.append(f"| a pair (MC-DPM + generator + refiner) | | | {total:.1f} |")
    return "\n".join([*lines, "", *sample_lines, "", *volume])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--one", help="measure kind:stage:mode:samples in this process (JSON)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", default="paper", help="the scale preset (tiny: a quick check)")
    parser.add_argument("--samples", default="cpu", help="'cpu' (1; refiner 8/16) or 'default'")
    parser.add_argument("--only", nargs="*", default=[], help="specs starting with these")
    parser.add_argument("--json", type=Path, help="read and update these results")
    parser.add_argument("--limit-gib", type=float, default=10.0)
    parser.add_argument("--mfu", type=float, default=0.25)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--budget-gib", type=float, default=40.0, help="GB (1e9 bytes)")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args.device, args.scale)), flush=True)
        return {}
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    for kind, stage, mode in PLAN:
        n = "default" if args.samples == "default" else CPU_SAMPLES[kind].get(stage, 1)
        spec = f"{kind}:{stage}:{mode}:{n}"
        if args.only and not any(spec.startswith(o) for o in args.only):
            continue
        results[spec] = run_child(spec, args.device, args.scale, args.limit_gib)
        print(json.dumps(results[spec]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print(report(results, args.mfu, args.peak_tflops, args.budget_gib, args.scale))
    return results


if __name__ == "__main__":
    main()
