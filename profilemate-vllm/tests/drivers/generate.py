"""Runs real vLLM on the tiny model and writes vLLM's own counts as JSON.

vLLM's numbers come from a stat logger given to ``LLMEngine.from_engine_args``: per non-empty
step the scheduler's ``SchedulerIterationDetails`` (``enable_logging_iteration_details``), per
step ``IterationStats.num_preempted_reqs``, and per finished request ``FinishedRequestStats``.
The tests compare profilemate's files with them.

    python generate.py --model DIR --scenario basic|preempt|moe|spec|bench --out counts.json

Whether the engine runs in this process or in its own processes is vLLM's
``VLLM_ENABLE_V1_MULTIPROCESSING`` (the caller sets it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time


def scenario(name: str):
    """(engine arguments, [(prompt token ids, max tokens)])"""
    rng = random.Random(1234)
    common = dict(
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,
        seed=0,
        disable_log_stats=False,
        enable_logging_iteration_details=True,
    )
    if name == "basic":
        # Small token budget and sequence limit: chunked prefill makes mixed steps, and requests
        # wait in the queue.
        args = dict(common, max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64)
        lengths = [(23, 12), (150, 8), (40, 20), (90, 16), (7, 24), (64, 10)]
    elif name == "preempt":
        # shared/VLLM.md: 8 KV blocks of 32 tokens (one reserved), 16 requests generating 200
        # tokens each: the scheduler must preempt.
        args = dict(
            common,
            num_gpu_blocks_override=8,
            block_size=32,
            max_model_len=(8 - 1) * 32,
            max_num_seqs=16,
            max_num_batched_tokens=256,
        )
        lengths = [(rng.randint(8, 20), 200) for _ in range(16)]
    elif name in ("moe", "moe_compiled"):
        # The tiny Mixtral: chunked prefill (mixed steps) and decode, a dozen steps; compiled by
        # torch.compile (vLLM's default) in "moe_compiled".
        args = dict(common, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32)
        if name == "moe_compiled":
            args["enforce_eager"] = False
        lengths = [(23, 6), (40, 8), (7, 10), (50, 5)]
    elif name == "spec":
        # Speculative decoding with n-gram drafts (runs on a CPU): steps verify up to 3 draft
        # tokens per request. Prompts repeat a short pattern so the drafter finds matches.
        args = dict(
            common,
            max_model_len=512,
            max_num_seqs=4,
            max_num_batched_tokens=64,
            speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                "prompt_lookup_max": 3},
        )
        patterns = [[rng.randrange(3, 1024) for _ in range(k)] for k in (3, 4, 5, 2, 6, 3)]
        prompts = [((p * 12)[:n], 24) for p, n in zip(patterns, (20, 33, 47, 18, 60, 25))]
        return args, prompts
    elif name == "recompute":
        # Chunked recompute after preemptions: 7 KV blocks of 32 tokens, every prompt and every
        # recomputation in chunks of one token (long_prefill_token_threshold=1).
        args = dict(
            common,
            num_gpu_blocks_override=7,
            block_size=32,
            max_model_len=128,
            max_num_seqs=4,
            max_num_batched_tokens=64,
            long_prefill_token_threshold=1,
            enable_chunked_prefill=True,
        )
        lengths = [(10, 100) for _ in range(8)]
    elif name == "priority":
        # The basic workload under priority scheduling: the scheduler's queues are not the
        # first-come-first-served deques the plugin reads natively, so it asks vLLM's
        # ``get_request_counts`` (priorities are given in ``main``).
        args = dict(common, max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64, scheduling_policy="priority")
        lengths = [(23, 12), (150, 8), (40, 20), (90, 16), (7, 24), (64, 10)]
    elif name == "bench":
        args = dict(common, max_model_len=512, max_num_seqs=16, max_num_batched_tokens=512)
        lengths = [(rng.randint(16, 64), 128) for _ in range(16)]
    else:
        raise SystemExit(f"unknown scenario {name}")
    prompts = [([rng.randrange(3, 1024) for _ in range(n)], m) for n, m in lengths]
    return args, prompts


def plugin_state():
    """Whether vLLM loaded the plugin and which of the methods it wraps are wrapped now."""
    import sys as _sys

    try:
        from profilemate_vllm._state import STATE as S
        from profilemate_vllm._hooks import SPECS, WRAPPED_ATTR
    except ImportError as e:
        return {"error": str(e)}
    wrapped = []
    for spec in SPECS:
        module = _sys.modules.get(spec.module)
        cls = getattr(module, spec.cls, None) if module else None
        func = cls.__dict__.get(spec.method) if isinstance(cls, type) else None
        if func is not None and hasattr(func, WRAPPED_ATTR):
            wrapped.append(f"{spec.module}.{spec.cls}.{spec.method}")
    loaded = [s.module for s in SPECS if s.module in _sys.modules]
    reader = S.sched_reader  # how the scheduler's queues and free blocks were read (in-process)
    return {
        "sched_reader": None if reader is None else {"fast_counts": reader[2], "fast_free": reader[5]},
        "register_calls": S.register_calls,
        "active": S.active,
        "wrapped": wrapped,
        "modules_loaded": sorted(set(loaded)),
        "hook_errors": dict(S.errors),
        "hook_status": dict(S.hook_status),
    }


def watch_phases(engine, seen) -> None:
    """In-process: the reference phase of every non-empty step from vLLM's request state.

    A scheduled request processes its prompt when, before the step, its ``num_computed_tokens``
    is below its prompt length or below the tokens it had computed when it was last preempted
    (read from the request as vLLM preempts it). Also counted: the steps the rule before this
    one (a resumed request is prefill on its first step back only) would call decode."""
    core = getattr(engine.engine_core, "engine_core", None)
    if core is None:
        raise SystemExit("the recompute scenario needs VLLM_ENABLE_V1_MULTIPROCESSING=0")
    sched = core.scheduler
    had = {}
    preempt, schedule = sched._preempt_request, sched.schedule
    seen["reference_phases"] = []
    seen["recomputing"] = []
    seen["old_rule_phases"] = []
    seen["recompute_example"] = None

    def _preempt_request(request, *a, **k):
        had[request.request_id] = max(had.get(request.request_id, 0), request.num_computed_tokens)
        return preempt(request, *a, **k)

    def _schedule(*a, **k):
        out = schedule(*a, **k)
        if not out.total_num_scheduled_tokens:
            return out
        prefill = recomputing = 0
        for rid, k_ in out.num_scheduled_tokens.items():
            r = sched.requests[rid]
            before = r.num_computed_tokens - k_
            if before < r.num_prompt_tokens or before < had.get(rid, 0):
                prefill += 1
            if r.num_output_tokens > 0 and before < had.get(rid, 0):
                recomputing += 1
                if seen["recompute_example"] is None and k_ == 1 and before > r.num_prompt_tokens:
                    seen["recompute_example"] = {
                        "request_id": rid, "num_output_tokens": r.num_output_tokens,
                        "num_computed_tokens": before, "num_tokens": r.num_tokens,
                        "had_before_preemption": had[rid],
                    }  # fmt: skip
        n = len(out.num_scheduled_tokens)
        seen["reference_phases"].append("decode" if not prefill else "prefill" if prefill == n else "mixed")
        seen["recomputing"].append(recomputing)
        old = len(out.scheduled_new_reqs)
        cached = out.scheduled_cached_reqs
        for rid, o in zip(cached.req_ids, cached.num_output_tokens):
            if o == 0 or out.num_scheduled_tokens[rid] > 1 or rid in cached.resumed_req_ids:
                old += 1
        seen["old_rule_phases"].append("decode" if not old else "prefill" if old == n else "mixed")
        return out

    sched._preempt_request = _preempt_request
    sched.schedule = _schedule


def watch_accounting(engine, seen) -> None:
    """In-process: vLLM's own counts at each non-empty step, read with its own methods right
    after ``Scheduler.schedule`` returns, where the plugin reads them: the running and waiting
    requests (``Scheduler.get_request_counts``), and the blocks free in the KV cache's pool
    (``BlockPool.get_num_free_blocks``) with the pool's size."""
    core = getattr(engine.engine_core, "engine_core", None)
    if core is None:
        return
    sched = core.scheduler
    pool = sched.kv_cache_manager.block_pool
    schedule = sched.schedule
    seen["at_schedule"] = []

    def _schedule(*a, **k):
        out = schedule(*a, **k)
        if out.total_num_scheduled_tokens:
            running, waiting = sched.get_request_counts()
            seen["at_schedule"].append([running, waiting, pool.get_num_free_blocks(), pool.num_gpu_blocks])
        return out

    sched.schedule = _schedule


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--scenario", default="basic")
    ap.add_argument("--out", required=True)
    ap.add_argument("--abort", type=int, default=0, help="abort this many requests after a few steps")
    ap.add_argument(
        "--inject-fault",
        default="",
        help="make this function of profilemate_vllm._plugin raise (tests that vLLM goes on)",
    )
    ap.add_argument(
        "--kill-engine-after",
        type=int,
        default=0,
        help="after this many steps, SIGKILL the engine processes and this one (a crashed server)",
    )
    args = ap.parse_args()

    if args.inject_fault:
        import profilemate_vllm._plugin as plugin

        def broken(*a, **k):
            raise RuntimeError("injected fault")

        setattr(plugin, args.inject_fault, broken)

    from vllm import EngineArgs, SamplingParams
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.metrics.loggers import StatLoggerBase

    seen = {"iterations": [], "preempted_per_step": [], "finished": [], "records": 0, "queues": []}

    class Counts(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.max_num_seqs = vllm_config.scheduler_config.max_num_seqs

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            seen["records"] += 1
            details = getattr(scheduler_stats, "iteration_details", None) if scheduler_stats else None
            if details is not None and not details.is_dummy:
                seen["iterations"].append(
                    [
                        details.num_ctx_requests,
                        details.num_ctx_tokens,
                        details.num_generation_requests,
                        details.num_generation_tokens,
                    ]
                )
                seen["queues"].append([scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs])
            if iteration_stats is not None:
                seen["preempted_per_step"].append(iteration_stats.num_preempted_reqs)
                for f in iteration_stats.finished_requests:
                    seen["finished"].append(
                        {
                            "request_id": f.request_id,
                            "num_preemptions": f.num_preemptions,
                            "finish_reason": str(f.finish_reason),
                            "num_prompt_tokens": f.num_prompt_tokens,
                            "num_generation_tokens": f.num_generation_tokens,
                        }
                    )

        def log_engine_initialized(self):
            pass

    engine_args, prompts = scenario(args.scenario)
    t0 = time.monotonic()
    engine = LLMEngine.from_engine_args(EngineArgs(model=args.model, **engine_args), stat_loggers=[Counts])
    t_ready = time.monotonic()
    for i, (ids, max_tokens) in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        priority = (i * 7) % 3 if args.scenario == "priority" else 0
        engine.add_request(f"req-{i}", {"prompt_token_ids": ids}, params, priority=priority)
    if args.scenario == "recompute":
        watch_phases(engine, seen)
    watch_accounting(engine, seen)
    outputs = {}
    steps = 0
    aborted = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = {
                    "prompt_tokens": len(out.prompt_token_ids or []),
                    "output_tokens": len(out.outputs[0].token_ids),
                    "token_ids": list(out.outputs[0].token_ids),
                }
        steps += 1
        if args.kill_engine_after and steps == args.kill_engine_after:
            import psutil

            children = psutil.Process().children(recursive=True)
            with open(args.out, "w") as f:
                json.dump({"killed_after_steps": steps, "killed": [c.pid for c in children]}, f)
            for c in children:
                c.kill()
            os._exit(0)  # no atexit, no vLLM shutdown: as if the whole server were killed
        if args.abort and steps == 6 and not aborted:
            aborted = [f"req-{i}" for i in range(len(prompts) - args.abort, len(prompts))]
            engine.abort_request(aborted)
    t_done = time.monotonic()
    state = plugin_state()
    generated = sum(o["output_tokens"] for o in outputs.values())
    result = {
        "scenario": args.scenario,
        "multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0",
        "engine_start_sec": t_ready - t0,
        "generate_sec": t_done - t_ready,
        "generated_tokens": generated,
        "tokens_per_sec": generated / (t_done - t_ready),
        "max_num_seqs": engine_args["max_num_seqs"],
        "max_num_batched_tokens": engine_args["max_num_batched_tokens"],
        "requests": {f"req-{i}": {"prompt_tokens": len(p), "max_tokens": m} for i, (p, m) in enumerate(prompts)},
        "outputs": outputs,
        "aborted": aborted,
        "plugin": state,
        **seen,
    }
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
