"""Pieces that need no engine: the phase rule, post-import hooks, configuration errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace as NS

from profilemate_vllm._phase import DECODE, MIXED, PREFILL, classify
from profilemate_vllm._state import STATE as S


def so(new=(), cached=(), outputs=(), scheduled=None, resumed=(), spec=None, computed=None, all_tokens=None,
       finished=(), prefill_tokens=None):
    scheduled = scheduled or {}
    prefill_tokens = prefill_tokens or {}
    return NS(
        scheduled_new_reqs=[
            NS(req_id=r, prompt_len=scheduled[r], prefill_token_ids=prefill_tokens.get(r)) for r in new
        ],
        scheduled_cached_reqs=NS(
            req_ids=list(cached),
            num_output_tokens=list(outputs),
            resumed_req_ids=set(resumed),
            num_computed_tokens=list(computed or [0] * len(cached)),
            all_token_ids=all_tokens or {},
        ),
        num_scheduled_tokens=scheduled,
        total_num_scheduled_tokens=sum(scheduled.values()),
        scheduled_spec_decode_tokens=spec or {},
        finished_req_ids=set(finished),
    )


def test_phase_from_the_request_mix():
    def classify1(s):
        return classify(s, {})

    assert classify1(so(new=["a"], scheduled={"a": 10})) == (PREFILL, 1)
    assert classify1(so(cached=["a", "c"], outputs=[3, 7], scheduled={"a": 1, "c": 1})) == (DECODE, 2)
    # Chunked prefill: a prompt chunk of b next to a decode of a.
    assert classify1(so(cached=["a", "b"], outputs=[4, 0], scheduled={"a": 1, "b": 36})) == (MIXED, 2)
    assert classify1(so(new=["n"], cached=["a"], outputs=[4], scheduled={"a": 1, "n": 30})) == (MIXED, 2)
    # The last chunk of a prompt may be one token: still prefill (no output token yet).
    assert classify1(so(cached=["b", "a"], outputs=[0, 5], scheduled={"b": 1, "a": 1})) == (MIXED, 2)
    assert classify1(so(cached=["b"], outputs=[0], scheduled={"b": 1})) == (PREFILL, 1)
    # A resumed request recomputes: prefill, even with one token scheduled.
    assert classify1(so(cached=["c"], outputs=[12], scheduled={"c": 1}, resumed=["c"])) == (PREFILL, 1)
    # Speculative decoding: 1 + drafts tokens is a decode step; more is a chunk.
    assert classify1(so(cached=["a"], outputs=[20], scheduled={"a": 4}, spec={"a": [1, 2, 3]})) == (DECODE, 1)
    assert classify1(so(cached=["a"], outputs=[20], scheduled={"a": 9}, spec={"a": [1, 2, 3]})) == (PREFILL, 1)


def test_recompute_in_one_token_chunks_is_prompt_processing_until_caught_up():
    """The issue's case: a request with 87 output tokens resumes (10 prompt tokens, 97 in all) and
    recomputes one token per step next to another request's decode."""
    table = {}
    first = so(cached=["a", "r"], outputs=[40, 87], scheduled={"a": 1, "r": 1}, resumed=["r"], computed=[49, 0],
               all_tokens={"r": list(range(97))})  # fmt: skip
    assert classify(first, table) == (MIXED, 2) and table == {"r": 97}
    # Later steps do not name it as resumed: its computed tokens say it is still recomputing.
    for computed in (1, 10, 95):
        step = so(cached=["a", "r"], outputs=[41, 87], scheduled={"a": 1, "r": 1}, computed=[50, computed])
        assert classify(step, table) == (MIXED, 2), computed
    # Its last recomputed token alone is still prefill; then it decodes the token it sampled last.
    assert classify(so(cached=["r"], outputs=[87], scheduled={"r": 1}, computed=[95]), table) == (PREFILL, 1)
    assert classify(so(cached=["r"], outputs=[87], scheduled={"r": 1}, computed=[96]), table) == (DECODE, 1)
    assert table == {}
    # With draft tokens: verification is decode once caught up.
    table = {"s": 30}
    assert classify(so(cached=["s"], outputs=[20], scheduled={"s": 1}, computed=[28]), table) == (PREFILL, 1)
    step = so(cached=["s"], outputs=[20], scheduled={"s": 3}, computed=[29], spec={"s": [5, 6]})
    assert classify(step, table) == (DECODE, 1) and table == {}
    # Model Runner V2 sends a resumed request as a new one with all its tokens.
    table = {}
    step = so(new=["v"], scheduled={"v": 1}, prefill_tokens={"v": list(range(30))})
    step.scheduled_new_reqs[0].prompt_len = 10
    assert classify(step, table) == (PREFILL, 1) and table == {"v": 30}
    assert classify(so(cached=["v"], outputs=[20], scheduled={"v": 1}, computed=[5]), table) == (PREFILL, 1)
    # A request that finishes (or is aborted) while recomputing leaves the table.
    forget = so(cached=["w"], outputs=[3], scheduled={"w": 1}, computed=[15], finished=["v"])
    table["w"] = 16
    assert classify(forget, table) == (DECODE, 1) and table == {}


