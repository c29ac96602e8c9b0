#!/usr/bin/env bash
# What the profilemate-mistralrs wrapper costs a real mistral.rs engine: tokens/s of the same
# workload with and without it, in interleaved rounds (profilemate-mistralrs/examples/overhead.rs).
# Usage: bash scripts/bench-mistralrs.sh [ROUNDS]   (default 15)
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${XDG_CACHE_HOME:-$HOME/.cache}/profilemate"
bash scripts/mistralrs-patch.sh
cd profilemate-mistralrs
CARGO_TARGET_DIR="${PROFILEMATE_MISTRALRS_TARGET:-$cache/mistralrs-target}" cargo run --locked --quiet --example overhead -- "$@"
