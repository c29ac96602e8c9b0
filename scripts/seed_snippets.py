#!/usr/bin/env python3
"""The seed document's own pandas/matplotlib analysis snippets, run unchanged on a run directory.

The seed (`../shared/seed/000_c0dcb44cb1aa3f0a.txt`, the origin of the output contract) shows
people how to analyse profilemate's files with pandas and matplotlib. Those snippets are a
promise: they must keep working, unchanged, on every run directory profilemate writes. Each
function below holds one snippet, copied verbatim between the `--- verbatim from the seed ---`
markers (only indented to sit in a function); `--seed FILE` checks that they still match the
seed word for word.

Every snippet runs in its own temporary directory in which the run's contract files are
symlinked, because the snippets open bare file names and save PNG files into the working
directory. Set MPLBACKEND=Agg (scripts/check-seed-snippets.sh does).

The seed's other Python blocks are not analysis of the output files and are not run here: the
`ProfilingConfig` classes (sitecustomize configuration), the `hasattr(model, ...)` model-type
detection (needs a model object) and the `print(ProfilingConfig.ENABLE_FORWARD_PASS_TIMING)`
troubleshooting line.

Usage: seed_snippets.py RUN_DIR [--seed SEED_FILE] [--keep OUTDIR]
Exits 1 when any snippet raises (or, with --seed, no longer matches the seed).
"""

import argparse
import inspect
import os
import re
import shutil
import sys
import tempfile
import textwrap
import time
import traceback


def forward_pass():
    """Seed section 1. ForwardPassProfiler, "Analysis Examples": prefill vs decode, throughput timeline, decode latency histogram."""
    # --- verbatim from the seed ---
    import pandas as pd
    import matplotlib.pyplot as plt

    # Load timing data
    df = pd.read_csv('forward_pass_timing.csv')

    # Compare prefill vs decode
    prefill = df[df['phase'] == 'prefill']
    decode = df[df['phase'] == 'decode']

    print(f"Prefill mean: {prefill['forward_time_ms'].mean():.2f}ms")
    print(f"Decode mean: {decode['forward_time_ms'].mean():.2f}ms")

    # Plot throughput over time
    plt.figure(figsize=(12, 6))
    plt.plot(df['timestamp_sec'], df['throughput_tokens_per_sec'])
    plt.xlabel('Time (seconds)')
    plt.ylabel('Throughput (tokens/s)')
    plt.title('Throughput Over Time')
    plt.grid(True)
    plt.savefig('throughput_timeline.png')

    # Latency distribution
    plt.figure(figsize=(10, 6))
    decode['forward_time_ms'].hist(bins=50)
    plt.xlabel('Forward Time (ms)')
    plt.ylabel('Frequency')
    plt.title('Decode Latency Distribution')
    plt.savefig('decode_latency_dist.png')
    # --- end verbatim ---


def cpu_timing():
    """Seed section 2. CPUTimingProfiler, "Analysis Examples": per-operation breakdown and the CPU overhead percentage."""
    # --- verbatim from the seed ---
    import pandas as pd
    import json

    # Load CPU timing
    df = pd.read_csv('cpu_operations_timing.csv')

    # Breakdown by operation
    for operation in df['operation'].unique():
        op_data = df[df['operation'] == operation]
        print(f"{operation}:")
        print(f"  Count: {len(op_data)}")
        print(f"  Mean: {op_data['duration_ms'].mean():.2f}ms")
        print(f"  P95: {op_data['duration_ms'].quantile(0.95):.2f}ms")

    # Calculate CPU overhead percentage
    with open('forward_pass_summary.json') as f:
        gpu_summary = json.load(f)
    with open('cpu_timing_summary.json') as f:
        cpu_summary = json.load(f)

    total_gpu = (gpu_summary['prefill']['count'] * gpu_summary['prefill']['mean_ms'] +
                 gpu_summary['decode']['count'] * gpu_summary['decode']['mean_ms'])
    total_cpu = sum(op['count'] * op['mean_ms'] for op in cpu_summary.values())

    cpu_overhead_pct = total_cpu / (total_cpu + total_gpu) * 100
    print(f"CPU overhead: {cpu_overhead_pct:.1f}%")
    # --- end verbatim ---


