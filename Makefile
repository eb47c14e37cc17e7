# The README's commands. Each target sets up what it needs from nothing: a virtual environment in $(VENV),
# torch==$(TORCH_VERSION) (the CPU wheel; a bare `torch` would pull a multi-GB CUDA build), the pinned
# requirements, and the extension built with --no-build-isolation.
VENV ?= .venv
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.ext-built
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py

.PHONY: install test demo bench lint cuda-check clean

install: $(BUILT)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

CMAKE_BUILD := build/cmake

test: $(BUILT)
	$(PY) -m pytest -q
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" > /dev/null
	cmake --build $(CMAKE_BUILD) -j2 > /dev/null
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

lint: $(DEPS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

cuda-check: $(DEPS)
	PY=$(PY) bash tools/check_cuda_compile.sh

clean:
	rm -rf build *.egg-info latentseek_ext/_C*.so $(BUILT)
