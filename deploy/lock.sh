#!/bin/sh
# Writes requirements/*.lock: every Python package each image installs, pinned with its sha256
# hashes (the Dockerfile installs them with pip --require-hashes, then chatqueue itself with
# --no-deps). Resolved for the images' platform (CPython 3.11, Linux x86_64), within
# requirements/constraints.txt (the versions the tests ran with). Needs uv (pip install uv) and
# PyPI. Run it after changing pyproject.toml's dependencies or the constraints:
#   sh deploy/lock.sh
set -eu
cd "$(dirname "$0")/.."
compile() {
  out="$1"; shift
  uv pip compile --generate-hashes --python-version 3.11 \
    --python-platform x86_64-unknown-linux-gnu --index-url https://pypi.org/simple \
    --constraints requirements/constraints.txt --custom-compile-command "sh deploy/lock.sh" \
    --quiet --output-file "$out" "$@"
}
compile requirements/flower.lock requirements/flower.in
compile requirements/gateway.lock pyproject.toml requirements/build.in --extra gateway
# torch from PyPI: on Linux x86_64 its wheel is the CUDA 13 build and pulls NVIDIA's CUDA
# runtime, cuDNN and NCCL in as packages (Dockerfile, stage worker).
compile requirements/worker.lock pyproject.toml requirements/build.in --extra worker
