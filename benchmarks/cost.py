"""What the sampling savers buy on this CPU, side by side in one run (issue #18).

    nice .venv/bin/python -m benchmarks.cost [--repeats 5] [--threads 2 1] [--no-compile]

Two forward passes under ``torch.inference_mode``, untrained networks of the demo widths from
the bundles' configs (cost does not depend on the weights):

- the MC-DPM UNet on one 64 x 64 x 16 window (m=16) and on a batch of two windows;
- the refiner's view UNet on a batch of 64 x 64 slices (``--slices``, default 128: 64 slices,
  both guidance branches).

Each runs at every thread count of ``--threads``, in float32 and under bf16 autocast, plain
and through ``torch.compile`` (its compile time is the first call minus a plain call).
Times are medians of ``--repeats`` calls after one warm-up. Prints the CPU's bf16 flags
(``/proc/cpuinfo``), the load average and a markdown table with the ratios.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.run import cpu_bf16
from common.core.bundle_configs import bundle_parser
from common.core.savers import autocast
from medgen3d.bundles import BUNDLES

WINDOW = {"spatial_size": [64, 64, 64], "m": 16}  # a 64 x 64 x 16 window


def cases(slices: int) -> dict[str, tuple[torch.nn.Module, Callable[[], tuple]]]:
    """``{name: (network, () -> (args, kwargs))}`` of the measured forward passes."""
    torch.manual_seed(0)
    mask = bundle_parser(BUNDLES / "mask_diffusion", ["inference.yaml"], "demo", "thorax")
    mask.update(WINDOW)
    mcdpm = mask.get_parsed_content("network_def").eval()
    k, (h, w, _), m = (mask.get_parsed_content(x) for x in ("num_classes", "spatial_size", "m"))
    image = bundle_parser(BUNDLES / "image_synthesis", ["inference.yaml"], "demo", "thorax")
    refiner = image.get_parsed_content("refiner_def").eval()

    def window(b):
        x = torch.randn(b, 2 * k + 1, h, w, m)
        return (x,), {"timesteps": torch.full((b,), 500), "class_labels": torch.zeros(b).long()}

    def slice_batch():
        seg = torch.nn.functional.one_hot(torch.randint(0, k, (slices, h, w)), k)
        x, t = torch.randn(slices, 1, h, w), torch.full((slices,), 10)
        return (x,), {"timesteps": t, "seg": seg.movedim(-1, 1).float()}

    return {
        f"MC-DPM, 1 window {h}x{w}x{m}": (mcdpm, lambda: window(1)),
        f"MC-DPM, 2 windows {h}x{w}x{m}": (mcdpm, lambda: window(2)),
        f"refiner, {slices} slices {h}x{w}": (refiner, slice_batch),
    }


def median_seconds(net, inputs, bf16: bool, repeats: int) -> tuple[float, float]:
    """(first call, median of ``repeats`` later calls) in seconds."""
    args, kwargs = inputs()
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            with autocast("cpu", bf16):
                net(*args, **kwargs)
            times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def measure(args: argparse.Namespace) -> list[dict]:
    """One row per (case, threads, precision, compiled)."""
    rows = []
    for name, (net, inputs) in cases(args.slices).items():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for bf16 in (False, True):
                _, plain = median_seconds(net, inputs, bf16, args.repeats)
                row = {"case": name, "threads": threads, "bf16": bf16, "s": plain}
                if args.compile:
                    torch._dynamo.reset()  # compile afresh for this thread count
                    compiled = torch.compile(copy.deepcopy(net))
                    first, fast = median_seconds(compiled, inputs, bf16, args.repeats)
                    row |= {"compiled_s": fast, "compile_s": first - fast}
                rows.append(row)
                print(row, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: ms per forward, the bf16 and compile ratios, and 1 vs 2 windows."""
    base = {(r["case"], r["threads"]): r["s"] for r in rows if not r["bf16"]}
    head = "| forward | threads | precision | ms | bf16 speed-up |"
    head += " compiled ms | compile speed-up | compile s |" if "compile_s" in rows[0] else ""
    lines = [head, "|" + "---|" * head.count(" |")]
    for r in rows:
        ratio = base[r["case"], r["threads"]] / r["s"]
        cells = [r["case"], str(r["threads"]), "bf16" if r["bf16"] else "fp32"]
        cells += [f"{1000 * r['s']:.0f}", f"{ratio:.2f}x" if r["bf16"] else ""]
        if "compile_s" in r:
            cells += [f"{1000 * r['compiled_s']:.0f}", f"{r['s'] / r['compiled_s']:.2f}x"]
            cells += [f"{r['compile_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    one, two = (c for c in dict.fromkeys(r["case"] for r in rows) if c.startswith("MC-DPM"))
    seconds = {(r["case"], r["threads"], r["bf16"]): r["s"] for r in rows}
    lines.append("")
    for (case, threads, bf16), s in seconds.items():
        if case == one:
            speed = 2 * s / seconds[two, threads, bf16]
            what = f"{threads} threads, {'bf16' if bf16 else 'fp32'}"
            lines.append(f"- 2 windows vs 1, {what}: {speed:.2f}x the windows per second")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args(argv)
    load0 = os.getloadavg()
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"bf16 instructions: {cpu_bf16()}; torch {torch.__version__}",
        flush=True,
    )
    rows = measure(args)
    load1 = os.getloadavg()
    print(f"\nload average (1, 5, 15 min) at start {load0}, at end {load1}\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
