"""What the standard preset costs on this CPU, per stage and candidate width.

    OMP_NUM_THREADS=1 nice .venv/bin/python -m benchmarks.standard_cost [--repeats 3]

For each stage (MC-DPM, sequence generator, refiner, segmentation) and each candidate width
(``CANDIDATES``; the first is the preset's own), in fp32 and under bf16 autocast: the median
CPU seconds (process time; wall seconds in brackets, which other jobs inflate) of one
training iteration at the preset's batch (after a warm-up iteration; batches from the
stage's own training pipeline: standard preset, field_of_view framing) and of one sampling
call (an MC-DPM round of windows, one generator slice, one refiner slice batch, one
segmentation window). It projects the CPU hours of a full training at the preset's
iterations (validation not counted) and the CPU seconds of one volume's sampling, and
prints a markdown table with the CPU's bf16 instruction sets. Data: the first ``--cases``
cases of ``--datalist`` (default ``data/<dataset>_demo/train.json``; made in a temporary
folder when missing).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from benchmarks.run import cpu_bf16
from common.core.bundle_configs import bundle_parser
from common.data.datalists import datalist_label_set, read_datalist, write_datalist
from common.images.refiner import VIEWS, start_timestep
from common.masks.mcdpm import plan_rounds
from common.masks.windows import extension_plan
from medgen3d.bundles import BUNDLES, TRAIN_STAGES

REPO = Path(__file__).resolve().parents[1]


def _unet3d(channels: list[int]) -> dict:
    return {"channels": channels, "strides": [2] * (len(channels) - 1), "num_res_units": 1}


# per stage: width overrides of the standard preset; the first is the preset's own
CANDIDATES = {
    "masks": [
        {"unet_channels": [16, 32, 64, 128], "unet_attention": [False, False, False, True]},
        {"unet_channels": [16, 32, 64, 128], "unet_attention": [False] * 4},
        {"unet_channels": [16, 32, 64], "unet_attention": [False] * 3},
        {"unet_channels": [32, 64, 128], "unet_attention": [False] * 3},
    ],
    "generator": [{"gen_channels": [32, 64, 128, 256]}, {"gen_channels": [16, 32, 64, 128]}],
    "refiner": [
        {"sdm_channels": [16, 32, 64, 128], "sdm_attention": [False] * 4},
        {"sdm_channels": [16, 32, 64], "sdm_attention": [False] * 3},
        {"sdm_channels": [32, 64, 128], "sdm_attention": [False] * 3, "sdm_spade_channels": 32},
    ],
    "seg": [
        {"network_sizes#unet3d": _unet3d([16, 32, 64, 128, 256])},
        {"network_sizes#unet3d": _unet3d([16, 32, 64, 128])},
        {"network_sizes#unet3d": _unet3d([32, 64, 128, 256])},
    ],
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="thorax", help="dataset preset: thorax or brain")
    parser.add_argument("--scale", default="standard", help="scale preset (or a YAML file)")
    parser.add_argument("--datalist", help="cases to draw batches from (default: the demo's)")
    parser.add_argument("--cases", type=int, default=4, help="cases of --datalist used")
    parser.add_argument(
        "--train_cases", type=int, default=16, help="cases of the full training datalist"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--stages", default="masks,generator,refiner,seg")
    return parser.parse_args(argv)


def cases_datalist(args: argparse.Namespace, folder: Path) -> Path:
    """A datalist of the first ``args.cases`` cases (made when there is no datalist)."""
    source = Path(args.datalist or REPO / "data" / f"{args.dataset}_demo" / "train.json")
    if not source.is_file():
        if args.dataset == "brain":
            from medgen3d.demo_data.brain import make_brain_cohort as make
        else:
            from medgen3d.demo_data.thorax import make_thorax_cohort as make
        source = make(folder / "cohort", args.cases)
    doc = read_datalist(source)
    cases = doc["training"][: args.cases]
    modality = doc["modality"]["0"]
    return write_datalist(folder / "cases.json", cases, datalist_label_set(doc), modality, "cost")


def stage_config(stage: str, args, datalist: Path, root: str, overrides: dict, bf16: bool):
    """The stage's training config at the presets with ``overrides``, writing under ``root``."""
    bundle, files, _ = TRAIN_STAGES[stage]
    values = {
        "bundle_root": root,
        "dataset_dir": str(datalist.parent),
        "datalist": str(datalist),
        "train#handlers": [],
        "device": "$torch.device('cpu')",
        **overrides,
    }
    if bundle == "seg_downstream":
        values["validate_data"] = False
    parser = bundle_parser(BUNDLES / bundle, files, args.scale, args.dataset, values)
    if "bf16" in parser.config:  # the trainings' own autocast switch, where there is one
        parser["bf16"] = bf16
    return parser