def test_post_import_hook_patches_when_the_module_is_imported(tmp_path):
    (tmp_path / "late_module.py").write_text("def f():\n    return 1\n")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from profilemate_vllm._imports import PostImportHooks
        hooks = PostImportHooks()
        hooks.when_imported("late_module", lambda m: setattr(m, "f", lambda: 2))
        assert "late_module" not in sys.modules and hooks.pending() == ["late_module"]
        import late_module
        assert late_module.f() == 2 and hooks.pending() == []
        print("ok")
        """
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.stdout.strip() == "ok", p.stderr


def test_configuration_errors_name_the_seed_variable(monkeypatch):
    from profilemate_vllm import _native

    monkeypatch.setenv("VLLM_PROFILING_DIR", "/tmp/x")
    monkeypatch.setenv("VLLM_PROFILING_LOG_INTERVAL", "often")
    try:
        _native.resolve_config()
        raise AssertionError("accepted a malformed value")
    except ValueError as e:
        assert "VLLM_PROFILING_LOG_INTERVAL" in str(e) and "often" in str(e)
    monkeypatch.setenv("VLLM_PROFILING_LOG_INTERVAL", "5")
    monkeypatch.setenv("VLLM_PROFILING_USE_CUDA_EVENTS", "0")
    config = json.loads(_native.resolve_config())
    assert config["dir"] == "/tmp/x" and config["log_interval"] == 5 and config["backend"] == "host"


def test_a_malformed_setting_disables_profiling_without_stopping_the_host(tmp_path):
    code = textwrap.dedent(
        """
        import logging, profilemate_vllm
        logging.basicConfig(level=logging.INFO)
        profilemate_vllm.register()
        print("active", profilemate_vllm.is_active())
        """
    )
    env = {"VLLM_PROFILING_DIR": str(tmp_path / "out"), "VLLM_PROFILING_DISABLE": "forward", "PATH": ""}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "active False" in p.stdout, p.stderr
    assert "VLLM_PROFILING_DISABLE" in p.stderr and not (tmp_path / "out").exists()


def test_moe_counts_never_index_out_of_range_and_leave_padding_out():
    """The routing counter on its own, on the CPU: the layer number from vLLM's layer name,
    padding rows beyond the step's tokens left out, unexpected ids counted apart, two calls of
    one layer in a step added, counts zeroed between steps, EPLB routers not counted."""
    import torch

    from profilemate_vllm._trackers import MoeRouting, ranges

    class Rec:
        def __init__(self):
            self.rows = []

        def moe_layer(self, layer, counts):
            self.rows.append((layer, list(counts)))

    router_a = NS(global_num_experts=4, top_k=2, eplb_state=None)
    router_b = NS(global_num_experts=4, top_k=2, eplb_state=None)
    router_eplb = NS(global_num_experts=4, top_k=2, eplb_state=object())
    cc = NS(
        static_all_moe_layers=["model.layers.7.mlp.experts", "model.layers.7.other.experts", "model.layers.9.mlp.experts"],
        static_forward_context={
            "model.layers.7.mlp.experts": NS(router=router_a),
            "model.layers.7.other.experts": NS(router=router_b),  # number taken: the next free one
            "model.layers.9.mlp.experts": NS(router=router_eplb),
        },
    )
    moe = MoeRouting()
    moe.discover(cc)
    assert {l.index: l.name for l in moe.layers.values()} == {
        7: "model.layers.7.mlp.experts",
        8: "model.layers.7.other.experts",
        9: "model.layers.9.mlp.experts",
    }
    assert moe.recordable()
    rec = Rec()
    # Step 1: 3 tokens scheduled, a 4th padding row; ids -1 and 4 (out of range) counted apart.
    moe.begin_step(3)
    ids = torch.tensor([[0, 1], [1, -1], [3, 4], [2, 2]], dtype=torch.int32)
    moe.route(router_a, (), {"router_logits": torch.zeros(4, 4)}, ids)
    moe.route(router_a, (), {}, torch.tensor([[0, 0]]))  # a second call of the same layer (a microbatch)
    moe.route(router_eplb, (), {}, torch.tensor([[0, 1]]))
    moe.end_step(rec)
    assert rec.rows == [(7, [3, 2, 0, 1])]
    assert moe.out_of_range_ids == 2
    # Step 2: the counts start from zero; an int64 tensor from another layer.
    moe.begin_step(2)
    moe.route(router_b, (), {}, torch.tensor([[3, 2], [2, 1]], dtype=torch.int64))
    moe.end_step(rec)
    assert rec.rows[1:] == [(8, [0, 1, 2, 1])]
    # Step 3: nothing routed (a CUDA graph replay runs no Python).
    moe.begin_step(1)
    moe.end_step(rec)
    assert moe.steps_routed == 2 and moe.steps_without_routing == 1
    assert "2 MoE layers found (layers 7-8, 4 experts, top-2)" in moe.describe()
    assert "1 with EPLB not counted" in moe.describe()
    assert ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_moe_counting_op_counts_each_run_of_a_compiled_graph(monkeypatch):
    """A router traced by torch.compile: the counting op in the graph counts at every run (the
    wrapper's Python does not run then), with functionalization (``aot_eager``) and without."""
    import torch

    from profilemate_vllm import _hooks
    from profilemate_vllm._trackers import MoeRouting

    class Router:
        global_num_experts, top_k, eplb_state = 4, 2, None

    class Rec:
        def __init__(self):
            self.rows = []

        def moe_layer(self, layer, counts):
            self.rows.append((layer, list(counts)))

    router = Router()
    moe = MoeRouting()
    moe.built(NS(router=router, layer_name="model.layers.3.block_sparse_moe.experts"))
    monkeypatch.setattr(S, "moe", moe)
    monkeypatch.setattr(S, "moe_elsewhere", None)
    select = _hooks._select_experts(lambda self, hidden, logits: torch.topk(logits, 2))

    def forward(hidden, logits):
        weights, ids = select(router, hidden, logits)
        return hidden * 2 + weights.sum()

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0], [0.0, 5.0, 4.0, 0.0]])
    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        compiled = torch.compile(forward, backend=backend, fullgraph=True)
        rec = Rec()
        monkeypatch.setattr(S, "in_step", False)
        compiled(torch.ones(3, 1), logits)  # vLLM's profiling run: not a step, not counted
        for ntok in (3, 2):  # the second step has a padding row
            monkeypatch.setattr(S, "in_step", True)
            moe.begin_step(ntok)
            compiled(torch.ones(3, 1), logits)
            monkeypatch.setattr(S, "in_step", False)
            moe.end_step(rec)
        assert rec.rows == [(3, [1, 2, 2, 1]), (3, [1, 1, 1, 1])], (backend, rec.rows)


