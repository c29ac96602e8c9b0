#!/usr/bin/env bash
# The main job: an engine profiled by profilemate, writing the contract files.
set -euo pipefail
cd "$(dirname "$0")/.."
export PROFILEMATE_DIR="${PROFILEMATE_DIR:-$PWD/profilemate_out}"
cargo run --release --example quickstart
