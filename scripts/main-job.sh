#!/usr/bin/env bash
# The main job: the simulated continuous-batching engine, profiled by profilemate, writing the
# contract files into PROFILEMATE_DIR (default ./profilemate_out). Extra arguments go to the
# engine (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "scripts/main-job.sh: cargo is required (https://rustup.rs)" >&2; exit 1; }
export PROFILEMATE_DIR="${PROFILEMATE_DIR:-$PWD/profilemate_out}"
cargo build --release --quiet --example simulated_engine
./target/release/examples/simulated_engine "$@"
