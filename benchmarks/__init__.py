"""Benchmarks: scripts that measure the product against its limit and its baseline.

Nothing here is imported by the product, and no test asserts a speed.
"""
