"""The worker sets OpenMP's wait policy before torch loads, and leaves the operator's alone; it
frees the loading thread's team once the engine runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from worker.openmp import POLICY

READ = f"import os, json; print(json.dumps({{k: os.environ.get(k) for k in {sorted(POLICY)!r}}}))"


def _policy_after(imports: str, **env: str) -> dict[str, str | None]:
    clean = {k: v for k, v in os.environ.items() if k not in POLICY}
    out = subprocess.run([sys.executable, "-c", f"{imports}; {READ}"], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_importing_the_worker_sets_the_policy_before_torch() -> None:
    assert _policy_after("import worker; import torch") == POLICY


def test_a_policy_the_operator_set_wins() -> None:
    got = _policy_after("import worker", OMP_WAIT_POLICY="PASSIVE")
    assert got == {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "PASSIVE"}


def test_nothing_is_set_once_torch_is_loaded() -> None:
    # libgomp read its environment when torch loaded: setting it then would only mislead.
    assert _policy_after("import torch; import worker") == dict.fromkeys(POLICY)


# In a fresh interpreter: the OS threads of the process after each step. A team of two is the
# calling thread and one more; releasing it ends that one; the next parallel op makes it again.
TEAM = """
import os, sys, json, threading
import worker, torch
from worker.openmp import release_thread_pool
torch.set_num_threads(2)
threads = lambda: len(os.listdir('/proc/self/task'))
a = torch.randn(600, 600)
seen = {'before': threads()}
a @ a; a + 1
seen['team'] = threads()
seen['released'] = release_thread_pool()
seen['after'] = threads()
a @ a; a + 1
seen['again'] = threads()
print(json.dumps(seen))
"""


def test_release_thread_pool_ends_the_calling_threads_team_and_a_new_op_makes_one() -> None:
    out = subprocess.run([sys.executable, "-c", TEAM], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    seen = json.loads(out)
    assert seen["released"] is True
    assert seen["team"] == seen["before"] + 1
    assert seen["after"] == seen["before"]
    assert seen["again"] == seen["team"]
