#!/usr/bin/env bash
# Runs the simulated engine twice, as ranks 0 and 1 of a job, with every output format
# (PROFILEMATE_SINKS=csv,json,parquet,perfetto), then checks with the readers people use:
#
# - pyarrow reads every Parquet table with the CSV table's columns plus `host` and `rank`, typed
#   (int64, double, string), with the same rows and values as the CSV, null where the CSV is
#   empty, and pandas sees the same missing values in both;
# - DuckDB reads the same rows from the Parquet file as from the CSV file (EXCEPT ALL both ways,
#   the CSV read with the Parquet file's types), and a query over both ranks' files at once;
# - the Perfetto trace is valid JSON with the fields each event kind needs, one named track per
#   thread, complete events that nest on their track, as many events as the tables have rows.
#
#   bash scripts/check-parquet.sh
#
# pyarrow, DuckDB and pandas come from PyPI into a virtual environment kept outside the checkout,
# ${PROFILEMATE_PY_ENV:-$HOME/.cache/profilemate/py-analysis}, made once and reused (added to,
# never rebuilt, so it can be shared with scripts/check-seed-snippets.sh). PROFILEMATE_KEEP=DIR
# keeps the two runs' files in DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "scripts/check-parquet.sh: cargo is required (https://rustup.rs)" >&2; exit 1; }
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "scripts/check-parquet.sh: $python is required" >&2; exit 1; }
env_dir="${PROFILEMATE_PY_ENV:-$HOME/.cache/profilemate/py-analysis}"
requirements="pyarrow>=14 duckdb>=1.0 pandas>=2.1,<4"

if [ ! -x "$env_dir/bin/python" ]; then
  echo "== creating the analysis environment in $env_dir"
  mkdir -p "$(dirname "$env_dir")"
  "$python" -m venv "$env_dir"
fi
if ! "$env_dir/bin/python" -c 'import pyarrow, duckdb, pandas' 2>/dev/null; then
  echo "== installing $requirements into $env_dir"
  # shellcheck disable=SC2086 # one argument per requirement
  "$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check $requirements
fi

if [ -n "${PROFILEMATE_KEEP:-}" ]; then
  out="$PROFILEMATE_KEEP"
  mkdir -p "$out"
else
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
fi

echo "== simulated engine, ranks 0 and 1, PROFILEMATE_SINKS=csv,json,parquet,perfetto"
cargo build --release --quiet --example simulated_engine -p profilemate --features parquet
run() { # rank, engine arguments...
  local rank="$1"
  shift
  rm -rf "$out/rank$rank"
  env -u PROFILEMATE_RANK -u SLURM_PROCID -u OMPI_COMM_WORLD_RANK -u PMI_RANK -u LOCAL_RANK \
    RANK="$rank" PROFILEMATE_DIR="$out/rank$rank" PROFILEMATE_SINKS=csv,json,parquet,perfetto \
    cargo run --release --quiet --example simulated_engine -p profilemate --features parquet -- "$@" 2>"$out/rank$rank.log" \
    || { cat "$out/rank$rank.log" >&2; exit 1; }
}
run 0 --model vlm --requests 160 --seed 7
run 1 --model whisper --requests 120 --seed 8

"$env_dir/bin/python" - "$out" <<'PY'
import decimal
import glob
import json
import math
import os
import sys

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

root = sys.argv[1]
TABLES = [
    "forward_pass_timing", "cpu_operations_timing", "batch_utilization", "preemption_events",
    "request_lifecycle", "encoder_decoder_timing", "kv_cache_usage", "cuda_graph_events",
    "moe_expert_routing", "step_timeline",
]
TEXT = {"phase", "operation", "context", "request_id", "event", "reason", "extra_info", "outcome",
        "component", "host", "cuda_graph"}
DOUBLE = {"moe_max_over_mean"}
failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
        print("FAIL:", what, file=sys.stderr)


def kind(column):
    if column in TEXT:
        return "string"
    if column in DOUBLE or column.endswith(("_sec", "_ms", "_pct")):
        return "double"
    return "int64"