def test_a_cached_compiled_model_without_the_counting_op_is_compiled_again(monkeypatch):
    """vLLM's AOT compile cache: an artifact whose inlined sources lack the router's wrapper (a
    run without profiling compiled it) is refused; one with it is used; patching twice wraps once."""
    import vllm.compilation.decorators as decorators

    from profilemate_vllm import _hooks
    from profilemate_vllm import _plugin as P
    from profilemate_vllm._trackers import MoeRouting, guard_compiled_artifacts

    def artifact(*modules):
        sources = [NS(module=m) for m in modules]
        return NS(source_info=lambda: NS(inlined_sources=sources))

    cache = {}

    def _try_load_aot_compiled_fn(model, aot_compilation_path):
        return cache.get(aot_compilation_path)

    monkeypatch.setattr(decorators, "_try_load_aot_compiled_fn", _try_load_aot_compiled_fn)
    monkeypatch.setattr(S, "moe", MoeRouting())
    assert guard_compiled_artifacts(P.moe_artifact_refused) == "guarded"
    wrapped = decorators._try_load_aot_compiled_fn
    assert guard_compiled_artifacts(P.moe_artifact_refused) == "guarded" and decorators._try_load_aot_compiled_fn is wrapped
    cache["plain"] = artifact("vllm.model_executor.models.mixtral")
    cache["profiled"] = artifact("vllm.model_executor.models.mixtral", "profilemate_vllm._hooks")
    assert wrapped(None, "plain") is None and S.moe.refused_artifacts == 1
    assert wrapped(None, "profiled") is cache["profiled"]
    assert wrapped(None, "missing") is None and S.moe.refused_artifacts == 1
    _hooks.uninstall()
    assert decorators._try_load_aot_compiled_fn is _try_load_aot_compiled_fn


def test_a_fault_in_a_tracker_hook_is_caught_and_vllms_result_returned(monkeypatch):
    from profilemate_vllm import _hooks
    from profilemate_vllm import _plugin as P

    def broken(*a, **k):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(S, "errors", {})
    monkeypatch.setattr(P, "moe_routed", broken)
    monkeypatch.setattr(P, "graph_captured", broken)
    monkeypatch.setattr(S, "capturing", 1)
    monkeypatch.setattr(S, "rec", object())  # an open recorder: nothing to open
    result = ("weights", "ids")
    select = _hooks._select_experts(lambda self, *a, **k: result)
    assert select(object(), "hidden", router_logits="logits", input_ids=None) is result
    capture = _hooks._warmup_and_capture(lambda self, desc, *a, **k: "captured")
    assert capture(object(), NS(num_tokens=8), "PIECEWISE") == "captured"
    assert S.errors == {"FusedMoERouter.select_experts": 1, "GPUModelRunner._warmup_and_capture": 1}


class FakeDevice:
    """A GPU stand-in for ``CudaTimer``: events complete when the test advances the device, and
    any call that would block the host fails the test."""

    def __init__(self):
        self.recorded = []  # events in the order the host recorded them
        self.done = 0  # how many of them the device has reached
        self.created = 0
        device = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing, "events must be created with timing enabled"
                device.created += 1
                self.at_ms = None
                self.index = None

            def record(self, stream=None):
                self.index = len(device.recorded)
                self.at_ms = 1.5 * self.index  # the device runs 1.5 ms between two records
                device.recorded.append(self)

            def query(self):
                return self.index is not None and self.index < device.done

            def elapsed_time(self, end):
                assert self.query() and end.query(), "elapsed_time before both events completed"
                return end.at_ms - self.at_ms

            def synchronize(self):
                raise AssertionError("CudaTimer must never wait for an event")

            wait = synchronize

        def synchronize(*_a, **_k):
            raise AssertionError("CudaTimer must never synchronise the device")

        self.torch = NS(cuda=NS(Event=Event, synchronize=synchronize, current_stream=lambda: None))


