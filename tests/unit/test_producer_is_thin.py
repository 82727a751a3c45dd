"""Backends import the producer; it must not drag torch or transformers into them."""

from __future__ import annotations

import subprocess
import sys


def test_importing_producer_loads_no_model_stack():
    code = (
        "import sys, producer, producer.cli, producer.client;"
        "print(','.join(m for m in ('torch', 'transformers', 'huggingface_hub', 'worker')"
        " if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == ""
