"""Real vLLM, in-process and multi-process: profilemate's rows against vLLM's own per-step data."""

from __future__ import annotations

import os

import pytest

import contract
from conftest import REPORT, Run


def vllm_phase(ctx_reqs: int, gen_reqs: int) -> str:
    if ctx_reqs and gen_reqs:
        return "mixed"
    return "prefill" if ctx_reqs else "decode"


def assert_rows_are_vllms_steps(rows, steps) -> None:
    """One forward row per vLLM non-empty step, with its sequences, tokens and phase."""
    assert len(rows) == len(steps) > 0
    for row, (ctx_reqs, ctx_tokens, gen_reqs, gen_tokens) in zip(rows, steps):
        assert int(row["batch_size"]) == ctx_reqs + gen_reqs
        assert int(row["num_tokens"]) == ctx_tokens + gen_tokens
        assert row["phase"] == vllm_phase(ctx_reqs, gen_reqs)
        assert row["rank"] == "0"
        assert float(row["forward_time_ms"]) > 0


def test_files_are_valid_under_the_contract(basic: Run):
    contract.validate(str(basic.dir))


def test_forward_rows_equal_vllms_non_empty_steps(basic: Run):
    rows = contract.read_csv(os.path.join(basic.dir, "forward_pass_timing.csv"))
    steps = basic.counts["iterations"]
    assert_rows_are_vllms_steps(rows, steps)
    phases = {p: sum(r["phase"] == p for r in rows) for p in ("prefill", "decode", "mixed")}
    assert phases["mixed"] > 0 and phases["decode"] > 0, "the basic scenario makes chunked-prefill mixed steps"
    # Every token vLLM computed: prompts plus all generated tokens but the last of each request.
    expected = sum(o["prompt_tokens"] + o["output_tokens"] - 1 for o in basic.counts["outputs"].values())
    assert sum(int(r["num_tokens"]) for r in rows) == expected
    mode = "multi-process" if basic.counts["multiprocessing"] else "in-process"
    REPORT.append(f"{mode} basic: {len(rows)} forward rows = {len(steps)} vLLM non-empty steps {phases}")


def test_speculative_decoding_steps_equal_vllms(inproc_spec: Run):
    """N-gram speculative decoding: a decode step verifies draft tokens, so it holds more tokens
    than sequences; it is still a decode step, as vLLM counts it."""
    run = inproc_spec
    contract.validate(str(run.dir))
    rows = contract.read_csv(os.path.join(run.dir, "forward_pass_timing.csv"))
    steps = run.counts["iterations"]
    assert_rows_are_vllms_steps(rows, steps)
    with_drafts = [r for r in rows if r["phase"] == "decode" and int(r["num_tokens"]) > int(r["batch_size"])]
    assert with_drafts, "no decode step verified draft tokens: the scenario did not speculate"
    assert all(o["output_tokens"] == 24 for o in run.counts["outputs"].values())
    REPORT.append(
        f"in-process n-gram speculative decoding: {len(rows)} forward rows = {len(steps)} vLLM non-empty steps, "
        f"{len(with_drafts)} decode steps verifying drafts (up to "
        f"{max(int(r['num_tokens']) - int(r['batch_size']) for r in with_drafts)} draft tokens in a step)"
    )


def test_batch_rows_match_the_scheduler_outputs(basic: Run):
    rows = contract.read_csv(os.path.join(basic.dir, "batch_utilization.csv"))
    fwd = contract.read_csv(os.path.join(basic.dir, "forward_pass_timing.csv"))
    steps = basic.counts["iterations"]
    assert len(rows) == len(steps)
    n_requests = len(basic.counts["requests"])
    for row, f, (ctx_reqs, ctx_tokens, gen_reqs, gen_tokens) in zip(rows, fwd, steps):
        assert int(row["num_seqs"]) == ctx_reqs + gen_reqs
        assert int(row["num_tokens"]) == ctx_tokens + gen_tokens
        assert int(row["max_num_seqs"]) == basic.counts["max_num_seqs"]
        assert int(row["max_tokens"]) == basic.counts["max_num_batched_tokens"]
        assert row["phase"] == f["phase"]
        running, waiting = int(row["running_queue_len"]), int(row["waiting_queue_len"])
        assert int(row["num_seqs"]) <= running <= basic.counts["max_num_seqs"]
        assert running + waiting <= n_requests
    # The requests outnumber max_num_seqs: some had to wait.
    assert max(int(r["waiting_queue_len"]) for r in rows) > 0
    if not basic.counts["multiprocessing"]:
        # All requests were added before the first step.
        assert int(rows[0]["running_queue_len"]) + int(rows[0]["waiting_queue_len"]) == n_requests


@pytest.mark.parametrize("name", ["inproc_basic", "inproc_priority", "inproc_preempt"])
def test_queue_lengths_and_kv_blocks_equal_the_schedulers_own_counts(name: str, request):
    """Each step's running and waiting queue lengths, and its KV cache blocks used, are what
    vLLM's own ``get_request_counts`` and ``get_num_free_blocks`` say right after scheduling:
    read natively past vLLM's methods for its first-come-first-served queues (basic, preempt),
    through the method under priority scheduling."""
    run = request.getfixturevalue(name)
    seen = run.counts["at_schedule"]
    batch = contract.read_csv(os.path.join(run.dir, "batch_utilization.csv"))
    kv = contract.read_csv(os.path.join(run.dir, "kv_cache_usage.csv"))
    assert len(batch) == len(kv) == len(seen) == len(run.counts["iterations"]) > 0
    for step, (b, k, (running, waiting, free, blocks)) in enumerate(zip(batch, kv, seen), start=1):
        assert (int(b["running_queue_len"]), int(b["waiting_queue_len"])) == (running, waiting), step
        # One block of the pool is vLLM's null block, never free and never used by a request.
        assert (int(k["used_blocks"]), int(k["total_blocks"])) == (blocks - 1 - free, blocks - 1), step
    assert max(w for _, w, _, _ in seen) > 0, "requests must wait"
    assert len({f for _, _, f, _ in seen}) > 1, "the KV cache's use must change"
    assert run.counts["plugin"]["sched_reader"] == {"fast_counts": name != "inproc_priority", "fast_free": True}
    REPORT.append(
        f"{name}: queue lengths and KV blocks of {len(seen)} steps equal vLLM's get_request_counts and "
        f"get_num_free_blocks (waiting up to {max(w for _, w, _, _ in seen)}, used blocks "
        f"{min(blocks - 1 - f for _, _, f, blocks in seen)} to {max(blocks - 1 - f for _, _, f, blocks in seen)})"
    )


