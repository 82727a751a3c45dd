"""The soak script's short mode, once: jobs through two worker kills and a Redis restart."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.servers import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_short_soak_loses_and_duplicates_nothing(tiny_model_dir):  # the fixture builds the model
    run = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--short", "--json"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])

    assert report["lost"] == 0 and report["duplicated"] == 0, run.stderr[-4000:]
    assert report["submitted"] >= 60
    assert report["completed"] + report["failed"] == report["submitted"]
    assert report["completed"] > 0 and report["failed"] > 0  # valid and invalid jobs both ran
    assert report["unexpected"] == 0, run.stderr[-4000:]
    assert report["redelivered"] >= 2  # each kill hit a running job, which ran again
