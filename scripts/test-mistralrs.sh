#!/usr/bin/env bash
# profilemate-mistralrs against real mistral.rs 0.8.1 on the CPU (its own workspace, excluded from
# the main one; its build cached outside the checkout, like the vLLM environment):
#   (a) the patched mistralrs-core (scripts/mistralrs-patch.sh);
#   (b) cargo fmt --check, clippy and rustdoc with warnings denied, in that workspace;
#   (c) cargo test: concurrent chat requests through mistral.rs's request API on the tiny Llama,
#       rows checked against each response's Usage, generation unchanged, disabled writes nothing;
#   (d) the profiled run's files validated against the contract (profilemate-vllm/tests/contract.py)
#       and read by `profilemate report`;
#   (e) the README's mistral.rs example (scripts/mistralrs-example.sh) and the benchmark compile.
# Build cache: ${PROFILEMATE_MISTRALRS_TARGET:-~/.cache/profilemate/mistralrs-target} (and -check).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
start=$(date +%s)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/profilemate"
target="${PROFILEMATE_MISTRALRS_TARGET:-$cache/mistralrs-target}"
mr() { (cd "$root/profilemate-mistralrs" && CARGO_TARGET_DIR="$target" cargo "$@"); }
# clippy and rustdoc check the dependencies without code generation, in a folder of their own
# (they never wait for the build's lock, and a changed lint level does not touch its artifacts).
mrc() { (cd "$root/profilemate-mistralrs" && CARGO_TARGET_DIR="$target-check" cargo "$@"); }

echo "== (a) patched mistralrs-core"
bash scripts/mistralrs-patch.sh

echo "== (b) profilemate-mistralrs: fmt, clippy, doc (warnings denied)"
mr fmt -- --check
mrc clippy --locked --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" mrc doc --locked --no-deps

echo "== (c) tests against real mistral.rs"
keep=$(mktemp -d)
trap 'rm -rf "$keep"' EXIT
status=0
PROFILEMATE_MISTRALRS_KEEP="$keep/run" mr test --locked -- --nocapture > "$keep/test.log" 2>&1 || status=$?
# mistral.rs logs each request; show the verdicts, the cross-check figures and any failure.
grep -E "^(test |cross-check|failures:|---- )|panicked|left:|right:|error" "$keep/test.log" || true
[ "$status" -eq 0 ] || { tail -n 60 "$keep/test.log"; echo "test-mistralrs: cargo test failed" >&2; exit 1; }

echo "== (d) the contract and profilemate report on the profiled run"
python3 - "$keep/run" <<'PY'
import sys
sys.path.insert(0, "profilemate-vllm/tests")
import contract
rows = contract.validate(sys.argv[1])
print("contract: valid;", ", ".join(f"{k} {len(v)} rows" for k, v in sorted(rows.items())))
PY
cargo run --quiet -p profilemate-cli -- report "$keep/run" > "$keep/report.txt"
grep -q "Forward Pass Timing" "$keep/report.txt" || { cat "$keep/report.txt"; echo "profilemate report: no forward pass section" >&2; exit 1; }
head -n 25 "$keep/report.txt"

echo "== (e) the README example, and the benchmark compiles"
PROFILEMATE_DIR="$keep/example" bash scripts/mistralrs-example.sh >/dev/null
test -s "$keep/example/forward_pass_timing.csv"
mr build --locked --example overhead
echo "test-mistralrs: finished in $(( $(date +%s) - start )) s"