def batch_utilization():
    """Seed section 3. BatchUtilizationProfiler, "Analysis Examples": token utilization timeline, underutilization, queues."""
    # --- verbatim from the seed ---
    import pandas as pd
    import matplotlib.pyplot as plt

    # Load utilization data
    df = pd.read_csv('batch_utilization.csv')

    # Plot token utilization over time
    plt.figure(figsize=(14, 6))
    plt.plot(df['timestamp_sec'], df['token_utilization_pct'])
    plt.axhline(y=50, color='r', linestyle='--', label='Underutilization threshold')
    plt.axhline(y=80, color='g', linestyle='--', label='Good utilization')
    plt.xlabel('Time (seconds)')
    plt.ylabel('Token Utilization (%)')
    plt.title('Batch Token Utilization Over Time')
    plt.legend()
    plt.grid(True)
    plt.savefig('token_utilization_timeline.png')

    # Analyze underutilization
    underutilized = df[df['token_utilization_pct'] < 50]
    print(f"Underutilization events: {len(underutilized)} ({len(underutilized)/len(df)*100:.1f}%)")

    # Prefill vs decode utilization
    prefill_util = df[df['phase'] == 'prefill']['token_utilization_pct'].mean()
    decode_util = df[df['phase'] == 'decode']['token_utilization_pct'].mean()
    print(f"Prefill avg utilization: {prefill_util:.1f}%")
    print(f"Decode avg utilization: {decode_util:.1f}%")

    # Queue length analysis
    plt.figure(figsize=(14, 6))
    plt.plot(df['timestamp_sec'], df['running_queue_len'], label='Running')
    plt.plot(df['timestamp_sec'], df['waiting_queue_len'], label='Waiting')
    plt.xlabel('Time (seconds)')
    plt.ylabel('Queue Length')
    plt.title('Request Queue Lengths Over Time')
    plt.legend()
    plt.grid(True)
    plt.savefig('queue_lengths.png')
    # --- end verbatim ---


def preemption():
    """Seed section 4. PreemptionProfiler, "Analysis Examples": rate, reasons, delays, preemption timeline."""
    # --- verbatim from the seed ---
    import pandas as pd
    import matplotlib.pyplot as plt

    # Load preemption data
    events_df = pd.read_csv('preemption_events.csv')
    lifecycle_df = pd.read_csv('request_lifecycle.csv')

    # Preemption rate
    total_requests = len(lifecycle_df)
    total_preemptions = len(events_df[events_df['event'] == 'preempted'])
    preemption_rate = total_preemptions / total_requests * 100
    print(f"Preemption rate: {preemption_rate:.1f}%")

    # Preemption reasons
    preempted = events_df[events_df['event'] == 'preempted']
    reason_counts = preempted['reason'].value_counts()
    print("Preemption reasons:")
    for reason, count in reason_counts.items():
        print(f"  {reason}: {count} ({count/len(preempted)*100:.1f}%)")

    # Preemption delay impact
    lifecycle_with_preempt = lifecycle_df[lifecycle_df['preemption_delay_sec'].notna()]
    mean_delay = lifecycle_with_preempt['preemption_delay_sec'].mean()
    print(f"Mean preemption delay: {mean_delay:.2f}s")

    # Plot preemption timeline
    plt.figure(figsize=(14, 6))
    preempted_times = events_df[events_df['event'] == 'preempted']['timestamp_sec']
    plt.scatter(preempted_times, range(len(preempted_times)), alpha=0.5)
    plt.xlabel('Time (seconds)')
    plt.ylabel('Preemption Event #')
    plt.title('Preemption Events Over Time')
    plt.grid(True)
    plt.savefig('preemption_timeline.png')
    # --- end verbatim ---


