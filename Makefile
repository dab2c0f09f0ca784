# Two entry points: `make demo` (the main job) and `make test` (the test suite).
PY ?= python3
SHARED ?= ../shared
export TIKTOKEN_CACHE_DIR ?= $(abspath $(SHARED))/data/gpt2_tokenizer/tiktoken_cache

.PHONY: install test demo compare bench

# torch==2.13.0 first: on a CPU machine that is a local CPU build; a bare `torch` would pull CUDA.
install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q -r requirements.txt

test: install
	$(PY) -m pytest -q

# The main job: gpt2 from the hub, or offline the reference teacher in $(SHARED) (demo.py says which).
demo: install
	KRONY_SHARED=$(abspath $(SHARED)) $(PY) demo.py

# The recipe comparison behind docs/RESULTS.md (31 runs, about 2 hours on 2 CPU cores; add ARGS=--device=cuda on a GPU).
compare: install
	$(PY) scripts/compare.py $(ARGS)

bench: install
	$(PY) scripts/bench_kron.py
