"""A stand-in for `chatqueue-worker run` (spawn_worker's `module`) that writes many lines at
once and exits: what a worker's last words look like to the test that stops it."""

import os
import sys

LINES = 300_000

if __name__ == "__main__":
    sys.stdout.write(".\n" * (LINES - 1) + "end\n")
    sys.stdout.flush()
    os._exit(0)  # at once, as a killed worker ends: no interpreter shutdown to wait for