def encoder_decoder():
    """Seed section 5. EncoderDecoderProfiler, "Analysis Examples": component means, pie chart, timeline."""
    # --- verbatim from the seed ---
    import pandas as pd
    import matplotlib.pyplot as plt
    import json

    # Load timing data
    df = pd.read_csv('encoder_decoder_timing.csv')

    # Breakdown by component
    encoder = df[df['component'] == 'encoder']
    decoder = df[df['component'] == 'decoder']

    print(f"Encoder mean: {encoder['duration_ms'].mean():.2f}ms")
    print(f"Decoder mean: {decoder['duration_ms'].mean():.2f}ms")

    # Load summary for percentages
    with open('encoder_decoder_summary.json') as f:
        summary = json.load(f)

    # Pie chart
    labels = ['Encoder', 'Decoder']
    sizes = [summary['encoder_pct'], summary['decoder_pct']]
    plt.figure(figsize=(8, 8))
    plt.pie(sizes, labels=labels, autopct='%1.1f%%', startangle=90)
    plt.title(f"{summary['model_type']}: Time Distribution")
    plt.savefig('encoder_decoder_breakdown.png')

    # Timeline comparison
    plt.figure(figsize=(14, 6))
    plt.plot(encoder['timestamp_sec'], encoder['duration_ms'], label='Encoder', alpha=0.7)
    plt.plot(decoder['timestamp_sec'], decoder['duration_ms'], label='Decoder', alpha=0.7)
    plt.xlabel('Time (seconds)')
    plt.ylabel('Duration (ms)')
    plt.title('Encoder vs Decoder Timing')
    plt.legend()
    plt.grid(True)
    plt.savefig('encoder_decoder_timeline.png')
    # --- end verbatim ---


def combined_analysis():
    """Seed section "Combined Analysis": the complete performance breakdown from the five summaries."""
    # --- verbatim from the seed ---
    import pandas as pd
    import json

    # Load all summaries
    with open('forward_pass_summary.json') as f:
        fp_summary = json.load(f)
    with open('cpu_timing_summary.json') as f:
        cpu_summary = json.load(f)
    with open('batch_utilization_summary.json') as f:
        batch_summary = json.load(f)
    with open('preemption_summary.json') as f:
        preempt_summary = json.load(f)
    with open('encoder_decoder_summary.json') as f:
        ed_summary = json.load(f)

    # Complete performance breakdown
    print("=== COMPLETE PERFORMANCE BREAKDOWN ===\n")

    print("1. Forward Pass Timing:")
    print(f"   Prefill: {fp_summary['prefill']['mean_ms']:.2f}ms (P95: {fp_summary['prefill']['p95_ms']:.2f}ms)")
    print(f"   Decode:  {fp_summary['decode']['mean_ms']:.2f}ms (P95: {fp_summary['decode']['p95_ms']:.2f}ms)")

    print("\n2. CPU Operations:")
    for op, stats in cpu_summary.items():
        print(f"   {op}: {stats['mean_ms']:.2f}ms")

    print("\n3. Model Components:")
    if ed_summary['model_type'] == 'encoder_decoder':
        print(f"   Encoder: {ed_summary['encoder_pct']:.1f}% ({ed_summary['encoder']['mean_ms']:.2f}ms)")
        print(f"   Decoder: {ed_summary['decoder_pct']:.1f}% ({ed_summary['decoder']['mean_ms']:.2f}ms)")
    else:
        print(f"   Decoder-only: 100%")

    print("\n4. Batch Utilization:")
    print(f"   Mean token utilization: {batch_summary['mean_token_utilization_pct']:.1f}%")
    print(f"   Underutilization events: {batch_summary['underutilization_events']}")

    print("\n5. Preemptions:")
    print(f"   Total preemptions: {preempt_summary['total_preemptions']}")
    print(f"   Preemption rate: {preempt_summary['total_preemptions']/preempt_summary['total_requests']*100:.1f}%")
    print(f"   Mean delay: {preempt_summary['mean_resume_delay']:.2f}s")
    # --- end verbatim ---


def troubleshooting_batch_limits():
    """Seed section "Troubleshooting", "Batch utilization always 100%": the limits in batch_utilization_summary.json."""
    # The seed runs this after the other snippets, which imported json; not part of the snippet.
    import json
    # --- verbatim from the seed ---
    # Check limits in batch_utilization_summary.json
    with open('batch_utilization_summary.json') as f:
        summary = json.load(f)
    print(f"Max seqs: {summary['max_num_seqs']}")
    print(f"Max tokens: {summary['max_tokens']}")

    # If both are 0, scheduler wasn't patched correctly
    # --- end verbatim ---


