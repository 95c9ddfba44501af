"""The markdown report of a benchmark run: one section per measurement, then the targets.

``report(results, train_iters)`` turns what ``benchmarks.run.run`` returns into the text of
``benchmarks/results.md``.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import suite

SPEEDUP_TARGET, QUALITY_TOLERANCE, LOADER_TARGET, GPU_BATCH_TARGET = 20.0, 0.10, 0.10, 0.5


def _f(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pm(q: dict, key: str, digits: int = 2) -> str:
    sd = q.get(f"{key}_sd")
    return _f(q[key], digits) + ("" if sd is None else f" ± {_f(sd, digits)}")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


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
        "(`common.masks.metrics`), mean ± sd over volumes, as sampled (raw) and after the "
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


def report(results: dict, train_iters: int) -> str:
    """The markdown report of ``results`` (``train_iters``: timed iterations per training)."""
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
        lines += training_section(results["training"], train_iters)
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


def _relative(path: str) -> str:
    """``path`` relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(suite.REPO)) if p.is_relative_to(suite.REPO) else str(p)


def _load(load: tuple) -> str:
    return ", ".join(f"{v:.2f}" for v in load)
