# syntax=docker/dockerfile:1
#
# Two images from one file (docker-compose.yml builds both):
#   docker build --target worker -t chatqueue-worker .   GPU worker and the `download` one-shot
#   docker build --target flower -t chatqueue-flower .   Flower: celery + flower + redis, no torch
#   docker build --target gateway -t chatqueue-gateway . the OpenAI-compatible HTTP API, no torch
# The worker is the last stage, so a plain `docker build .` gives the worker.

ARG PYTHON_IMAGE=python:3.11-slim

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
# The versions the project runs Flower with (Flower 2.2 with Celery 5.7, measured).
ARG CELERY_VERSION=5.7.0
ARG FLOWER_VERSION=2.2.0
RUN pip install "celery[redis]==${CELERY_VERSION}" "flower==${FLOWER_VERSION}"
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
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY gateway ./gateway
RUN pip install ".[gateway]" \
 && mkdir -p /data/files && chown -R chatqueue:chatqueue /data
USER chatqueue
EXPOSE 8000
ENTRYPOINT ["chatqueue-gateway"]


FROM base AS worker
# torch comes from the default PyPI wheel: on Linux x86_64 that wheel is the CUDA build (2.13.0
# is built for CUDA 13 and pulls NVIDIA's CUDA runtime, cuDNN and NCCL in as pip packages), so
# the slim base needs no CUDA toolkit -- only the host's driver, which the NVIDIA container
# toolkit mounts in. CUDA 13 needs driver >= 580. For an older driver, build with a
# PyTorch index of an older CUDA line, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128  (driver >= 570)
# if that line still publishes this torch version.
# Installed first and on its own layer: it is gigabytes and changes far less often than our code.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
# Only what the package needs: the build context's .venv, models/ and caches never enter the image.
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
# A regular (not editable) install: the torch above already satisfies the `worker` extra.
RUN pip install ".[worker]"

# Docker seeds an empty named volume from the image's folder, ownership included: created here
# and owned by the worker's user, the shared model volume is writable by `download`.
RUN mkdir -p /models && chown chatqueue:chatqueue /models
ENV CHATQUEUE_MODELS_ROOT=/models

USER chatqueue
WORKDIR /home/chatqueue
ENTRYPOINT ["chatqueue-worker"]
CMD ["run"]
