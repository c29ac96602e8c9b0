#!/usr/bin/env bash
# Profiling overhead of the engine loop in instructions, counted by callgrind: figures that do
# not drift with the load of a shared machine. The engine_loop benchmark binary runs with
# profiling off and on for the same steps of the same work. On the engine thread only the
# instructions inside the step loop are counted (`--toggle-collect`), so set-up (session start,
# clock calibration) is left out. The other threads' instructions (the collector draining,
# computing statistics and writing CSV/JSON) are counted whole, over runs of STEPS and 2*STEPS
# steps, and their difference per step is printed apart.
#
#   bash scripts/overhead-instructions.sh [STEPS]
#
# Work rounds per step: 1,000,000 (about 1 ms natively here) and 100,000 (about 100 us).
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-100}"
command -v valgrind >/dev/null || { echo "valgrind is required (apt-get install valgrind)" >&2; exit 1; }
cargo bench --bench engine_loop --no-run 2>/dev/null
bin=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/engine_loop-* | grep -v "\.d$" | head -1)
out=$(mktemp -d)
for work in 1000000 100000; do
  for mode in off on; do
    for n in "$steps" "$((2 * steps))"; do
      valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$out/$work.$mode.$n.%p" \
        "$bin" --instructions "$mode" "$n" "$work" >/dev/null 2>"$out/$work.$mode.$n.log"
    done
    valgrind --tool=callgrind --toggle-collect='*Engine::run*' --callgrind-out-file="$out/loop.$work.$mode" \
      "$bin" --instructions "$mode" "$steps" "$work" >/dev/null 2>"$out/loop.$work.$mode.log"
  done
done
python3 - "$out" "$steps" <<'PY'
import glob, os, re, sys
out, steps = sys.argv[1], int(sys.argv[2])
def threads(work, mode, n):
    per = {}
    for f in glob.glob(os.path.join(out, f"{work}.{mode}.{n}.*")):
        if f.endswith(".log"):
            continue
        m = re.search(r"^(?:summary|totals): (\d+)", open(f).read(), re.M)
        t = re.search(r"-(\d+)$", f)
        thread = int(t.group(1)) if t else 1
        per[thread] = per.get(thread, 0) + (int(m.group(1)) if m else 0)
    return per
for work in (1000000, 100000):
    per_step = {}
    other = {}
    for mode in ("off", "on"):
        a, b = threads(work, mode, steps), threads(work, mode, 2 * steps)
        m = re.search(r"^(?:summary|totals): (\d+)", open(os.path.join(out, f"loop.{work}.{mode}")).read(), re.M)
        per_step[mode] = int(m.group(1)) / steps
        other[mode] = (sum(v for k, v in b.items() if k != 1) - sum(v for k, v in a.items() if k != 1)) / steps
    off, on = per_step["off"], per_step["on"]
    print(f"work {work:>9,} rounds/step: engine thread {off:,.0f} -> {on:,.0f} instructions per step, "
          f"overhead {100.0 * (on - off) / off:+.4f} % ({on - off:,.0f} instructions); "
          f"collector and writers {other['on']:,.0f} per step ({100.0 * other['on'] / off:.3f} %)")
PY
