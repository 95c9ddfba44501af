"""`medgen3d generate` killed mid-run: no partial file under a final name, and the rerun ends
with exactly the files of an uninterrupted run (same seed, same checkpoint, CPU: bit for bit),
though its remaining cases run in another batch, and without the killed run's temporaries."""

import gzip
import json
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from bundle_helpers import REPO


def _command(out) -> list[str]:
    """Three demo-scale (32^3) pairs, masks from 2 sampling steps."""
    args = ["generate", "--n", "3", "--out", str(out), "--seed", "3", "--steps", "2"]
    args += ["--scale", "demo"]
    return [sys.executable, "-m", "medgen3d.cli", *args]


def _finals(root) -> list[str]:
    """Files under their final names (temporaries start with a dot)."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )


@pytest.mark.slow
def test_killed_generation_finishes_like_an_uninterrupted_run(tmp_path):
    quiet = {"cwd": REPO, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    straight = subprocess.Popen(_command(tmp_path / "a"), **quiet)
    killed = subprocess.Popen(_command(tmp_path / "b"), **quiet)
    first_image = tmp_path / "b" / "images" / "synthetic_0000.nii.gz"
    deadline = time.time() + 240
    while not first_image.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.kill()
    killed.wait()
    partial = _finals(tmp_path / "b")
    assert "images/synthetic_0002.nii.gz" not in partial, "killed too late to test a resume"
    for name in partial:  # every visible file is complete
        path = tmp_path / "b" / name
        if name.endswith(".nii.gz"):
            np.asarray(nib.load(path).dataobj)
        else:
            json.loads(path.read_text())
    rerun = subprocess.run(_command(tmp_path / "b"), cwd=REPO, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert straight.wait(timeout=300) == 0
    names = _finals(tmp_path / "a")
    assert names == _finals(tmp_path / "b") and len(names) == 11
    assert not [p for p in (tmp_path / "b").rglob(".*")]  # no temporary left behind
    for name in names:
        a, b = (tmp_path / r / name for r in "ab")
        if name.endswith(".json"):
            doc = a.read_text().replace(str(tmp_path / "a"), str(tmp_path / "b"))
            assert json.loads(doc) == json.loads(b.read_text()), name
        else:  # NIfTI header and voxels, byte for byte (the gzip header names the temp file)
            assert gzip.decompress(a.read_bytes()) == gzip.decompress(b.read_bytes()), name
