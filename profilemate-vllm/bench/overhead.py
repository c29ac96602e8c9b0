"""What profilemate costs vLLM: the same generation with and without the plugin, interleaved.

Two ways to interleave, both on the tiny random Llama model (decode steps of 1 to 2 ms, so a
per-step cost of a few microseconds shows):

``--mode toggle`` (default): one in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with
profiling active; rounds alternate between the plugin's hooks installed and removed (vLLM's own
methods restored), so both conditions share one engine, one process and one warm cache. The
difference is the per-step cost of the hooks and of recording.

``--mode steps``: the same in-process engine and alternation as ``toggle``, but every engine step
is timed on its own (``LLMEngine.step``): the decode steps of batch ``--batch`` (the same steps in
both conditions) give a step-time distribution per condition. Its low quantiles are the least
disturbed by other work on a shared machine (interference only ever adds time), and the median of
the per-round-pair ratios comes with a 95 % confidence interval. Tokens per step are fixed, so the
tokens/s ratio is the inverse of the step-time ratio.

``--mode processes``: a fresh process per round, alternately with ``VLLM_PROFILING_DIR`` set and
unset, with vLLM's default engine processes. Engine start-up is excluded from the timing; the
rounds are noisier (each has its own warm-up).

Prints tokens/s per round, the median of each condition, and the ratio (profiled / plain).

    python bench/overhead.py --model DIR [--mode toggle|steps|processes] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def workload(n_requests: int, max_tokens: int):
    rng = random.Random(7)
    return [[rng.randrange(3, 1024) for _ in range(rng.randint(16, 64))] for _ in range(n_requests)], max_tokens


def make_llm(model: str, max_num_seqs: int):
    from vllm import LLM

    return LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=512,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=512,
        seed=0,
    )


def generate(llm, prompts, max_tokens, cpu: bool = False):
    """Tokens per second of one generation (and per CPU second of this process, with ``cpu``:
    less disturbed than wall time by other work on a shared machine)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return (tokens / dt, tokens / dc) if cpu else tokens / dt


