# Two entry points: `make demo` (the main job) and `make test` (the test suite).
PY ?= python3
SHARED ?= ../shared
export TIKTOKEN_CACHE_DIR ?= $(abspath $(SHARED))/data/gpt2_tokenizer/tiktoken_cache

.PHONY: install test demo bench

# torch==2.13.0 first: on a CPU machine that is a local CPU build; a bare `torch` would pull CUDA.
install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q -r requirements.txt

test: install
	$(PY) -m pytest -q

# The GPT-2 sequence (hub access and a GPU): prepare, train (decomposes the teacher first), convert, evaluate.
demo: install
	$(PY) data/owt/prepare.py
	$(PY) train.py config/train_gpt2.py
	$(PY) krony_to_gpt.py checks/ckpt out/krony81m
	$(PY) perplexity_eval.py out/krony81m

bench: install
	$(PY) scripts/bench_kron.py
