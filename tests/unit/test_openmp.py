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


# The engine's own thread: its team exists while it computes and is freed once it is idle.
ENGINE_TEAM = """
import os, json, time
import worker, torch
from transformers import LlamaConfig, LlamaForCausalLM
from worker.engine import Engine, EngineLimits, EngineRequest
from worker.openmp import release_thread_pool
from worker.pipeline.sampling import SamplingParams
torch.set_num_threads(2)
threads = lambda: len(os.listdir('/proc/self/task'))
model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=512,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64)).eval()
release_thread_pool()  # the loading thread's, as the worker does
engine = Engine(model, pad_id=0, limits=EngineLimits()).start()
idle = threads()
during = []
engine.on_step(lambda: during.append(threads()))
engine.generate(EngineRequest([i % 96 + 1 for i in range(200)], 8, SamplingParams(do_sample=False),
                              frozenset()))
deadline = time.monotonic() + 30
while threads() > idle and time.monotonic() < deadline:
    time.sleep(0.01)
print(json.dumps({'idle': idle, 'busiest': max(during), 'after': threads()}))
engine.stop()
"""


def test_the_engine_thread_frees_its_team_when_it_goes_idle() -> None:
    out = subprocess.run([sys.executable, "-c", ENGINE_TEAM], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["busiest"] > seen["idle"]  # it computed with a team of its own
    assert seen["after"] == seen["idle"]