def toggle(args) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_PROFILING_DIR", tempfile.mkdtemp(prefix="profilemate-bench-"))
    llm = make_llm(args.model, args.batch)
    import profilemate_vllm
    from profilemate_vllm import _hooks

    assert profilemate_vllm.is_active(), "the plugin did not activate (is profilemate-vllm installed?)"
    prompts, max_tokens = workload(args.batch, args.tokens)
    for _ in range(2):  # warm-up, both ways
        generate(llm, prompts, max_tokens)
    results = {"on": [], "off": []}
    cpu_results = {"on": [], "off": []}
    collector_cpu, on_wall = 0.0, 0.0
    order = ["on", "off"]
    for i in range(args.rounds * 2):
        mode = order[(i + i // 2) % 2]  # on off off on on off ...: no condition always goes first
        if mode == "on":
            _hooks.install()
        else:
            _hooks.uninstall()
        c0, w0 = thread_cpu("profilemate-col"), time.perf_counter()
        tps, cps = generate(llm, prompts, max_tokens, cpu=True)
        if mode == "on":
            collector_cpu += thread_cpu("profilemate-col") - c0
            on_wall += time.perf_counter() - w0
        results[mode].append(tps)
        cpu_results[mode].append(cps)
        print(f"round {i + 1:2d} plugin {mode:3s}: {tps:8.1f} tokens/s, {cps:8.1f} tokens per CPU second", flush=True)
    _hooks.install()
    report(results, "toggle (one in-process engine)")
    report(cpu_results, "same rounds, tokens per CPU second of the process", unit="tokens/CPU-s")
    print(
        f"profilemate's collector thread (drains, aggregates, writes the files): {collector_cpu:.2f} CPU s "
        f"over {on_wall:.1f} s of profiled generation ({collector_cpu / max(on_wall, 1e-9) * 100:.2f} % of one core)"
    )
    cost = hook_cost(llm, prompts)
    step_ms = args.batch / max(results["off"]) * 1000
    print(
        f"fastest decode step seen without the plugin: about {step_ms:.2f} ms (batch {args.batch}); "
        f"the plugin's {cost / 1000:.2f} us per step is {cost / (step_ms * 1e6) * 100:.2f} % of it"
    )


def steps(args) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_PROFILING_DIR", tempfile.mkdtemp(prefix="profilemate-bench-"))
    llm = make_llm(args.model, args.batch)
    import profilemate_vllm
    from profilemate_vllm import _hooks
    from vllm import SamplingParams

    assert profilemate_vllm.is_active(), "the plugin did not activate (is profilemate-vllm installed?)"
    engine = llm.llm_engine
    prompts, max_tokens = workload(args.batch, args.tokens)
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    pc = time.perf_counter_ns
    counter = [0]

    def one_round():
        """Durations (ns) of the round's decode steps: all but the first steps (prompts being
        prefilled, in chunks of the token budget) and the last two (requests finishing)."""
        counter[0] += 1
        for j, p in enumerate(prompts):
            engine.add_request(f"r{counter[0]}-{j}", {"prompt_token_ids": p}, params)
        times = []
        while engine.has_unfinished_requests():
            t0 = pc()
            engine.step()
            times.append(pc() - t0)
        prefill_steps = -(-sum(len(p) for p in prompts) // 512) + 2
        return times[prefill_steps:-2]

    for _ in range(2):  # warm-up, both ways
        _hooks.uninstall()
        one_round()
        _hooks.install()
        one_round()
    per_round = {"on": [], "off": []}
    pooled = {"on": [], "off": []}
    for i in range(args.rounds * 2):
        mode = ["on", "off"][(i + i // 2) % 2]  # on off off on on off ...
        if mode == "on":
            _hooks.install()
        else:
            _hooks.uninstall()
        t = one_round()
        per_round[mode].append(statistics.median(t))
        pooled[mode].extend(t)
        print(f"round {i + 1:2d} plugin {mode:3s}: {len(t)} decode steps, median {statistics.median(t) / 1e6:.3f} ms, "
              f"fastest {min(t) / 1e6:.3f} ms", flush=True)
    _hooks.install()
    print(f"\nsteps (one in-process engine, decode steps of batch {args.batch}): {args.rounds} rounds each, "
          f"{len(pooled['on'])} / {len(pooled['off'])} steps with / without the plugin")
    for q in (0.1, 0.25, 0.5):
        on_q, off_q = quantile(sorted(pooled["on"]), q), quantile(sorted(pooled["off"]), q)
        print(f"  p{int(q * 100):<2d} step time: {off_q / 1e6:.4f} ms without, {on_q / 1e6:.4f} ms with: "
              f"tokens/s ratio {off_q / on_q:.4f} ({(on_q / off_q - 1) * 100:+.2f} % step time)")
    # Rounds (2k, 2k+1) are one of each, side by side in time: drifts cancel in the pair's ratio.
    ratios = sorted(off_ / on_ for on_, off_ in zip(per_round["on"], per_round["off"]))
    lo, hi = median_ci(ratios)
    print(f"  median of the {len(ratios)} pair ratios of median step times, as tokens/s with / without: "
          f"{statistics.median(ratios):.4f} (95 % CI {lo:.4f} .. {hi:.4f})")


def quantile(sorted_values, q: float) -> float:
    return sorted_values[round((len(sorted_values) - 1) * q)]


def median_ci(sorted_values):
    """Distribution-free 95 % confidence interval of the median (order statistics n/2 -+ 0.98 sqrt n)."""
    n = len(sorted_values)
    half = 0.98 * n**0.5
    lo = max(int(n / 2 - half), 1) - 1
    hi = min(int(-(-(n / 2 + 1 + half) // 1)), n) - 1
    return sorted_values[lo], sorted_values[hi]


def thread_cpu(name_prefix: str) -> float:
    """CPU seconds used so far by this process's threads whose name starts with ``name_prefix``
    (Linux; 0 elsewhere)."""
    total = 0.0
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as f:
                if not f.read().startswith(name_prefix):
                    continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        pass
    return total


def hook_cost(llm, prompts) -> float:
    """The plugin's own per-step cost: its wrappers, around no-op stand-ins for vLLM's methods,
    driven with a real decode-step ``SchedulerOutput`` captured from the engine."""
    from profilemate_vllm import _hooks, _plugin

    captured = []
    real = _plugin.after_schedule

    def capture(sched, out, dt):
        captured.append((sched, out))
        return real(sched, out, dt)

    _plugin.after_schedule = capture
    try:
        generate(llm, prompts, 16)
    finally:
        _plugin.after_schedule = real
    decode = [(s, o) for s, o in captured if not o.scheduled_new_reqs]
    sched, so = max(decode, key=lambda so_: len(so_[1].num_scheduled_tokens))
    core = llm.llm_engine.engine_core.engine_core
    worker = core.model_executor.driver_worker.worker
    runner = worker.model_runner

    # No-op stand-ins with the parameters of the methods they stand for (the wrappers have a
    # faster form for exactly those).
    def noop(self, *a, **k):
        return None

    def schedule_stub(self, throttle_prefills=False):
        return so

    def prepare_stub(self, scheduler_output, num_scheduled_tokens):
        return None

    def sample_stub(self, grammar_output):
        return None

    def update_stub(self, scheduler_output, model_runner_output):
        return None

    def forward_stub(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None,
                     **model_kwargs):
        return None

    schedule = _hooks._schedule(schedule_stub)
    prepare = _hooks._cpu_op(_plugin.OP_BATCH_PREPARATION, "bench")(prepare_stub)
    forward = _hooks._model_forward(forward_stub)

    def runner_execute(self, scheduler_output, intermediate_tensors=None):
        prepare(self, scheduler_output, None)
        # As vLLM calls it: keywords.
        forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None)

    execute = _hooks._execute_model(False)(runner_execute)

    def worker_stub(self, scheduler_output):
        return execute(runner, scheduler_output)

    worker_execute = _hooks._worker_execute_model(worker_stub)
    sample = _hooks._sample_tokens("bench")(sample_stub)
    # The end of the engine core's step (wrapped since the step ids; a baseline without the
    # wrapper calls vLLM's method bare).
    update_wrapper = getattr(_hooks, "_update_from_output", None)
    update = update_wrapper(update_stub) if update_wrapper is not None else update_stub

    try:
        from profilemate_vllm._state import STATE
    except ImportError:  # the layout before the state object (for --mode cost-compare)
        STATE = None

    def forget_last():
        if STATE is not None:
            STATE.last_so = None
        else:
            _plugin._last_so = None

    def step(reuse_phase: bool):
        schedule(sched)
        held = 0
        if not reuse_phase:
            forget_last()  # a worker process classifies the step itself
            # ... and opens the step id itself (the engine core's step is not open there)
            held = getattr(STATE, "engine_step", 0)
            if held:
                STATE.engine_step = 0
        worker_execute(worker, so)
        sample(runner, None)
        if held:
            STATE.engine_step = held
        update(sched, so, None)

    def plain():  # vLLM's seven methods, without the plugin
        schedule_stub(sched)
        noop(worker, so)
        noop(runner, so)
        prepare_stub(runner, so, None)
        forward_stub(runner, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None)
        sample_stub(runner, None)
        update_stub(sched, so, None)

    def per_call(f, n=20000):
        for _ in range(2000):
            f()
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter_ns()
            for _ in range(n):
                f()
            best = min(best, (time.perf_counter_ns() - t0) / n)
        return best

    base = per_call(plain)
    inproc = per_call(lambda: step(True)) - base
    if getattr(STATE, "worker_here", False):
        # The engine core of a split engine has no model runner in its process: its outputs
        # carry the step id and phase to the workers.
        STATE.worker_here = False
    split = per_call(lambda: step(False)) - base
    print(
        f"\nper-step cost of the plugin (decode step, batch {len(so.num_scheduled_tokens)}; best of 7 x 20000, "
        f"no-op stand-ins for vLLM's methods subtracted): {inproc / 1000:.2f} us in-process, "
        f"{split / 1000:.2f} us with scheduler and worker in separate processes"
    )
    hook_cost.last = (inproc, split)
    return inproc


def cost(args) -> None:
    """Only the per-step cost of the installed plugin (``hook_cost``), as a JSON line."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_PROFILING_DIR", tempfile.mkdtemp(prefix="profilemate-bench-"))
    llm = make_llm(args.model, args.batch)
    prompts, _ = workload(args.batch, args.tokens)
    hook_cost(llm, prompts)
    inproc, split = hook_cost.last
    print(json.dumps({"inproc_ns": inproc, "split_ns": split}))


def cost_compare(args) -> None:
    """The per-step cost of a baseline copy of the package (``--baseline DIR``, a directory
    holding a ``profilemate_vllm`` package, put first on ``PYTHONPATH``) and of the installed one,
    in alternating fresh processes of ``--mode cost``: before and after, side by side."""
    results = {"baseline": [], "installed": []}
    for i in range(args.rounds * 2):
        which = ["baseline", "installed"][(i + i // 2) % 2]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_PROFILING_", "PROFILEMATE_"))}
        if which == "baseline":
            env["PYTHONPATH"] = args.baseline + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, __file__, "--model", args.model, "--mode", "cost", "--batch", str(args.batch)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        r = json.loads([line for line in p.stdout.splitlines() if line.startswith('{"inproc_ns"')][-1])
        results[which].append(r)
        print(f"round {i + 1:2d} {which:9s}: {r['inproc_ns'] / 1000:.2f} us in-process, "
              f"{r['split_ns'] / 1000:.2f} us split", flush=True)
    print(f"\nper-step cost of the plugin, median of {args.rounds} fresh processes each:")
    for which, rs in results.items():
        print(f"  {which:9s}: {statistics.median(r['inproc_ns'] for r in rs) / 1000:.2f} us in-process, "
              f"{statistics.median(r['split_ns'] for r in rs) / 1000:.2f} us split")


def processes(args) -> None:
    results = {"on": [], "off": []}
    for i in range(args.rounds * 2):
        mode = ["on", "off"][(i + i // 2) % 2]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_PROFILING_", "PROFILEMATE_"))}
        if mode == "on":
            env["VLLM_PROFILING_DIR"] = tempfile.mkdtemp(prefix="profilemate-bench-")
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, __file__, "--model", args.model, "--one-round", out.name,
                   "--batch", str(args.batch), "--tokens", str(args.tokens)]
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            tps = json.load(open(out.name))["tokens_per_sec"]
        results[mode].append(tps)
        print(f"round {i + 1:2d} plugin {mode:3s}: {tps:8.1f} tokens/s", flush=True)
    report(results, "processes (default multi-process engine, one process per round)")


def one_round(args) -> None:
    llm = make_llm(args.model, args.batch)
    prompts, max_tokens = workload(args.batch, args.tokens)
    generate(llm, prompts, max_tokens)  # warm-up
    tps = statistics.median(generate(llm, prompts, max_tokens) for _ in range(3))
    with open(args.one_round, "w") as f:
        json.dump({"tokens_per_sec": tps}, f)


def report(results, how: str, unit: str = "tokens/s") -> None:
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    best_on, best_off = max(results["on"]), max(results["off"])
    print(f"\n{how}: {len(results['on'])} rounds each")
    print(f"median {unit} without plugin: {off:.1f}   best: {best_off:.1f}")
    print(f"median {unit} with plugin:    {on:.1f}   best: {best_on:.1f}")
    print(f"ratio (with / without): median {on / off:.4f} ({(1 - on / off) * 100:+.2f} % loss), "
          f"best {best_on / best_off:.4f} ({(1 - best_on / best_off) * 100:+.2f} % loss)")
    # Rounds run on, off, off, on, on, off, ...: each pair (2k, 2k+1) is one of each, side by side
    # in time, so slow drifts of the machine's load cancel in the pair's ratio.
    ratios = sorted(on_ / off_ for on_, off_ in zip(results["on"], results["off"]))
    print(f"median of the {len(ratios)} side-by-side pair ratios: {statistics.median(ratios):.4f} "
          f"({(1 - statistics.median(ratios)) * 100:+.2f} % loss)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", choices=["toggle", "steps", "processes", "cost", "cost-compare"], default="toggle")
    ap.add_argument("--baseline", help="--mode cost-compare: a directory holding the baseline profilemate_vllm")
    ap.add_argument("--rounds", type=int, default=8, help="rounds per condition")
    ap.add_argument("--batch", type=int, default=16, help="requests, all running at once")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--one-round", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.one_round:
        one_round(args)
    elif args.mode == "toggle":
        toggle(args)
    elif args.mode == "steps":
        steps(args)
    elif args.mode == "cost":
        cost(args)
    elif args.mode == "cost-compare":
        cost_compare(args)
    else:
        processes(args)


if __name__ == "__main__":
    main()
