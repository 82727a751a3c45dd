# The commands a person types. Everything installs into .venv in the project root.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: install demo test test-unit test-integration lint bench bench-quick bench-gpu bench-gateway gateway models clean

install: .venv/.installed

.venv/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

demo: install
	bash scripts/demo.sh

test: install
	$(PY) -m pytest

test-unit: install
	$(PY) -m pytest tests/unit

test-integration: install
	$(PY) -m pytest tests/integration

lint: install
	.venv/bin/ruff check .
	.venv/bin/mypy

bench: install
	$(PY) -m benchmarks.run

bench-quick: install
	$(PY) -m benchmarks.run --quick

# The OpenAI-compatible HTTP API on 127.0.0.1:8000 (CHATQUEUE_GATEWAY_* to change it).
gateway: install
	.venv/bin/chatqueue-gateway

# Time to first token through the gateway vs the producer (real Redis, tiny-model worker).
bench-gateway: install
	$(PY) -m benchmarks.gateway_load $(ARGS)

# No install: a GPU machine has torch + transformers and no .venv (see benchmarks/gpu.py).
bench-gpu:
	$(if $(wildcard $(PY)),$(PY),python3) -m benchmarks.gpu $(ARGS)

models: install
	.venv/bin/chatqueue-worker build-model demo --out models/HuggingFaceTB--SmolLM2-135M-Instruct

clean:
	rm -rf .venv .pytest_cache .ruff_cache .mypy_cache
