"""Step ids across vLLM's processes: the engine core numbers the non-empty steps, the worker opens
the same id, and the merged step timeline joins both by step (in-process and multi-process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import pytest

import contract
from conftest import REPORT, Run

REPO = Path(__file__).resolve().parents[2]


def rows_of(run: Run, name: str):
    return contract.read_csv(os.path.join(run.dir, name))


def step_of(row) -> int:
    """The row's step id; fails on an empty field."""
    assert row["step"] != "", row
    return int(row["step"])


def test_forward_rows_carry_the_step_of_their_batch_row(basic: Run):
    """Every forward row (worker) carries the step of the batch utilization row (engine core) of
    the same step; steps are numbered 1..N, N being vLLM's non-empty steps."""
    fwd = rows_of(basic, "forward_pass_timing.csv")
    batch = rows_of(basic, "batch_utilization.csv")
    n = len(basic.counts["iterations"])
    assert len(fwd) == len(batch) == n > 0
    assert [step_of(r) for r in batch] == list(range(1, n + 1))
    by_step = {step_of(r): r for r in batch}
    for f in fwd:
        b = by_step[step_of(f)]
        assert (f["phase"], f["batch_size"], f["num_tokens"]) == (b["phase"], b["num_seqs"], b["num_tokens"])
        # The batch was scheduled before its forward pass ran.
        assert float(f["timestamp_sec"]) >= float(b["timestamp_sec"]) - 2e-6
    # vLLM's own per-step figures, step by step.
    for f in fwd:
        ctx_reqs, ctx_tokens, gen_reqs, gen_tokens = basic.counts["iterations"][step_of(f) - 1]
        assert int(f["num_tokens"]) == ctx_tokens + gen_tokens


def test_every_per_step_row_is_in_its_step(basic: Run):
    """CPU operations, KV-cache readings, components and lifecycle events: one step each, and
    each step has exactly one scheduling, batch preparation, model execution and sampling row."""
    n = len(basic.counts["iterations"])
    cpu = rows_of(basic, "cpu_operations_timing.csv")
    per_op = defaultdict(Counter)
    for r in cpu:
        per_op[r["operation"]][step_of(r)] += 1
    for op in ("scheduling", "batch_preparation", "model_execution", "sampling"):
        assert per_op[op] == Counter(range(1, n + 1)), op
    assert [step_of(r) for r in rows_of(basic, "kv_cache_usage.csv")] == list(range(1, n + 1))
    assert [step_of(r) for r in rows_of(basic, "encoder_decoder_timing.csv")] == list(range(1, n + 1))
    # A request starts in the step that first schedules it and finishes in the step whose output
    # completes it (the engine core's step lasts until its output's bookkeeping).
    events = rows_of(basic, "preemption_events.csv")
    assert all(1 <= step_of(e) <= n for e in events)
    for e in events:
        if e["event"] == "finished":
            assert step_of(e) >= max(step_of(s) for s in events if s["request_id"] == e["request_id"])


def test_step_timeline_has_one_row_per_step_joining_the_processes(basic: Run):
    """step_timeline.csv: one row per vLLM non-empty step; its forward, CPU and batch figures
    equal the rows of that step in the per-profiler files (the worker's and the engine core's)."""
    n = len(basic.counts["iterations"])
    timeline = rows_of(basic, "step_timeline.csv")
    assert [int(r["step"]) for r in timeline] == list(range(1, n + 1))
    fwd = {step_of(r): r for r in rows_of(basic, "forward_pass_timing.csv")}
    batch = {step_of(r): r for r in rows_of(basic, "batch_utilization.csv")}
    cpu = defaultdict(dict)
    scheduled_at = {}
    for r in rows_of(basic, "cpu_operations_timing.csv"):
        cpu[step_of(r)][r["operation"]] = float(r["duration_ms"])
        if r["operation"] == "scheduling":
            scheduled_at[step_of(r)] = float(r["timestamp_sec"])
    kv = {step_of(r): r for r in rows_of(basic, "kv_cache_usage.csv")}
    for t in timeline:
        s = int(t["step"])
        f, b = fwd[s], batch[s]
        assert t["phase"] == f["phase"]
        assert (t["batch_size"], t["num_tokens"], t["forward_passes"]) == (f["batch_size"], f["num_tokens"], "1")
        assert float(t["forward_time_ms"]) == pytest.approx(float(f["forward_time_ms"]), abs=1e-6)
        for op in ("scheduling", "batch_preparation", "sampling"):
            assert float(t[f"{op}_ms"]) == pytest.approx(cpu[s][op], abs=1e-6), (s, op)
        assert (t["running_queue_len"], t["waiting_queue_len"]) == (b["running_queue_len"], b["waiting_queue_len"])
        assert float(t["token_utilization_pct"]) == pytest.approx(float(b["token_utilization_pct"]), abs=1e-3)
        assert float(t["kv_cache_usage_pct"]) == pytest.approx(
            100 * int(kv[s]["used_blocks"]) / int(kv[s]["total_blocks"]), abs=1e-3
        )
        assert t["preemptions"] == "0" and float(t["encoder_time_ms"]) == 0
        assert float(t["decoder_time_ms"]) == pytest.approx(float(f["forward_time_ms"]), abs=1e-6)
        # The engine core's step encloses the worker's forward pass and sampling.
        wall = float(t["step_wall_ms"])
        claimed = sum(float(t[c]) for c in ("forward_time_ms", "scheduling_ms", "batch_preparation_ms", "sampling_ms"))
        assert wall >= claimed - 1e-3, t
        start = float(t["start_sec"])
        # The step opens before its scheduling starts (the first one too).
        assert start <= scheduled_at[s] + 2e-6, (s, start, scheduled_at[s])
        assert start <= float(b["timestamp_sec"]) and start <= float(f["timestamp_sec"])
        assert start + wall / 1000 >= float(f["timestamp_sec"]) + float(f["forward_time_ms"]) / 1000 - 2e-6
    summary = json.load(open(os.path.join(basic.dir, "step_timeline_summary.json")))
    assert summary["steps"] == n and summary["late_rows"] == 0
    assert sum(summary[p]["count"] for p in ("prefill", "decode", "mixed")) == n
    total_fwd = sum(float(f["forward_time_ms"]) for f in fwd.values())
    assert sum(summary[p]["total_forward_ms"] for p in ("prefill", "decode", "mixed")) == pytest.approx(total_fwd, abs=1e-3)
    manifest = json.load(open(os.path.join(basic.dir, "profilemate_run.json")))
    assert manifest["rows"]["step_timeline.csv"] == n
    mode = "multi-process" if basic.counts["multiprocessing"] else "in-process"
    walls = sorted(float(t["step_wall_ms"]) for t in timeline)
    REPORT.append(
        f"{mode} basic: step_timeline.csv {len(timeline)} rows = {n} vLLM non-empty steps; step wall "
        f"median {walls[len(walls) // 2]:.3f} ms, forward {total_fwd:.1f} ms of {sum(walls):.1f} ms"
    )