class FakeRecorder:
    def __init__(self):
        self.forward_rows = []
        self.components = []

        self.steps = []

    def forward_of_step(self, step, phase, nseq, ntok, ns):
        from profilemate_vllm._state import DECODER

        self.steps.append(step)
        self.forward_rows.append((phase, nseq, ntok, ns))
        self.components.append((DECODER, ns, "language_model"))


def test_cuda_timer_resolves_steps_in_order_without_waiting(monkeypatch):
    """The GPU forward-pass timing logic (``_cuda.CudaTimer``) on a stand-in device: rows appear
    only once the device reached a step's end event, oldest first, with the device time between
    the events; events are reused from a pool; past the pending bound the oldest step is dropped
    and counted; at shutdown, steps the device has not finished are dropped and counted. No call
    may block the host (the stand-in fails on any synchronisation)."""
    from profilemate_vllm import _cuda
    from profilemate_vllm._state import DECODER

    monkeypatch.setattr(S, "f_fwd", True)
    monkeypatch.setattr(S, "f_enc", True)
    device = FakeDevice()
    timer = _cuda.CudaTimer(2, S)  # at most max(8, 2 * 4) = 8 steps pending
    timer._torch = device.torch
    rec = FakeRecorder()

    for step in range(3):
        timer.start()
        timer.stop((DECODE, 4, 4 + step, 10 + step))
    timer.poll(rec)
    assert rec.forward_rows == []  # the device has not finished any step
    device.done = 2  # the first step's start and end events
    timer.poll(rec)
    assert rec.forward_rows == [(DECODE, 4, 4, 1_500_000)]
    assert rec.components == [(DECODER, 1_500_000, "language_model")]
    device.done = 6
    timer.poll(rec)
    assert [r[2] for r in rec.forward_rows] == [4, 5, 6]
    # Each row is recorded in the step its pass ran in, not the one open when it resolved.
    assert rec.steps == [10, 11, 12]
    assert device.created == 6  # three pairs so far

    # Finished pairs are reused: three more steps create no new event.
    for step in range(3):
        timer.start()
        timer.stop((MIXED, 2, 64, 0))
    assert device.created == 6
    device.done = len(device.recorded)
    timer.poll(rec)
    assert len(rec.forward_rows) == 6 and timer.dropped == 0

    # The device falls behind: more than 8 steps pending drops the oldest, counted.
    for _ in range(10):
        timer.start()
        timer.stop((PREFILL, 1, 512, 0))
    assert timer.dropped == 2 and len(timer._pending) == 8
    # Shutdown with the device still behind: what it has not reached is dropped and counted.
    device.done = len(device.recorded) - 4  # the last two steps are not finished
    timer.drain(rec)
    assert len(rec.forward_rows) == 6 + 6 and timer.dropped == 2 + 2
    assert not timer._pending


def test_trackers_record_on_the_first_rank_of_a_parallel_group_only(monkeypatch):
    """Tensor-parallel ranks route the same tokens and run the same steps: only rank 0 records the
    MoE and CUDA graph trackers, so the merged files count each token and step once; the others
    say why in their log line."""
    from profilemate_vllm import _plugin as P

    runner = NS(
        compilation_config=NS(static_all_moe_layers=["model.layers.0.block_sparse_moe.experts"]),
        cudagraph_dispatcher=NS(keys_initialized=True, cudagraph_mode=NS(name="FULL")),
    )
    for name, value in [("f_moe", True), ("f_graph", True), ("moe", None), ("model_seen", False),
                        ("graphs_on", False), ("graph_mode", ""), ("graph_elsewhere", None),
                        ("moe_elsewhere", None), ("graph_counts", dict.fromkeys(S.graph_counts, 0))]:
        monkeypatch.setattr(S, name, value)

    monkeypatch.setattr(P, "parallel_ranks", lambda: (1, 0))
    P.model_ready(runner, False)
    assert S.moe is None and not S.graphs_on
    P.moe_routed(NS(), (), {}, (None, None))  # a router call on this rank: ignored
    P.graph_captured(8, 1_000_000)
    assert S.moe is None and S.graph_counts["capture"] == 0
    assert P.moe_status() == "tensor-parallel rank 1: its routing is the same as rank 0's, recorded there"
    assert "tensor-parallel rank 1, pipeline rank 0" in P.graph_status()

    # A second pipeline stage's first tensor-parallel rank records its own MoE layers, not the
    # graph decisions of the steps the first stage already records.
    monkeypatch.setattr(S, "graph_elsewhere", None)
    monkeypatch.setattr(S, "moe_elsewhere", None)
    monkeypatch.setattr(P, "parallel_ranks", lambda: (0, 1))
    P.model_ready(runner, False)
    assert S.moe is not None and not S.graphs_on
    assert "pipeline rank 1" in P.graph_status() and "recorded there" not in P.moe_status()

    # Rank 0 of everything records both.
    monkeypatch.setattr(S, "graph_elsewhere", None)
    monkeypatch.setattr(P, "parallel_ranks", lambda: (0, 0))
    P.model_ready(runner, False)
    assert S.graphs_on and S.graph_mode == "FULL"


