"""Benchmark suite: generation and training speed, mask quality per sampler, memory, scaling.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.run          # ~10 min on 2 quiet cores
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.run --quick  # ~2 min, a smoke run

The full suite writes ``benchmarks/results.md``, ``--quick`` writes
``benchmarks/results-quick.md`` (its numbers come from fewer volumes, steps and iterations).
Each section can be run alone (``--sections mask,image,training,scaling``). The GPU
counterpart, for the paper preset, is ``benchmarks/gpu.sh``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import monai
import torch

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import suite  # noqa: E402
from common.io import atomic_path  # noqa: E402

SECTIONS = ("mask", "image", "training", "scaling")
PRESETS = {
    "full": {
        "samplers": "ddpm:1000:2,ddim:50:4,ddim:20:8,ddim:20:8:bf16,ddim:20:4:eta=0,"
        "rflow:30:4,rflow:10:4",
        "batch_volumes": 8,
        "image_volumes": 2,
        "slice_batches": "8,16,32,64",
        "train_iters": 6,
        "depths": "64,128,256",
        "sizes": "32,64,128",
        "scaling_steps": 2,
    },
    "quick": {
        "samplers": "ddpm:100:1,ddim:20:2,ddim:20:2:bf16,ddim:20:1:eta=0,rflow:10:1",
        "batch_volumes": 2,
        "image_volumes": 1,
        "slice_batches": "16,64",
        "train_iters": 2,
        "depths": "32,64",
        "sizes": "32,64",
        "scaling_steps": 1,
    },
}
SPEEDUP_TARGET, QUALITY_TOLERANCE, LOADER_TARGET, GPU_BATCH_TARGET = 20.0, 0.10, 0.10, 0.5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run at reduced counts")
    parser.add_argument("--out", help="report path (default benchmarks/results[-quick].md)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    parser.add_argument(
        "--datalist",
        help="real cases: the training data, and the masks that quality is measured against "
        "(default: the demo weights' training cases, data/thorax_demo/train.json, made if missing)",
    )
    parser.add_argument(
        "--ckpt", default=str(suite.REPO / "bundles/mask_diffusion/models/model.pt")
    )
    parser.add_argument(
        "--samplers",
        help="kind:steps:volumes[:bf16][:eta=X],... (the longest fp32 ddpm is the reference)",
    )
    parser.add_argument(
        "--default", default="ddim:20", help="kind:steps[:flags]: the fast sampler judged"
    )
    parser.add_argument("--batch-volumes", type=int, help="volumes of the batched-generation test")
    parser.add_argument("--image-volumes", type=int, help="volumes per image-stage call")
    parser.add_argument("--slice-batches", help="refiner slice batch sizes, comma-separated")
    parser.add_argument("--train-iters", type=int, help="timed iterations per training")
    parser.add_argument("--depths", help="scaling: depths D, comma-separated")
    parser.add_argument("--sizes", help="scaling: in-plane sizes, comma-separated")
    parser.add_argument("--scaling-steps", type=int, help="scaling: DDIM steps")
    parser.add_argument("--threads", type=int, help="torch threads (default: OMP_NUM_THREADS)")
    args = parser.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = str(suite.REPO / "benchmarks" / f"results{'-quick' if args.quick else ''}.md")
    if args.datalist is None:
        args.datalist = str(demo_training_cases())
    if not Path(args.datalist).exists():
        parser.error(f"{args.datalist} does not exist; pass an existing --datalist")
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def demo_training_cases() -> Path:
    """``data/thorax_demo/train.json``: the 16 cases the demo weights were trained on (the
    first 16 of the 24-case seed-0 cohort, as in models/PROVENANCE.md), made when missing."""
    if not suite.TRAIN_DATALIST.exists():
        from common.data import split_datalist
        from common.demo_data.thorax import make_thorax_cohort

        folder = suite.TRAIN_DATALIST.parent
        datalist = make_thorax_cohort(folder, 24, seed=0)
        split_datalist(datalist, 16, folder / "train.json", folder / "heldout.json")
    return suite.TRAIN_DATALIST


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def run(args: argparse.Namespace) -> dict:
    """Run the chosen sections; returns their results and the run's context."""
    if args.threads:
        torch.set_num_threads(args.threads)
    context = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "command": " ".join(
            [f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}"]
            + [shlex.quote(a) for a in [Path(sys.executable).name, "-m", "benchmarks.run"]]
            + [shlex.quote(a) for a in sys.argv[1:]]
        ),
        "load_start": os.getloadavg(),
        "quick": args.quick,
        "cpu_bf16": _cpu_bf16(),
    }
    start = time.perf_counter()
    memory: dict = {}
    results: dict = {"context": context, "memory": memory}
    if "mask" in args.sections:
        results["mask"] = suite.mask_sampling(
            [suite.Sampler.parse(s) for s in args.samplers.split(",")],
            args.ckpt,
            args.batch_volumes,
            default_sampler(args),
            memory,
            suite.real_masks(args.datalist),
        )
    if "image" in args.sections:
        results["image"] = suite.image_stage(
            args.image_volumes, _ints(args.slice_batches), memory, args.datalist
        )
    if "training" in args.sections:
        results["training"] = suite.training(args.train_iters, memory, args.datalist)
    if "scaling" in args.sections:
        depths, sizes = _ints(args.depths), _ints(args.sizes)
        results["scaling"] = suite.scaling(depths, sizes, (sizes[0], depths[0]), args.scaling_steps)
    context["wall_s"] = time.perf_counter() - start
    context["load_end"] = os.getloadavg()
    return results


