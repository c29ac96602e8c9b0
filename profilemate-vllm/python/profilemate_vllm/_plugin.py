"""The vLLM plugin: activation, one recording session per process, and the hooks.

vLLM loads the ``vllm.general_plugins`` entry point in every process (front end, engine core,
each worker) and calls :func:`register`. Unless ``VLLM_PROFILING_DIR`` or ``PROFILEMATE_DIR`` is
set it returns at once: nothing is imported, patched or written.

When active, it wraps a fixed list of vLLM V1 methods (:data:`profilemate_vllm._hooks.SPECS`),
each after checking that it exists with the parameters this version expects. Modules that are
not imported yet are wrapped the moment vLLM imports them, so vLLM's import order is unchanged.
Every wrapper calls the original with the same arguments and returns what it returned; it only
reads vLLM's objects. An exception in our own code is caught, counted, reported once per hook,
and vLLM goes on.

Each process records into its own part, ``DIR/parts/<run>/<role>-<pid>/``, opened at its first
record, with the CUDA graph and MoE routing trackers on only where that process has something for
them (a model runner with CUDA graphs, MoE layers; see :mod:`profilemate_vllm._trackers`). The
front end (the process that is not a multiprocessing child) merges the run's parts into the
top-level contract files when vLLM shuts its engine down, and again at exit.
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

from ._phase import classify

logger = logging.getLogger("vllm.profilemate")

RUN_ENV = "PROFILEMATE_VLLM_RUN"
_pc = time.perf_counter_ns

# Operation and component codes of the native module.
OP_SCHEDULING, OP_BATCH_PREPARATION, OP_MODEL_EXECUTION, OP_SAMPLING = 0, 1, 2, 3
ENCODER, DECODER = 0, 1

# --- process state -----------------------------------------------------------------------------

_register_calls = 0
_active = False
_native: Any = None
_config: Dict[str, Any] = {}
OUT_DIR = ""
RUN = ""
IS_FRONTEND = False
RANK: Optional[int] = None
F_FWD = F_CPU = F_BATCH = F_PRE = F_ENC = F_KV = False
F_GRAPH = F_MOE = False  # the CUDA graph and MoE routing trackers (see _trackers)

rec: Any = None  # the native Recorder of this process, opened at the first record
_lock = threading.RLock()
_open_failed = False
_exiting = False
_logged_line = False
_part_seq = 0
_part_dir: Optional[str] = None
_leaked: List[Any] = []  # recorders inherited through fork: never shut down (their thread is gone)
_errors: Dict[str, int] = {}
_hook_status: Dict[str, str] = {}
_model_type: Optional[str] = None
_timing = "host"
_cuda: Any = None  # the CUDA event timer, on a GPU

# Per-step state: the scheduler's last output (in-process, the worker reuses its phase).
_last_so: Any = None
_last_phase = 0
_last_nseq = 0
_preempted: set = set()
# Requests recomputing their KV cache after a preemption (see _phase.classify).
_recompute: Dict[str, int] = {}
# Worker side.
_in_step = False
_fwd_ns = 0
_step_phase = 0
_sample_pending = False
# Trackers (worker side): what the model runner said when it set up its KV cache.
_model_seen = False
_graphs_on = False  # its CUDA graph mode is not NONE (or vLLM captured graphs)
_graph_mode = ""
_graph_watch: Any = None  # in a real step with graphs on: the V1 dispatcher / V2 runner that decides
_graph_step: Any = None  # (mode, descriptor) it decided for this step
_capturing = 0  # inside V1's capture loop (not its memory profiling)
_capture_manager: Any = None  # V2: the runner's graph manager while capture_model(profile_only=False) runs
_graph_counts = {"capture": 0, "replay": 0, "eager": 0, "unrecorded": 0}
# Set when a model runner is ready and this process is not the one that records a tracker for
# its parallel group (see model_ready): the reason, for the log line; None when it records.
_graph_elsewhere: Optional[str] = None
_moe_elsewhere: Optional[str] = None
_moe: Any = None  # _trackers.MoeRouting, once a MoE layer is known
_rec_graph = _rec_moe = False  # what the open recorder records


def _env_activated() -> bool:
    for name in ("PROFILEMATE_DIR", "VLLM_PROFILING_DIR"):
        if os.environ.get(name, "").strip():
            return os.environ.get("PROFILEMATE_ENABLED", "1").strip().lower() not in ("0", "false", "no", "off")
    return False


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Inert unless profiling is activated."""
    global _register_calls
    _register_calls += 1
    if _active or not _env_activated():
        return
    try:
        _activate()
    except Exception as e:  # never take vLLM down
        logger.warning("profilemate: not profiling in this process: %s", e)


