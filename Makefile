# Entry points: `make demo` (the main job), `make test` (the suite).
PY ?= python3
SHARED ?= ../shared
export TIKTOKEN_CACHE_DIR ?= $(abspath $(SHARED))/data/gpt2_tokenizer/tiktoken_cache

.PHONY: install test quick scale test-latest test-floor lock demo compare bench

# Exactly what the suite passed with (requirements.lock); torch==2.13.0 resolves to the CPU build on a
# machine that has one, the CUDA build elsewhere. requirements.txt keeps the ranges for your own environment.
install:
	@$(PY) -m pip install -q -r requirements.lock

test: install
	$(PY) -m pytest -q

# The tests not marked slow: the loop of editing and testing (make test before a commit).
quick: install
	$(PY) -m pytest -q -m "not slow"

# The walks at the larger families' real shapes (SmolLM2-135M's: tens of minutes on 2 CPU cores), left out of
# make test; docs/SCALE.md has their figures.
scale: install
	$(PY) -m pytest -q -m scale --scale

# The suite in a throwaway venv with the newest release of every requirement: run it before a release,
# or when a dependency ships, to find the next upstream break on purpose (make lock adopts those releases).
test-latest:
	scripts/fresh_env.sh latest

# The suite with every requirement at its floor in requirements.txt.
test-floor:
	scripts/fresh_env.sh floor

# Newest releases; if the suite passes with them, requirements.lock is rewritten from that environment.
lock:
	scripts/fresh_env.sh lock

# The main job: gpt2 from the hub, or offline the reference teacher in $(SHARED) (demo.py says which);
# another teacher: make demo ARGS="--teacher $(SHARED)/teacher/owt-6x256-llama-bpe8k".
demo: install
	KRONY_SHARED=$(abspath $(SHARED)) $(PY) demo.py $(ARGS)

# The recipe comparison behind docs/RESULTS.md (31 runs, about 2 hours on 2 CPU cores; add ARGS=--device=cuda on a GPU);
# ARGS=--frontier: every structure at 80, 65.8, 50, 35 and 20% of the teacher (40 runs, 5 to 11 minutes each here).
compare: install
	$(PY) scripts/compare.py $(ARGS)

bench: install
	$(PY) scripts/bench_kron.py