# ---------------------------------------------------------------- report


def _f(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pm(q: dict, key: str, digits: int = 2) -> str:
    sd = q.get(f"{key}_sd")
    return _f(q[key], digits) + ("" if sd is None else f" ± {_f(sd, digits)}")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def default_sampler(args: argparse.Namespace) -> suite.Sampler:
    """``--default`` with the volume count of its row in ``--samplers``."""
    default = suite.Sampler.parse_setting(args.default, 0)
    for text in args.samplers.split(","):
        sampler = suite.Sampler.parse(text)
        if dataclasses.replace(sampler, volumes=0) == default:
            return sampler
    return dataclasses.replace(default, volumes=args.batch_volumes)


def reference_row(mask: dict) -> dict | None:
    """The fp32 DDPM row with the most steps: what the fast samplers are compared with."""
    ddpm = [r for r in mask["rows"] if r["sampler"].kind == "ddpm" and not r["sampler"].bf16]
    return max(ddpm, key=lambda r: r["sampler"].steps) if ddpm else None


def _quality_cells(q: dict | None, kept: bool = False) -> list[str]:
    if q is None:
        return ["timing only: the checkpoint is not trained for this objective", "", ""]
    components = _f(q["components_gen"]) if kept else _pm(q, "components_gen")
    return [_pm(q, "volume_w1_rel"), components, _pm(q, "z_continuity_gen")]


def mask_section(mask: dict) -> list[str]:
    ref = reference_row(mask)
    h, w, d = mask["spatial_size"]
    lines = [
        f"## MC-DPM mask sampling (demo preset {h}x{w}x{d}, m={mask['m']}, n={mask['n']}, "
        f"guidance {mask['guidance']})",
        "",
        "Each volume sampled alone (volume i from seed i), its first window in the middle of "
        "the volume (3 rounds of windows; a random start takes 3-5 rounds at this size), so "
        "every volume and sampler does the same window work. Weights: "
        + (
            f"`{_relative(mask['ckpt']['path'])}` (sha256 {mask['ckpt']['sha256']}…). "
            if mask["ckpt"]
            else "untrained. "
        )
        + "Quality: each volume "
        f"against the {mask['n_real']} real training masks on the model grid "
        "(`common.mask_metrics`), mean ± sd over volumes, as sampled (raw) and after the "
        "bundle's default keep-largest-component post-processing (kept). Volume W1 rel: "
        "Wasserstein-1 distance of a volume's label volumes to the real ones / real mean, "
        "averaged over labels; components: 26-connected pieces per present label (real: "
        "1); z-continuity: Dice of consecutive slices.",
        "",
    ]
    header = ["sampler", "volumes", "s / volume"]
    header += [f"speed-up vs {ref['sampler'].name}" if ref else "speed-up"]
    header += ["raw: volume W1 rel", "raw: components", "raw: z-continuity"]
    header += ["kept: volume W1 rel", "kept: components", "kept: z-continuity"]
    rows = []
    real = None
    for r in mask["rows"]:
        speed = f"{ref['s_per_volume'] / r['s_per_volume']:.1f}x" if ref else "–"
        cells = [r["sampler"].name, str(r["sampler"].volumes), _f(r["s_per_volume"], 1), speed]
        cells += _quality_cells(r["quality"]) + _quality_cells(r["quality_kept"], kept=True)
        rows.append(cells)
        real = r["quality"] or real
    if real is not None:
        real_row = ["real masks", "", "", "", "", _f(real["components_real"])]
        real_row += [_f(real["z_continuity_real"]), "", _f(real["components_real"])]
        rows.append(real_row + [_f(real["z_continuity_real"])])
    lines += _table(header, rows)
    b = mask["batched"]
    lines += [
        "",
        f"Batched generation ({b['sampler'].name}): {b['volumes']} volumes in one "
        f"call {_f(b['batched_s'], 1)} s vs {b['volumes']} single-volume calls "
        f"{_f(b['single_s'], 1)} s: ratio **{_f(b['ratio'])}** (target on GPU <= "
        f"{GPU_BATCH_TARGET}, see `benchmarks/gpu.sh`).",
        "",
    ]
    return lines


def image_section(image: dict) -> list[str]:
    h, w, d = image["spatial_size"]
    lines = [
        f"## Image stage (demo preset {h}x{w}x{d}, shipped demo weights, real masks)",
        "",
        f"Sequence generator: {_f(image['seqgen_s'], 2)} s / volume alone, "
        f"{_f(image['seqgen_batched_s'], 2)} s / volume with {image['volumes']} volumes per "
        "call (one generator call per axial slice).",
        "",
        f"Refiner: {image['sampler'].upper()}-{image['steps']} schedule from t0={image['t0']}, "
        f"i.e. {image['t_steps']} denoising steps x {len(image['views'])} views "
        f"({', '.join(image['views'])}), guidance {image['guidance']} (both branches in one "
        f"forward), {image['volumes']} volumes per call:",
        "",
    ]
    rows = [
        [str(r["slice_batch"]), "bf16" if r["bf16"] else "fp32", str(r["forward_calls"])]
        + [_f(r["s_per_volume"], 2)]
        for r in image["refiner"]
    ]
    header = ["slice batch", "precision", "forward calls", "s / volume"]
    return lines + _table(header, rows) + [""]


def training_section(rows: list[dict], iters: int) -> list[str]:
    lines = [
        "## Training (demo presets)",
        "",
        f"{iters} timed iterations after one warm-up, through the bundle's own pipeline "
        "(CacheDataset of the deterministic preprocessing, random crops/windows per "
        "iteration, num_workers 0) and again over the same batches already in memory. "
        "Loader: seconds to draw one batch from the DataLoader alone; its share of a "
        "pipeline step is the loader cost.",
        "",
    ]
    header = ["training", "samples / it", "cache build s", "loader s / batch"]
    header += ["it/s (pipeline)", "samples/s (pipeline)", "it/s (in memory)"]
    header += ["samples/s (in memory)", "loader share of a step"]
    table = []
    for r in rows:
        table.append(
            [r["name"], str(r["samples_per_iter"]), _f(r["cache_s"], 1), _f(r["loader_s"], 3)]
            + [_f(1 / r["step_s"]), _f(r["samples_per_iter"] / r["step_s"], 1)]
            + [_f(1 / r["step_in_memory_s"]), _f(r["samples_per_iter"] / r["step_in_memory_s"], 1)]
            + [f"{100 * r['loader_share']:.1f}%"]
        )
    return lines + _table(header, table) + [""]


def memory_section(memory: dict) -> list[str]:
    lifetime = any(m["lifetime_peak"] for m in memory.values())
    lines = [
        "## Peak resident memory per stage",
        "",
        "Peak RSS of the benchmark process during the stage (Linux VmHWM, reset at the "
        "stage's start"
        + ("; this platform cannot reset it, so these are lifetime peaks" if lifetime else "")
        + "); RSS at start is what the process held before (libraries, loaded models); "
        "load: the 1-minute load average when the stage ended.",
        "",
    ]
    rows = [
        [name, _f(m["seconds"], 1), _f(m["peak_rss_mb"], 0), _f(m["start_rss_mb"], 0)]
        + [_f(m["load"], 1)]
        for name, m in memory.items()
    ]
    header = ["stage", "s", "peak RSS MB", "RSS at start MB", "load"]
    return lines + _table(header, rows) + [""]


def linear_in_depth(by_depth: list[dict]) -> float:
    """Largest relative deviation of seconds per slice from that of the smallest depth."""
    per_slice = [r["s"] / r["depth"] for r in by_depth]
    return max(abs(p / per_slice[0] - 1) for p in per_slice)


def scaling_section(scaling: dict) -> list[str]:
    dev = linear_in_depth(scaling["by_depth"])
    verdict = "grows linearly in D" if dev <= 0.25 else "does NOT grow linearly in D"
    lines = [
        f"## Scaling (untrained network of the demo architecture, DDIM-{scaling['steps']}, "
        "one volume, first window in the middle)",
        "",
        "Upward and downward windows run side by side after the first window, so a volume "
        "takes 1 + ceil(windows / 2) rounds of one or two windows.",
        "",
    ]
    rows = [
        [f"{r['size']}x{r['size']}x{r['depth']}", str(r["windows"]), str(r["rounds"])]
        + [_f(r["s"], 2), _f(1000 * r["s"] / r["depth"], 1)]
        for r in scaling["by_depth"]
    ]
    lines += _table(["volume", "windows", "rounds", "s / volume", "ms / slice"], rows)
    lines += ["", f"Seconds per slice vary by at most {100 * dev:.0f}%: the cost {verdict}.", ""]
    base = scaling["by_size"][0]
    rows = [
        [f"{r['size']}x{r['size']}x{r['depth']}", _f(r["s"], 2)]
        + [_f(r["s"] / base["s"], 1), _f((r["size"] / base["size"]) ** 2, 0)]
        for r in scaling["by_size"]
    ]
    lines += _table(["volume", "s / volume", "time vs smallest", "voxels vs smallest"], rows)
    return lines + [""]


def _quality_target(fast: dict, ref: dict, key: str) -> str | None:
    """The target line comparing ``fast`` with ``ref`` on quality ``key`` (raw or kept).

    A metric passes when it is within the tolerance of the reference's, or closer to the
    real masks' value (W1: 0) than the reference's: quality not lost.
    """
    q_fast, q_ref = fast[key], ref[key]
    if not (q_fast and q_ref):
        return None
    real = {"volume_w1_rel": 0.0}
    real.update(
        components_gen=q_ref["components_real"], z_continuity_gen=q_ref["z_continuity_real"]
    )
    passed, texts = [], []
    for metric in suite.QUALITY_KEYS:
        a, b = q_fast[metric], q_ref[metric]
        rel = abs(a - b) / abs(b) if b else float("inf")
        closer = abs(a - real[metric]) < abs(b - real[metric])
        passed.append(rel <= QUALITY_TOLERANCE or closer)
        sd = q_fast.get(f"{metric}_sd")
        note = ", sd " + _f(sd) if sd is not None else ""
        note += ", closer to real" if closer and rel > QUALITY_TOLERANCE else ""
        texts.append(f"{metric} {_f(a)} vs {_f(b)} ({100 * rel:.0f}%{note})")
    verdict = "met" if all(passed) else "missed"
    what = "as sampled" if key == "quality" else "after keep-largest (the bundle's output)"
    return (
        f"- Quality {what}: {fast['sampler'].name} vs {ref['sampler'].name} "
        f"({fast['sampler'].volumes} vs {ref['sampler'].volumes} volumes): "
        + "; ".join(texts)
        + f" (target: within {100 * QUALITY_TOLERANCE:.0f}% or closer to the real masks): "
        f"**{verdict}**."
    )


def targets_section(results: dict) -> list[str]:
    lines = ["## Targets", ""]
    mask = results.get("mask")
    if mask:
        ref = reference_row(mask)
        default = mask["batched"]["sampler"]
        fast = next((r for r in mask["rows"] if r["sampler"] == default), None)
        if ref and fast:
            speed = ref["s_per_volume"] / fast["s_per_volume"]
            verdict = "met" if speed >= SPEEDUP_TARGET else "missed"
            lines.append(
                f"- Speed: {default.name} is {speed:.1f}x faster than {ref['sampler'].name} "
                f"per mask volume (target >= {SPEEDUP_TARGET:.0f}x): **{verdict}**."
            )
            for key in ("quality", "quality_kept"):
                line = _quality_target(fast, ref, key)
                lines += [line] if line else []
        b = mask["batched"]
        lines.append(
            f"- Batched generation: {b['volumes']} volumes in one call cost {_f(b['ratio'])} of "
            f"{b['volumes']} single-volume calls on this CPU (GPU target <= {GPU_BATCH_TARGET}, "
            "measured by `benchmarks/gpu.sh`)."
        )
    for r in results.get("training", []):
        verdict = "met" if r["loader_share"] <= LOADER_TARGET else "missed"
        lines.append(
            f"- Loader, {r['name']}: {100 * r['loader_share']:.1f}% of a step (target <= "
            f"{100 * LOADER_TARGET:.0f}%): **{verdict}**."
        )
    return lines + [""]


def report(results: dict, args: argparse.Namespace) -> str:
    c = results["context"]
    lines = [
        "# Benchmark results" + (" (quick smoke run: reduced counts)" if c["quick"] else ""),
        "",
        f"- Date: {c['date']}; wall time of the suite: {c['wall_s'] / 60:.1f} min",
        f"- Machine: {c['platform']}, {c['processor']}, {c['cpu_count']} CPUs visible, "
        f"torch threads {c['threads']}, CPU bf16 instructions: {c['cpu_bf16']}; everything "
        "runs on the CPU (the GPU counterpart is `benchmarks/gpu.sh`)",
        f"- Load average (1, 5, 15 min) at start {_load(c['load_start'])}, at end "
        f"{_load(c['load_end'])}: above the CPU count means other work shared the machine "
        "and absolute times are pessimistic; ratios hold better.",
        f"- Versions: python {c['python']}, torch {c['torch']}, monai {c['monai']}",
        f"- Command: `{c['command']}`",
        "",
    ]
    if "mask" in results:
        lines += mask_section(results["mask"])
    if "image" in results:
        lines += image_section(results["image"])
    if "training" in results:
        lines += training_section(results["training"], args.train_iters)
    if results["memory"]:
        lines += memory_section(results["memory"])
    if "scaling" in results:
        lines += scaling_section(results["scaling"])
    lines += targets_section(results)
    lines += [
        "## Notes",
        "",
        "- RFlow rows: the shipped MC-DPM is trained as a DDPM with v-prediction; rectified "
        "flow needs a flow-trained checkpoint (`scheduler_kind: rflow`), so with the shipped "
        "weights those rows time the sampler only.",
        "- bf16 rows run the network under `torch.autocast(bfloat16)` (`bf16=True` of "
        "`sample_mask_volumes` / `refine_volume`); the sampler's arithmetic stays float32. "
        "CPUs with AMX / AVX512-BF16 run bf16 convolutions natively; on others bf16 can be "
        "slower.",
        "- On the CPU, a batch of one small window runs PyTorch's native 3D convolution "
        "(oneDNN is chosen only from batch 2 at this size): one window takes longer than a "
        "batch of two. Batching volumes (`batch_size` of the inference config) is the main "
        "CPU lever after the step count.",
        "",
    ]
    return "\n".join(lines)


def _cpu_bf16() -> str:
    """The CPU's bf16 instruction sets (Linux), ``none`` or ``unknown``."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    found = sorted(flags & {"amx_bf16", "avx512_bf16"})
    return ", ".join(found) or "none"


def _relative(path: str) -> str:
    """``path`` relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(suite.REPO)) if p.is_relative_to(suite.REPO) else str(p)


def _load(load: tuple) -> str:
    return ", ".join(f"{v:.2f}" for v in load)


def main(argv=None) -> Path:
    args = parse_args(argv)
    results = run(args)
    out = Path(args.out)
    text = report(results, args)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