def test_one_lifecycle_row_per_request(basic: Run):
    rows = contract.read_csv(os.path.join(basic.dir, "request_lifecycle.csv"))
    events = contract.read_csv(os.path.join(basic.dir, "preemption_events.csv"))
    assert sorted(basic.external(r["request_id"]) for r in rows) == sorted(basic.counts["requests"])
    for r in rows:
        assert r["outcome"] == "finished" and r["num_preemptions"] == "0"
        assert float(r["started_sec"]) < float(r["finished_sec"])
        mine = [e for e in events if e["request_id"] == r["request_id"]]
        assert [e["event"] for e in mine] == ["started", "finished"]
        out = basic.counts["outputs"][basic.external(r["request_id"])]
        info = dict(kv.split("=") for kv in mine[1]["extra_info"].split(";"))
        assert info["status"] == "FINISHED_LENGTH_CAPPED"
        assert int(info["num_output_tokens"]) == out["output_tokens"]
        assert int(info["num_prompt_tokens"]) == out["prompt_tokens"]


def test_cpu_operations_once_per_step(basic: Run):
    rows = contract.read_csv(os.path.join(basic.dir, "cpu_operations_timing.csv"))
    steps = len(basic.counts["iterations"])
    for op in ("scheduling", "batch_preparation", "model_execution", "sampling"):
        assert sum(r["operation"] == op for r in rows) == steps, op
    assert all(r["context"].startswith("phase=") for r in rows)


def test_decoder_only_model_type_and_language_model_time(basic: Run):
    import json

    ed = json.load(open(os.path.join(basic.dir, "encoder_decoder_summary.json")))
    assert ed["model_type"] == "decoder_only"
    assert ed["decoder"]["count"] == len(basic.counts["iterations"]) and ed["encoder"]["count"] == 0


def test_kv_cache_sampled_every_step(basic: Run):
    rows = contract.read_csv(os.path.join(basic.dir, "kv_cache_usage.csv"))
    assert len(rows) == len(basic.counts["iterations"])
    assert all(0 < int(r["used_blocks"]) <= int(r["total_blocks"]) for r in rows)


def test_each_process_logs_one_instrumentation_line(basic: Run):
    lines = basic.instrumentation_lines()
    pids = [l.split(" pid ")[1].split(":")[0] for l in lines]
    assert len(pids) == len(set(pids)), lines
    if basic.counts["multiprocessing"]:
        roles = sorted(l.split("profilemate: ")[1].split(" ")[0] for l in lines)
        assert roles == ["engine", "main", "worker"], lines
    else:
        assert len(lines) == 1, lines
    for l in lines:
        assert "could not instrument: nothing" in l, l
    assert any("Scheduler.schedule" in l for l in lines)
    assert any("GPUModelRunner.execute_model" in l for l in lines)
    REPORT.extend(l[l.index("profilemate:"):] for l in lines)


def test_multiprocess_parts_share_one_time_base(mp_basic: Run):
    import json

    manifest = json.load(open(os.path.join(mp_basic.dir, "profilemate_run.json")))
    parts = manifest["merged_from"]
    roles = sorted(p["role"] for p in parts)
    assert roles == ["engine", "worker"], parts
    assert all(p["finished"] for p in parts) and manifest["finished"]
    assert len({p["pid"] for p in parts}) == 2
    worker = next(p for p in parts if p["role"] == "worker")
    assert worker["rank"] == 0 and worker["rows"]["forward_pass_timing.csv"] == len(mp_basic.counts["iterations"])
    engine = next(p for p in parts if p["role"] == "engine")
    assert engine["rows"]["forward_pass_timing.csv"] == 0 and engine["rows"]["batch_utilization.csv"] > 0
    # Step i is scheduled (engine core process) before its forward pass runs (worker process),
    # and the next step is scheduled after it: only true if both are on one clock.
    batch = contract.read_csv(os.path.join(mp_basic.dir, "batch_utilization.csv"))
    fwd = contract.read_csv(os.path.join(mp_basic.dir, "forward_pass_timing.csv"))
    for i, f in enumerate(fwd):
        t = float(f["timestamp_sec"])
        assert t >= float(batch[i]["timestamp_sec"]) - 2e-6, i
        if i + 1 < len(batch):
            assert t + float(f["forward_time_ms"]) / 1000 <= float(batch[i + 1]["timestamp_sec"]) + 2e-6, i


def test_merge_command_rebuilds_the_same_files(mp_basic: Run, tmp_path):
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "copy"
    shutil.copytree(mp_basic.dir / "parts", copy / "parts")
    p = subprocess.run([sys.executable, "-m", "profilemate_vllm", "merge", str(copy)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "merged run" in p.stdout
    for name in ("forward_pass_timing.csv", "request_lifecycle.csv", "batch_utilization.csv"):
        assert (copy / name).read_text() == (mp_basic.dir / name).read_text(), name