def test_worker_part_opens_the_engine_cores_step_ids(mp_basic: Run):
    """Multi-process: the id travels with the SchedulerOutput to the worker process, whose part
    has the same step ids as the engine core's (its own step timeline included)."""
    parts = sorted((mp_basic.dir / "parts").glob("*/*/part.json"))
    steps = {}
    for p in parts:
        role = json.loads(p.read_text())["role"]
        if role in ("engine", "worker"):
            table = "batch_utilization.csv" if role == "engine" else "forward_pass_timing.csv"
            rows = contract.read_csv(str(p.parent / table))
            steps[role] = [step_of(r) for r in rows]
            own = contract.read_csv(str(p.parent / "step_timeline.csv"))
            assert [int(r["step"]) for r in own] == steps[role], role
    n = len(mp_basic.counts["iterations"])
    assert steps["engine"] == steps["worker"] == list(range(1, n + 1))


def test_preemptions_and_resumes_are_in_their_steps(preempt_run: Run):
    """The forced-preemption run: every preemption and resume carries a step; the timeline's
    per-step counts add up to the events and to vLLM's own count."""
    run = preempt_run
    n = len(run.counts["iterations"])
    events = rows_of(run, "preemption_events.csv")
    timeline = rows_of(run, "step_timeline.csv")
    assert [int(r["step"]) for r in timeline] == list(range(1, n + 1))
    per_step = Counter(step_of(e) for e in events if e["event"] == "preempted")
    resumes = Counter(step_of(e) for e in events if e["event"] == "resumed")
    assert sum(per_step.values()) == sum(run.counts["preempted_per_step"]) > 0
    for t in timeline:
        s = int(t["step"])
        assert (int(t["preemptions"]), int(t["resumes"])) == (per_step.get(s, 0), resumes.get(s, 0)), s
    # A preempted request is resumed in a later step.
    for e in events:
        if e["event"] == "resumed":
            before = [step_of(p) for p in events if p["event"] == "preempted" and p["request_id"] == e["request_id"]]
            assert before and min(before) < step_of(e)


@pytest.fixture(params=["inproc_preempt", "mp_preempt"])
def preempt_run(request) -> Run:
    return request.getfixturevalue(request.param)


def test_a_request_aborted_between_steps_has_no_step(model, tmp_path):
    """Rows outside any step keep the column empty: an abort the front end makes between two
    steps (in-process, the engine core handles it at once)."""
    from conftest import run_vllm

    run = run_vllm(model, tmp_path, "basic", multiprocessing=False, args=("--abort", "2"))
    events = rows_of(run, "preemption_events.csv")
    evicted = [e for e in events if e["event"] == "evicted"]
    assert sorted(run.external(e["request_id"]) for e in evicted) == sorted(run.counts["aborted"]) != []
    assert all(e["step"] == "" for e in evicted)
    assert all(e["step"] != "" for e in events if e["event"] != "evicted")
    n = len(run.counts["iterations"])
    assert [int(r["step"]) for r in rows_of(run, "step_timeline.csv")] == list(range(1, n + 1))


def profilemate_cli():
    for path in (os.environ.get("PROFILEMATE_CLI"), REPO / "target/release/profilemate", REPO / "target/debug/profilemate"):
        if path and os.access(str(path), os.X_OK):
            return str(path)
    return None


def test_profilemate_report_prints_the_breakdown_and_slow_steps(mp_basic: Run, tmp_path):
    """`profilemate report` on the merged multi-process output: the step breakdown tree and the
    slow-step section, from the merged step timeline."""
    cli = profilemate_cli()
    if cli is None:
        pytest.skip("no profilemate binary (cargo build -p profilemate-cli, or set PROFILEMATE_CLI)")
    copy = tmp_path / "out"
    shutil.copytree(mp_basic.dir, copy, ignore=shutil.ignore_patterns("parts"))
    p = subprocess.run([cli, "report", str(copy)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    n = len(mp_basic.counts["iterations"])
    assert "Step breakdown (step_timeline.csv" in p.stdout, p.stdout
    assert f"   all: {n} steps" in p.stdout, p.stdout
    assert "Slow Steps" in p.stdout, p.stdout
    start = p.stdout.index("Step breakdown")
    REPORT.append("profilemate report on the merged multi-process basic run:\n" + p.stdout[start : start + 1500])
