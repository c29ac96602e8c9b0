"""The CUDA graph and MoE routing trackers, in real vLLM.

MoE: a tiny random Mixtral (2 MoE layers, 8 experts, top-2) served in-process and with the
engine in its own processes; its routing rows against the step's scheduled tokens and vLLM's own
per-step counts. Dense: the tiny Llama runs write no tracker file. CUDA graphs: a CPU cannot
capture or replay one, so vLLM's own dispatcher and capture loop are driven as a GPU worker runs
them (``drivers/cuda_graphs.py``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import contract
import tiny_mixtral
from conftest import HERE, REPORT, Run, run_vllm

LAYERS = tiny_mixtral.NUM_LAYERS
EXPERTS = tiny_mixtral.NUM_EXPERTS
TOP_K = tiny_mixtral.TOP_K


def moe_records(rows: List[Dict[str, str]]) -> List[Tuple[float, int, Dict[int, int]]]:
    """The routing records: runs of rows with the same time and layer -> (time, layer, counts)."""
    out: List[Tuple[float, int, Dict[int, int]]] = []
    key = None
    for r in rows:
        k = (r["timestamp_sec"], r["layer"])
        if k != key:
            out.append((float(r["timestamp_sec"]), int(r["layer"]), {}))
            key = k
        out[-1][2][int(r["expert_id"])] = int(r["num_tokens"])
    return out


def model_part(run: Run) -> Path:
    """The part of the process that ran the model (in-process: the only one)."""
    for part in (run.dir / "parts").glob("*/*"):
        info = json.loads((part / "part.json").read_text())
        if info["role"] in ("main", "worker"):
            if info["role"] == "worker" or not run.counts["multiprocessing"]:
                return part
    raise AssertionError("no model part")


def test_moe_routing_per_step_and_layer_equals_the_scheduled_tokens(moe: Run):
    files = contract.validate(str(moe.dir))
    fwd = files["forward_pass_timing.csv"]
    steps = moe.counts["iterations"]
    assert len(fwd) == len(steps) > 0
    records = moe_records(files["moe_expert_routing.csv"])
    starts = [float(r["timestamp_sec"]) for r in fwd]

    # Each record belongs to the step whose forward pass started last before it.
    per_step: Dict[int, Dict[int, Dict[int, int]]] = defaultdict(dict)
    for t, layer, counts in records:
        i = max(j for j, s in enumerate(starts) if s <= t)
        assert layer not in per_step[i], f"two records of layer {layer} in step {i}"
        per_step[i][layer] = counts
    assert sorted(per_step) == list(range(len(steps))), "every step, and only steps, routed"
    for i, (row, (ctx_reqs, ctx_tokens, gen_reqs, gen_tokens)) in enumerate(zip(fwd, steps)):
        assert int(row["num_tokens"]) == ctx_tokens + gen_tokens
        assert sorted(per_step[i]) == list(range(LAYERS)), i
        for layer, counts in per_step[i].items():
            assert all(0 <= e < EXPERTS for e in counts), counts
            assert sum(counts.values()) == (ctx_tokens + gen_tokens) * TOP_K, (i, layer, counts)

    # The summary is what the rows say.
    summary = json.load(open(os.path.join(moe.dir, "moe_expert_summary.json")))
    assert summary["records"] == len(records) == len(steps) * LAYERS
    ratios = {}
    for layer in range(LAYERS):
        tokens = [0] * EXPERTS
        for _, l, counts in records:
            if l == layer:
                for e, n in counts.items():
                    tokens[e] += n
        stats = summary["layers"][str(layer)]
        mean = sum(tokens) / EXPERTS
        sd = math.sqrt(sum((t - mean) ** 2 for t in tokens) / EXPERTS)
        assert stats["tokens_per_expert"] == tokens
        assert stats["total_tokens"] == sum(tokens) == sum(int(r["num_tokens"]) for r in fwd) * TOP_K
        assert math.isclose(stats["max_over_mean"], max(tokens) / mean)
        assert math.isclose(stats["coefficient_of_variation"], sd / mean)
        assert stats["hottest_expert"] == tokens.index(max(tokens))
        assert stats["coldest_expert"] == tokens.index(min(tokens))
        ratios[layer] = stats["max_over_mean"]
    order = sorted(ratios, key=lambda l: (-ratios[l], l))
    assert summary["most_imbalanced_layers"] == order
    assert math.isclose(summary["max_over_mean"], max(ratios.values()))

    part = json.loads((model_part(moe) / "part.json").read_text())
    report = part["moe_expert"]
    assert report["steps_routed"] == len(steps) and report["steps_without_routing"] == 0
    assert report["out_of_range_ids"] == 0
    assert [report["layers"][str(l)]["name"] for l in range(LAYERS)] == [
        f"model.layers.{l}.block_sparse_moe.experts" for l in range(LAYERS)
    ]
    mode = "multi-process" if moe.counts["multiprocessing"] else "in-process"
    REPORT.append(
        f"MoE ({mode}, tiny Mixtral {LAYERS} layers x {EXPERTS} experts, top-{TOP_K}): {len(steps)} vLLM steps, "
        f"{len(records)} routing records ({LAYERS} per step), {len(files['moe_expert_routing.csv'])} rows; "
        f"per step and layer sum = scheduled tokens x {TOP_K} (total {summary['layers']['0']['total_tokens']} per layer); "
        f"max/mean {', '.join(f'layer {l} {r:.2f}' for l, r in ratios.items())}"
    )


def routing_per_step(run: Run) -> List[Dict[int, Dict[int, int]]]:
    """Per step (vLLM's), per layer: tokens per expert, from the routing and forward rows."""
    files = contract.validate(str(run.dir))
    starts = [float(r["timestamp_sec"]) for r in files["forward_pass_timing.csv"]]
    per_step: List[Dict[int, Dict[int, int]]] = [dict() for _ in starts]
    for t, layer, counts in moe_records(files["moe_expert_routing.csv"]):
        i = max(j for j, s in enumerate(starts) if s <= t)
        assert layer not in per_step[i], f"two records of layer {layer} in step {i}"
        per_step[i][layer] = counts
    return per_step


def test_moe_routing_under_torch_compile_equals_the_eager_run(moe_compiled: Run, inproc_moe: Run):
    """torch.compile traces the router once; the counting op it puts into the graph counts every
    time the graph runs: the same rows as the eager run, step by step."""
    run = moe_compiled
    backend = "inductor" if "VLLM_CACHE_ROOT" in run.env else "Dynamo's eager backend, VLLM_CPU_CI_ENV=1"
    mp = run.counts["multiprocessing"]
    steps = run.counts["iterations"]
    compiled = routing_per_step(run)
    assert len(compiled) == len(steps) > 0
    for i, (ctx_reqs, ctx_tokens, gen_reqs, gen_tokens) in enumerate(steps):
        assert sorted(compiled[i]) == list(range(LAYERS)), i
        for layer, counts in compiled[i].items():
            assert sum(counts.values()) == (ctx_tokens + gen_tokens) * TOP_K, (i, layer, counts)
    if not mp:
        # In-process the requests all wait for the first step: the eager run's schedule, so its
        # rows compare step by step. (With the engine in its own process they arrive while it
        # steps, and the steps differ from run to run.)
        assert steps == inproc_moe.counts["iterations"], "the same schedule as the eager run"
        assert compiled == routing_per_step(inproc_moe), "compiled and eager runs route the same tokens alike"
    assert run.counts["outputs"] == inproc_moe.counts["outputs"]
    part = json.loads((model_part(run) / "part.json").read_text())
    report = part["moe_expert"]
    assert report["compiled"] is True and report["steps_routed"] == len(steps)
    assert report["steps_without_routing"] == 0
    line = [l for l in run.instrumentation_lines() if "MoE layers found" in l][0]
    assert "torch.compile: counted inside the compiled graph (op profilemate::moe_count)" in line, line
    summary = json.load(open(os.path.join(run.dir, "moe_expert_summary.json")))
    tokens = sum(c + g for _, c, _, g in steps)
    REPORT.append(
        f"MoE under torch.compile ({'multi-process' if mp else 'in-process'}, {backend}): {summary['records']} "
        f"routing records over {len(steps)} steps, per step and layer sum = scheduled tokens x {TOP_K} ({tokens} "
        f"tokens, {summary['layers']['0']['total_tokens']} per layer)"
        f"{'' if mp else ', rows equal to the eager run step by step'}; "
        f"engine start {run.counts['engine_start_sec']:.1f} s"
    )


def test_moe_log_lines_say_what_each_process_found(moe: Run):
    lines = moe.instrumentation_lines()
    found = f"MoE routing: FusedMoERouter.select_experts hooked, {LAYERS} MoE layers found (layers 0-{LAYERS - 1}, {EXPERTS} experts, top-{TOP_K})"
    graphs = "CUDA graphs: CudagraphDispatcher.dispatch hooked, graphs off in this process (cudagraph_mode NONE): nothing recorded"
    model_role = "worker" if moe.counts["multiprocessing"] else "main"
    for l in lines:
        role = l.split("profilemate: ")[1].split(" ")[0]
        assert "could not instrument: nothing" in l, l
        if role == model_role:
            assert found in l and graphs in l, l
            assert "FusedMoERouter.select_experts" in l.split("instrumented ")[1].split(";")[0], l
        else:
            assert "MoE routing: no model in this process" in l, l
            assert "CUDA graphs: no model runner in this process" in l, l
    assert not any(n.startswith("cuda_graph") for n in os.listdir(moe.dir))
    REPORT.extend(l[l.index("profilemate:") :] for l in lines)


def test_moe_hooks_leave_vllms_tokens_unchanged(mixtral, tmp_path, inproc_moe: Run, mp_moe: Run):
    plain = run_vllm(mixtral, tmp_path, "moe", multiprocessing=False, profiling=False)
    assert plain.counts["plugin"]["wrapped"] == []
    assert len(plain.counts["outputs"]) == len(plain.counts["requests"])
    for run in (inproc_moe, mp_moe):
        assert run.counts["outputs"] == plain.counts["outputs"]
        assert run.counts["plugin"]["hook_errors"] == {}
    # In-process, the requests all wait for the first step: the same steps, too. (With the
    # engine in its own process they arrive while it steps.)
    assert inproc_moe.counts["iterations"] == plain.counts["iterations"]
    generated = sum(o["output_tokens"] for o in plain.counts["outputs"].values())
    REPORT.append(f"MoE: {generated} tokens generated without profiling = in-process = multi-process, token for token")


def test_dense_model_writes_no_tracker_files(basic: Run):
    lines = basic.instrumentation_lines()
    model_role = "worker" if basic.counts["multiprocessing"] else "main"
    model_lines = [l for l in lines if l.split("profilemate: ")[1].startswith(model_role + " ")]
    assert len(model_lines) == 1, lines
    line = model_lines[0]
    assert "no MoE layer in this model" in line, line
    assert "graphs off in this process (cudagraph_mode NONE): nothing recorded" in line, line
    for d in [basic.dir, *(basic.dir / "parts").glob("*/*")]:
        names = os.listdir(d)
        assert not [n for n in names if n.startswith(("moe_", "cuda_graph_"))], (d, names)
    manifest = json.load(open(os.path.join(basic.dir, "profilemate_run.json")))
    assert "moe_expert" not in manifest["profilers"] and "cuda_graph" not in manifest["profilers"]


def test_cuda_graph_hooks_on_vllms_dispatcher_and_capture_loop(tmp_path):
    out, result = tmp_path / "profile", tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_PROFILING_", "PROFILEMATE_"))}
    env.update(HF_HUB_OFFLINE="1", VLLM_PROFILING_DIR=str(out))
    cmd = [sys.executable, str(HERE / "drivers" / "cuda_graphs.py"), str(result)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r = json.loads(result.read_text())
    assert all(r["wrapped"].values()), r["wrapped"]
    assert r["errors"] == {} and r["merged"]
    # vLLM's keys for capture sizes 1, 2, 4, 8 and at most 4 sequences: PIECEWISE graphs for
    # mixed batches, FULL graphs for uniform decode batches.
    assert r["captured"] == [["PIECEWISE", 8], ["PIECEWISE", 4], ["PIECEWISE", 2], ["PIECEWISE", 1],
                             ["FULL", 4], ["FULL", 2], ["FULL", 1]]  # fmt: skip
    assert r["decisions"] == [[3, "FULL", 4], [5, "PIECEWISE", 8], [20, "NONE", 20], [1, "FULL", 1]]

    files = contract.validate_trackers(str(out))
    rows = files["cuda_graph_events.csv"]
    captures = [r_ for r_ in rows if r_["event"] == "capture"]
    # One row per graph vLLM's capture loop captured (not the memory-profiling one), then the
    # Model Runner V2 stand-in's two; each lasted at least its two 2 ms dummy runs (3 ms for V2).
    assert [int(c["batch_size"]) for c in captures] == [n for _, n in r["captured"]] + [16, 12]
    assert all(float(c["duration_ms"]) >= 4.0 for c in captures[:-2])
    assert all(float(c["duration_ms"]) >= 6.0 for c in captures[-2:])
    steps = [(x["event"], int(x["batch_size"]), x["padded_batch_size"]) for x in rows if x["event"] != "capture"]
    assert steps == [("replay", 3, "4"), ("replay", 5, "8"), ("eager", 20, ""), ("replay", 1, "1")]
    times = [float(x["timestamp_sec"]) for x in rows]
    assert times == sorted(times)
    summary = json.load(open(out / "cuda_graph_summary.json"))
    assert (summary["captures"], summary["replays"], summary["eager_steps"]) == (9, 3, 1)
    assert summary["replay_rate_pct"] == 75.0
    assert math.isclose(summary["mean_padding_pct"], (1 / 4 + 3 / 8 + 0) / 3 * 100)
    assert summary["captured_sizes"] == [1, 2, 4, 8, 12, 16] and summary["max_eager_batch_size"] == 20
    assert "graphs on (cudagraph_mode FULL_AND_PIECEWISE)" in r["line"], r["line"]
    part = json.loads((Path(r["part"]) / "part.json").read_text())
    assert part["cuda_graph"] == {
        "mode": "FULL_AND_PIECEWISE", "on": True, "capture": 9, "replay": 3, "eager": 1, "unrecorded": 0
    }  # fmt: skip
    REPORT.append(
        f"CUDA graphs (vLLM's dispatcher and capture loop on the CPU): {summary['captures']} capture rows "
        f"({summary['capture_time_ms']:.1f} ms), replays 3->4, 5->8, 1->1 and eager 20: "
        f"replay rate {summary['replay_rate_pct']:.0f} %, mean padding {summary['mean_padding_pct']:.1f} %"
    )


def test_switching_the_trackers_off_wraps_nothing_for_them(tmp_path):
    code = textwrap.dedent(
        """
        import json, sys
        import profilemate_vllm
        profilemate_vllm.register()
        import vllm.v1.cudagraph_dispatcher, vllm.v1.worker.gpu_model_runner
        import vllm.v1.worker.gpu.model_runner, vllm.v1.worker.gpu.cudagraph_utils
        import vllm.model_executor.layers.fused_moe.router.fused_moe_router
        import vllm.model_executor.layers.fused_moe.runner.moe_runner
        import profilemate_vllm._plugin as P
        from profilemate_vllm._state import STATE as S
        from profilemate_vllm._hooks import SPECS, WRAPPED_ATTR, owner
        wrapped = {}
        for s in SPECS:
            if s.module in sys.modules:  # None: its module is not loaded here
                func = owner(s, sys.modules[s.module]).__dict__[s.method]
                wrapped[s.key] = hasattr(func, WRAPPED_ATTR)
            else:
                wrapped[s.key] = None
        rec = S.native.Recorder(sys.argv[1], "host", ["cuda_graph", "moe_expert"])
        print(json.dumps({"wrapped": wrapped, "trackers": rec.trackers, "line": P.instrumentation_line(),
                          "specs": {s.key: list(s.trackers) for s in SPECS}}))
        rec.shutdown()
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_PROFILING_", "PROFILEMATE_"))}
    env.update(VLLM_PROFILING_DIR=str(tmp_path / "out"), VLLM_PROFILING_DISABLE="cuda_graph,moe_expert")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "part")], capture_output=True, text=True,
                       env=env, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    tracker_hooks = [k for k, t in r["specs"].items() if t]
    assert len(tracker_hooks) == 9
    assert all(r["wrapped"][k] is False for k in tracker_hooks), r["wrapped"]
    others = [k for k, t in r["specs"].items() if not t and r["wrapped"][k] is not None]
    assert "GPUModelRunner.execute_model" in others and "GPUModelRunner[V2].prepare_inputs" in others
    assert all(r["wrapped"][k] for k in others), r["wrapped"]
    assert r["trackers"] == [], "the environment's switch wins over the binding's request"
    assert "CUDA graphs: switched off" in r["line"] and "MoE routing: switched off" in r["line"], r["line"]
    assert not any(os.path.exists(tmp_path / "part" / f) for f in ("cuda_graph_events.csv", "moe_expert_routing.csv"))
