"""The binding's GPU paths on real CUDA tensors, without vLLM (run by ``scripts/gpu-check.sh``).

For a GPU machine that has PyTorch but neither vLLM nor a network: the binding's abi3 wheel,
built on a development machine, is carried there and unpacked into a temporary directory (no pip,
no index). Three checks, each against PyTorch's own ``torch.cuda.Event`` references:

1. Forward timing (``_cuda.CudaTimer``, what the plugin does around ``execute_model`` on a GPU):
   CUDA events on PyTorch's current stream, resolved with ``Event.query()``, under
   ``torch.cuda.set_sync_debug_mode("error")``: any synchronisation on the step path raises and
   fails the check. The forward rows the native recorder writes (one per step, in order) equal,
   step by step, reference events recorded around the same work.
2. A captured CUDA graph, replayed and timed by the same events: one row per replay, equal to
   reference events around each replay.
3. MoE routing counts on the device (``_trackers.MoeRouting``, through the router wrapper of
   ``_hooks``): per step ``index_add_`` into a counts row on the GPU, a ``non_blocking`` copy
   into pinned memory behind an event, recorded when a later step finds it complete, all under
   the sync debug mode; the routing rows equal a host-side count of the same ``topk_ids``.

Where there is no CUDA device it says so and exits 2 (``--device cpu`` runs the MoE check and
the plumbing on the CPU, for this script's own logic). Exit status: 0 passed, 1 failed, 2 could
not run here.

    python gpu_check.py [--wheel PATH] [--device cuda|cpu] [--steps N]
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
import tempfile
import time
import zipfile
from types import SimpleNamespace as NS
from typing import Any, Dict, List

TOLERANCE_MS = 0.05  # events recorded back to back on one stream: they agree to a few microseconds
TOLERANCE_REL = 0.02


def say(*parts: Any) -> None:
    print("gpu-check (binding):", *parts, flush=True)


def unpack(wheel: str) -> str:
    """The wheel unpacked into a temporary directory, put first on ``sys.path``."""
    target = tempfile.mkdtemp(prefix="profilemate-wheel-")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    sys.path.insert(0, target)
    return target


def rows(path: str) -> List[Dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def agree(ours: List[float], reference: List[float]) -> List[str]:
    bad = []
    for i, (a, b) in enumerate(zip(ours, reference)):
        if abs(a - b) > max(TOLERANCE_MS, TOLERANCE_REL * b):
            bad.append(f"step {i}: {a:.4f} ms recorded, {b:.4f} ms by the reference events")
    if len(ours) != len(reference):
        bad.append(f"{len(ours)} rows for {len(reference)} steps")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", help="the binding's wheel (default: the installed profilemate_vllm)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()

    if args.wheel:
        wheels = sorted(glob.glob(args.wheel))
        if not wheels:
            say(f"no wheel matches {args.wheel}: build it with `maturin build --release` and carry it")
            return 2
        say(f"unpacked {wheels[-1]} into {unpack(wheels[-1])}")
    try:
        import torch
    except ImportError:
        say("SKIPPED: PyTorch is not installed here")
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        say(f"SKIPPED: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False)")
        return 2
    import profilemate_vllm
    from profilemate_vllm import _hooks, _native
    from profilemate_vllm._state import STATE

    say(f"profilemate_vllm from {os.path.dirname(profilemate_vllm.__file__)}; torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, Python {sys.version.split()[0]}"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ", on the CPU (MoE check only)"))
    out = tempfile.mkdtemp(prefix="profilemate-gpu-check-")
    S = STATE
    S.f_fwd = S.f_enc = S.f_cpu = True
    device = torch.device(args.device)
    failures: List[str] = []
    rec = _native.Recorder(os.path.join(out, "part"), "cuda" if args.device == "cuda" else "host", ["moe_expert"])

    def sync_checked(fn):
        """Runs ``fn`` with every synchronisation an error (on a GPU)."""
        if args.device != "cuda":
            return fn()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)

    reference: List[float] = []
    graph_reference: List[float] = []
    if args.device == "cuda":
        from profilemate_vllm._cuda import CudaTimer

        a = torch.randn(2048, 2048, device=device)
        b = torch.randn(2048, 2048, device=device)
        torch.cuda.synchronize()
        timer = CudaTimer(100, S)
        ref_events = []

        def forward_steps():
            for i in range(args.steps):
                r0, r1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                timer.start()
                r0.record()
                for _ in range(1 + i % 3):  # steps of different lengths
                    torch.mm(a, b)
                r1.record()
                timer.stop((1, 8, 8, i + 1))  # decode, 8 sequences, 8 tokens, step i + 1
                timer.poll(rec)
                ref_events.append((r0, r1))

        t0 = time.perf_counter()
        sync_checked(forward_steps)
        host_s = time.perf_counter() - t0
        torch.cuda.synchronize()
        timer.drain(rec)
        reference = [s.elapsed_time(e) for s, e in ref_events]
        say(f"forward timing: {args.steps} steps under sync debug mode \"error\" in {host_s * 1000:.1f} ms of host time, "
            f"no synchronisation raised; {timer.dropped} dropped")

        # A captured CUDA graph, replayed.
        x = torch.randn(1024, 1024, device=device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                y = x @ x  # warmup on a side stream, as PyTorch asks before a capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = x @ x
            y = y @ x
        torch.cuda.synchronize()
        graph_events = []

        def replays():
            for _ in range(args.steps):
                r0, r1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                timer.start()
                r0.record()
                graph.replay()
                r1.record()
                timer.stop((1, 4, 4, 0))  # outside any step
                timer.poll(rec)
                graph_events.append((r0, r1))

        sync_checked(replays)
        torch.cuda.synchronize()
        timer.drain(rec)
        graph_reference = [s.elapsed_time(e) for s, e in graph_events]
        say(f"CUDA graph: {args.steps} replays timed under sync debug mode \"error\", no synchronisation raised")

    # MoE routing counts on the device, through the router wrapper.
    from profilemate_vllm._trackers import MoeRouting

    class Router:
        global_num_experts, top_k, eplb_state = 8, 2, None

    router = Router()
    S.moe = moe = MoeRouting()
    S.moe_elsewhere = None
    with device:
        moe.built(NS(router=router, layer_name="model.layers.0.block_sparse_moe.experts"))
    select = _hooks._select_experts(lambda self, hidden, logits: torch.topk(logits, 2))
    generator = torch.Generator(device=device).manual_seed(0)
    steps_logits = [torch.randn(n, 8, device=device, generator=generator) for n in (5, 17, 1, 64, 3, 33) * 8]
    ntoks = [max(1, t.shape[0] - (i % 2)) for i, t in enumerate(steps_logits)]  # odd steps: one padding row
    routed = []

    def moe_steps():
        for logits, ntok in zip(steps_logits, ntoks):
            S.in_step = True
            moe.begin_step(ntok)
            _, ids = select(router, None, logits)
            routed.append(ids)
            S.in_step = False
            moe.end_step(rec)

    sync_checked(moe_steps)
    moe.drain(rec)  # at shutdown, off the step path: waits for the last copies
    expected = []
    for ids, ntok in zip(routed, ntoks):
        counts = [0] * 8
        for e in ids[:ntok].reshape(-1).tolist():
            counts[e] += 1
        expected.append(counts)
    say(f"MoE counts: {len(routed)} steps on {device.type}" + (
        " under sync debug mode \"error\" (index_add_ on the device, non_blocking copies to pinned memory), "
        f"{moe.dropped_copies} copies dropped" if args.device == "cuda" else ""))

    rec.shutdown()
    part = os.path.join(out, "part")
    if args.device == "cuda":
        fwd = [float(r["forward_time_ms"]) for r in rows(os.path.join(part, "forward_pass_timing.csv"))]
        bad = agree(fwd[: len(reference)], reference) + agree(fwd[len(reference):], graph_reference)
        if len(fwd) != len(reference) + len(graph_reference):
            bad.append(f"{len(fwd)} forward rows for {len(reference) + len(graph_reference)} steps")
        worst = max((abs(a - b) for a, b in zip(fwd, reference + graph_reference)), default=0.0)
        say(f"forward rows: {len(fwd)} = {len(reference)} steps + {len(graph_reference)} graph replays; largest "
            f"difference to the reference events {worst * 1000:.2f} us (steps {min(reference):.3f} to "
            f"{max(reference):.3f} ms, replays {min(graph_reference):.3f} to {max(graph_reference):.3f} ms)")
        failures += bad[:10]
    moe_rows = rows(os.path.join(part, "moe_expert_routing.csv"))
    recorded: List[List[int]] = []
    key = None
    for r in moe_rows:
        k = (r["timestamp_sec"], r["layer"])
        if k != key:
            recorded.append([0] * 8)
            key = k
        recorded[-1][int(r["expert_id"])] = int(r["num_tokens"])
    if recorded != expected:
        failures.append(f"MoE rows differ from the host-side count: {len(recorded)} records for {len(expected)} steps")
    else:
        say(f"MoE rows: {len(recorded)} records equal to the host-side count of the same topk_ids "
            f"({sum(map(sum, expected))} routed tokens; padding rows left out)")
    for f in failures:
        say("FAILED:", f)
    say("OK" if not failures else "FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
