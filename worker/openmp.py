"""OpenMP's wait policy for the engine thread's CPU ops; must run before torch is imported.

The engine runs torch on its own thread, while the main thread (which loaded the model) keeps
an OpenMP team of its own. With more OpenMP threads than cores, libgomp (the OpenMP of torch's
Linux wheels) cuts each thread's spin-wait between parallel regions to ~1,000 iterations, so
every parallel op of the engine thread wakes its team through the kernel: measured on 2 cores,
elementwise ops 5x slower and a decode step 25-30% slower than the same step on the main
thread. `OMP_WAIT_POLICY=ACTIVE` with a bounded `GOMP_SPINCOUNT` keeps the spin between ops
(microseconds apart in a forward), and an idle team still sleeps after a few milliseconds.
Either variable set by the operator wins, and then neither is set here. On CUDA the policy
matters little: the CPU only launches kernels.
"""

from __future__ import annotations

import os
import sys

POLICY = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def configure() -> bool:
    """Set the policy unless the operator set either variable or torch is already loaded (too
    late: libgomp has read its environment); True when it was set."""
    if "torch" in sys.modules or any(name in os.environ for name in POLICY):
        return False
    os.environ.update(POLICY)
    return True
