"""OpenMP for the engine thread's CPU ops: the wait policy (before torch is imported) and one
team in the process (`release_thread_pool`, once the model is loaded).

The engine runs torch on its own thread, while the main thread (which loaded the model) keeps
an OpenMP team of its own. With more OpenMP threads than cores, libgomp (the OpenMP of torch's
Linux wheels) cuts each thread's spin-wait between parallel regions to ~1,000 iterations, so
every parallel op of the engine thread wakes its team through the kernel: measured on 2 cores,
elementwise ops 5x slower and a decode step 25-30% slower than the same step on the main
thread. `OMP_WAIT_POLICY=ACTIVE` with a bounded `GOMP_SPINCOUNT` keeps the spin between ops
(microseconds apart in a forward), and an idle team still sleeps after a few milliseconds.
Either variable set by the operator wins, and then neither is set here. With ACTIVE, libgomp
still throttles to 1,000 spins while the loading thread's team exists: the worker frees that
team once the engine runs (`release_thread_pool`). On CUDA all this matters little: the CPU
only launches kernels.
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


# omp_pause_resource_all's `kind`: soft, the thread pool freed (OpenMP 5.0; libgomp since GCC 9).
_OMP_PAUSE_SOFT = 1


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP team (libgomp's `omp_pause_resource_all`); True when done.

    The thread that loaded the model (and prepacked its weights) keeps a team of its own, and
    libgomp counts it: with more OpenMP threads in the process than cores, it throttles every
    thread's spin-wait to ~1,000 iterations whatever GOMP_SPINCOUNT says (OMP_WAIT_POLICY=ACTIVE
    fixes the throttled count at 1,000), so each parallel region of the engine thread wakes its
    team through the kernel. Measured on 2 cores: a 32 x 576 norm on two threads took 98 us from
    a second thread while the first kept its team, 15 us once it had none; a decode step at 32
    rows dropped from ~135 to ~80 ms in the engine alone. Call it from the loading thread once
    the engine runs on its own; a later parallel op on that thread makes a new team (correct,
    only slower again). The engine thread frees its own whenever it goes idle, so that another
    thread's CPU work between jobs (a benchmark's baseline in the same process) runs alone.
    Only an already loaded libgomp is touched (torch's Linux wheels); with another OpenMP
    runtime this does nothing."""
    import ctypes

    try:
        libgomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        pause = libgomp.omp_pause_resource_all
    except (OSError, AttributeError):
        return False
    pause.argtypes = [ctypes.c_int]
    pause.restype = ctypes.c_int
    return pause(_OMP_PAUSE_SOFT) == 0
