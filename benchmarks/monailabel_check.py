"""Client half of ``benchmarks/monailabel_check.sh``: talk to a running MONAI Label server.

    python benchmarks/monailabel_check.py --url http://127.0.0.1:8765 --model seg_downstream \
        --datalist COHORT/heldout.json --evaluation EVAL/metrics.json --out OUT

Waits for ``/info/`` (the model and its labels must be listed), segments every image of the
datalist through ``/infer/MODEL`` (each label file must have its image's shape and affine and
only the model's label values; Dice per case and label against the datalist's label files,
mean within ``--tolerance`` of the bundle's own evaluation on the images' own grids), runs
``/train/MODEL`` for one epoch (MONAI Label's default request otherwise: run id ``run``,
the pretrained ``models/model.pt``) and prints a markdown summary, also written to
``OUT/summary.md``. Exit status 1 when a check fails. Runs in the MONAI Label environment
(requests, nibabel, numpy); imports nothing of this repository.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import requests


def wait_for_info(url: str, timeout_s: float) -> dict:
    """``GET /info/`` once the server answers (it loads the app first)."""
    start = time.time()
    while True:
        try:
            reply = requests.get(f"{url}/info/", timeout=30)
            if reply.ok:
                return reply.json()
        except requests.ConnectionError:
            pass
        if time.time() - start > timeout_s:
            raise SystemExit(f"{url}/info/: no answer after {timeout_s:.0f} s; see the server log")
        time.sleep(2)


def dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: list[int]) -> list[float]:
    """Dice of each label value between two label volumes of one grid."""
    return [
        2.0 * np.sum((pred == k) & (truth == k)) / max(1, np.sum(pred == k) + np.sum(truth == k))
        for k in labels
    ]


def infer(url: str, model: str, case: dict, out: Path, labels: list[int]) -> dict:
    """``POST /infer/MODEL?image=ID`` for one datastore image; checks and scores its label."""
    image_id = Path(case["image"]).name.removesuffix(".nii.gz")
    start = time.time()
    reply = requests.post(f"{url}/infer/{model}", params={"image": image_id, "output": "image"})
    seconds = time.time() - start
    if not reply.ok:
        raise SystemExit(
            f"/infer/{model} {image_id}: HTTP {reply.status_code}: {reply.text[:2000]}"
        )
    path = out / f"{image_id}_server.nii.gz"
    path.write_bytes(reply.content)
    pred, image, truth = (nib.load(p) for p in (path, case["image"], case["label"]))
    values = sorted(int(v) for v in np.unique(np.asarray(pred.dataobj)))
    return {
        "image": image_id,
        "seconds": seconds,
        "shape_ok": pred.shape == image.shape,
        "affine_ok": bool(np.allclose(pred.affine, image.affine, atol=1e-3)),
        "values_ok": set(values) <= {0, *labels},
        "values": values,
        "dice": dice_per_label(np.asarray(pred.dataobj), np.asarray(truth.dataobj), labels),
    }


def train_one_epoch(url: str, model: str, timeout_s: float) -> dict:
    """``POST /train/MODEL`` with ``max_epochs: 1`` (a background task, as MONAI Label's clients
    start it), then ``GET /train/`` until the task is DONE or ERROR; the last status."""
    start = time.time()
    reply = requests.post(f"{url}/train/{model}", json={"max_epochs": 1}, timeout=60)
    status: dict = {}
    while reply.ok and time.time() - start < timeout_s:
        status = requests.get(f"{url}/train/", timeout=30).json()
        if status.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(2)
    return {"http": reply.status_code, "seconds": time.time() - start, "status": status}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--datalist", required=True, help="images and labels to segment")
    parser.add_argument("--evaluation", required=True, help="the bundle's eval metrics.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per stage")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.datalist).parent
    cases = [
        {k: str(root / c[k]) for k in ("image", "label")}
        for c in json.loads(Path(args.datalist).read_text())["training"]
    ]

    info = wait_for_info(args.url, args.timeout)
    listed = info.get("models", {}).get(args.model, {})
    label_map = listed.get("labels", {})
    labels = sorted(int(v) for v in label_map.values())
    info_ok = bool(label_map) and args.model in info.get("trainers", {})

    results = [infer(args.url, args.model, c, out, labels) for c in cases] if info_ok else []
    served = float(np.mean([r["dice"] for r in results])) if results else float("nan")
    per_label = np.mean([r["dice"] for r in results], axis=0) if results else []
    evaluation = json.loads(Path(args.evaluation).read_text())
    evaluated = evaluation["dice_own_grid"]["mean"]
    infer_ok = bool(results) and all(
        r["shape_ok"] and r["affine_ok"] and r["values_ok"] for r in results
    )
    dice_ok = abs(served - evaluated) <= args.tolerance

    train = train_one_epoch(args.url, args.model, args.timeout) if info_ok else {}
    train_ok = train.get("http") == 200 and train.get("status", {}).get("status") == "DONE"

    names = {v: k for k, v in label_map.items()}
    values = sorted({v for r in results for v in r["values"]})
    seconds = np.mean([r["seconds"] for r in results]) if results else float("nan")
    state = train.get("status", {}).get("status")
    lines = [
        f"## MONAI Label check: {args.model} at {args.url}",
        "",
        "| check | result |",
        "|---|---|",
        f"| `/info/` lists the model, its labels and trainer | {'ok' if info_ok else 'FAILED'}: "
        f"{json.dumps(label_map)} |",
        f"| `/infer/` on {len(results)} held-out images: shape, affine, label values | "
        f"{'ok' if infer_ok else 'FAILED'}: values {values}, {seconds:.1f} s each |",
        f"| `/infer/` mean Dice vs the label files (own grid) | {served:.3f} "
        f"({', '.join(f'{names[k]} {d:.3f}' for k, d in zip(labels, per_label))}) |",
        f"| bundle's `run evaluating`, Dice on the same grids | {evaluated:.3f} "
        f"(model grid {evaluation['dice']['mean']:.3f}) |",
        f"| served within {args.tolerance} of the bundle's evaluation | "
        f"{'ok' if dice_ok else 'FAILED'}: {served - evaluated:+.3f} |",
        f"| `/train/` one epoch (run id `run`, pretrained model.pt) | "
        f"{'ok' if train_ok else 'FAILED'}: HTTP {train.get('http')}, "
        f"status {state}, {train.get('seconds', float('nan')):.0f} s |",
    ]
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    (out / "results.json").write_text(json.dumps({"infer": results, "train": train}, indent=2))
    print(summary)
    return 0 if info_ok and infer_ok and dice_ok and train_ok else 1


if __name__ == "__main__":
    sys.exit(main())