def test_instrumenting_twice_wraps_once_and_uninstrumenting_restores_vllm(tmp_path):
    code = textwrap.dedent(
        """
        import json
        import vllm.v1.core.sched.scheduler as sched
        original = sched.Scheduler.schedule
        import profilemate_vllm
        from profilemate_vllm._instrument import INSTRUMENTOR
        from profilemate_vllm._state import STATE, WRAPPED_ATTR
        profilemate_vllm.register()
        first = sched.Scheduler.schedule
        INSTRUMENTOR.instrument()
        profilemate_vllm.register()
        second = sched.Scheduler.schedule
        INSTRUMENTOR.uninstrument()
        restored = sched.Scheduler.schedule
        INSTRUMENTOR.instrument()
        again = sched.Scheduler.schedule
        print(json.dumps({
            "wrapped_once": first is second and getattr(first, WRAPPED_ATTR) is original,
            "restored": restored is original,
            "wrapped_again": getattr(again, WRAPPED_ATTR, None) is original,
            "version": STATE.vllm_version, "tested": STATE.vllm_tested,
        }))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_PROFILING_", "PROFILEMATE_"))}
    env["VLLM_PROFILING_DIR"] = str(tmp_path / "out")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r == {"wrapped_once": True, "restored": True, "wrapped_again": True, "version": "0.32.0", "tested": True}


def test_the_package_modules_import_each_other_as_a_tree():
    """No import circle among the plugin's modules (imports inside functions included)."""
    import ast
    import pathlib

    import profilemate_vllm

    root = pathlib.Path(profilemate_vllm.__file__).parent
    edges = {}
    for path in root.glob("*.py"):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module)
                else:
                    deps.update(a.name for a in node.names)
        edges[name] = {d for d in deps if (root / f"{d}.py").exists() and d != name}
    visiting, done = set(), set()

    def visit(n, path):
        assert n not in visiting, f"import circle: {' -> '.join(path + [n])}"
        if n in done:
            return
        visiting.add(n)
        for d in sorted(edges.get(n, ())):
            visit(d, path + [n])
        visiting.discard(n)
        done.add(n)

    for n in sorted(edges):
        visit(n, [])
    assert "_state" in edges and edges["_state"] == set()