SNIPPETS = [
    forward_pass,
    cpu_timing,
    batch_utilization,
    preemption,
    encoder_decoder,
    combined_analysis,
    troubleshooting_batch_limits,
]

# The output contract's files (../shared/CONTRACT.md), linked into each snippet's directory.
CONTRACT_FILES = [
    "forward_pass_timing.csv",
    "forward_pass_summary.json",
    "cpu_operations_timing.csv",
    "cpu_timing_summary.json",
    "batch_utilization.csv",
    "batch_utilization_summary.json",
    "preemption_events.csv",
    "request_lifecycle.csv",
    "preemption_summary.json",
    "encoder_decoder_timing.csv",
    "encoder_decoder_summary.json",
    "kv_cache_usage.csv",
    "kv_cache_summary.json",
    "cuda_graph_events.csv",
    "cuda_graph_summary.json",
    "moe_expert_routing.csv",
    "moe_expert_summary.json",
    "profilemate_run.json",
]

BEGIN = "# --- verbatim from the seed ---"
END = "# --- end verbatim ---"


def verbatim_text(fn):
    """The snippet inside `fn`, dedented back to how the seed prints it."""
    lines = inspect.getsource(fn).split("\n")
    start = next(i for i, l in enumerate(lines) if l.strip() == BEGIN)
    end = next(i for i, l in enumerate(lines) if l.strip() == END)
    return textwrap.dedent("\n".join(lines[start + 1 : end])) + "\n"


def check_against_seed(seed_path):
    """Names of the snippets that are not, word for word, a Python block of the seed."""
    with open(seed_path, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    return [fn.__name__ for fn in SNIPPETS if verbatim_text(fn) not in blocks]


def run_snippet(fn, run_dir, keep_dir):
    """Runs one snippet in a fresh directory holding links to the run's files. True if it passed."""
    work = tempfile.mkdtemp(prefix=f"seed-{fn.__name__}-")
    cwd = os.getcwd()
    try:
        for name in CONTRACT_FILES:
            src = os.path.join(run_dir, name)
            if os.path.exists(src):
                os.symlink(src, os.path.join(work, name))
        os.chdir(work)
        print(f"== {fn.__name__}", flush=True)
        started = time.monotonic()
        try:
            fn()
        except Exception:  # Any failure of a snippet is the finding; report it and go on.
            traceback.print_exc()
            print(f"-- {fn.__name__}: FAILED", flush=True)
            return False
        finally:
            sys.stdout.flush()
            try:
                import matplotlib.pyplot as plt

                plt.close("all")
            except ImportError:
                pass
        pngs = sorted(f for f in os.listdir(work) if f.endswith(".png"))
        for png in pngs:
            if os.path.getsize(png) == 0:
                print(f"-- {fn.__name__}: FAILED, {png} is empty", flush=True)
                return False
        if keep_dir and pngs:
            os.makedirs(keep_dir, exist_ok=True)
            for png in pngs:
                shutil.copy(png, os.path.join(keep_dir, png))
        took = time.monotonic() - started
        saved = f", saved {', '.join(pngs)}" if pngs else ""
        print(f"-- {fn.__name__}: ok ({took:.1f} s{saved})", flush=True)
        return True
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a profilemate output directory")
    parser.add_argument("--seed", help="the seed document: check the snippets still match it verbatim")
    parser.add_argument("--keep", metavar="OUTDIR", help="copy the PNG files the snippets save into OUTDIR")
    args = parser.parse_args()
    run_dir = os.path.abspath(args.run_dir)
    if not os.path.isdir(run_dir):
        print(f"seed_snippets.py: {run_dir}: not a directory", file=sys.stderr)
        return 2
    if args.seed:
        mismatched = check_against_seed(args.seed)
        if mismatched:
            print(f"seed_snippets.py: not verbatim from {args.seed}: {', '.join(mismatched)}", file=sys.stderr)
            return 1
        print(f"all {len(SNIPPETS)} snippets match {args.seed} verbatim")
    failed = [fn.__name__ for fn in SNIPPETS if not run_snippet(fn, run_dir, args.keep)]
    if failed:
        print(f"seed snippets FAILED: {', '.join(failed)} (of {len(SNIPPETS)})")
        return 1
    print(f"all {len(SNIPPETS)} seed snippets ran on {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
