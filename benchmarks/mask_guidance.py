"""Whether classifier-free guidance makes MC-DPM's raw masks less fragmented.

MC-DPM trains with the conditions dropped ``p_unconditional`` of the time, so sampling can
weigh the conditional prediction by ``guidance`` (1 = no guidance). For each guidance, samples
``--volumes`` raw volumes (seeds 0.., first window in the middle, the config's sampler and
steps under bf16 autocast) from ``CKPT`` and reports their quality against the held-out
``REAL`` masks (pieces, z-continuity, volume W1) and the seconds per volume::

    OMP_NUM_THREADS=1 python -m benchmarks.mask_guidance REAL CKPT --scale standard \\
        --guidance 1,2,4 --volumes 4 --out OUT.json
"""

from __future__ import annotations

import fire
import numpy as np

from benchmarks import suite
from common.core.io import write_json


def main(
    real: str,
    ckpt: str | None,
    scale: str = "demo",
    guidance: str | float | tuple = "1,2,4",
    volumes: int = 4,
    out: str | None = None,
) -> list[dict]:
    """One row per guidance; ``ckpt`` None samples an untrained network (tests)."""
    reference = suite.real_masks(real, scale)
    config = suite.mask_config(scale)
    pipeline = suite.changed(suite.mask_pipeline(config, ckpt), bf16=True)
    rows = []
    for value in suite.numbers(guidance):
        masks, seconds = suite.sample_timed(suite.changed(pipeline, guidance=value), range(volumes))
        rows.append(
            {
                "guidance": value,
                "s_per_volume": float(np.median(seconds)),
                "raw": suite.quality(masks, reference),
            }
        )
        print(rows[-1], flush=True)
    if out:
        write_json({"real": real, "ckpt": ckpt, "scale": scale, "rows": rows}, out)
    return rows


if __name__ == "__main__":
    fire.Fire(main)
