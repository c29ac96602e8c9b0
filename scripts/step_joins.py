#!/usr/bin/env python3
"""Recomputes step_timeline.csv from the per-profiler CSV files of a run, joined by `step`, with
pandas, and fails when a figure differs: the join the collector makes must be exact.

Usage: step_joins.py RUN_DIR
"""

import sys

import pandas as pd

ENCLOSING = {"model_execution"}  # CPU operations around the forward pass: not step CPU time


def main(run_dir):
    read = lambda name: pd.read_csv(f"{run_dir}/{name}")
    tl = read("step_timeline.csv").set_index("step")
    fp = read("forward_pass_timing.csv")
    cpu = read("cpu_operations_timing.csv")
    batch = read("batch_utilization.csv")
    pre = read("preemption_events.csv")
    enc = read("encoder_decoder_timing.csv")
    failures = []

    def check(name, expected, actual, atol):
        expected = expected.reindex(tl.index)
        both = pd.concat([expected.rename("files"), actual.rename("timeline")], axis=1)
        bad = both[~(((both.files - both.timeline).abs() <= atol) | (both.files.isna() & both.timeline.isna()))]
        print(f"{name:<24} {len(both) - len(bad):>6} of {len(both)} steps equal")
        if len(bad):
            failures.append(f"{name}: {len(bad)} steps differ, first:\n{bad.head()}")

    # Times are written with 6 decimals in milliseconds (whole nanoseconds): sums agree to 1 ns.
    ns = 1.5e-6
    g = fp.groupby("step")
    check("forward_time_ms", g.forward_time_ms.sum(), tl.forward_time_ms, ns)
    check("forward_passes", g.size(), tl.forward_passes.where(tl.forward_passes > 0), 0)
    check("num_tokens", g.num_tokens.sum(), tl.num_tokens, 0)
    for op in ["scheduling", "batch_preparation", "sampling"]:
        check(f"{op}_ms", cpu[cpu.operation == op].groupby("step").duration_ms.sum(), tl[f"{op}_ms"], ns)
    other = cpu[~cpu.operation.isin(["scheduling", "batch_preparation", "sampling"] + sorted(ENCLOSING))]
    check("other_cpu_ms", other.groupby("step").duration_ms.sum(), tl.other_cpu_ms, ns)
    last = batch.groupby("step").last()
    check("token_utilization_pct", last.token_utilization_pct, tl.token_utilization_pct, 1.5e-4)
    check("seq_utilization_pct", last.seq_utilization_pct, tl.seq_utilization_pct, 1.5e-4)
    check("waiting_queue_len", last.waiting_queue_len, tl.waiting_queue_len, 0)
    in_steps = pre[pre.step.notna()]
    count = lambda event: in_steps[in_steps.event == event].groupby("step").size().reindex(tl.index, fill_value=0)
    check("preemptions", count("preempted"), tl.preemptions, 0)
    check("resumes", count("resumed"), tl.resumes, 0)
    enc_sum = enc[enc.component == "encoder"].groupby("step").duration_ms.sum()
    any_component = enc.groupby("step").size()
    check("encoder_time_ms", enc_sum.reindex(any_component.index, fill_value=0.0), tl.encoder_time_ms, ns)
    unclaimed = (tl.step_wall_ms - tl[["forward_time_ms", "scheduling_ms", "batch_preparation_ms", "sampling_ms",
                                       "other_cpu_ms"]].fillna(0).sum(axis=1)).clip(lower=0)
    check("unclaimed_ms", unclaimed, tl.unclaimed_ms, 6e-6)
    steps_in_files = set(fp.step.dropna()) | set(cpu.step.dropna()) | set(batch.step.dropna())
    if steps_in_files != set(tl.index):
        failures.append(f"steps in the files but not in the timeline: {sorted(steps_in_files - set(tl.index))[:10]}")
    if failures:
        print("\n".join(failures))
        sys.exit(1)
    print(f"step_timeline.csv: {len(tl)} steps, every figure equals the per-profiler files joined by step")


if __name__ == "__main__":
    main(sys.argv[1])