def is_active() -> bool:
    """Whether this process has activated the plugin."""
    return _active


def _activate() -> None:
    global _active, _native, _config, OUT_DIR, RUN, IS_FRONTEND
    global F_FWD, F_CPU, F_BATCH, F_PRE, F_ENC, F_KV, F_GRAPH, F_MOE
    from . import _native as native

    try:
        config = json.loads(native.resolve_config())
    except ValueError as e:
        logger.error("profilemate: not profiling: %s", e)
        return
    if not config.get("enabled", True):
        return
    _native, _config = native, config
    OUT_DIR = os.path.abspath(str(config["dir"]))
    disabled = set(config.get("disabled") or ())
    F_FWD = "forward_pass" not in disabled
    F_CPU = "cpu_timing" not in disabled
    F_BATCH = "batch_utilization" not in disabled
    F_PRE = "preemption" not in disabled
    F_ENC = "encoder_decoder" not in disabled
    F_KV = "kv_cache" not in disabled
    F_GRAPH = "cuda_graph" not in disabled
    F_MOE = "moe_expert" not in disabled
    IS_FRONTEND = multiprocessing.parent_process() is None
    if IS_FRONTEND or not os.environ.get(RUN_ENV):
        # A new run; the engine processes spawned from here inherit its id.
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        os.environ[RUN_ENV] = f"{stamp}-{os.getpid()}"
    RUN = os.environ[RUN_ENV]
    _active = True

    from . import _hooks

    _hooks.install()
    atexit.register(_at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork)


def _role() -> str:
    if multiprocessing.parent_process() is None:
        return "main"
    name = multiprocessing.current_process().name
    if name.startswith("EngineCore"):
        return "engine" + name[len("EngineCore") :].lower().replace("_", "-")
    if name.startswith("VllmWorker"):
        return "worker"
    return "proc"


# --- the session of this process -----------------------------------------------------------------


def _open() -> Any:
    """The recorder of this process, opened at the first record; None if it cannot record."""
    global rec, _open_failed, _part_dir, _logged_line, _rec_graph, _rec_moe
    if _open_failed or _exiting or not _active:
        return None
    with _lock:
        if rec is not None:
            return rec
        try:
            part = f"{_role()}-{os.getpid()}" + (f"-{_part_seq}" if _part_seq else "")
            part_dir = os.path.join(OUT_DIR, "parts", RUN, part)
            # The trackers this process has something for, as far as it knows now (the model
            # runner set up before the first step); the others write no files.
            trackers = []
            if F_GRAPH and _graphs_on:
                trackers.append("cuda_graph")
            if F_MOE and _moe is not None and _moe.recordable():
                trackers.append("moe_expert")
            r = _native.Recorder(part_dir, _timing, trackers)
            if _model_type is not None:
                r.declare_model_type(_model_type)
            enabled = set(r.trackers)
            _rec_graph, _rec_moe = "cuda_graph" in enabled, "moe_expert" in enabled
            if _moe is not None:
                _moe.recording = _rec_moe
            _part_dir = part_dir
            rec = r
            _write_part_json()
        except Exception as e:
            _open_failed = True
            logger.warning("profilemate: cannot record in this process: %s", e)
            return None
        if not _logged_line:
            _logged_line = True
            logger.info("%s", instrumentation_line())
    return rec


def instrumentation_line() -> str:
    """The one line a process logs: what it instrumented, what it could not, where it writes."""
    from ._hooks import summarize

    done, failed, pending = summarize(_hook_status)
    parts = [f"profilemate: {_role()} pid {os.getpid()}: instrumented {done or 'nothing'}"]
    parts.append(f"could not instrument: {failed}" if failed else "could not instrument: nothing")
    if pending:
        parts.append(f"not loaded in this process: {pending}")
    parts.append(f"CUDA graphs: {graph_status()}")
    parts.append(f"MoE routing: {moe_status()}")
    if _part_dir:
        parts.append(f"recording into {_part_dir} ({_timing} clock)")
    return "; ".join(parts)


