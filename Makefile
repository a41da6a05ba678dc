# razor-gguf: one command to set up and run the demo, one to set up and run the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip --disable-pip-version-check -q
# The binding is installed from the same pinned, cached sdist the libraries are built from,
# without building llama.cpp a second time.
BINDING_ARGS := -DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF

.PHONY: setup demo test sysdeps deps clean

demo: setup
	$(VENV)/bin/razor-gguf demo

test: setup
	$(VENV)/bin/pytest

setup: deps
	$(PIP) install --no-deps --no-build-isolation .
	$(VENV)/bin/razor-gguf --version

deps: sysdeps $(VENV)/.deps

# chromium and chromedriver (Debian's chromium, chromium-driver): the chat page's tests in a real browser
sysdeps:
	@missing=""; for t in ccache git; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing with apt"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.deps: pyproject.toml native/prepare_source.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "scikit-build-core>=0.10" cmake ninja "cffi>=1.15" "numpy>=1.24" "gguf>=0.17" "pytest>=7"
	$(PIP) install "torch==2.13.0"
	# matplotlib: `razor-gguf inspect --plot` (the layer x head heatmap) and its test.
	$(PIP) install "matplotlib>=3.5"
	# `razor-gguf serve` (llama-cpp-python's server extra) and the chat/server tests' drivers.
	$(PIP) install "uvicorn>=0.22.0" "fastapi>=0.100.0" "pydantic-settings>=2.0.1" "sse-starlette>=1.6.1" \
	  "starlette-context>=0.3.6,<0.4" "PyYAML>=5.1" "openai>=1.0" "pexpect>=4.8"
	# selenium: drives the real Chromium in the chat page's tests (tests/test_web.py) through the system chromedriver.
	$(PIP) install "selenium>=4.20"
	$(VPY) -c 'import llama_cpp, sys; sys.exit(llama_cpp.__version__ != "0.3.36")' 2>/dev/null || \
	  CMAKE_ARGS="$(BINDING_ARGS)" $(PIP) install "$$($(VPY) native/prepare_source.py --sdist)"
	touch $@

clean:
	rm -rf build razor_gguf/lib
