#!/usr/bin/env bash
# The README's mistral.rs example on a fresh machine: prepares the patched mistralrs-core, writes
# the tiny test Llama, builds and runs profilemate-mistralrs/examples/chat.rs (eight concurrent
# chat requests through a profiled mistral.rs engine on the CPU) with its output in
# $PROFILEMATE_DIR (default ./profilemate_out), then prints `profilemate report` on it.
# The first run builds mistral.rs (about 720 crates; cached in ~/.cache/profilemate/mistralrs-target).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/profilemate"
export PROFILEMATE_DIR="${PROFILEMATE_DIR:-$root/profilemate_out}"
case "$PROFILEMATE_DIR" in /*) ;; *) PROFILEMATE_DIR="$root/$PROFILEMATE_DIR" ;; esac
bash scripts/mistralrs-patch.sh
(cd profilemate-mistralrs && CARGO_TARGET_DIR="${PROFILEMATE_MISTRALRS_TARGET:-$cache/mistralrs-target}" \
  cargo run --locked --quiet --example chat -- --tiny "$cache/tiny-llama-mistralrs")
cargo run --quiet -p profilemate-cli -- report "$PROFILEMATE_DIR"