def _hook_prefix(key: str) -> str:
    """``KEY hooked, `` / ``KEY not hooked (why), `` / nothing while its module is not loaded."""
    state = _hook_status.get(key, "pending")
    if state == "ok":
        return f"{key} hooked, "
    return "" if state == "pending" else f"{key} not hooked ({state}), "


def graph_status() -> str:
    """What this process does about CUDA graphs, for the log line and part.json."""
    if not F_GRAPH:
        return "switched off (cuda_graph in PROFILEMATE_DISABLE/VLLM_PROFILING_DISABLE)"
    if not _model_seen:
        return "no model runner in this process"
    if _graph_elsewhere:
        return _graph_elsewhere
    v1 = _hook_status.get("CudagraphDispatcher.dispatch") == "ok"
    hooked = _hook_prefix("CudagraphDispatcher.dispatch" if v1 else "GPUModelRunner[V2].prepare_inputs")
    if not _graphs_on:
        return f"{hooked}graphs off in this process (cudagraph_mode {_graph_mode or 'NONE'}): nothing recorded"
    c = _graph_counts
    text = (
        f"{hooked}graphs on (cudagraph_mode {_graph_mode}): {c['capture']} captures timed, "
        f"{c['replay']} replayed and {c['eager']} eager steps so far"
    )
    if c["unrecorded"]:
        text += f"; {c['unrecorded']} events after this process's files were opened without graphs: not recorded"
    return text


def moe_status() -> str:
    """What this process does about MoE routing, for the log line and part.json."""
    if not F_MOE:
        return "switched off (moe_expert in PROFILEMATE_DISABLE/VLLM_PROFILING_DISABLE)"
    if not _model_seen and _moe is None:
        return "no model in this process"
    if _moe_elsewhere:
        return _moe_elsewhere
    body = _moe.describe() if _moe is not None else "no MoE layer in this model"
    return _hook_prefix("FusedMoERouter.select_experts") + body


