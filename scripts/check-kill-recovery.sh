#!/usr/bin/env bash
# SIGKILL of the simulated engine (every sink on) at random instants, then `profilemate recover`:
# every CSV parses, forward rows <= the engine's own count of completed steps (the rest was in
# flight, counted and printed), summaries equal a recomputation from the rows, traces load as JSON.
#
#   bash scripts/check-kill-recovery.sh [RUNS]     (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-20}"
command -v python3 >/dev/null || { echo "scripts/check-kill-recovery.sh: python3 is required" >&2; exit 1; }
cargo build --release --quiet --example simulated_engine -p profilemate --features parquet
cargo build --release --quiet -p profilemate-cli
python3 scripts/kill_recovery.py --runs "$runs" --engine target/release/examples/simulated_engine \
  --cli target/release/profilemate
