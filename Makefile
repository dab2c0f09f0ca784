# Two entry points: `make demo` (the main job) and `make test` (the test suite).
PY ?= python3
SHARED ?= ../shared
TEACHER ?= gpt2
export TIKTOKEN_CACHE_DIR ?= $(abspath $(SHARED))/data/gpt2_tokenizer/tiktoken_cache

.PHONY: install test demo bench

# torch==2.13.0 first: on a CPU machine that is a local CPU build; a bare `torch` would pull CUDA.
install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q -r requirements.txt

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) kron_decompose.py --list 3072 768 --factors 1 --budget 600000
	$(PY) kron_decompose.py 768 768 1 --teacher $(TEACHER) --out checks/krony81m_init
	$(PY) train.py config/train_gpt2.py
	$(PY) krony_to_gpt.py checks/ckpt out
	$(PY) perplexity_eval.py out

bench: install
	$(PY) scripts/bench_kron.py
