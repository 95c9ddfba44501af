"""Benchmark suite: generation and training speed, mask quality per sampler, memory, scaling.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.run          # ~10 min on 2 quiet cores
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.run --quick  # ~2 min, a smoke run

The full suite writes ``benchmarks/results.md``, ``--quick`` writes
``benchmarks/results-quick.md`` (its numbers come from fewer volumes, steps and iterations).
Each section can be run alone (``--sections mask,image,training,scaling``). The measurements
are in ``benchmarks/suite.py``, the report text in ``benchmarks/report.py``. The GPU
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

from benchmarks import suite, training  # noqa: E402
from benchmarks.report import report  # noqa: E402
from common.core.io import atomic_path  # noqa: E402

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
        "--ckpt", default=str(suite.REPO / "bundles/mask_diffusion/models/demo/model.pt")
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
    first 16 of the 24-case seed-0 cohort, as in models/demo/PROVENANCE.md), made when missing."""
    if not suite.TRAIN_DATALIST.exists():
        from common.data.splits import split_datalist
        from medgen3d.demo_data.thorax import make_thorax_cohort

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
        "cpu_bf16": cpu_bf16(),
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
        results["training"] = training.training(args.train_iters, memory, args.datalist)
    if "scaling" in args.sections:
        depths, sizes = _ints(args.depths), _ints(args.sizes)
        results["scaling"] = suite.scaling(depths, sizes, (sizes[0], depths[0]), args.scaling_steps)
    context["wall_s"] = time.perf_counter() - start
    context["load_end"] = os.getloadavg()
    return results


def default_sampler(args: argparse.Namespace) -> suite.Sampler:
    """``--default`` with the volume count of its row in ``--samplers``."""
    default = suite.Sampler.parse_setting(args.default, 0)
    for text in args.samplers.split(","):
        sampler = suite.Sampler.parse(text)
        if dataclasses.replace(sampler, volumes=0) == default:
            return sampler
    return dataclasses.replace(default, volumes=args.batch_volumes)


def cpu_bf16() -> str:
    """The CPU's bf16 instruction sets (Linux), ``none`` or ``unknown``."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    found = sorted(flags & {"amx_bf16", "avx512_bf16"})
    return ", ".join(found) or "none"


# the first section written by another benchmark command; it and all after it are kept
OTHER_SECTIONS = "\n## Speed and memory savers"


def kept_sections(results: Path) -> str:
    """The sections of ``results`` that other benchmark commands wrote (kept on a rerun)."""
    text = results.read_text() if results.is_file() else ""
    start = text.find(OTHER_SECTIONS)
    return "" if start < 0 else text[start:]


def main(argv=None) -> Path:
    args = parse_args(argv)
    results = run(args)
    out = Path(args.out)
    text = report(results, args.train_iters)
    kept = kept_sections(out)
    with atomic_path(out) as tmp:
        tmp.write_text(text + kept)
    print(text)
    return out


if __name__ == "__main__":
    main()
