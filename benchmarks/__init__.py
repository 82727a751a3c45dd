"""Benchmarks: scripts that measure the product against its limit and its baseline.

Nothing here is imported by the product, and no test asserts a speed.
"""

# Before anything imports torch: the engine thread's OpenMP wait policy, as in the worker (the
# engine-alone rows run the engine in this process).
import worker  # noqa: F401
