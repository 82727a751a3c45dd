# syntax=docker/dockerfile:1
#
# Two images from one file (docker-compose.yml builds both):
#   docker build --target worker -t chatqueue-worker .   GPU worker and the `download` one-shot
#   docker build --target flower -t chatqueue-flower .   Flower: celery + flower + redis, no torch
#   docker build --target gateway -t chatqueue-gateway . the OpenAI-compatible HTTP API, no torch
# The worker is the last stage, so a plain `docker build .` gives the worker.
#
# Supply: the base image is pinned by digest (the tag beside it is for people; Docker pulls the
# digest), and every Python package comes from a lock file with sha256 hashes
# (requirements/*.lock, written by deploy/lock.sh) installed with --require-hashes; chatqueue
# itself is then installed from this context with --no-deps --no-build-isolation, so nothing
# unpinned is downloaded. Bump the digest with `docker buildx imagetools inspect python:3.11-slim`.

# python:3.11-slim, the multi-arch index as Docker Hub served it on 2026-10-07.
ARG PYTHON_IMAGE=python:3.11-slim@sha256:0dd364ba7e10242f07755449e3a3d0e35f9efd987952737b90def6709ab0c5ce

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed uid/gid: files the containers write on named volumes keep one owner across rebuilds.
RUN groupadd --system --gid 10001 chatqueue \
 && useradd --system --uid 10001 --gid chatqueue --create-home --home-dir /home/chatqueue \
        --shell /usr/sbin/nologin chatqueue


FROM base AS flower
# The versions the project runs Flower with (Flower 2.2 with Celery 5.7, measured): requirements/flower.in.
COPY requirements/flower.lock /tmp/flower.lock
RUN pip install --require-hashes -r /tmp/flower.lock && rm /tmp/flower.lock
# Read-only Flower: no control broadcast when it starts following events (see the file).
COPY deploy/flower/flowerconfig.py /home/chatqueue/flowerconfig.py
USER chatqueue
WORKDIR /home/chatqueue
EXPOSE 5555
ENTRYPOINT ["celery"]
CMD ["flower"]


FROM base AS gateway
# The producer and the gateway only: no torch, no worker code.
WORKDIR /app
COPY requirements/gateway.lock /tmp/gateway.lock
RUN pip install --require-hashes -r /tmp/gateway.lock && rm /tmp/gateway.lock
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY gateway ./gateway
RUN pip install --no-deps --no-build-isolation . \
 && mkdir -p /data/files && chown -R chatqueue:chatqueue /data
USER chatqueue
EXPOSE 8000
ENTRYPOINT ["chatqueue-gateway"]


FROM base AS worker
# torch comes from the PyPI wheel the lock pins: on Linux x86_64 that wheel is the CUDA build
# (2.13.0 is built for CUDA 13 and pulls NVIDIA's CUDA runtime, cuDNN and NCCL in as pip
# packages, all in requirements/worker.lock), so the slim base needs no CUDA toolkit -- only the
# host's driver, which the NVIDIA container toolkit mounts in. CUDA 13 needs driver >= 580. For
# an older driver, lock torch from a PyTorch index of an older CUDA line (add e.g.
# --extra-index-url https://download.pytorch.org/whl/cu128 in deploy/lock.sh; driver >= 570).
# The dependencies are one layer, before our code: gigabytes that change only with the lock.
COPY requirements/worker.lock /tmp/worker.lock
RUN pip install --require-hashes -r /tmp/worker.lock && rm /tmp/worker.lock

WORKDIR /app
# Only what the package needs: the build context's .venv, models/ and caches never enter the image.
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
# A regular (not editable) install of chatqueue alone: its dependencies came from the lock.
RUN pip install --no-deps --no-build-isolation .

# Docker seeds an empty named volume from the image's folder, ownership included: created here
# and owned by the worker's user, the shared model volume is writable by `download`.
RUN mkdir -p /models && chown chatqueue:chatqueue /models
ENV CHATQUEUE_MODELS_ROOT=/models

USER chatqueue
WORKDIR /home/chatqueue
ENTRYPOINT ["chatqueue-worker"]
CMD ["run"]
