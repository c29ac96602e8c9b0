"""Every format merged, and nothing lost when `vllm serve` is stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import contract
import sigterm
from conftest import REPORT, Run, run_vllm

ALL_SINKS = "csv,json,parquet,perfetto"


@pytest.fixture(scope="session")
def mp_all_sinks(model, tmp_path_factory) -> Run:
    return run_vllm(
        model,
        tmp_path_factory.mktemp("mp-all-sinks"),
        "basic",
        multiprocessing=True,
        extra_env={"PROFILEMATE_SINKS": ALL_SINKS},
    )


def _trace(path: Path):
    with open(path) as f:
        return json.load(f)  # the whole file: a cut event would not parse


def _check_trace_and_tables(out: Path, parts) -> None:
    events = _trace(out / "profilemate_trace.json")
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    assert sorted(names) == sorted(p["pid"] for p in parts), (names, parts)
    for p in parts:
        assert names[p["pid"]].startswith(f"vLLM {p['role']} pid {p['pid']}"), names
    fwd = contract.read_csv(str(out / "forward_pass_timing.csv"))
    slices = [e for e in events if e.get("ph") == "X" and e.get("cat") == "forward_pass"]
    assert len(slices) == len(fwd) > 0
    worker = next(p for p in parts if p["role"] == "worker")
    assert {e["pid"] for e in slices} == {worker["pid"]}
    cpu = contract.read_csv(str(out / "cpu_operations_timing.csv"))
    assert len([e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_operation"]) == len(cpu)
    # Both processes have tracks: the scheduler's CPU operations and counters are the engine's.
    engine = next(p for p in parts if p["role"] == "engine")
    assert any(e["pid"] == engine["pid"] and e.get("ph") in ("X", "C") for e in events)

    import pyarrow.parquet as pq

    for name in sorted(os.listdir(out)):
        if not name.endswith(".csv"):
            continue
        table = pq.read_table(out / name.replace(".csv", ".parquet"))
        assert table.num_rows == len(contract.read_csv(str(out / name))), name
    ranks = pq.read_table(out / "forward_pass_timing.parquet").column("rank").to_pylist()
    assert ranks == [int(r["rank"]) for r in fwd]
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]


def test_the_merge_writes_the_trace_and_parquet_tables(mp_all_sinks: Run):
    manifest = json.load(open(mp_all_sinks.dir / "profilemate_run.json"))
    assert manifest["sinks"] == ALL_SINKS.split(",")
    parts = manifest["merged_from"]
    assert sorted(p["role"] for p in parts) == ["engine", "worker"]
    _check_trace_and_tables(mp_all_sinks.dir, parts)
    fwd = contract.read_csv(str(mp_all_sinks.dir / "forward_pass_timing.csv"))
    assert len(fwd) == len(mp_all_sinks.counts["iterations"])


def test_a_part_cut_by_a_kill_still_merges_into_a_loadable_trace(mp_all_sinks: Run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(mp_all_sinks.dir / "parts", copy / "parts")
    run = next((copy / "parts").iterdir())
    worker = next(p for p in run.iterdir() if p.name.startswith("worker"))
    # As a kill leaves it: a torn last row, an unfinished part.
    fwd = worker / "forward_pass_timing.csv"
    rows = len(contract.read_csv(str(fwd)))
    with open(fwd, "a") as f:
        f.write("12.5,deco")
    for name in ("profilemate_run.json", "part.json"):
        info = json.loads((worker / name).read_text())
        info["finished"] = False
        (worker / name).write_text(json.dumps(info))
    p = subprocess.run([sys.executable, "-m", "profilemate_vllm", "merge", str(copy)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    manifest = json.load(open(copy / "profilemate_run.json"))
    assert manifest["finished"] is False
    part = next(p for p in manifest["merged_from"] if p["role"] == "worker")
    assert part["rows"]["forward_pass_timing.csv"] == rows and part["skipped_lines"] == 1
    # The manifest and the command say what came from the killed part.
    assert manifest["recovered"]["parts"] == [part["dir"]]
    assert manifest["recovered"]["rows"] == part["rows"] and manifest["recovered"]["skipped_lines"] == 1
    line = next(l for l in p.stdout.splitlines() if l.strip().startswith(part["dir"]))
    assert f"{sum(part['rows'].values())} rows recovered, 1 torn line(s) skipped" in line, p.stdout
    _check_trace_and_tables(copy, manifest["merged_from"])


RUNS = 5


def test_sigterm_right_after_the_last_response_keeps_every_request_and_forward_pass(model, tmp_path):
    """`vllm serve`, 5 completions of 8 tokens, SIGTERM right after the last response (vLLM's
    default shutdown: the engine core and its worker are force-killed), 5 times: the merged files
    hold every request (with its finish) and every forward pass vLLM's /metrics counted."""
    t0 = time.monotonic()
    figures = []
    for i in range(RUNS):
        f = sigterm.run_once(model, tmp_path / f"run{i}")
        figures.append(f)
        REPORT.append(f"SIGTERM run {i + 1}: {f.line()}")
    totals = (
        sum(f.lifecycle_rows for f in figures),
        sum(f.requests for f in figures),
        sum(f.forward_rows for f in figures),
        sum(f.steps for f in figures),
    )
    REPORT.append(
        f"SIGTERM: lifecycle rows {totals[0]}/{totals[1]}, forward rows {totals[2]}/{totals[3]} over {RUNS} runs "
        f"({time.monotonic() - t0:.0f} s)"
    )
    for i, f in enumerate(figures):
        assert f.rc == 0, f"run {i + 1}: vllm serve did not exit by itself after SIGTERM\n{f.log[-3000:]}"
        # vLLM's own counters: every request succeeded, every step with outputs counted.
        assert f.requests == sigterm.REQUESTS and f.steps >= sigterm.MAX_TOKENS, f"run {i + 1}: {f.line()}"
        assert (f.lifecycle_rows, f.finished_rows) == (f.requests, f.requests), f"run {i + 1}: {f.line()}"
        assert f.forward_rows == f.steps, f"run {i + 1}: {f.line()}"