def _write_part_json(final: bool = False) -> None:
    if _part_dir is None:
        return
    info = {
        "role": _role(),
        "pid": os.getpid(),
        "rank": RANK,
        "process_name": multiprocessing.current_process().name,
        "run": RUN,
        "timing": _timing,
        "hooks": dict(_hook_status),
        "hook_errors": dict(_errors),
        "trackers": {"cuda_graph": graph_status(), "moe_expert": moe_status()},
        "cuda_graph": {"mode": _graph_mode or None, "on": _graphs_on, **_graph_counts},
        "moe_expert": _moe.report() if _moe is not None else None,
        "finished": final,
    }
    tmp = os.path.join(_part_dir, "part.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(_part_dir, "part.json"))


def _set_rank(rank: Any) -> None:
    global RANK
    if isinstance(rank, int) and rank != RANK:
        RANK = rank
        if rec is not None:
            try:
                _write_part_json()
            except Exception as e:
                _fail("part.json", e)


def finalize_process() -> None:
    """Writes this process's last rows, summaries and manifest (later records reopen a part)."""
    global rec, _part_seq
    with _lock:
        r = rec
        rec = None
        if r is None:
            return
        _part_seq += 1
    try:
        if _cuda is not None:
            _cuda.drain(r)
        if _moe is not None:
            _moe.drain(r if _rec_moe else None)
        r.shutdown()
        _write_part_json(final=True)
        if _errors:
            logger.warning(
                "profilemate: errors caught in its hooks (vLLM unaffected): %s",
                ", ".join(f"{k} x{v}" for k, v in sorted(_errors.items())),
            )
    except Exception as e:
        logger.warning("profilemate: could not finish this process's files: %s", e)


def merge_run(quiet_if_incomplete: bool = False) -> Optional[Dict[str, Any]]:
    """Front end only: merges this run's parts into the top-level files of ``OUT_DIR``.

    ``quiet_if_incomplete``: at exit, vLLM may stop its engine processes after this handler
    ran; their parts are merged again then, so an incomplete merge here is not reported."""
    global _merged_signature, _logged_line
    if not (IS_FRONTEND and _active):
        return None
    if not _logged_line:
        # A front end whose engine ran in other processes recorded nothing itself.
        _logged_line = True
        logger.info("%s", instrumentation_line())
    run_dir = os.path.join(OUT_DIR, "parts", RUN)
    if not os.path.isdir(run_dir):
        return None
    signature = _parts_signature(run_dir)
    if signature == _merged_signature:
        return None  # nothing was written since the last merge
    try:
        report = json.loads(_native.merge(OUT_DIR, RUN))
    except Exception as e:
        logger.warning("profilemate: could not merge the parts of run %s: %s", RUN, e)
        return None
    _merged_signature = signature
    incomplete = [p["dir"] for p in report["parts"] if not p["finished"]]
    if incomplete and quiet_if_incomplete:
        return report
    logger.info(
        "profilemate: wrote %s from %d process part(s) of run %s (%d forward passes)%s",
        OUT_DIR,
        len(report["parts"]),
        RUN,
        report["rows"].get("forward_pass_timing.csv", 0),
        f"; not shut down cleanly: {', '.join(incomplete)}" if incomplete else "",
    )
    return report


_merged_signature: Any = None


def _parts_signature(run_dir: str) -> Any:
    """Size and time of every file of every part: a merge is redone when anything changed."""
    sig = []
    for name in sorted(os.listdir(run_dir)):
        part = os.path.join(run_dir, name)
        try:
            for f in sorted(os.listdir(part)):
                st = os.stat(os.path.join(part, f))
                sig.append((name, f, st.st_mtime_ns, st.st_size))
        except OSError:
            sig.append((name, None, None, None))
    return tuple(sig)


def _at_exit() -> None:
    global _exiting
    _exiting = True
    finalize_process()
    merge_run(quiet_if_incomplete=True)


def _after_fork() -> None:
    # The child has the parent's recorder but not its collector thread: keep it alive, unused.
    global rec, IS_FRONTEND, _part_seq, _logged_line, _open_failed, _moe, _model_seen, _graphs_on, _graph_mode
    global _graph_elsewhere, _moe_elsewhere
    if rec is not None:
        _leaked.append(rec)
    rec = None
    # The child builds its own model runner, if any.
    _moe = None
    _model_seen = _graphs_on = False
    _graph_mode = ""
    _graph_elsewhere = _moe_elsewhere = None
    for k in _graph_counts:
        _graph_counts[k] = 0
    IS_FRONTEND = False
    _recompute.clear()
    _part_seq = 0
    _logged_line = False
    _open_failed = False


def _fail(where: str, exc: BaseException) -> None:
    n = _errors.get(where, 0) + 1
    _errors[where] = n
    if n == 1:
        logger.warning(
            "profilemate: error in its %s hook, caught; vLLM goes on (later errors there are only counted): %r",
            where,
            exc,
        )


# --- what the hooks call ---------------------------------------------------------------------------


def after_schedule(sched: Any, out: Any, dt: int) -> None:
    """A non-empty ``SchedulerOutput``: phase, scheduling time, batch, lifecycle, KV cache."""
    global _last_so, _last_phase, _last_nseq
    r = rec if rec is not None else _open()
    if r is None:
        return
    phase, nseq = classify(out, _recompute)
    _last_so, _last_phase, _last_nseq = out, phase, nseq
    if F_PRE:
        pending = _preempted
        for new in out.scheduled_new_reqs:
            rid = new.req_id
            if rid in pending:
                pending.discard(rid)
                r.resumed(rid)
            else:
                r.started(rid)
        resumed = out.scheduled_cached_reqs.resumed_req_ids
        if resumed:
            for rid in resumed:
                pending.discard(rid)
                r.resumed(rid)
    if F_BATCH:
        running, waiting = sched.get_request_counts()
    else:
        running = waiting = 0
    if F_KV:
        kvm = sched.kv_cache_manager
        pool = kvm.block_pool
        total = pool.num_gpu_blocks - 1  # one block is vLLM's null block, never free
        used = total - pool.get_num_free_blocks()
        stats = kvm.prefix_cache_stats  # reset by vLLM after every step when it logs stats
        q, h = (stats.queries, stats.hits) if stats is not None else (0, 0)
    else:
        total = used = q = h = -1
    # One call records the scheduling time, the batch and the KV cache reading.
    r.scheduled(
        phase,
        dt if F_CPU else -1,
        nseq,
        sched.max_num_running_reqs,
        out.total_num_scheduled_tokens,
        sched.max_num_scheduled_tokens,
        running,
        waiting,
        used,
        total,
        q,
        h,
    )


def before_preempt(sched: Any, request: Any) -> Any:
    """What a preemption frees, read before vLLM resets it."""
    try:
        blocks = sum(len(b) for b in sched.kv_cache_manager.get_block_ids(request.request_id))
    except Exception:
        blocks = None
    return (request.request_id, request.num_computed_tokens, blocks)


def after_preempt(request: Any, before: Any) -> None:
    r = rec if rec is not None else _open()
    if r is None:
        return
    rid, computed, blocks = before
    extra = f"num_computed_tokens={computed}"
    if blocks is not None:
        extra += f";num_blocks={blocks}"
    extra += f";num_output_tokens={request.num_output_tokens};num_preemptions={request.num_preemptions}"
    _preempted.add(rid)
    r.preempted(rid, "RECOMPUTE", extra)


_EVICTED = {"FINISHED_ABORTED": "aborted", "FINISHED_IGNORED": "ignored", "FINISHED_ERROR": "error"}


def after_free(request: Any) -> None:
    r = rec if rec is not None else _open()
    if r is None:
        return
    rid = request.request_id
    _preempted.discard(rid)
    status = getattr(request.status, "name", str(request.status))
    extra = (
        f"status={status};num_prompt_tokens={request.num_prompt_tokens};"
        f"num_output_tokens={request.num_output_tokens};num_preemptions={request.num_preemptions}"
    )
    reason = _EVICTED.get(status)
    if reason is None:
        r.finished(rid, extra)
    else:
        r.evicted(rid, reason, extra)


def detect_model(runner: Any) -> None:
    """Declares the model type from the runner's model configuration (once per process)."""
    global _model_type, _timing, _cuda
    mc = runner.model_config
    ed = bool(getattr(mc, "is_encoder_decoder", False) or getattr(mc, "is_multimodal_model", False))
    _model_type = "encoder_decoder" if ed else "decoder_only"
    backend = _config.get("backend", "auto")
    device = getattr(getattr(runner, "device", None), "type", "cpu")
    if backend != "host" and device == "cuda":
        from ._cuda import CudaTimer

        _cuda = CudaTimer(int(_config.get("cuda_event_batch", 100)))
        _timing = "cuda"
        if rec is not None:
            # In-process, the scheduler opened this process's part first, with the host clock
            # named in its manifest; part.json says which clock timed the forward passes.
            _write_part_json()
    elif backend == "cuda":
        logger.warning("profilemate: CUDA events asked for, but the model runs on %s: using the host clock", device)
    if rec is not None:
        rec.declare_model_type(_model_type)


def begin_step(runner: Any, so: Any, v2: bool) -> Any:
    """Before a non-empty ``execute_model``: the step's phase and size."""
    global _in_step, _fwd_ns, _step_phase
    if _model_type is None:
        detect_model(runner)
    if so is _last_so:
        phase, nseq = _last_phase, _last_nseq
    else:
        phase, nseq = classify(so, _recompute)
    ntok = so.total_num_scheduled_tokens
    _fwd_ns = 0
    _in_step = True
    _step_phase = phase
    if _graphs_on:
        _graph_begin(runner, v2)
    if _moe is not None:
        try:
            _moe.begin_step(ntok)
        except Exception as e:
            _fail("MoE routing tracker", e)
    if _cuda is not None:
        _cuda.start()
    return (phase, nseq, ntok)


def end_step(step: Any, dt: int, v2: bool) -> None:
    global _in_step, _sample_pending
    _in_step = False
    r = rec if rec is not None else _open()
    if r is not None:
        phase, nseq, ntok = step
        _sample_pending = True
        if _cuda is not None:
            if F_CPU:
                r.cpu(OP_MODEL_EXECUTION, dt, phase)
            _cuda.stop(step)
            _cuda.poll(r)
        else:
            # One call records model_execution, the forward pass and the language model's time.
            r.executed(phase, nseq, ntok, dt if F_CPU else -1, _fwd_ns or dt)
    # The trackers (a dense model on a CPU: two checks).
    if _graph_watch is not None:
        try:
            _graph_end(r, step[2])
        except Exception as e:
            _fail("CUDA graph tracker", e)
    if _moe is not None:
        try:
            _moe.end_step(r if _rec_moe else None)
        except Exception as e:
            _fail("MoE routing tracker", e)


# --- trackers: CUDA graphs and MoE routing (see _trackers) -----------------------------------------


def model_ready(runner: Any, v2: bool) -> None:
    """A model runner has set up its KV cache (after loading the model, before any step): its
    CUDA graph mode, and the MoE layers vLLM built."""
    global _model_seen, _graphs_on, _graph_mode, _moe, _graph_elsewhere, _moe_elsewhere
    from ._trackers import MoeRouting, runner_graph_mode

    _model_seen = True
    # Every tensor-parallel rank routes the same tokens and runs the same step: one rank per group
    # records, or the merged files would count each step and each token once per rank. Pipeline
    # stages hold different layers (each stage's first tensor-parallel rank records its MoE
    # layers) but run the same steps (the first stage records the graph decisions).
    tp, pp = parallel_ranks()
    if tp:
        _moe_elsewhere = f"tensor-parallel rank {tp}: its routing is the same as rank 0's, recorded there"
        _moe = None  # a profiling run before this may have found the routers
    if tp or pp:
        _graph_elsewhere = (
            f"tensor-parallel rank {tp}, pipeline rank {pp}: the same steps are recorded by the first rank"
        )
    if F_GRAPH and not _graph_elsewhere:
        _graph_mode = runner_graph_mode(runner, v2)
        _graphs_on = _graph_mode != "NONE"
    if F_MOE and not _moe_elsewhere:
        cc = getattr(runner, "compilation_config", None)
        if cc is None:
            cc = getattr(getattr(runner, "vllm_config", None), "compilation_config", None)
        names = getattr(cc, "static_all_moe_layers", None)
        if names:
            if _moe is None:
                _moe = MoeRouting()
            _moe.discover(cc)


def parallel_ranks() -> Tuple[int, int]:
    """This process's (tensor-parallel, pipeline-parallel) rank; (0, 0) when vLLM's parallel
    state is not set up."""
    try:
        from vllm.distributed import parallel_state as ps

        return int(ps.get_tensor_model_parallel_rank()), int(ps.get_pp_group().rank_in_group)
    except Exception:
        return 0, 0


def moe_routed(router: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """``FusedMoERouter.select_experts`` returned ``out`` (in a real step, or not)."""
    global _moe
    if _moe_elsewhere:
        return
    if _moe is None:
        from ._trackers import MoeRouting

        _moe = MoeRouting()
        if rec is not None:
            _moe.recording = _rec_moe
    if _in_step:
        _moe.route(router, args, kwargs, out[1])
    elif id(router) not in _moe.layers:
        _moe.register(router, None, kwargs.get("router_logits", args[1] if len(args) > 1 else None))


def _graph_begin(runner: Any, v2: bool) -> None:
    global _graph_watch, _graph_step
    _graph_step = None
    _graph_watch = runner if v2 else getattr(runner, "cudagraph_dispatcher", None)


def _graph_end(r: Any, ntok: int) -> None:
    """Records the step's replay or eager row from the decision vLLM made for it."""
    global _graph_watch, _graph_step
    decided, _graph_step, _graph_watch = _graph_step, None, None
    if decided is None:
        return
    mode, desc = decided
    replay = getattr(mode, "name", "NONE") != "NONE"
    _graph_counts["replay" if replay else "eager"] += 1
    if r is None:
        return
    if not _rec_graph:
        _graph_counts["unrecorded"] += 1
    elif replay:
        r.graph(1, ntok, int(desc.num_tokens))
    else:
        r.graph(2, ntok)


def graph_capture_starts() -> None:
    """Opens this process's part before the first capture, so that its row starts in it."""
    if rec is None:
        _open()


def graph_captured(num_tokens: int, ns: int) -> None:
    """vLLM captured a CUDA graph for ``num_tokens`` tokens in ``ns`` (host clock)."""
    global _graphs_on
    if _graph_elsewhere:
        return
    _graphs_on = True
    _graph_counts["capture"] += 1
    r = rec if rec is not None else _open()
    if r is None:
        return
    if _rec_graph:
        r.graph(0, num_tokens, -1, ns)
    else:
        _graph_counts["unrecorded"] += 1


def encoder_context(modalities: Any) -> str:
    names = []
    for m in modalities:
        n = "vision_encoder" if m in ("image", "video") else f"{m}_encoder"
        if n not in names:
            names.append(n)
    return "+".join(names) or "mm_encoder"