def arrow_kind(t):
    if pa.types.is_int64(t):
        return "int64"
    if pa.types.is_float64(t):
        return "double"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    return str(t)


def same(text, value, k):
    if text == "":
        return value is None
    if value is None:
        return False
    if k == "int64":
        return int(text) == value
    if k == "double":
        return float(text) == value  # both correctly rounded from the same decimal
    return text == value


con = duckdb.connect()
runs = sorted(d for d in glob.glob(os.path.join(root, "rank*")) if os.path.isdir(d))
check(len(runs) == 2, f"two runs in {root}: {runs}")
csv_rows = {}
for run in runs:
    rank = int(os.path.basename(run)[4:])
    manifest = json.load(open(os.path.join(run, "profilemate_run.json")))
    check(manifest["finished"], f"{run}: the run finished")
    check(not glob.glob(os.path.join(run, "*.partial")), f"{run}: no .partial file left")
    for t in TABLES:
        csv_path, pq_path = os.path.join(run, t + ".csv"), os.path.join(run, t + ".parquet")
        if not os.path.exists(csv_path):
            check(not os.path.exists(pq_path), f"{pq_path}: no Parquet file for a disabled table")
            continue
        where = f"rank {rank} {t}"
        # pyarrow: columns, types, rows, values, nulls.
        text = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        table = pq.read_table(pq_path)
        header = list(text.columns)
        check(table.column_names == header + ["host", "rank"], f"{where}: columns {table.column_names}")
        check(table.num_rows == len(text), f"{where}: {table.num_rows} Parquet rows, {len(text)} CSV rows")
        csv_rows[(rank, t)] = len(text)
        for name in table.column_names:
            expected = "int64" if name == "rank" else kind(name)
            got = arrow_kind(table.schema.field(name).type)
            check(got == expected, f"{where}.{name}: type {got}, expected {expected}")
        for name in header:
            k = kind(name)
            values = table.column(name).to_pylist()
            bad = [i for i, (a, b) in enumerate(zip(text[name], values)) if not same(a, b, k)]
            check(not bad, f"{where}.{name}: {len(bad)} values differ, first at row {bad[:1]}: "
                           f"{[text[name][i] for i in bad[:1]]} vs {[values[i] for i in bad[:1]]}")
        check(set(table.column("host").to_pylist()) <= {manifest["host"]}, f"{where}: host")
        check(set(table.column("rank").to_pylist()) <= {rank}, f"{where}: rank")
        # pandas: the same missing values whichever file it reads.
        if len(text):
            a = pd.read_csv(csv_path).isna()
            b = pd.read_parquet(pq_path)[header].isna()
            check(a.equals(b), f"{where}: pandas sees different missing values")
        # DuckDB: the same multiset of rows from both files.
        types = {"int64": "BIGINT", "double": "DOUBLE", "string": "VARCHAR"}
        columns = "{" + ", ".join(f"'{c}': '{types[kind(c)]}'" for c in header) + "}"
        cols = ", ".join(f'"{c}"' for c in header)
        parquet_sql = f"SELECT {cols} FROM read_parquet('{pq_path}')"
        csv_sql = (f"SELECT {cols} FROM read_csv('{csv_path}', header = true, delim = ',', quote = '\"', "
                   f"escape = '\"', auto_detect = false, columns = {columns})")
        n_parquet = con.execute(f"SELECT count(*) FROM ({parquet_sql})").fetchone()[0]
        n_csv = con.execute(f"SELECT count(*) FROM ({csv_sql})").fetchone()[0]
        check(n_parquet == n_csv == len(text), f"{where}: DuckDB counts {n_parquet} Parquet, {n_csv} CSV")
        for a, b in ((parquet_sql, csv_sql), (csv_sql, parquet_sql)):
            diff = con.execute(f"SELECT count(*) FROM ({a} EXCEPT ALL {b})").fetchone()[0]
            check(diff == 0, f"{where}: DuckDB finds {diff} rows in one file and not the other")

    # The trace: strict JSON, fields per event kind, named tracks, nesting, counts.
    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    files = sorted(glob.glob(os.path.join(run, "profilemate_trace*.json")))
    check(files and os.path.basename(files[0]) == "profilemate_trace.json", f"{run}: trace files {files}")
    counts = {}
    for path in files:
        events = json.load(open(path), parse_float=decimal.Decimal, parse_constant=no_constant)
        check(isinstance(events, list), f"{path}: a JSON array")
        names, spans = {}, {}
        for e in events:
            ph = e.get("ph")
            ok = isinstance(e.get("pid"), int)
            if ph == "X":
                ok &= all(k in e for k in ("name", "cat", "ts", "dur", "tid", "args"))
                spans.setdefault(e["tid"], []).append((int(e["ts"] * 1000), int((e["ts"] + e["dur"]) * 1000)))
                counts[e["cat"]] = counts.get(e["cat"], 0) + 1
            elif ph == "i":
                ok &= e.get("s") == "t" and isinstance(e.get("args", {}).get("request_id"), str)
                ok &= all(k in e for k in ("name", "ts", "tid"))
                counts["instant"] = counts.get("instant", 0) + 1
            elif ph == "C":
                args = e.get("args", {})
                ok &= bool(args) and all(isinstance(v, (int, decimal.Decimal)) for v in args.values())
                counts["C " + e["name"]] = counts.get("C " + e["name"], 0) + 1
            elif ph == "M":
                if e["name"] == "thread_name":
                    check(e["tid"] not in names, f"{path}: tid {e['tid']} named twice")
                    names[e["tid"]] = e["args"]["name"]
            else:
                ok = False
            check(ok, f"{path}: malformed event {e}")
        check(len(set(names.values())) == len(names), f"{path}: track names repeat: {names}")
        for tid in spans:
            check(tid in names, f"{path}: track {tid} has no name")
        for tid, s in spans.items():
            s.sort(key=lambda x: (x[0], -x[1]))
            stack = []
            for start, end in s:
                while stack and stack[-1] <= start:
                    stack.pop()
                if stack and end > stack[-1]:
                    check(False, f"{path}: track {names.get(tid)}: [{start}, {end}) overlaps an event ending at {stack[-1]}")
                    break
                stack.append(end)
    pe = pd.read_csv(os.path.join(run, "preemption_events.csv"), dtype=str, keep_default_na=False)
    expected = {
        "forward_pass": csv_rows[(rank, "forward_pass_timing")],
        "cpu_operation": csv_rows[(rank, "cpu_operations_timing")],
        "encoder_decoder": csv_rows[(rank, "encoder_decoder_timing")],
        "instant": int(pe["event"].isin(["preempted", "resumed", "evicted"]).sum()),
        "C queue": csv_rows[(rank, "batch_utilization")],
        "C kv_cache": csv_rows[(rank, "kv_cache_usage")],
    }
    for k, n in expected.items():
        check(counts.get(k, 0) == n, f"rank {rank} trace: {counts.get(k, 0)} {k} events, the tables have {n} rows")
    print(f"rank {rank}: " + ", ".join(f"{csv_rows[(rank, t)]} {t}" for t in TABLES if (rank, t) in csv_rows))
    print(f"rank {rank} trace: {len(files)} file(s), " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))

query = f"""SELECT host, rank, phase, count(*) AS steps, round(avg(forward_time_ms), 3) AS avg_forward_time_ms
FROM '{root}/*/forward_pass_timing.parquet' GROUP BY ALL ORDER BY ALL"""
print("DuckDB, both ranks at once:")
print("  " + query.replace(root, "out").replace("\n", "\n  "))
result = con.execute(query)
print("  " + " | ".join(d[0] for d in result.description))
rows = result.fetchall()
for r in rows:
    print("  " + " | ".join(str(v) for v in r))
for rank in (0, 1):
    total = sum(r[3] for r in rows if r[1] == rank)
    check(total == csv_rows.get((rank, "forward_pass_timing")), f"rank {rank}: {total} steps in the query")

if failures:
    print(f"check-parquet: {len(failures)} check(s) failed", file=sys.stderr)
    sys.exit(1)
print(f"check-parquet: pyarrow {pa.__version__}, DuckDB {duckdb.__version__}, pandas {pd.__version__}: "
      "Parquet matches CSV, trace is valid")
PY
