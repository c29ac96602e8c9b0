"""Profiling off: nothing written, nothing patched. A fault in our code: vLLM goes on."""

from __future__ import annotations

import json
import os

from conftest import run_vllm


def test_not_activated_writes_nothing_and_patches_nothing(model, tmp_path, inproc_basic):
    run = run_vllm(model, tmp_path, "basic", multiprocessing=False, profiling=False)
    state = run.counts["plugin"]
    assert state["register_calls"] >= 1, "vLLM loaded the plugin"
    assert state["active"] is False
    assert "vllm.v1.core.sched.scheduler" in state["modules_loaded"]
    assert state["wrapped"] == []
    assert not run.dir.exists()
    assert "profilemate:" not in run.log
    assert sorted(os.listdir(tmp_path)) == ["counts.json", "run.log"]
    assert len(run.counts["outputs"]) == len(run.counts["requests"])
    # The same generation with profiling on produced the same tokens, in the same steps.
    assert run.counts["outputs"] == inproc_basic.counts["outputs"]
    assert run.counts["iterations"] == inproc_basic.counts["iterations"]


def test_an_exception_in_a_hook_is_caught_counted_and_reported_once(model, tmp_path, inproc_basic):
    run = run_vllm(model, tmp_path, "basic", multiprocessing=False, args=("--inject-fault", "after_schedule"))
    # vLLM finished every request and computed what it computes without the fault.
    assert run.counts["outputs"] == inproc_basic.counts["outputs"]
    steps = len(run.counts["iterations"])
    assert run.counts["plugin"]["hook_errors"] == {"Scheduler.schedule": steps}
    warnings = [l for l in run.log.splitlines() if "error in its Scheduler.schedule hook" in l]
    assert len(warnings) == 1, warnings
    # The other hooks went on recording.
    with open(os.path.join(run.dir, "forward_pass_timing.csv")) as f:
        assert len(f.read().splitlines()) == steps + 1
    part = next((run.dir / "parts").glob("*/*/part.json"))
    assert json.loads(part.read_text())["hook_errors"] == {"Scheduler.schedule": steps}
