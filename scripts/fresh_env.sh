#!/usr/bin/env bash
# The test suite in a throwaway virtual environment, to find upstream breaks on purpose.
#   scripts/fresh_env.sh latest          newest release of every requirement (make test-latest)
#   scripts/fresh_env.sh floor           every requirement at its floor in requirements.txt (make test-floor)
#   scripts/fresh_env.sh lock            newest releases; if the suite passes, requirements.lock is
#                                        rewritten from that environment (make lock)
# Extra arguments go to pytest (e.g. -m "not slow"). torch is $TORCH (default torch==2.13.0, a CPU
# build where the machine has one: a bare `torch` pulls several GB of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"; shift || true
case "$mode" in latest|floor|lock) ;; *) echo "usage: scripts/fresh_env.sh latest|floor|lock [pytest args]" >&2; exit 2;; esac
PY="${PY:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
venv="$(mktemp -d "${TMPDIR:-/tmp}/krony-venv.XXXXXX")"
trap 'rm -rf "$venv"' EXIT
"$PY" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
if [ "$mode" = floor ]; then
    # lowest-direct: each ">=X" of requirements.txt installed as "==X" (the upper bounds kept)
    sed -E 's/>=([^,; ]+)/==\1/' requirements.txt | grep -v '^torch' > "$venv/floor.txt"
    "${pip[@]}" "$TORCH" -r "$venv/floor.txt"
else
    "${pip[@]}" --upgrade "$TORCH" -r requirements.txt
fi
echo "fresh_env.sh: $mode environment:" >&2
"$venv/bin/python" -m pip freeze | grep -iE '^(torch|transformers|tokenizers|huggingface.hub|safetensors|datasets|tiktoken|numpy|scipy)==' >&2
"$venv/bin/python" -m pytest -q "$@"
if [ "$mode" = lock ]; then
    # the local build label (+cpu) dropped, so that a GPU machine resolves the same release's own build
    { echo "# Exact versions the test suite passed with: a clean virtual environment of Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())') with"
      echo "# $TORCH and requirements.txt's newest releases on $(date -u +%Y-%m-%d) (scripts/fresh_env.sh lock"
      echo "# writes it anew after the suite passes). make install installs these; requirements.txt keeps the ranges."
      "$venv/bin/python" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > requirements.lock.tmp
    mv requirements.lock.tmp requirements.lock
    echo "fresh_env.sh: requirements.lock written" >&2
fi
