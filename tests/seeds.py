"""The seed of the randomized kernel tests: fresh on every run, pinned on request.

The kernel issue asks for fresh random inputs on each run, so that CI keeps exploring; every
test prints the seed it drew, and ``LENS_TEST_SEED=<seed>`` replays a failure exactly. To fuzz
locally: ``for s in $(seq 200); do LENS_TEST_SEED=$s pytest tests/test_kernels.py -q -x || break; done``.
"""
from __future__ import annotations

import os
import time


def random_seed() -> int:
    raw = os.environ.get("LENS_TEST_SEED", "")
    if raw:
        try:
            seed = int(raw)
        except ValueError:
            raise ValueError(f"LENS_TEST_SEED must be an integer, got {raw!r}") from None
    else:
        seed = time.time_ns() % (2**31)
    print(f"random seed = {seed} (replay with LENS_TEST_SEED={seed})")
    return seed
