"""SIGKILL of the simulated engine at random instants, then `profilemate recover` on its files.

For each instant: the engine runs with every sink on and prints, right after each forward pass's
recording call returns, its own count of forward passes recorded; it is killed (SIGKILL) at a
random instant (some during its shutdown); `profilemate recover DIR` runs (replaying the thread
buffers the killed process left in the directory); then every CSV must parse, the forward rows
must be exactly the passes the engine had recorded (or one more: a pass whose recording call
returned in the microseconds before the engine printed it), each step id at most once and none
missing (also where a first `recover` was itself killed part-way, every other run), the events lost in flight (counted in the manifest) at most one per thread buffer, the
summaries (the step timeline's too) must equal a recomputation from the rows, every trace
file must load as JSON and show one forward-pass slice per forward row (recovery appends the
replayed events to the killed process's trace), and every Parquet table (request lifecycle and step timeline included)
must load with pyarrow, none left `.partial`, each with its CSV table's rows. A second `recover` must change no file. Prints the loss per kill (steps
and seconds) and a summary.
"""

import argparse
import csv
import glob
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

try:
    import pyarrow.parquet as pq
except ImportError:
    pq = None
parquet_checked = []
trace_checked = []


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise AssertionError(f"{path}: row {i + 2} has {len(r)} fields, the header {len(header)}")
    return [dict(zip(header, r)) for r in body]


def table_rows(d, name):
    stem = name[: -len(".csv")]
    rolled = sorted(
        (p for p in glob.glob(os.path.join(d, stem + ".*.csv")) if p[len(os.path.join(d, stem)) + 1 : -4].isdigit()),
        key=lambda p: int(p[len(os.path.join(d, stem)) + 1 : -4]),
    )
    rows = []
    for p in rolled + [os.path.join(d, name)]:
        if os.path.exists(p):
            rows += read_csv(p)
    return rows


def check(d):
    """Checks a recovered directory; returns (forward rows, last forward end in session seconds)."""
    for p in glob.glob(os.path.join(d, "*.csv")):
        read_csv(p)
    fwd = table_rows(d, "forward_pass_timing.csv")
    summary = json.load(open(os.path.join(d, "forward_pass_summary.json")))
    for phase in ("prefill", "decode", "mixed"):
        mine = [r for r in fwd if r["phase"] == phase]
        assert summary[phase]["count"] == len(mine), (phase, summary[phase]["count"], len(mine))
        assert summary[phase]["total_tokens"] == sum(int(r["num_tokens"]) for r in mine), phase
        total = sum(float(r["forward_time_ms"]) for r in mine)
        assert abs(summary[phase]["total_ms"] - total) <= 1e-6 * max(total, 1.0), (phase, summary[phase]["total_ms"], total)
    cpu = json.load(open(os.path.join(d, "cpu_timing_summary.json")))
    ops = {}
    for r in table_rows(d, "cpu_operations_timing.csv"):
        ops[r["operation"]] = ops.get(r["operation"], 0) + 1
    assert {k: v["count"] for k, v in cpu.items()} == ops, (cpu.keys(), ops)
    timeline = table_rows(d, "step_timeline.csv")
    tl_path = os.path.join(d, "step_timeline_summary.json")
    if not (timeline or os.path.exists(tl_path)):
        tl = {"steps": 0, **{p: {"count": 0, "total_wall_ms": 0.0} for p in ("prefill", "decode", "mixed")}}
    else:
        tl = json.load(open(tl_path))
    assert tl["steps"] == len(timeline), ("step timeline", tl["steps"], len(timeline))
    for phase in ("prefill", "decode", "mixed"):
        mine = [r for r in timeline if r["phase"] == phase]
        assert tl[phase]["count"] == len(mine), ("step timeline", phase, tl[phase]["count"], len(mine))
        total = sum(float(r["step_wall_ms"]) for r in mine)
        assert abs(tl[phase]["total_wall_ms"] - total) <= 1e-6 * max(total, 1.0) + 1e-3, ("step timeline", phase)
    slices = 0
    traces = glob.glob(os.path.join(d, "profilemate_trace*.json"))
    for p in traces:
        events = json.load(open(p))
        assert isinstance(events, list) and events, p
        slices += sum(1 for e in events if e.get("ph") == "X" and e.get("cat") == "forward_pass")
    if traces:
        # The trace shows what the tables hold: recovery appends the replayed events to it.
        assert slices == len(fwd), ("trace forward-pass slices", slices, "forward rows", len(fwd))
        trace_checked.append(slices)
    if pq is not None:
        # Every Parquet table loads and holds its CSV table's rows, the request lifecycle and
        # the step timeline included; once a Parquet file exists, every CSV table has one.
        parquet = glob.glob(os.path.join(d, "*.parquet"))
        for p in parquet:
            name = os.path.basename(p)[: -len(".parquet")] + ".csv"
            n = pq.read_table(p).num_rows
            assert n == len(table_rows(d, name)), (p, n, len(table_rows(d, name)))
            parquet_checked.append(p)
        if parquet:
            # Rolled-over CSV files (`<table>.<n>.csv`) belong to their table.
            tables = {os.path.basename(p)[: -len(".csv")].split(".")[0] for p in glob.glob(os.path.join(d, "*.csv"))}
            have = {os.path.basename(p)[: -len(".parquet")] for p in parquet}
            assert tables <= have, ("CSV tables without a Parquet table", tables - have)
    end = max((float(r["timestamp_sec"]) + float(r["forward_time_ms"]) / 1000 for r in fwd), default=0.0)
    return len(fwd), end


