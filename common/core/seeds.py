"""Seeds for per-case randomness: case ``k`` depends only on ``(seed, k)``."""

from __future__ import annotations

import numpy as np


def case_seed(seed: int, index: int) -> int:
    """A 32-bit seed for case ``index`` of a run seeded with ``seed`` (any run size)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])
