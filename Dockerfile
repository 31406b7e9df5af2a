# Blink's images. Needs BuildKit (the default builder since Docker 23; on Debian's docker.io 20.10
# set DOCKER_BUILDKIT=1).
#   docker build -t blink .                              CPU image (the default target)
#   docker build --target gpu -t blink-gpu .             NVIDIA GPU image (CUDA runtime base)
#   docker build --target loadtest -t blink-loadtest .   Locust, for compose's `loadtest` profile
# Build arguments (all optional):
#   BASE_IMAGE, GPU_BASE_IMAGE  base images: Debian bookworm with Python 3.11; CUDA 12 + cuDNN 9
#   BUILD_DATASET, BUILD_EPOCHS, BUILD_LIMIT, BUILD_FLAGS, MODEL_NAME   the offline build
#   PIP_EXTRA_INDEX_URL  where the CPU build of torch comes from: PyPI's own torch brings
#                        gigabytes of CUDA libraries the CPU build stage never uses
#   WHEELS_IMAGE         an image with extra wheels at / (pip's find-links), for builds that
#                        cannot reach PyTorch's index
# Packages come from the lock files in requirements/ (exact versions, hashes checked), so an image
# built later has the same ones; torch is pinned by version (docs/development.md explains why).
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG GPU_BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG WHEELS_IMAGE=scratch
ARG MODEL_NAME=fashion-mnist

FROM ${WHEELS_IMAGE} AS wheels

# A virtual environment on the base's Python: the same layout whatever the base image.
# VIRTUAL_ENV makes scripts/setup.sh install into it rather than into a .venv of its own.
FROM ${BASE_IMAGE} AS python
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv

# ---- build: the README's set-up, then the offline build of the model ----
FROM python AS build
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=/wheels
ARG BUILD_DATASET=fashion-mnist
# Empty: `blink build`'s own defaults, the model the README builds. A small limit (images) and
# one epoch make a quick, poor model for tests.
ARG BUILD_EPOCHS=
ARG BUILD_LIMIT=
# more `blink build` flags, e.g. "--teacher auto-train --prune 0.3"
ARG BUILD_FLAGS=
ARG MODEL_NAME
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY scripts/setup.sh scripts/venv.sh scripts/
COPY app/ app/
COPY models/ models/
# The same set-up as on a developer's machine: Debian's dataset package, torch (CPU), then the
# build extra exactly as requirements/build.txt locks it (hashes checked).
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    bash scripts/setup.sh --build
RUN read -ra flags <<< "${BUILD_FLAGS}"; \
    if [ -n "${BUILD_EPOCHS}" ]; then flags+=(--epochs "${BUILD_EPOCHS}"); fi; \
    if [ -n "${BUILD_LIMIT}" ]; then flags+=(--limit "${BUILD_LIMIT}"); fi; \
    blink build --dataset "${BUILD_DATASET}" --name "${MODEL_NAME}" --out models/repository \
        "${flags[@]}" \
    && test -f "models/repository/${MODEL_NAME}/latest/manifest.json"

# ---- loadtest: Locust aimed at a running Blink (compose profile `loadtest`) ----
FROM python AS loadtest
WORKDIR /src
# Its requests are Fashion-MNIST's test images: Debian's package, as scripts/setup.sh installs.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,target=/tmp/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes --no-deps -r /tmp/src/requirements/loadtest.txt \
    && pip install --no-deps /tmp/src \
    && pip check
COPY loadtest/ loadtest/
EXPOSE 8089
CMD ["locust", "-f", "loadtest/locustfile.py", "--host", "http://blink:8000"]

# ---- gpu: ONNX Runtime with CUDA and TensorRT on NVIDIA's CUDA runtime base ----
FROM ${GPU_BASE_IMAGE} AS gpu
ARG MODEL_NAME
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The CUDA base's own Python: its version is the distribution's (3.12 on Ubuntu 24.04).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/blink
# onnxruntime (a runtime dependency) and onnxruntime-gpu install the same `onnxruntime` package:
# remove the CPU one, then reinstall the GPU one (same version: DL3013 does not apply) so that
# its files are the ones left.
# hadolint ignore=DL3013
RUN --mount=type=bind,target=/tmp/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
    && pip install "/tmp/src[gpu]" \
    && pip uninstall -y onnxruntime \
    && pip install --force-reinstall --no-deps "$(pip list --format=freeze | grep '^onnxruntime-gpu==')" \
    && ln -s "$(python -c 'import os, tensorrt_libs; print(os.path.dirname(tensorrt_libs.__file__))')" \
        /opt/tensorrt_libs \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /srv/blink blink
COPY --from=build /src/models/repository/ models/
# TensorRT keeps its engines next to the bundle (app/engine.py): the one writable place in it.
RUN for bundle in models/*/*/; do mkdir -p "${bundle}.trt-cache"; done \
    && chown -R blink:blink models/*/*/.trt-cache
# ONNX Runtime's TensorRT provider loads libnvinfer from the tensorrt wheel's directory.
# BLINK_DEVICE=auto takes TensorRT, then CUDA; BLINK_MODEL_VARIANT=auto serves fp16 on a GPU.
ENV LD_LIBRARY_PATH=/opt/tensorrt_libs \
    BLINK_MODEL=/srv/blink/models/${MODEL_NAME} \
    BLINK_HOST=0.0.0.0 \
    BLINK_PORT=8000 \
    BLINK_WORKERS=1 \
    BLINK_DEVICE=auto \
    BLINK_MODEL_VARIANT=auto \
    BLINK_MAX_BATCH_SIZE=64 \
    BLINK_MAX_QUEUE_DELAY_MS=2 \
    BLINK_ENGINE_SLOTS=2
EXPOSE 8000
USER 10001:10001
# The first start builds TensorRT engines (minutes); the cache makes later starts quick.
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/readyz' % os.environ['BLINK_PORT'], timeout=2)"]
CMD ["blink", "serve"]

# ---- runtime: the CPU image, the default target (the last stage) ----
FROM python AS runtime
ARG MODEL_NAME
WORKDIR /srv/blink
# Only the runtime dependencies, exactly as requirements/runtime.txt locks them (no torch); the
# source is not kept in the image.
RUN --mount=type=bind,target=/tmp/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes --no-deps -r /tmp/src/requirements/runtime.txt \
    && pip install --no-deps /tmp/src \
    && pip check \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /srv/blink blink
COPY --from=build /src/models/repository/ models/
ENV BLINK_MODEL=/srv/blink/models/${MODEL_NAME} \
    BLINK_HOST=0.0.0.0 \
    BLINK_PORT=8000 \
    BLINK_WORKERS=1
EXPOSE 8000
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/readyz' % os.environ['BLINK_PORT'], timeout=2)"]
CMD ["blink", "serve"]
