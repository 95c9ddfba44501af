"""Run MONAI bundle commands in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def monai_bundle(*args: str, cwd: Path = REPO, timeout: int = 600) -> str:
    """``python -m monai.bundle ARGS`` in ``cwd``; returns its output, fails with it on error."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def overrides(values: dict) -> list[str]:
    """``{"m": 4}`` -> ``["--m", "4"]`` (lists written as Python literals for fire)."""
    return [
        a for k, v in values.items() for a in (f"--{k}", repr(v) if isinstance(v, list) else str(v))
    ]
