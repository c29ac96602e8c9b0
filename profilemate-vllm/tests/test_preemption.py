"""The forced-preemption run of shared/VLLM.md: preemptions recorded equal vLLM's own counts."""

from __future__ import annotations

import json
import os
from collections import Counter

import contract
from conftest import REPORT, Run


import pytest


@pytest.fixture(params=["inproc_preempt", "mp_preempt"])
def preempt(request) -> Run:
    return request.getfixturevalue(request.param)


def test_preemptions_match_vllms_counts_request_by_request(preempt: Run):
    run = preempt
    files = contract.validate(str(run.dir))
    events = files["preemption_events.csv"]
    lifecycle = files["request_lifecycle.csv"]
    summary = json.load(open(os.path.join(run.dir, "preemption_summary.json")))

    vllm_total = sum(run.counts["preempted_per_step"])
    vllm_per_request = {f["request_id"]: f["num_preemptions"] for f in run.counts["finished"]}
    assert vllm_total > 0, "the scenario must force preemptions"
    assert len(vllm_per_request) == len(run.counts["requests"]) == 16, "every request finished"

    preempted = [e for e in events if e["event"] == "preempted"]
    assert len(preempted) == summary["total_preemptions"] == vllm_total
    ours_events = Counter(run.external(e["request_id"]) for e in preempted)
    ours_rows = {run.external(r["request_id"]): int(r["num_preemptions"]) for r in lifecycle}
    assert len(lifecycle) == 16
    for rid, n in vllm_per_request.items():
        assert ours_rows[rid] == n, rid
        assert ours_events.get(rid, 0) == n, rid
    assert summary["requests_preempted"] == sum(1 for n in vllm_per_request.values() if n)
    assert summary["preemption_reasons"] == {"RECOMPUTE": vllm_total}

    # Every preemption was followed by a resume (all requests finished); the extra info says
    # what was freed.
    resumed = Counter(run.external(e["request_id"]) for e in events if e["event"] == "resumed")
    assert resumed == ours_events
    for e in preempted:
        info = dict(kv.split("=") for kv in e["extra_info"].split(";"))
        assert int(info["num_computed_tokens"]) > 0 and int(info["num_blocks"]) > 0
        assert float(e["running_time_sec"]) >= 0
    for r in lifecycle:
        assert r["outcome"] == "finished"
        if int(r["num_preemptions"]):
            assert float(r["preemption_delay_sec"]) > 0 and r["resumed_sec"] != ""

    # Steps: one forward row per non-empty step, with vLLM's batch and token counts.
    fwd = files["forward_pass_timing.csv"]
    steps = run.counts["iterations"]
    assert len(fwd) == len(steps)
    for row, (ctx_reqs, ctx_tokens, gen_reqs, gen_tokens) in zip(fwd, steps):
        assert int(row["batch_size"]) == ctx_reqs + gen_reqs
        assert int(row["num_tokens"]) == ctx_tokens + gen_tokens
    mode = "multi-process" if run.counts["multiprocessing"] else "in-process"
    REPORT.append(
        f"forced preemption ({mode}): vLLM counted {vllm_total} preemptions over "
        f"{sum(1 for n in vllm_per_request.values() if n)} requests; profilemate recorded {len(preempted)} "
        f"preempted events, per-request counts equal for all {len(vllm_per_request)} requests; "
        f"{len(fwd)} forward rows = {len(steps)} vLLM steps"
    )


