#!/usr/bin/env bash
# SIGKILL of the simulated engine (every sink on) at random instants, then `profilemate recover`:
# every CSV parses, the forward rows are exactly the engine's own count of recorded passes,
# summaries equal a recomputation from the rows, traces load as JSON, Parquet tables load with
# pyarrow and hold the CSV tables' rows.
#
#   bash scripts/check-kill-recovery.sh [RUNS]     (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-20}"
command -v python3 >/dev/null || { echo "scripts/check-kill-recovery.sh: python3 is required" >&2; exit 1; }
cargo build --release --quiet --example simulated_engine -p profilemate --features parquet
cargo build --release --quiet -p profilemate-cli
# The Parquet tables recovery completes are read with pyarrow: the analysis environment that
# scripts/check-parquet.sh makes (it runs before this in scripts/test.sh), or python3 if it has
# pyarrow; without pyarrow the check says so and leaves Parquet unchecked.
python=python3
env_python="${PROFILEMATE_PY_ENV:-$HOME/.cache/profilemate/py-analysis}/bin/python"
if [ -x "$env_python" ] && "$env_python" -c 'import pyarrow' 2>/dev/null; then
  python="$env_python"
fi
"$python" scripts/kill_recovery.py --runs "$runs" --engine target/release/examples/simulated_engine \
  --cli target/release/profilemate