def run_once(engine, args, d, kill_after, during_shutdown):
    env = dict(os.environ, PROFILEMATE_DIR=d, PROFILEMATE_SINKS="csv,json,parquet,perfetto", SIMULATED_ENGINE_PRINT_STEPS="1")
    p = subprocess.Popen([engine] + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    shutdown = threading.Event()

    def reader():
        for line in p.stdout:
            lines.append(line.split())
            if line.startswith("shutdown"):
                shutdown.set()

    t = threading.Thread(target=reader)
    t.start()
    if during_shutdown:
        shutdown.wait(120)
        time.sleep(kill_after)
    else:
        time.sleep(kill_after)
    killed_at = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    p.send_signal(signal.SIGKILL)
    p.wait()
    t.join()
    steps = max((int(l[1]) for l in lines if l and l[0] in ("forward", "shutdown")), default=0)
    return steps, killed_at, p.returncode


def snapshot(d):
    """Every file's bytes, to compare two recoveries; of the manifest, what it says of the run
    (its `recovery` object lists what each recovery did, so only its totals are compared)."""
    out = {}
    for p in sorted(glob.glob(os.path.join(d, "*"))):
        with open(p, "rb") as f:
            out[os.path.basename(p)] = f.read()
    m = json.loads(out.pop("profilemate_run.json"))
    rec = m.pop("recovery", {})
    out["manifest"] = (m, rec.get("events_recovered"), rec.get("events_lost_in_flight"))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--cli", required=True)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    args = ["--requests", "200"]
    with tempfile.TemporaryDirectory() as d:
        started = time.monotonic()
        subprocess.run([a.engine] + args, env=dict(os.environ, PROFILEMATE_DIR=d), check=True, capture_output=True)
        full = time.monotonic() - started
    print(f"a whole run takes {full:.1f} s; killing {a.runs} runs at random instants")
    lost_steps, lost_sec, unparseable_before = [], [], 0
    recovered_total, in_flight_total, one_more, killed_recoveries, was_killed = [], [], 0, [], []
    moe_lost = []
    for i in range(a.runs):
        during_shutdown = i % 5 == 4
        kill_after = rng.uniform(0.0, 0.05) if during_shutdown else rng.uniform(0.2, full)
        with tempfile.TemporaryDirectory() as d:
            steps, killed_at, rc = run_once(a.engine, args, d, kill_after, during_shutdown)
            checked = (len(trace_checked), len(parquet_checked))
            try:
                check_before = check(d)
            except Exception:
                check_before = None
                unparseable_before += 1
            # Only the checks after recovery are counted.
            del trace_checked[checked[0] :], parquet_checked[checked[1] :]
            if i % 2 == 1:
                # A recovery killed part-way: the next one completes it, no row lost or doubled.
                rp = subprocess.Popen([a.cli, "recover", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(rng.uniform(0.0, 0.02))
                rp.send_signal(signal.SIGKILL)
                rp.wait()
                killed_recoveries.append(rp.returncode == -signal.SIGKILL)
            r = subprocess.run([a.cli, "recover", d], capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr)
                return 1
            rows, end = check(d)
            left = {os.path.basename(p) for p in glob.glob(os.path.join(d, "*.parquet.partial"))}
            assert not left, ("Parquet tables left .partial after recovery", left)
            assert not json.load(open(os.path.join(d, "profilemate_run.json"))).get("recovery", {}).get(
                "parquet_not_completed"
            ), "recovery could not complete a Parquet table"
            after_first = snapshot(d)
            r2 = subprocess.run([a.cli, "recover", d], capture_output=True, text=True)
            assert r2.returncode == 0, r2.stderr
            assert snapshot(d) == after_first, "a second recovery changed the files"
            assert not glob.glob(os.path.join(d, ".profilemate_buffers.*")), "buffers left after recovery"
            manifest = json.load(open(os.path.join(d, "profilemate_run.json")))
            recovered = manifest.get("events_recovered", 0)
            in_flight = manifest.get("events_lost_in_flight", 0)
            if rc == -signal.SIGKILL and not manifest.get("finished"):
                assert manifest["finished_cleanly"] is False
            fwd_steps = [int(r["step"]) for r in table_rows(d, "forward_pass_timing.csv") if r.get("step")]
            assert len(fwd_steps) == len(set(fwd_steps)), "a forward row written twice"
            assert sorted(fwd_steps) == list(range(1, len(fwd_steps) + 1)), "a forward row missing"
            assert steps <= rows <= steps + 1, f"{rows} forward rows, the engine recorded {steps}"
            # One record per thread buffer at most (the engine thread's, its MoE detail buffer's).
            assert in_flight <= 2, in_flight
            moe_lost.append(manifest.get("recovery", {}).get("moe_window_lost", {}).get("steps_lost_max", 0))
            recovered_total.append(recovered)
            in_flight_total.append(in_flight)
            one_more += rows == steps + 1
            kill_sec = (killed_at - manifest["monotonic_start_ns"]) / 1e9
            lost_steps.append(max(0, steps - rows))
            # A run that finished before the kill lost nothing; its gap is idle time.
            lost_sec.append(0.0 if manifest.get("finished") else max(0.0, kill_sec - end))
            where = "during shutdown" if during_shutdown else f"at {kill_after:.2f} s"
            state = "finished" if manifest.get("finished") else "killed"
            was_killed.append(not manifest.get("finished"))
            print(
                f"kill {i + 1:2} {where:>16} ({state}): engine completed {steps} steps, {rows} forward rows after recovery, "
                f"{max(0, steps - rows)} lost ({lost_sec[-1]:.3f} s before the kill); {recovered} events replayed "
                f"from the buffers, {in_flight} in flight; MoE window lost: {moe_lost[-1]} steps"
                f"{'' if check_before else '; files did not check before recovery'}"
            )
    print(f"{len(trace_checked)} traces checked after recovery: forward-pass slices equal the forward rows")
    if pq is None:
        print("pyarrow is not installed for this python: the Parquet tables were not checked")
    else:
        print(f"{len(parquet_checked)} Parquet tables loaded with pyarrow after recovery, each with its CSV table's rows")
    killed = [i for i, k in enumerate(was_killed) if k]
    if killed:
        print(
            f"{len(killed)} runs really killed (not finished yet): steps lost median "
            f"{statistics.median(lost_steps[i] for i in killed)}, max {max(lost_steps[i] for i in killed)}; "
            f"seconds from the last forward pass on disk to the kill median "
            f"{statistics.median(lost_sec[i] for i in killed):.3f}, max {max(lost_sec[i] for i in killed):.3f}"
        )
    print(
        f"{a.runs} kills: steps lost median {statistics.median(lost_steps)}, max {max(lost_steps)}; "
        f"seconds lost median {statistics.median(lost_sec):.3f}, max {max(lost_sec):.3f}; "
        f"{unparseable_before} of {a.runs} directories failed the checks before recovery, 0 after; "
        f"events replayed from the buffers median {statistics.median(recovered_total)}, "
        f"lost in flight total {sum(in_flight_total)}; "
        f"MoE routing window lost with the heap (manifest's moe_window_lost) median {statistics.median(moe_lost)} steps, "
        f"max {max(moe_lost)}; "
        f"{one_more} kills fell between a pass's recording and the engine's print of it; "
        f"{sum(killed_recoveries)} recoveries killed part-way (of {len(killed_recoveries)} tried) and completed by the next"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