def _clocks() -> tuple[float, float]:
    """(process CPU seconds, wall seconds): CPU time is what one thread spends computing,
    unaffected by other jobs on a shared machine."""
    return time.process_time(), time.perf_counter()


def _medians(spans: list[tuple]) -> tuple[float, float]:
    """Median CPU and wall seconds of ``(cpu, wall)`` spans."""
    return tuple(statistics.median(s[j] for s in spans) for j in (0, 1))


def iteration_seconds(trainer, batch, repeats: int, bf16: bool) -> tuple[float, float]:
    """Median CPU and wall seconds of one ``trainer`` iteration on ``batch`` (after one warm-up
    iteration), under bf16 autocast when ``bf16``."""
    marks: list[tuple[float, float]] = []
    handles = [
        trainer.add_event_handler(event, lambda _: marks.append(_clocks()))
        for event in (Events.ITERATION_STARTED, Events.ITERATION_COMPLETED)
    ]
    trainer.state.max_epochs = None  # a fresh run of exactly repeats + 1 iterations
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        Engine.run(trainer, [batch] * (repeats + 1), max_epochs=1, epoch_length=repeats + 1)
    for handle in handles:
        handle.remove()
    spans = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks[0::2], marks[1::2])]
    return _medians(spans[1:])


def call_seconds(fn, repeats: int, bf16: bool) -> tuple[float, float]:
    """Median CPU and wall seconds of ``fn()`` under inference mode (after one warm-up call)."""
    spans = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for _ in range(repeats + 1):
            start = _clocks()
            fn()
            spans.append(tuple(b - a for a, b in zip(start, _clocks())))
    return _medians(spans[1:])


