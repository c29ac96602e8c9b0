"""Checks an output directory against shared/CONTRACT.md (files, columns, formats, JSON keys)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from typing import Dict, List

CSV_COLUMNS = {
    "forward_pass_timing.csv": [
        "timestamp_sec", "phase", "batch_size", "num_tokens", "forward_time_ms", "throughput_tokens_per_sec",
    ],
    "cpu_operations_timing.csv": ["timestamp_sec", "operation", "duration_ms", "context"],
    "batch_utilization.csv": [
        "timestamp_sec", "num_seqs", "max_num_seqs", "seq_utilization_pct", "num_tokens", "max_tokens",
        "token_utilization_pct", "phase", "running_queue_len", "waiting_queue_len",
    ],
    "preemption_events.csv": ["timestamp_sec", "request_id", "event", "reason", "running_time_sec", "extra_info"],
    "request_lifecycle.csv": [
        "request_id", "started_sec", "preempted_sec", "resumed_sec", "finished_sec", "total_time_sec",
        "preemption_delay_sec", "num_preemptions",
    ],
    "encoder_decoder_timing.csv": ["timestamp_sec", "component", "duration_ms", "context"],
}
# The trackers' files, written only by a run that had something for them.
TRACKER_COLUMNS = {
    "cuda_graph_events.csv": ["timestamp_sec", "event", "batch_size", "padded_batch_size", "duration_ms"],
    "moe_expert_routing.csv": ["timestamp_sec", "layer", "expert_id", "num_tokens"],
}
TRACKER_SUMMARIES = {
    "cuda_graph_events.csv": "cuda_graph_summary.json",
    "moe_expert_routing.csv": "moe_expert_summary.json",
}
PHASE_STATS = [
    "count", "mean_ms", "std_ms", "min_ms", "max_ms", "p50_ms", "p95_ms", "p99_ms", "total_ms", "total_tokens",
    "mean_throughput_tokens_per_sec",
]
OP_STATS = ["count", "mean_ms", "std_ms", "min_ms", "max_ms", "p50_ms", "p95_ms", "p99_ms", "total_ms"]
COMPONENT_STATS = ["count", "total_ms", "mean_ms", "std_ms", "min_ms", "max_ms", "p50_ms", "p95_ms"]
SEC = re.compile(r"^\d+\.\d{6}$")
MS = re.compile(r"^\d+\.\d{3,}$")
NUM = re.compile(r"^\d+(\.\d+)?$")
INT = re.compile(r"^\d+$")
KV = re.compile(r"^$|^[^=;]+=[^;]*(;[^=;]+=[^;]*)*$")


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _no_nan(value) -> None:
    def bad(x):
        raise AssertionError(f"non-finite JSON constant {x}")

    json.loads(value, parse_constant=bad)


def _load(path: str):
    with open(path) as f:
        text = f.read()
    _no_nan(text)
    return json.loads(text)


def validate(d: str) -> Dict[str, List[Dict[str, str]]]:
    """Asserts every contract rule this binding's files are subject to; returns the CSV rows."""
    out = {}
    for name, cols in CSV_COLUMNS.items():
        path = os.path.join(d, name)
        assert os.path.exists(path), f"missing {name}"
        with open(path, newline="") as f:
            text = f.read()
        assert text.endswith("\n") and "\r\n" not in text, f"{name}: line ends"
        header = next(csv.reader([text.splitlines()[0]]))
        assert header[: len(cols)] == cols, f"{name}: header {header}"
        rows = read_csv(path)
        for r in rows:
            for k, v in r.items():
                assert v not in ("null", "None", "NaN", "nan", "inf"), f"{name}: {k}={v}"
        out[name] = rows

    for r in out["forward_pass_timing.csv"]:
        assert SEC.match(r["timestamp_sec"]) and r["phase"] in ("prefill", "decode", "mixed")
        assert INT.match(r["batch_size"]) and INT.match(r["num_tokens"]) and MS.match(r["forward_time_ms"])
        t = float(r["forward_time_ms"])
        if t > 0:
            expect = int(r["num_tokens"]) / t * 1000
            assert math.isclose(float(r["throughput_tokens_per_sec"]), expect, rel_tol=1e-3, abs_tol=1e-3)
        else:
            assert r["throughput_tokens_per_sec"] == ""
    for r in out["cpu_operations_timing.csv"]:
        assert SEC.match(r["timestamp_sec"]) and MS.match(r["duration_ms"]) and KV.match(r["context"])
    for r in out["batch_utilization.csv"]:
        assert SEC.match(r["timestamp_sec"]) and r["phase"] in ("prefill", "decode", "mixed")
        for num, mx, pct in (("num_seqs", "max_num_seqs", "seq_utilization_pct"),
                             ("num_tokens", "max_tokens", "token_utilization_pct")):
            n, m = int(r[num]), int(r[mx])
            if m == 0:
                assert r[pct] == ""
            else:
                assert math.isclose(float(r[pct]), min(n, m) / m * 100, abs_tol=1e-3)
    for r in out["preemption_events.csv"]:
        assert SEC.match(r["timestamp_sec"]) and r["event"] in ("started", "preempted", "resumed", "finished", "evicted")
        assert KV.match(r["extra_info"]), r["extra_info"]
        if r["event"] in ("preempted", "evicted"):
            assert r["reason"], r
        else:
            assert r["reason"] == "", r
        if r["event"] != "preempted":
            assert r["running_time_sec"] == ""
    for r in out["request_lifecycle.csv"]:
        preempted = int(r["num_preemptions"]) > 0
        for k in ("preempted_sec", "resumed_sec", "preemption_delay_sec"):
            assert (r[k] != "") == preempted or (k == "resumed_sec" and preempted), (k, r)
        if r["finished_sec"] and r["started_sec"]:
            assert math.isclose(float(r["total_time_sec"]),
                                float(r["finished_sec"]) - float(r["started_sec"]), abs_tol=2e-6)
    for r in out["encoder_decoder_timing.csv"]:
        assert r["component"] in ("encoder", "decoder", "cross_attention") and MS.match(r["duration_ms"])

    fwd = _load(os.path.join(d, "forward_pass_summary.json"))
    assert set(fwd) >= {"prefill", "decode", "mixed"}
    for phase in ("prefill", "decode", "mixed"):
        assert set(fwd[phase]) >= set(PHASE_STATS), phase
        rows = [r for r in out["forward_pass_timing.csv"] if r["phase"] == phase]
        assert fwd[phase]["count"] == len(rows)
        assert fwd[phase]["total_tokens"] == sum(int(r["num_tokens"]) for r in rows)
        assert math.isclose(fwd[phase]["total_ms"], sum(float(r["forward_time_ms"]) for r in rows), abs_tol=1e-3)
    cpu = _load(os.path.join(d, "cpu_timing_summary.json"))
    ops = {r["operation"] for r in out["cpu_operations_timing.csv"]}
    assert set(cpu) == ops, "cpu_timing_summary.json is a closed object, one key per operation"
    for op, s in cpu.items():
        assert set(s) >= set(OP_STATS)
        assert s["count"] == sum(r["operation"] == op for r in out["cpu_operations_timing.csv"])
    batch = _load(os.path.join(d, "batch_utilization_summary.json"))
    assert set(batch) >= {
        "total_samples", "mean_seq_utilization_pct", "mean_token_utilization_pct", "underutilization_events",
        "underutilization_threshold_pct", "prefill_avg_utilization", "decode_avg_utilization",
        "mixed_avg_utilization", "max_num_seqs", "max_tokens", "mean_running_queue_len",
        "mean_waiting_queue_len", "max_waiting_queue_len",
    }
    assert batch["total_samples"] == len(out["batch_utilization.csv"])
    pre = _load(os.path.join(d, "preemption_summary.json"))
    assert set(pre) >= {
        "total_preemptions", "total_requests", "requests_preempted", "preemption_rate_pct", "preemption_reasons",
        "mean_running_time_before_preempt", "mean_resume_delay", "max_resume_delay",
    }
    assert pre["total_preemptions"] == sum(r["event"] == "preempted" for r in out["preemption_events.csv"])
    ed = _load(os.path.join(d, "encoder_decoder_summary.json"))
    assert ed["model_type"] in ("encoder_decoder", "decoder_only")
    for c in ("encoder", "decoder", "cross_attention"):
        assert set(ed[c]) >= set(COMPONENT_STATS)
    pcts = ed["encoder_pct"] + ed["decoder_pct"] + ed["cross_attention_pct"]
    assert math.isclose(pcts, 100.0, abs_tol=1e-6) or pcts == 0
    out.update(validate_trackers(d))
    manifest = _load(os.path.join(d, "profilemate_run.json"))
    for k in ("format_version", "profilemate_version", "started_at", "monotonic_start_ns", "pid", "host", "config",
              "profilers", "rows", "dropped", "finished"):
        assert k in manifest, k
    for name, rows in out.items():
        assert manifest["rows"][name] == len(rows), name
    return out