def test_killed_engine_processes_are_completed_by_the_merge_command(model, tmp_path):
    """The whole server is SIGKILLed mid-run: `python -m profilemate_vllm merge DIR` builds the
    contract files from what the engine processes had written."""
    import subprocess
    import sys

    from conftest import run_vllm

    # The binding's default collector period (1 s): what a killed process had not written yet is
    # still in its thread buffers (a mapped file the kill leaves behind), and the merge replays it.
    run = run_vllm(model, tmp_path, "preempt", multiprocessing=True, args=("--kill-engine-after", "900"))
    assert run.counts["killed_after_steps"] == 900 and len(run.counts["killed"]) >= 2
    assert not (run.dir / "forward_pass_timing.csv").exists(), "nobody merged: the front end was killed too"
    p = subprocess.run(
        [sys.executable, "-m", "profilemate_vllm", "merge", str(run.dir)], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    assert "NOT shut down cleanly" in p.stdout
    files = contract.validate(str(run.dir))
    fwd = files["forward_pass_timing.csv"]
    # Every step the front end had received the output of (900) has its forward row, whatever
    # the killed processes had written themselves; the engine core may have run ahead of the
    # front end, so there can be more. Each step once, none missing.
    assert len(fwd) >= 900
    assert sorted(int(r["step"]) for r in fwd) == list(range(1, len(fwd) + 1))
    batch_steps = [int(r["step"]) for r in files["batch_utilization.csv"]]
    assert batch_steps[: len(fwd)] == list(range(1, len(fwd) + 1))
    manifest = json.load(open(os.path.join(run.dir, "profilemate_run.json")))
    recovered = manifest["recovered"]
    assert recovered["recovery_errors"] == {} and recovered["events_lost_in_flight"] <= 2
    assert not list(run.dir.glob("parts/*/*/.profilemate_buffers.*")), "replayed buffers are removed"
    assert manifest["finished"] is False
    assert sorted(p["role"] for p in manifest["merged_from"]) == ["engine", "worker"]
    assert not any(p["finished"] for p in manifest["merged_from"])
    lifecycle = files["request_lifecycle.csv"]
    assert any(r["finished_sec"] == "" for r in lifecycle), "requests in flight when killed"
    REPORT.append(
        f"killed at step 900 of the multi-process preemption run: merge command recovered {len(fwd)} forward rows "
        f"({recovered['events_recovered']} events replayed from the killed processes' buffers, "
        f"{recovered['events_lost_in_flight']} lost in flight), "
        f"{len(lifecycle)} lifecycle rows ({sum(r['outcome'] == 'in_flight' for r in lifecycle)} in flight)"
    )


def test_chunked_recompute_after_preemption_is_prompt_processing(inproc_recompute: Run):
    """Recomputation in one-token chunks (long_prefill_token_threshold=1) next to other requests'
    decodes: every step where a request recomputes tokens it had computed before its preemption
    is prefill or mixed, and every step's phase is what vLLM's request state says."""
    run = inproc_recompute
    files = contract.validate(str(run.dir))
    fwd = files["forward_pass_timing.csv"]
    reference = run.counts["reference_phases"]
    recomputing = run.counts["recomputing"]
    steps = run.counts["iterations"]
    assert len(fwd) == len(reference) == len(steps) > 0
    assert sum(run.counts["preempted_per_step"]) > 0, "the scenario must force preemptions"
    recompute_steps = [i for i, n in enumerate(recomputing) if n]
    assert recompute_steps, "requests must recompute after their preemptions"
    ours = [r["phase"] for r in fwd]
    labelled_decode = [i for i in recompute_steps if ours[i] == "decode"]
    assert labelled_decode == [], f"{len(labelled_decode)} recomputing steps labelled decode, e.g. step {labelled_decode[:5]}"
    assert ours == reference
    for row, (ctx_reqs, ctx_tokens, gen_reqs, gen_tokens) in zip(fwd, steps):
        assert int(row["batch_size"]) == ctx_reqs + gen_reqs
        assert int(row["num_tokens"]) == ctx_tokens + gen_tokens
    old = run.counts["old_rule_phases"]
    old_decode = sum(1 for i in recompute_steps if old[i] == "decode")
    assert old_decode > 0, "the scenario recomputes in one-token chunks the previous rule called decode"
    summary = json.load(open(os.path.join(run.dir, "forward_pass_summary.json")))
    counts = Counter(ours)
    assert {p: summary[p]["count"] for p in ("prefill", "decode", "mixed")} == {
        p: counts.get(p, 0) for p in ("prefill", "decode", "mixed")
    }
    ex = run.counts["recompute_example"]
    REPORT.append(
        f"chunked recompute (in-process, 8 x 10-token prompts x 100 tokens, 7 blocks, 1-token chunks): "
        f"{sum(run.counts['preempted_per_step'])} preemptions, {len(fwd)} steps, {len(recompute_steps)} with a request "
        f"recomputing; labelled decode now {len(labelled_decode)}, by the previous rule {old_decode}; phases "
        f"{dict(counts)} equal to vLLM's request state step by step; e.g. {ex}"
    )