def sampling(stage: str, config, network: torch.nn.Module) -> tuple:
    """``(fn, calls per volume, what)``: one sampling call of ``stage`` and how many make one
    volume (MC-DPM: a call per round and step, the first round's one window counted as two:
    on a CPU one window costs about as much as two)."""
    h, w, depth = config.get_parsed_content("spatial_size")
    k = config.get_parsed_content("num_classes")
    network.eval()
    if stage == "masks":
        m, n, steps = (config.get_parsed_content(key) for key in ("m", "n", "steps"))
        rounds = plan_rounds(extension_plan(depth, m, n, (depth - m) // 2))
        x = torch.randn(2, 2 * k + 1, h, w, m)
        t, z = torch.tensor([500, 500]), torch.tensor([0, 1])
        calls = steps * len(rounds)  # a round: the up and the down window (the first: one)
        return lambda: network(x, timesteps=t, class_labels=z), calls, f"2 windows {h}x{w}x{m}"
    if stage == "generator":
        x = torch.randn(1, 3 * k + 2, h, w)
        return lambda: network(x), depth, f"1 slice {h}x{w}"
    if stage == "refiner":
        batch = min(config.get_parsed_content("sdm_slice_batch"), depth)
        guided = 2 if config.get_parsed_content("sdm_guidance") != 1.0 else 1
        scheduler = config.get_parsed_content("scheduler")
        t0, steps = config.get_parsed_content("sdm_t0"), config.get_parsed_content("sdm_steps")
        first = start_timestep(scheduler, steps, t0)
        runs = sum(int(s) <= first for s in scheduler.timesteps)
        views = len(config.get_parsed_content("sdm_views"))
        x, seg = torch.randn(guided * batch, 1, h, w), torch.randn(guided * batch, k, h, w)
        t = torch.full((guided * batch,), 10)
        calls = runs * views * math.ceil(depth / batch)
        return lambda: network(x, timesteps=t, seg=seg), calls, f"{guided * batch} slices {h}x{w}"
    x = torch.randn(1, 1, h, w, depth)
    return lambda: network(x), 1, f"1 window {h}x{w}x{depth}"


def planned_iterations(stage: str, config, train_cases: int) -> int:
    """Optimiser steps of the stage's full training (refiner: all three views)."""
    cases = train_cases - int(config.get_parsed_content("val_cases"))
    if stage == "seg" and config.get("max_iterations") is not None:
        return int(config.get_parsed_content("max_iterations"))
    epochs, batch = {
        "masks": ("max_epochs", "batch_size"),
        "generator": ("gen_max_epochs", "gen_batch_size"),
        "refiner": ("sdm_max_epochs", "sdm_batch_size"),
        "seg": ("max_epochs", "batch_size"),
    }[stage]
    per_epoch = math.ceil(cases / int(config.get_parsed_content(batch)))
    views = len(VIEWS) if stage == "refiner" else 1
    return int(config.get_parsed_content(epochs)) * per_epoch * views


def network_of(stage: str, config) -> torch.nn.Module:
    """The stage's trained network from its training config."""
    return config.get_parsed_content("generator" if stage == "generator" else "network")


def measure(stage: str, args, datalist: Path, root: str) -> list[dict]:
    """One row per candidate width and precision of ``stage``; ``chosen`` marks the preset's
    widths at the preset's precision (its ``bf16`` key)."""
    bundle, files, _ = TRAIN_STAGES[stage]
    preset_bf16 = bool(bundle_parser(BUNDLES / bundle, files, args.scale, args.dataset).get("bf16"))
    rows, batch = [], None
    for i, overrides in enumerate(CANDIDATES[stage]):
        for bf16 in (False, True):
            config = stage_config(stage, args, datalist, root, overrides, bf16)
            if batch is None:
                batch = next(iter(config.get_parsed_content("train#dataloader")))
            trainer = config.get_parsed_content("train#trainer")
            step, step_wall = iteration_seconds(trainer, batch, args.repeats, bf16)
            network = network_of(stage, config)
            fn, calls, what = sampling(stage, config, network)
            call, call_wall = call_seconds(fn, args.repeats, bf16)
            iters = planned_iterations(stage, config, args.train_cases)
            rows.append(
                {
                    "stage": stage,
                    "width": _width(overrides),
                    "preset": i == 0,
                    "chosen": i == 0 and bf16 == preset_bf16,
                    "bf16": bf16,
                    "params_m": sum(p.numel() for p in network.parameters()) / 1e6,
                    "iter_s": step,
                    "iter_wall_s": step_wall,
                    "iterations": iters,
                    "train_h": step * iters / 3600,
                    "call": what,
                    "call_s": call,
                    "call_wall_s": call_wall,
                    "volume_s": call * calls,
                }
            )
            print(_row(rows[-1]), flush=True)
    return rows


def _width(overrides: dict) -> str:
    """A candidate's channels, ``+attn`` where its last level attends."""
    first = next(iter(overrides.values()))
    channels = first["channels"] if isinstance(first, dict) else first
    attention = next((v for k, v in overrides.items() if k.endswith("_attention")), [False])
    return "/".join(map(str, channels)) + (" +attn" if attention[-1] else "")


def _row(r: dict) -> str:
    return (
        f"| {r['stage']}{' (preset)' if r['preset'] else ''} | {r['width']} | "
        f"{'bf16' if r['bf16'] else 'fp32'} | {r['params_m']:.2f} | {r['iter_s']:.2f} "
        f"({r['iter_wall_s']:.2f}) | {r['iterations']} | {r['train_h']:.2f} | {r['call']} | "
        f"{r['call_s']:.3f} ({r['call_wall_s']:.3f}) | {r['volume_s']:.1f} |"
    )


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    cpu = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "?")
    print(f"CPU {cpu}; bf16 instructions: {cpu_bf16()}; torch {torch.__version__}, ", end="")
    print(f"{torch.get_num_threads()} thread(s); {args.scale} preset, {args.dataset}\n")
    print(
        "| stage | width | precision | params (M) | train CPU s/iter (wall) | iterations | "
        "train CPU h | sampling call | call CPU s (wall) | CPU s per volume |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        datalist = cases_datalist(args, Path(tmp))
        for stage in args.stages.split(","):
            rows += measure(stage, args, datalist, tmp)
    for bf16 in (False, True):
        chosen = [r for r in rows if r["preset"] and r["bf16"] == bf16]
        hours = sum(r["train_h"] for r in chosen)
        pair = sum(r["volume_s"] for r in chosen if r["stage"] != "seg")
        print(
            f"\nPreset widths, {'bf16' if bf16 else 'fp32'}: full training {hours:.2f} CPU h "
            f"(validation not counted); one pair's sampling {pair:.0f} CPU s"
        )
    hours = sum(r["train_h"] for r in rows if r["chosen"])
    print(f"Preset widths at the trainings' own bf16 setting: {hours:.2f} CPU h")
    return rows


if __name__ == "__main__":
    main()