def validate_trackers(d: str) -> Dict[str, List[Dict[str, str]]]:
    """The CUDA graph and MoE routing files, where present (each CSV with its summary)."""
    out = {}
    for name, cols in TRACKER_COLUMNS.items():
        path, summary = os.path.join(d, name), os.path.join(d, TRACKER_SUMMARIES[name])
        assert os.path.exists(path) == os.path.exists(summary), f"{name} and its summary come together"
        if not os.path.exists(path):
            continue
        with open(path, newline="") as f:
            text = f.read()
        assert text.endswith("\n") and "\r\n" not in text, f"{name}: line ends"
        header = next(csv.reader([text.splitlines()[0]]))
        assert header[: len(cols)] == cols, f"{name}: header {header}"
        out[name] = read_csv(path)

    graphs = out.get("cuda_graph_events.csv")
    if graphs is not None:
        for r in graphs:
            assert SEC.match(r["timestamp_sec"]) and INT.match(r["batch_size"]), r
            if r["event"] == "capture":
                assert r["padded_batch_size"] == "" and MS.match(r["duration_ms"]), r
            elif r["event"] == "replay":
                assert INT.match(r["padded_batch_size"]) and int(r["padded_batch_size"]) >= int(r["batch_size"]), r
                assert r["duration_ms"] == "", r
            else:
                assert r["event"] == "eager" and r["padded_batch_size"] == "" and r["duration_ms"] == "", r
        s = _load(os.path.join(d, "cuda_graph_summary.json"))
        assert set(s) >= {"captures", "replays", "eager_steps", "replay_rate_pct", "mean_padding_pct", "capture_time_ms"}
        for key, event in (("captures", "capture"), ("replays", "replay"), ("eager_steps", "eager")):
            assert s[key] == sum(r["event"] == event for r in graphs), key
        total = sum(float(r["duration_ms"]) for r in graphs if r["event"] == "capture")
        assert math.isclose(s["capture_time_ms"], total, abs_tol=1e-3)
    moe = out.get("moe_expert_routing.csv")
    if moe is not None:
        for r in moe:
            assert SEC.match(r["timestamp_sec"]) and INT.match(r["layer"]) and INT.match(r["expert_id"]), r
            assert INT.match(r["num_tokens"]) and int(r["num_tokens"]) > 0, r
        s = _load(os.path.join(d, "moe_expert_summary.json"))
        assert set(s) >= {"layers", "most_imbalanced_layers", "max_over_mean"}
        assert set(s["layers"]) == {r["layer"] for r in moe}
        for stats in s["layers"].values():
            assert set(stats) >= {"tokens_per_expert", "max_over_mean", "coefficient_of_variation"}
    return out
