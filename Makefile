# One-command set-up: `make test` and `make demo` create .venv, install torch (a CPU build on a
# machine without an NVIDIA GPU), the package with its extras, and Debian's data packages when run
# as root. Nothing is installed outside .venv except those Debian packages.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU_VERSION ?= 2.13.0
EXTRAS ?= test,hf,diffusers,webdataset,eval,plots,serve
DEBIAN_PACKAGES ?= dataset-fashion-mnist fortunes chromium
export HF_HUB_OFFLINE := 1

.PHONY: test test-slow demo lint format system venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@# torch first, so that resolving the project never pulls a multi-GB CUDA build onto a CPU machine
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install "torch>=2.9"; \
	  else $(PIP) install "torch==$(TORCH_CPU_VERSION)" 2>/dev/null \
	    || $(PIP) install --index-url https://download.pytorch.org/whl/cpu "torch>=2.9"; fi; \
	fi
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

# Debian packages the tests and the demo use (Fashion-MNIST, headless Chromium for the report test).
# Skipped, with a note, when not root: the tests that need them skip themselves.
system:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi; \
	else echo "note: not root or no apt-get; install Debian packages by hand: $(DEBIAN_PACKAGES)"; fi

test: system venv
	$(PY) -m pytest -q

test-slow: system venv
	$(PY) -m pytest -q -m slow

demo: system venv
	$(VENV)/bin/transfusion demo

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