def test_gpu_check_harness_skips_without_a_gpu_and_runs_its_cpu_side():
    """``tests/gpu_check.py`` (run on a GPU machine by scripts/gpu-check.sh): here, without a
    CUDA device, it says so and exits 2; on the CPU its MoE check and plumbing pass."""
    import pathlib

    import torch

    script = str(pathlib.Path(__file__).parent / "gpu_check.py")
    p = subprocess.run([sys.executable, script, "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "MoE rows: 48 records equal to the host-side count" in p.stdout, p.stdout + p.stderr
    if not torch.cuda.is_available():
        p = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and "SKIPPED: no CUDA device" in p.stdout, p.stdout + p.stderr


def test_the_front_ends_merge_waits_for_a_live_process_still_writing_its_part(tmp_path, monkeypatch):
    """vLLM returns from its shutdown once the engine-core process is gone, while the worker it
    started may still write its files: the merge waits for that part, not for a dead one."""
    import threading
    import time

    from profilemate_vllm import _plugin

    run = tmp_path / "parts" / "run"
    live, dead = run / "worker-live", run / "worker-dead"
    live.mkdir(parents=True)
    dead.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        (live / "part.json").write_text(json.dumps({"pid": writer.pid, "finished": False}))
        (dead / "part.json").write_text(json.dumps({"pid": gone.pid, "finished": False}))
        assert _plugin._unfinished_live_parts(str(run)) == [("worker-live", writer.pid)]

        # The live process finishes its part: the wait ends then, with the part finished.
        monkeypatch.setenv("PROFILEMATE_MERGE_WAIT_S", "60")
        finished_at = []

        def finish():
            time.sleep(0.3)
            (live / "part.json.tmp").write_text(json.dumps({"pid": writer.pid, "finished": True}))
            os.replace(live / "part.json.tmp", live / "part.json")
            finished_at.append(time.monotonic())

        t = threading.Thread(target=finish)
        t.start()
        _plugin._wait_for_parts(str(run))
        returned_at = time.monotonic()
        t.join()
        assert finished_at and returned_at >= finished_at[0]
        assert _plugin._unfinished_live_parts(str(run)) == []

        # A live process that never finishes: the wait is bounded by the setting.
        (live / "part.json").write_text(json.dumps({"pid": writer.pid, "finished": False}))
        monkeypatch.setenv("PROFILEMATE_MERGE_WAIT_S", "0.2")
        t0 = time.monotonic()
        _plugin._wait_for_parts(str(run))
        assert time.monotonic() - t0 >= 0.2
        assert _plugin._unfinished_live_parts(str(run)) == [("worker-live", writer.pid)]
    finally:
        writer.kill()
        writer.wait()
    # Gone (reaped) and a zombie both count as not writing.
    assert _plugin._unfinished_live_parts(str(run)) == []
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(200):
        if not _plugin._process_alive(zombie.pid):
            break
        time.sleep(0.02)
    assert not _plugin._process_alive(zombie.pid)
    assert zombie.poll() is not None  # reaped only now: it was a zombie above
    assert _plugin._process_alive(os.getpid())


def test_part_json_follows_the_counters_while_the_process_runs(tmp_path, monkeypatch):
    """A process that vLLM kills without a shutdown keeps counters at most one refresh old."""
    import time

    from profilemate_vllm import _plugin

    monkeypatch.setattr(_plugin, "PART_JSON_REFRESH_S", 0.05)
    rec = object()
    monkeypatch.setattr(S, "part_dir", str(tmp_path))
    monkeypatch.setattr(S, "rec", rec)
    monkeypatch.setattr(S, "errors", {})
    part = tmp_path / "part.json"

    def read():
        for _ in range(200):
            try:
                return json.loads(part.read_text())
            except (OSError, ValueError):
                time.sleep(0.01)
        raise AssertionError("no part.json")

    _plugin._write_part_json()
    _plugin._start_part_json_refresher(rec)
    assert read()["hook_errors"] == {} and read()["finished"] is False
    S.errors["execute_model"] = 3  # what a caught fault does while the engine runs
    for _ in range(200):
        if read()["hook_errors"] == {"execute_model": 3}:
            break
        time.sleep(0.02)
    assert read()["hook_errors"] == {"execute_model": 3}

    # Finished: the refresher never overwrites the final file.
    monkeypatch.setattr(S, "rec", None)
    _plugin._write_part_json(final=True)
    S.errors["execute_model"] = 4
    time.sleep(0.3)
    assert read()["finished"] is True and read()["hook_errors"] == {"execute_model": 3}


def test_the_idle_flush_writes_the_rows_once_the_steps_stop_and_the_shutdown_waits_for_it(tmp_path, monkeypatch):
    """A burst of records arms the idle flusher once; the recorder is flushed only after no
    record came for the window, part.json says `idle` false meanwhile and true after; the front
    end's shutdown wait returns once every live part is idle (and is bounded otherwise)."""
    import threading
    import time

    from profilemate_vllm import _plugin

    class Rec:
        def __init__(self):
            self.flushes = []

        def flush(self):
            self.flushes.append((time.monotonic(), S.idle_activity))

        def activity(self):  # the step path's records (none here: note_activity counts)
            return 0

        def in_step(self):  # the step path's view (S.in_step: the general path's)
            return False

    rec = Rec()
    run = tmp_path / "parts" / "run"
    part = run / "worker-1"
    part.mkdir(parents=True)
    monkeypatch.setenv("PROFILEMATE_IDLE_FLUSH_MS", "200")
    for name, value in [
        ("part_dir", str(part)), ("rec", rec), ("errors", {}), ("idle_activity", 0), ("idle_armed", False),
        ("idle_event", threading.Event()), ("idle_thread", None), ("idle_flushed", True), ("exiting", False),
        ("in_step", False), ("idle_sched", None),
    ]:
        monkeypatch.setattr(S, name, value)
    _plugin._write_part_json()

    def part_json():
        for _ in range(200):
            try:
                return json.loads((part / "part.json").read_text())
            except (OSError, ValueError):
                time.sleep(0.01)
        raise AssertionError("no part.json")

    # 10 records 10 ms apart (far shorter than the window): no flush until 200 ms after the last.
    for _ in range(10):
        _plugin.note_activity()
        last = time.monotonic()
        time.sleep(0.01)
    assert rec.flushes == [] and S.idle_armed
    for _ in range(300):
        if rec.flushes and part_json()["idle"]:
            break
        time.sleep(0.01)
    assert len(rec.flushes) == 1, rec.flushes
    at, seen = rec.flushes[0]
    assert seen == 10 and at - last >= 0.2
    assert part_json()["idle"] is True and not S.idle_armed

    # Not idle while a step runs longer than the window, nor while the scheduler holds requests.
    class Sched:
        unfinished = True

        def has_unfinished_requests(self):
            return self.unfinished

    sched = Sched()
    for busy in ("in_step", "idle_sched"):
        if busy == "in_step":
            S.in_step = True
        else:
            S.idle_sched = sched
        _plugin.note_activity()
        time.sleep(0.6)
        assert len(rec.flushes) == 1 and part_json()["idle"] is False, busy
        S.in_step = False
        sched.unfinished = False
        for _ in range(300):
            if len(rec.flushes) == 2 and part_json()["idle"]:
                break
            time.sleep(0.01)
        assert len(rec.flushes) == 2 and part_json()["idle"] is True, busy
        rec.flushes.pop()
        sched.unfinished = True
    S.idle_sched = None

    # The front end's wait: a live part that says it is stepping is waited for...
    monkeypatch.setattr(S, "active", True)
    monkeypatch.setattr(S, "out_dir", str(tmp_path))
    monkeypatch.setattr(S, "run", "run")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = part_json()
        info.update(pid=writer.pid, idle=False)
        (part / "part.json").write_text(json.dumps(info))
        monkeypatch.setenv("PROFILEMATE_SHUTDOWN_WAIT_S", "0.2")
        t0 = time.monotonic()
        _plugin.wait_for_idle_parts()
        assert time.monotonic() - t0 >= 0.2  # ...at most this long when it never becomes idle
        assert _plugin._busy_parts(str(run)) == [("worker-1", writer.pid)]
        monkeypatch.setenv("PROFILEMATE_SHUTDOWN_WAIT_S", "60")

        def idle():
            time.sleep(0.3)
            (part / "part.json.tmp").write_text(json.dumps(dict(info, idle=True)))
            os.replace(part / "part.json.tmp", part / "part.json")

        t = threading.Thread(target=idle)
        t.start()
        t0 = time.monotonic()
        _plugin.wait_for_idle_parts()
        waited = time.monotonic() - t0
        t.join()
        assert 0.25 <= waited < 30 and _plugin._busy_parts(str(run)) == []
    finally:
        writer.kill()
        writer.wait()


def test_native_step_methods_give_rows_their_step(tmp_path, monkeypatch):
    """``Recorder.begin_step`` / ``end_step`` / ``cancel_step`` / ``forward_of_step`` on the real
    native module: rows carry the open step, a cancelled step writes no timeline row, a late
    forward row goes to the step it names, rows outside any step have none."""
    from profilemate_vllm import _native

    for k in list(os.environ):
        if k.startswith(("VLLM_PROFILING_", "PROFILEMATE_")):
            monkeypatch.delenv(k)
    rec = _native.Recorder(str(tmp_path / "part"))
    rec.cpu(0, 100_000, 1)  # scheduling outside any step
    rec.begin_step(1)
    rec.cpu(0, 200_000, 1)
    rec.forward(1, 2, 2, 800_000)
    rec.end_step()
    rec.begin_step(2)  # opened, then the scheduler had nothing to run
    rec.cancel_step()
    rec.begin_step(2)
    rec.cpu(0, 300_000, 1)
    rec.forward_of_step(1, 1, 2, 2, 500_000)  # resolved late: step 1's pass
    rec.forward(1, 2, 2, 600_000)
    rec.end_step()
    try:
        rec.begin_step(0)
        raise AssertionError("step id 0 accepted")
    except ValueError as e:
        assert "step id 0" in str(e)
    rec.shutdown()

    def read(name):
        with open(tmp_path / "part" / name) as f:
            return list(csv.DictReader(f))

    assert [(r["duration_ms"], r["step"]) for r in read("cpu_operations_timing.csv") if r["operation"] == "scheduling"] == [
        ("0.100000", ""), ("0.200000", "1"), ("0.300000", "2")
    ]
    assert [(r["forward_time_ms"], r["step"]) for r in read("forward_pass_timing.csv")] == [
        ("0.800000", "1"), ("0.500000", "1"), ("0.600000", "2")
    ]
    timeline = read("step_timeline.csv")
    assert [(r["step"], r["forward_passes"], r["forward_time_ms"]) for r in timeline] == [
        ("1", "2", "1.300000"), ("2", "1", "0.600000")
    ]


def test_step_path_reads_queue_lengths_natively_and_has_zero_scans_counts(tmp_path, monkeypatch):
    """``StepPath.scheduled`` takes each queue as a length or as the queue: a list, a queue of
    the ``set_queue_type`` type (its base's C length), anything else through ``len()``; the rows
    hold those lengths. Wrong arguments raise naming what is expected. ``has_zero`` is
    ``not all(counts)`` for lists, other iterables, bools and floats."""
    import collections

    from profilemate_vllm import _native

    for k in list(os.environ):
        if k.startswith(("VLLM_PROFILING_", "PROFILEMATE_")):
            monkeypatch.delenv(k)

    class Fcfs(collections.deque):
        def __len__(self):  # as vLLM's FCFSRequestQueue: the deque's own length
            return super().__len__()

    class Odd(collections.deque):
        def __len__(self):  # not registered: measured by len()
            return 7

    rec = _native.Recorder(str(tmp_path / "part"))
    rec.set_limits(8, 64, -1)
    p = rec.step_path()
    p.set_queue_type(Fcfs, collections.deque)
    for step, (running, waiting, held) in enumerate(
        [([1, 2, 3], Fcfs([1, 2]), Fcfs([3])), (5, 4, 0), (Fcfs(), Odd([1]), [9, 9])], start=1
    ):
        p.schedule_begin(step)
        p.scheduled(1, 2, 2, running, waiting, held, -1, 0, 0)
        p.end_step()
    for bad, why in [
        (lambda: p.set_queue_type(int, collections.deque), "subclass of base"),
        (lambda: p.set_queue_type(Fcfs, 3), "subclass of base"),
        (lambda: p.set_queue_type(Fcfs, object), "no C length function"),
        (lambda: p.scheduled(1, 2, 2, 3, 4, -1, 0, 0), "takes 9 arguments (8 given)"),
        (lambda: p.scheduled(1, 2, 2, object(), 4, 0, -1, 0, 0), "has no len()"),
    ]:
        try:
            bad()
            raise AssertionError(f"accepted: {why}")
        except TypeError as e:
            assert why in str(e), e
    rec.shutdown()
    with open(tmp_path / "part" / "batch_utilization.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["running_queue_len"], r["waiting_queue_len"]) for r in rows] == [("3", "3"), ("5", "4"), ("0", "9")]

    has_zero = _native.has_zero
    for counts in ([], [1, 2, 3], [0], [4, 0, 5], (1, 0), [True, False], [1, 0.0], [2.5], [10**30, 10**30 - 10**30]):
        assert has_zero(counts) == (not all(counts)), counts
    assert has_zero(iter([2, 3])) is False and has_zero(c for c in [2, 0]) is True
    try:
        has_zero(5)
        raise AssertionError("an int accepted as counts")
    except TypeError:
        pass


def test_has_zero_follows_all_when_an_items_bool_changes_the_list():
    """``has_zero`` is ``not all(counts)`` even when an item's ``__bool__`` shrinks or grows the
    list being scanned (``all`` reads the list's length again at each item): no ``IndexError``,
    and items appended while scanning are scanned. Its references are balanced."""
    import sys

    from profilemate_vllm._native import has_zero

    class Clears:
        def __init__(self, counts):
            self.counts = counts

        def __bool__(self):
            self.counts.clear()
            return True

    class Appends:
        def __init__(self, counts, value):
            self.counts, self.value = counts, value

        def __bool__(self):
            self.counts.append(self.value)
            return True

    def cases():
        a = [1, 2]
        a.insert(0, Clears(a))  # the 2 left items are gone once it is tested
        yield a
        b = [0]
        b.insert(0, Clears(b))  # its 0 too
        yield b
        c = [3]
        c.append(Appends(c, 0))  # a 0 appended while scanning
        yield c
        d = [3]
        d.append(Appends(d, 5))
        yield d

    for expected, counts in zip(cases(), cases()):
        assert has_zero(counts) == (not all(expected)), expected
    item = Appends([], 1)
    counts = [7, item, 0]
    before = (sys.getrefcount(counts), sys.getrefcount(item))
    for _ in range(100):
        assert has_zero(counts) is True
    assert (sys.getrefcount(counts), sys.getrefcount(item)) == before


def test_step_path_queue_type_references_and_hostile_lengths(tmp_path, monkeypatch):
    """``set_queue_type`` holds one reference to the registered type, releases it when replaced
    and when the step path goes; ``scheduled`` leaves its queues' references as they were. A
    ``__len__`` that calls back into the step path (recording a step, registering a type) is
    measured as it returns; lengths ``len()`` refuses raise its error; huge lengths saturate."""
    import collections
    import gc
    import sys

    from profilemate_vllm import _native

    for k in list(os.environ):
        if k.startswith(("VLLM_PROFILING_", "PROFILEMATE_")):
            monkeypatch.delenv(k)

    class Fcfs(collections.deque):
        def __len__(self):
            return super().__len__()

    class Other(list):
        pass

    rec = _native.Recorder(str(tmp_path / "part"))
    rec.set_limits(8, 64, -1)
    p = rec.step_path()
    fcfs, other = sys.getrefcount(Fcfs), sys.getrefcount(Other)
    p.set_queue_type(Fcfs, collections.deque)
    p.set_queue_type(Fcfs, collections.deque)
    assert sys.getrefcount(Fcfs) == fcfs + 1
    p.set_queue_type(Other, list)
    assert (sys.getrefcount(Fcfs), sys.getrefcount(Other)) == (fcfs, other + 1)

    class Reenters:
        def __len__(self):
            p.set_queue_type(Fcfs, collections.deque)  # releases Other while it is measured
            p.scheduled(1, 1, 1, 11, 0, 0, -1, 0, 0)
            return 2

    class Huge:
        def __len__(self):
            return 2**62

    class Negative:
        def __len__(self):
            return -1

    queue = Fcfs([1, 2, 3])
    before = sys.getrefcount(queue)
    p.schedule_begin(1)
    p.scheduled(1, 1, 1, Reenters(), Other([1]), queue, -1, 0, 0)
    p.end_step()
    assert sys.getrefcount(queue) == before
    p.schedule_begin(2)
    p.scheduled(1, 1, 1, Huge(), Huge(), Huge(), -1, 0, 0)
    p.end_step()
    for bad, error in [(Negative(), ValueError), (2**70, OverflowError), (1.5, TypeError), (None, TypeError)]:
        try:
            p.scheduled(1, 1, 1, bad, 0, 0, -1, 0, 0)
            raise AssertionError(f"accepted {bad!r}")
        except error:
            pass
    assert (sys.getrefcount(Fcfs), sys.getrefcount(Other)) == (fcfs + 2, other)  # p's, and queue's
    del p
    gc.collect()
    assert sys.getrefcount(Fcfs) == fcfs + 1  # queue's only
    rec.shutdown()
    with open(tmp_path / "part" / "batch_utilization.csv") as f:
        rows = [(r["step"], r["running_queue_len"], r["waiting_queue_len"]) for r in csv.DictReader(f)]
    assert rows == [("1", "11", "0"), ("1", "2", "4"), ("2", str(2**32 - 1), str(2**32 - 1))], rows
