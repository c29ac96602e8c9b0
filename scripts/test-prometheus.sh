#!/usr/bin/env bash
# A real Prometheus server (Debian's `prometheus` package, installed here when missing) scrapes
# the simulated engine's /metrics endpoint every second during a run; after the run, PromQL
# queries through its HTTP API must equal the run's own files: steps per phase and preemptions
# per reason equal the CSV row counts, the forward-time histogram's count per phase equals the
# forward rows per phase and its sum their total time within 0.1 %. Loopback addresses only;
# Prometheus keeps its data in a temporary directory and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/prometheus.sh install

cargo build --release --quiet --example simulated_engine -p profilemate
engine=target/release/examples/simulated_engine

work="$(mktemp -d)"
engine_pid=""
cleanup() {
  [ -n "$engine_pid" ] && kill "$engine_pid" 2>/dev/null || true
  bash scripts/prometheus.sh stop "$work"
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
engine_port="$(free_port)"
prom_port="$(bash scripts/prometheus.sh start "$work" "127.0.0.1:$engine_port" simulated_engine)"

# The run: long enough for several scrapes while it goes on, then 4 s (4 scrape intervals) of
# serving the final counts after its last step.
export PROFILEMATE_DIR="$work/run"
started=$(date +%s)
"$engine" --requests 600 --kv-blocks 300 --metrics-addr "127.0.0.1:$engine_port" --metrics-linger-s 4 \
  2>"$work/engine.log" &
engine_pid=$!
wait "$engine_pid" || { cat "$work/engine.log" >&2; echo "test-prometheus: the engine failed" >&2; exit 1; }
engine_pid=""
cat "$work/engine.log"
echo "test-prometheus: the run took $(( $(date +%s) - started )) s, Prometheus at 127.0.0.1:$prom_port scraped 127.0.0.1:$engine_port"

python3 - "$prom_port" "$PROFILEMATE_DIR" <<'EOF'
"""PromQL after the run against the run's CSV files and manifest."""
import collections, csv, json, sys, urllib.parse, urllib.request

port, run = sys.argv[1], sys.argv[2]

def query(promql):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]

def by(promql, label):
    """The last scraped sample of each series (last_over_time skips the staleness markers
    written once the engine stopped serving), keyed by `label`."""
    return {s["metric"].get(label, ""): float(s["value"][1]) for s in query(f"last_over_time({promql}[10m])")}

def rows(name):
    with open(f"{run}/{name}", newline="") as f:
        return list(csv.DictReader(f))

forward = rows("forward_pass_timing.csv")
cpu = rows("cpu_operations_timing.csv")
events = rows("preemption_events.csv")
manifest = json.load(open(f"{run}/profilemate_run.json"))
failures = []

def check(what, got, want, rel=0.0):
    ok = abs(got - want) <= rel * abs(want) if rel else got == want
    print(f"  {'ok ' if ok else 'BAD'} {what}: Prometheus {got:.9g}, files {want:.9g}, "
          f"relative difference {abs(got - want) / abs(want) if want else 0:.2e}" if rel else
          f"  {'ok ' if ok else 'BAD'} {what}: Prometheus {got:g}, files {want:g}")
    if not ok:
        failures.append(what)

rows_per_phase = collections.Counter(r["phase"] for r in forward)
ms_per_phase = collections.defaultdict(float)
for r in forward:
    ms_per_phase[r["phase"]] += float(r["forward_time_ms"])
steps = by("profilemate_steps_total", "phase")
count = by("profilemate_forward_pass_duration_seconds_count", "phase")
total = by("profilemate_forward_pass_duration_seconds_sum", "phase")
inf = by('profilemate_forward_pass_duration_seconds_bucket{le="+Inf"}', "phase")
print("PromQL against the run's files:")
for phase in ("prefill", "decode", "mixed"):
    check(f"profilemate_steps_total{{phase={phase}}} = forward rows", steps.get(phase, -1), rows_per_phase[phase])
    check(f"forward histogram _count{{phase={phase}}} = forward rows", count.get(phase, -1), rows_per_phase[phase])
    check(f"forward histogram +Inf bucket{{phase={phase}}} = forward rows", inf.get(phase, -1), rows_per_phase[phase])
    check(f"forward histogram _sum{{phase={phase}}} (s) = sum of forward_time_ms / 1000 (0.1 %)",
          total.get(phase, -1), ms_per_phase[phase] / 1000, rel=0.001)
check("sum of profilemate_steps_total = manifest steps", sum(steps.values()), manifest["steps"])

preempted = collections.Counter(r["reason"] or "unspecified" for r in events if r["event"] == "preempted")
reasons = by("profilemate_preemptions_total", "reason")
assert preempted, "the run preempted nothing: the check would prove nothing (use a smaller --kv-blocks)"
for reason in sorted(set(preempted) | set(reasons)):
    check(f"profilemate_preemptions_total{{reason={reason}}} = preempted rows", reasons.get(reason, -1), preempted[reason])

ops = collections.Counter(r["operation"] for r in cpu)
op_counts = by("profilemate_cpu_operation_duration_seconds_count", "operation")
for op in sorted(ops):
    check(f"cpu histogram _count{{operation={op}}} = rows", op_counts.get(op, -1), ops[op])
step_count = by("profilemate_step_duration_seconds_count", "")
check("profilemate_step_duration_seconds_count = scheduling rows", step_count.get("", -1), ops["scheduling"])
check("sum of profilemate_events_dropped_total = manifest drops",
      sum(float(s["value"][1]) for s in query("sum(last_over_time(profilemate_events_dropped_total[10m]))")),
      sum(n for r in manifest["dropped"].values() for n in r.values()))

# Live, not only at the end: the decode step counter was scraped at several different values.
changes = query('changes(profilemate_steps_total{phase="decode"}[10m])')
seen = float(changes[0]["value"][1]) if changes else 0
print(f"  {'ok ' if seen >= 2 else 'BAD'} the decode step counter changed {seen:g} times between scrapes during the run")
if seen < 2:
    failures.append("live scrapes")
if failures:
    sys.exit(f"test-prometheus: {len(failures)} check(s) failed: {failures}")
print("test-prometheus: every PromQL figure equals the run's files")
EOF
