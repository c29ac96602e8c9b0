#!/usr/bin/env bash
# The main job: the simulated continuous-batching engine, profiled by profilemate, writing the
# contract files into PROFILEMATE_DIR (default ./profilemate_out), then `profilemate report` on
# them: the breakdown and insights on stdout, plots in PROFILEMATE_DIR/plots and one HTML page,
# PROFILEMATE_DIR/report.html. Extra arguments go to the engine (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "scripts/main-job.sh: cargo is required (https://rustup.rs)" >&2; exit 1; }
export PROFILEMATE_DIR="${PROFILEMATE_DIR:-$PWD/profilemate_out}"
cargo build --release --quiet --example simulated_engine -p profilemate
cargo build --release --quiet -p profilemate-cli
cargo run --release --quiet --example simulated_engine -p profilemate -- "$@"
cargo run --release --quiet -p profilemate-cli -- report "$PROFILEMATE_DIR" \
  --plots "$PROFILEMATE_DIR/plots" --html "$PROFILEMATE_DIR/report.html"
echo "plots: $PROFILEMATE_DIR/plots, page: $PROFILEMATE_DIR/report.html"
