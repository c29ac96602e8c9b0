"""What the hooks record: one recording session per process, driven through the state object.

Each process records into its own part, ``DIR/parts/<run>/<role>-<pid>/``, opened at its first
record, with the CUDA graph and MoE routing trackers on only where that process has something for
them (a model runner with CUDA graphs, MoE layers; see :mod:`profilemate_vllm._trackers`). The
front end (the process that is not a multiprocessing child) merges the run's parts into the
top-level contract files when vLLM shuts its engine down, and again at exit.

Every function here reads and writes :data:`profilemate_vllm._state.STATE` (``S``); the hooks
(:mod:`profilemate_vllm._hooks`) call them. Activation is in :mod:`profilemate_vllm._instrument`.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from ._phase import classify, forget_finished
from ._state import (
    DECODER,
    OP_BATCH_PREPARATION,
    OP_MODEL_EXECUTION,
    OP_SAMPLING,
    OP_SCHEDULING,
    PHASE_ATTR,
    STATE as S,
    STEP_ATTR,
    logger,
)

__all__ = ["OP_SCHEDULING", "OP_BATCH_PREPARATION", "OP_MODEL_EXECUTION", "OP_SAMPLING", "DECODER", "forget_finished"]


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
    if S.open_failed or S.exiting or not S.active:
        return None
    with S.lock:
        if S.rec is not None:
            return S.rec
        try:
            part = f"{_role()}-{os.getpid()}" + (f"-{S.part_seq}" if S.part_seq else "")
            part_dir = os.path.join(S.out_dir, "parts", S.run, part)
            # The trackers this process has something for, as far as it knows now (the model
            # runner set up before the first step); the others write no files.
            trackers = []
            if S.f_graph and S.graphs_on:
                trackers.append("cuda_graph")
            if S.f_moe and S.moe is not None and S.moe.recordable():
                trackers.append("moe_expert")
            r = S.native.Recorder(part_dir, S.timing, trackers)
            if S.model_type is not None:
                r.declare_model_type(S.model_type)
            enabled = set(r.trackers)
            S.rec_graph, S.rec_moe = "cuda_graph" in enabled, "moe_expert" in enabled
            if S.moe is not None:
                S.moe.recording = S.rec_moe
            S.part_dir = part_dir
            S.path = r.step_path()
            S.rec = r
            _write_part_json()
            _start_part_json_refresher(r)
        except Exception as e:
            S.open_failed = True
            logger.warning("profilemate: cannot record in this process: %s", e)
            return None
        if not S.logged_line:
            S.logged_line = True
            logger.info("%s", instrumentation_line())
    return S.rec


def instrumentation_line() -> str:
    """The one line a process logs: what it instrumented, what it could not, where it writes."""
    done, failed, pending = summarize()
    parts = [f"profilemate: {_role()} pid {os.getpid()}: instrumented {done or 'nothing'}"]
    parts.append(f"could not instrument: {failed}" if failed else "could not instrument: nothing")
    if pending:
        parts.append(f"not loaded in this process: {pending}")
    parts.append(f"CUDA graphs: {graph_status()}")
    parts.append(f"MoE routing: {moe_status()}")
    if S.part_dir:
        parts.append(f"recording into {S.part_dir} ({S.timing} clock)")
    return "; ".join(parts)


def summarize() -> Tuple[str, str, str]:
    """(instrumented, could not, not loaded) as text for the log line, from the hook table."""
    done: Dict[str, List[str]] = {}
    failed: List[str] = []
    pending: Dict[str, int] = {}
    for key, (label, method) in S.hook_labels.items():
        s = S.hook_status.get(key, "pending")
        if s == "off":
            continue  # its trackers are switched off (the log line says so)
        if s == "ok":
            done.setdefault(label, []).append(method)
        elif s == "pending":
            pending[label] = pending.get(label, 0) + 1
        else:
            failed.append(f"{key} ({s})")
    done_text = ", ".join(f"{label}.{'/'.join(methods)}" for label, methods in done.items())
    return done_text, "; ".join(failed), ", ".join(pending)


def _hook_prefix(key: str) -> str:
    """``KEY hooked, `` / ``KEY not hooked (why), `` / nothing while its module is not loaded."""
    state = S.hook_status.get(key, "pending")
    if state == "ok":
        return f"{key} hooked, "
    return "" if state == "pending" else f"{key} not hooked ({state}), "


def graph_status() -> str:
    """What this process does about CUDA graphs, for the log line and part.json."""
    if not S.f_graph:
        return "switched off (cuda_graph in PROFILEMATE_DISABLE/VLLM_PROFILING_DISABLE)"
    if not S.model_seen:
        return "no model runner in this process"
    if S.graph_elsewhere:
        return S.graph_elsewhere
    v1 = S.hook_status.get("CudagraphDispatcher.dispatch") == "ok"
    hooked = _hook_prefix("CudagraphDispatcher.dispatch" if v1 else "GPUModelRunner[V2].prepare_inputs")
    if not S.graphs_on:
        return f"{hooked}graphs off in this process (cudagraph_mode {S.graph_mode or 'NONE'}): nothing recorded"
    c = S.graph_counts
    text = (
        f"{hooked}graphs on (cudagraph_mode {S.graph_mode}): {c['capture']} captures timed, "
        f"{c['replay']} replayed and {c['eager']} eager steps so far"
    )
    if c["unrecorded"]:
        text += f"; {c['unrecorded']} events after this process's files were opened without graphs: not recorded"
    return text


def moe_status() -> str:
    """What this process does about MoE routing, for the log line and part.json."""
    if not S.f_moe:
        return "switched off (moe_expert in PROFILEMATE_DISABLE/VLLM_PROFILING_DISABLE)"
    if not S.model_seen and S.moe is None:
        return "no model in this process"
    if S.moe_elsewhere:
        return S.moe_elsewhere
    body = S.moe.describe() if S.moe is not None else "no MoE layer in this model"
    return _hook_prefix("FusedMoERouter.select_experts") + body


#: How often the refresher thread rewrites part.json while its counters change (seconds): the
#: binding's collector period, so a process killed without a shutdown (vLLM's force kill) leaves
#: counters at most this old beside rows at most this old.
PART_JSON_REFRESH_S = 1.0


def _part_counters() -> Tuple[Any, ...]:
    """What part.json reports that changes while the process runs (cheap to compare)."""
    moe = S.moe
    return (
        S.rank,
        len(S.hook_status),
        sum(S.errors.values()),
        tuple(S.graph_counts.values()),
        None
        if moe is None
        else (
            moe.steps_routed,
            moe.steps_without_routing,
            moe.out_of_range_ids,
            moe.dropped_copies,
            moe.unrecorded_calls,
            moe.refused_artifacts,
            moe.compiled,
        ),
    )


def _start_part_json_refresher(rec: Any) -> None:
    """A daemon thread that rewrites this part's part.json once a :data:`PART_JSON_REFRESH_S`
    while its counters change, until the part is finished (off the step path: the steps only
    bump counters; the thread holds the GIL for one small JSON write per second at most)."""

    def refresh() -> None:
        last = _part_counters()
        while True:
            time.sleep(PART_JSON_REFRESH_S)
            if S.rec is not rec:
                return
            now = _part_counters()
            if now == last:
                continue
            try:
                _write_part_json(only_while_open=rec)
                last = now
            except Exception as e:
                S.fail("part.json", e)

    threading.Thread(target=refresh, name="profilemate-part-json", daemon=True).start()


def _write_part_json(final: bool = False, only_while_open: Any = None) -> None:
    """Writes part.json (atomically: a reader sees the old or the new file). ``only_while_open``:
    the recorder the refresher saw; nothing is written once the part was finished or reopened."""
    with S.part_json_lock:
        if only_while_open is not None and S.rec is not only_while_open:
            return
        _write_part_json_locked(final)


def _write_part_json_locked(final: bool) -> None:
    if S.part_dir is None:
        return
    info = {
        "role": _role(),
        "pid": os.getpid(),
        "rank": S.rank,
        "process_name": multiprocessing.current_process().name,
        "run": S.run,
        "timing": S.timing,
        "hooks": dict(S.hook_status),
        "hook_errors": dict(S.errors),
        "trackers": {"cuda_graph": graph_status(), "moe_expert": moe_status()},
        "cuda_graph": {"mode": S.graph_mode or None, "on": S.graphs_on, **S.graph_counts},
        "moe_expert": S.moe.report() if S.moe is not None else None,
        "finished": final,
        # False while the process steps and its last records may not be in the files yet.
        "idle": S.idle_flushed,
    }
    tmp = os.path.join(S.part_dir, "part.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(S.part_dir, "part.json"))


def _set_rank(rank: Any) -> None:
    if isinstance(rank, int) and rank != S.rank:
        S.rank = rank
        if S.rec is not None:
            try:
                _write_part_json()
            except Exception as e:
                S.fail("part.json", e)


def finalize_process() -> None:
    """Writes this process's last rows, summaries and manifest (later records reopen a part)."""
    with S.lock:
        r = S.rec
        S.rec = None
        S.path = None
        if r is None:
            return
        S.part_seq += 1
    S.engine_step = S.worker_step = 0  # a later record opens a new part, with no step open
    try:
        if S.cuda is not None:
            S.cuda.drain(r)
        if S.moe is not None:
            S.moe.drain(r if S.rec_moe else None)
        # The counters first (a kill during the shutdown below keeps them), then the last rows.
        _write_part_json()
        r.shutdown()
        _write_part_json(final=True)
        if S.errors:
            logger.warning(
                "profilemate: errors caught in its hooks (vLLM unaffected): %s",
                ", ".join(f"{k} x{v}" for k, v in sorted(S.errors.items())),
            )
    except Exception as e:
        logger.warning("profilemate: could not finish this process's files: %s", e)


# --- the idle flush: rows reach the files as soon as the engine stops stepping ------------------

#: How long a process that recorded steps must see no new record before its rows are flushed to
#: its files (milliseconds; ``PROFILEMATE_IDLE_FLUSH_MS``, 0 turns the idle flush off). vLLM's
#: default shutdown force-kills the engine core and its workers (SIGKILL, no shutdown hook), and
#: the collector writes once a second (:data:`DEFAULT_FLUSH_MS` in the native config): without this
#: the steps of the last second before a kill, often the whole tail of a run, never reach the
#: files. With it, once the engine goes idle for this long (no step under way, no request left in
#: the scheduler of this process, if it has one), the rows are written; a kill after that loses
#: nothing. A busy engine is left to the collector's period: no flush per step.
IDLE_FLUSH_ENV = "PROFILEMATE_IDLE_FLUSH_MS"
IDLE_FLUSH_DEFAULT_MS = 20.0


def _setting(name: str, default: float, unit: str) -> float:
    """A number >= 0 from the environment variable ``name`` (``default`` when unset); a malformed
    value is reported once, naming the variable, and the default is used."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
        if value >= 0:
            return value
    except ValueError:
        pass
    if name not in S.warned_settings:
        S.warned_settings.add(name)
        logger.warning("profilemate: %s=%r is not a number of %s >= 0; using the default %g", name, raw, unit, default)
    return default


def _idle_flush_s() -> float:
    return _setting(IDLE_FLUSH_ENV, IDLE_FLUSH_DEFAULT_MS, "milliseconds") / 1000


def note_activity() -> None:
    """On the step path, after a record: a counter, and once per burst of steps an Event that
    wakes the idle flusher (no I/O, no wait; the flush runs on the flusher's thread)."""
    S.idle_activity += 1
    if not S.idle_armed:
        S.idle_armed = True
        _arm_idle_flush()


def _arm_idle_flush() -> None:
    if S.idle_thread is None:
        window = _idle_flush_s()
        if window <= 0:
            S.idle_thread = False
            return
        t = threading.Thread(
            target=_idle_flusher, args=(S.idle_event, window), name="profilemate-idle-flush", daemon=True
        )
        S.idle_thread = t
        t.start()
    if S.idle_thread is not False:
        S.idle_event.set()


def _idle_flusher(event: threading.Event, window: float) -> None:
    """Waits for a burst of records, then for ``window`` seconds without a new one, then has the
    collector write everything recorded so far (``Recorder.flush``, the GIL released)."""
    while True:
        event.wait()
        event.clear()
        r = S.rec
        if r is not None and S.idle_flushed:
            # part.json says the process is stepping: the front end's shutdown waits for it.
            S.idle_flushed = False
            _write_part_json_quietly(r)
        while True:
            seen = _activity()
            time.sleep(window)
            if _activity() == seen and _engine_idle():
                break
        S.idle_armed = False  # the next record arms it again (and is in this flush or the next)
        r = S.rec
        if r is None or S.exiting or S.idle_event is not event:
            continue
        try:
            r.flush()
            S.idle_flushed = True
            _write_part_json_quietly(r)
        except Exception as e:
            S.fail("idle flush", e)


def _activity() -> int:
    """Records so far: the step path's (counted natively) and the others' (``note_activity``)."""
    r = S.rec
    return S.idle_activity + (r.activity() if r is not None else 0)


def _engine_idle() -> bool:
    """Whether this process's part of the engine has stopped: no forward pass under way (a step
    longer than the window is not a pause) and no request left in its scheduler (the engine core
    waiting for its worker's step is not idle either)."""
    r = S.rec
    if S.in_step or (r is not None and r.in_step()):
        return False
    sched = S.idle_sched
    if sched is None:
        return True
    try:
        return not sched.has_unfinished_requests()
    except Exception:
        return True


def _write_part_json_quietly(r: Any) -> None:
    try:
        _write_part_json(only_while_open=r)
    except Exception as e:
        S.fail("part.json", e)


#: How long the front end's shutdown waits, before vLLM SIGTERMs and then force-kills the engine
#: core and its workers, for those processes to have written everything they recorded (their
#: part.json says ``idle``: their idle flush is done). Seconds; ``PROFILEMATE_SHUTDOWN_WAIT_S``.
#: An engine still stepping at shutdown (requests in flight) is waited for this long, then killed
#: as vLLM would; an idle one has flushed within :data:`IDLE_FLUSH_DEFAULT_MS` of its last step.
SHUTDOWN_WAIT_ENV = "PROFILEMATE_SHUTDOWN_WAIT_S"
SHUTDOWN_WAIT_DEFAULT_S = 2.0


def _busy_parts(run_dir: str) -> List[Tuple[str, int]]:
    """Live, unfinished parts of other processes whose part.json says they are not idle."""
    return _live_parts(run_dir, stepping_only=True)


def wait_for_idle_parts() -> None:
    """Front end, before vLLM stops its engine processes: waits (bounded by
    :data:`SHUTDOWN_WAIT_ENV`) until each has written what it recorded."""
    if not S.active or not S.out_dir or not S.run:
        return
    run_dir = os.path.join(S.out_dir, "parts", S.run)
    if not os.path.isdir(run_dir):
        return
    limit = _setting(SHUTDOWN_WAIT_ENV, SHUTDOWN_WAIT_DEFAULT_S, "seconds")
    t0 = time.monotonic()
    busy = _busy_parts(run_dir)
    while busy and time.monotonic() - t0 < limit:
        time.sleep(0.005)
        busy = _busy_parts(run_dir)
    if busy:
        logger.warning(
            "profilemate: %s still stepping after %g s (%s): vLLM stops them now, their last rows may be lost",
            ", ".join(f"{name} (pid {pid})" for name, pid in busy),
            limit,
            SHUTDOWN_WAIT_ENV,
        )


# --- the API server's /metrics ------------------------------------------------------------------

#: On a prometheus_client registry that has profilemate's collector (no second registration).
LIVE_ATTR = "__profilemate_series__"


class PartsCollector:
    """A prometheus_client custom collector: at each scrape, the series of every part of this run
    (``_native.PartsSeries.render``, which reads the rows the engine-core and worker processes
    wrote since the previous scrape) parsed back into metric families. ``describe`` returns no
    names, so registering it neither collects nor clashes with vLLM's names. A failure yields
    nothing for that scrape (counted and reported once); vLLM's own series are served as usual."""

    def __init__(self, series: Any) -> None:
        self.series = series

    def describe(self) -> List[Any]:
        return []

    def collect(self) -> Any:
        try:
            from prometheus_client.parser import text_string_to_metric_families

            return list(text_string_to_metric_families(self.series.render()))
        except Exception as e:
            S.fail("PartsSeries.render (/metrics)", e)
            return []


def add_live_series(registry: Any) -> None:
    """Registers :class:`PartsCollector` on ``registry`` (vLLM's /metrics registry), once per
    registry; all registries share this process's one ``PartsSeries``."""
    if not S.active or registry is None or getattr(registry, LIVE_ATTR, False):
        return
    if S.live is None:
        S.live = S.native.PartsSeries(S.out_dir, S.run)
    registry.register(PartsCollector(S.live))
    setattr(registry, LIVE_ATTR, True)
    S.live_registries += 1
    logger.info(
        "profilemate: API server pid %d: hooked vLLM's /metrics (get_prometheus_registry): profilemate_* series "
        "of run %s, read from %s at each scrape",
        os.getpid(),
        S.run,
        os.path.join(S.out_dir, "parts", S.run),
    )


def merge_run(quiet_if_incomplete: bool = False) -> Optional[Dict[str, Any]]:
    """Front end only: merges this run's parts into the top-level files of ``S.out_dir``.

    ``quiet_if_incomplete``: at exit, vLLM may stop its engine processes after this handler
    ran; their parts are merged again then, so an incomplete merge here is not reported."""
    if not (S.is_frontend and S.active):
        return None
    if not S.logged_line:
        # A front end whose engine ran in other processes recorded nothing itself.
        S.logged_line = True
        logger.info("%s", instrumentation_line())
    run_dir = os.path.join(S.out_dir, "parts", S.run)
    if not os.path.isdir(run_dir):
        return None
    _wait_for_parts(run_dir)
    signature = _parts_signature(run_dir)
    if signature == S.merged_signature:
        return None  # nothing was written since the last merge
    try:
        report = json.loads(S.native.merge(S.out_dir, S.run))
    except Exception as e:
        logger.warning("profilemate: could not merge the parts of run %s: %s", S.run, e)
        return None
    S.merged_signature = signature
    incomplete = [p["dir"] for p in report["parts"] if not p["finished"]]
    if incomplete and quiet_if_incomplete:
        return report
    logger.info(
        "profilemate: wrote %s from %d process part(s) of run %s (%d forward passes)%s",
        S.out_dir,
        len(report["parts"]),
        S.run,
        report["rows"].get("forward_pass_timing.csv", 0),
        f"; not shut down cleanly: {', '.join(incomplete)}" if incomplete else "",
    )
    return report


S.merged_signature: Any = None

#: How long the front end's merge waits for an engine-core or worker process that is still alive
#: and still writing its part (seconds; ``PROFILEMATE_MERGE_WAIT_S``). vLLM returns from its
#: shutdown once the engine-core process is gone, while a worker that process started may still be
#: finishing its files; merging before it has would merge a part cut short.
MERGE_WAIT_ENV = "PROFILEMATE_MERGE_WAIT_S"
MERGE_WAIT_DEFAULT_S = 30.0


def _merge_wait_s() -> float:
    return _setting(MERGE_WAIT_ENV, MERGE_WAIT_DEFAULT_S, "seconds")



def _process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The state follows the parenthesised command name, which may itself hold ") ".
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _unfinished_live_parts(run_dir: str) -> List[Tuple[str, int]]:
    """Parts of other processes that are still alive and have not written their last files."""
    return _live_parts(run_dir, stepping_only=False)


def _live_parts(run_dir: str, stepping_only: bool) -> List[Tuple[str, int]]:
    """``(part, pid)`` of the parts of other processes that are alive and unfinished (and, with
    ``stepping_only``, whose part.json says ``"idle": false``)."""
    out = []
    for name in sorted(os.listdir(run_dir)):
        try:
            with open(os.path.join(run_dir, name, "part.json")) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue  # no part.json yet (nothing recorded) or being replaced: the merge reports it
        pid = info.get("pid")
        if info.get("finished") or not isinstance(pid, int) or pid == os.getpid():
            continue
        if stepping_only and info.get("idle") is not False:
            continue
        if _process_alive(pid):
            out.append((name, pid))
    return out


def _wait_for_parts(run_dir: str) -> None:
    """Waits (bounded by :data:`MERGE_WAIT_ENV`) until every other process of the run has finished
    its part or is gone; a part whose process died unfinished is merged from what it flushed."""
    pending = _unfinished_live_parts(run_dir)
    if not pending:
        return
    limit = _merge_wait_s()
    t0 = time.monotonic()
    logger.info(
        "profilemate: waiting up to %g s for %s to finish writing (%s)",
        limit,
        ", ".join(f"pid {pid}" for _, pid in pending),
        MERGE_WAIT_ENV,
    )
    while pending and time.monotonic() - t0 < limit:
        time.sleep(0.05)
        pending = _unfinished_live_parts(run_dir)
    if pending:
        logger.warning(
            "profilemate: after %g s, %s still writing: merging what they flushed (run "
            "`python -m profilemate_vllm merge %s` once they are gone)",
            limit,
            ", ".join(f"{name} (pid {pid})" for name, pid in pending),
            S.out_dir,
        )


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


def at_exit() -> None:
    S.exiting = True
    finalize_process()
    merge_run(quiet_if_incomplete=True)


# --- what the hooks call ---------------------------------------------------------------------------
#
# Step ids. The engine core opens the next id before ``Scheduler.schedule`` (so that preemptions
# made while scheduling belong to the step), keeps it when the output is non-empty (the id goes
# with the ``SchedulerOutput`` as ``STEP_ATTR``) and cancels it when the output is empty (vLLM's
# empty steps are not steps: the next non-empty one reuses the id). ``update_from_output`` for
# that output closes it. A worker process opens the output's id around its forward pass and
# sampling; in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) the engine core's open step
# already covers the worker's rows. A scheduler that schedules ahead (vLLM's batch queue) closes
# the previous step when it schedules the next.


def step_opens() -> Any:
    """Before ``Scheduler.schedule``: opens the next step id and starts its scheduling time (the
    first call opens this process's recorder, so that the first step's scheduling is inside it
    too). Returns the recorder's step path (None: it cannot record). The exact wrapper of
    ``Scheduler.schedule`` does the same inline."""
    r = S.rec if S.rec is not None else _open()
    if r is None:
        return None
    p = S.path
    if S.engine_step:
        p.end_step()  # scheduled ahead of its bookkeeping (batch queue), or that raised
    n = S.step_seq + 1
    S.engine_step = n
    p.schedule_begin(n)
    return p


def after_empty_schedule(out: Any) -> None:
    """``Scheduler.schedule`` returned an output with no tokens to run: the step opened for it is
    cancelled, and requests it reports finished leave the recompute bookkeeping."""
    if S.engine_step:
        step_empty()
    if S.recompute:
        forget_finished(out, S.recompute)


def step_empty() -> None:
    """``Scheduler.schedule`` returned nothing to run: the step opened for it is not one."""
    S.engine_step = 0
    if S.rec is not None:
        S.rec.cancel_step()


def step_ends(so: Any) -> None:
    """After ``update_from_output(so)``: closes the step ``so`` carries if it is the open one.
    (The exact wrapper of ``update_from_output`` does the same inline.)"""
    if so is S.last_so or getattr(so, STEP_ATTR, 0) == S.engine_step:
        S.engine_step = 0
        if S.rec is not None:
            S.rec.end_step()


def worker_step_ends() -> None:
    """After a worker process's sampling: closes the step it opened for the forward pass."""
    S.worker_step = 0
    if S.rec is not None:
        S.rec.end_step()


def _sched_reader(sched: Any, p: Any) -> Tuple[Any, Any, bool, Any, Any, bool]:
    """What ``after_schedule`` reads of one scheduler, resolved once per scheduler and recorder
    (``p``: its step path): ``(sched, p, fast_counts, kv_cache_manager, block_pool, fast_free)``;
    the scheduler's limits go to the recorder (``Recorder.set_limits``).

    ``fast_counts``: the scheduler is vLLM's own ``Scheduler`` (its ``get_request_counts``
    unchanged) with first-come-first-served queues (``FCFSRequestQueue``, a ``deque`` whose
    ``__len__`` only calls the deque's): the queues themselves then go to ``p.scheduled``, which
    reads their lengths as that method does, ``len(running)`` and the two waiting queues', in C
    (the deque's own length function, ``p.set_queue_type``), without the method's three Python
    frames (about 0.2 µs a step) or the Python calls that read the deques' lengths past
    ``FCFSRequestQueue.__len__`` (0.08 µs more). Anything else (priority
    scheduling, another scheduler class) calls the method. The KV cache part (when that profiler
    is on): its manager, and the block pool, whose free-block count ``fast_free`` reads as
    vLLM's ``BlockPool.get_num_free_blocks`` does (``free_block_queue.num_free_blocks``) when the
    pool's class has that method; the pool's size (one block is vLLM's null block, never free)
    is a limit."""
    fast = False
    try:
        from vllm.v1.core.sched.request_queue import FCFSRequestQueue
        from vllm.v1.core.sched.scheduler import Scheduler

        fast = (
            getattr(type(sched), "get_request_counts", None) is Scheduler.get_request_counts
            and type(sched.waiting) is FCFSRequestQueue
            and type(sched.kv_holding_waiting) is FCFSRequestQueue
            and type(sched.running) is list
            and sched.get_request_counts() == (len(sched.running), len(sched.waiting) + len(sched.kv_holding_waiting))
        )
        if fast:
            p.set_queue_type(FCFSRequestQueue, collections.deque)
    except Exception:
        fast = False
    kvm = pool = None
    fast_free = False
    total = -1
    if S.f_kv:
        kvm = sched.kv_cache_manager
        pool = kvm.block_pool
        total = pool.num_gpu_blocks - 1
        try:
            from vllm.v1.core.block_pool import BlockPool

            fast_free = (
                getattr(type(pool), "get_num_free_blocks", None) is BlockPool.get_num_free_blocks
                and pool.free_block_queue.num_free_blocks == pool.get_num_free_blocks()
            )
        except Exception:
            fast_free = False
    S.rec.set_limits(sched.max_num_running_reqs, sched.max_num_scheduled_tokens, total)
    S.idle_sched = sched  # the idle flusher asks it whether requests are left
    return (sched, p, fast, kvm, pool, fast_free)


def after_schedule(sched: Any, out: Any, p: Any) -> None:
    """A non-empty ``SchedulerOutput``, recorded through ``p`` (the recorder's step path): its
    step id, phase, scheduling time, batch, lifecycle, KV cache."""
    n = S.step_seq + 1
    S.step_seq = n
    if S.engine_step != n:  # not opened by the wrapper (a recorder opened in between)
        if S.engine_step:
            p.end_step()
        S.rec.begin_step(n)
        S.engine_step = n
    phase, nseq = classify(out, S.recompute)
    if not S.worker_here:  # for model runners in other processes
        out.profilemate_step = n  # STEP_ATTR
        out.profilemate_phase = phase  # PHASE_ATTR
    S.last_so = out
    S.last_phase = phase
    S.last_nseq = nseq
    if S.f_pre:
        news = out.scheduled_new_reqs
        resumed = out.scheduled_cached_reqs.resumed_req_ids
        if news or resumed:
            _lifecycle(news, resumed)
    rd = S.sched_reader
    if rd is None or rd[0] is not sched or rd[1] is not p:
        rd = S.sched_reader = _sched_reader(sched, p)
    if S.f_batch:
        if rd[2]:
            # ``Scheduler.get_request_counts`` without its Python frames: the queues, measured
            # natively (see _sched_reader).
            running, waiting, held = sched.running, sched.waiting, sched.kv_holding_waiting
        else:
            running, waiting = sched.get_request_counts()
            held = 0
    else:
        running = waiting = held = 0
    if S.f_kv:
        # Blocks used: the total (a limit) less the free ones, natively.
        free = rd[4].free_block_queue.num_free_blocks if rd[5] else rd[4].get_num_free_blocks()
        stats = rd[3].prefix_cache_stats  # reset by vLLM after every step when it logs stats
        if stats is not None:
            q, h = stats.queries, stats.hits
        else:
            q = h = 0
    else:
        free = q = h = -1
    # One call records the scheduling time, the batch and the KV cache reading.
    p.scheduled(phase, nseq, out.total_num_scheduled_tokens, running, waiting, held, free, q, h)
    if not S.idle_armed:
        S.idle_armed = True
        _arm_idle_flush()


def _lifecycle(news: Any, resumed: Any) -> None:
    """Requests that start or resume running in a scheduled step."""
    r = S.rec
    pending = S.preempted
    for new in news:
        rid = new.req_id
        if rid in pending:
            pending.discard(rid)
            r.resumed(rid)
        else:
            r.started(rid)
    if resumed:
        for rid in resumed:
            pending.discard(rid)
            r.resumed(rid)


def before_preempt(sched: Any, request: Any) -> Any:
    """What a preemption frees, read before vLLM resets it."""
    try:
        blocks = sum(len(b) for b in sched.kv_cache_manager.get_block_ids(request.request_id))
    except Exception:
        blocks = None
    return (request.request_id, request.num_computed_tokens, blocks)


def after_preempt(request: Any, before: Any) -> None:
    r = S.rec if S.rec is not None else _open()
    if r is None:
        return
    rid, computed, blocks = before
    extra = f"num_computed_tokens={computed}"
    if blocks is not None:
        extra += f";num_blocks={blocks}"
    extra += f";num_output_tokens={request.num_output_tokens};num_preemptions={request.num_preemptions}"
    S.preempted.add(rid)
    r.preempted(rid, "RECOMPUTE", extra)


_EVICTED = {"FINISHED_ABORTED": "aborted", "FINISHED_IGNORED": "ignored", "FINISHED_ERROR": "error"}


def after_free(request: Any) -> None:
    r = S.rec if S.rec is not None else _open()
    if r is None:
        return
    rid = request.request_id
    S.preempted.discard(rid)
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
    note_activity()


def detect_model(runner: Any) -> None:
    """Declares the model type from the runner's model configuration (once per process)."""
    mc = runner.model_config
    ed = bool(getattr(mc, "is_encoder_decoder", False) or getattr(mc, "is_multimodal_model", False))
    S.model_type = "encoder_decoder" if ed else "decoder_only"
    backend = S.config.get("backend", "auto")
    device = getattr(getattr(runner, "device", None), "type", "cpu")
    if backend != "host" and device == "cuda":
        from ._cuda import CudaTimer

        S.cuda = CudaTimer(int(S.config.get("cuda_event_batch", 100)), S)
        S.timing = "cuda"
        if S.rec is not None:
            # In-process, the scheduler opened this process's part first, with the host clock
            # named in its manifest; part.json says which clock timed the forward passes.
            _write_part_json()
    elif backend == "cuda":
        logger.warning("profilemate: CUDA events asked for, but the model runs on %s: using the host clock", device)
    if S.rec is not None:
        S.rec.declare_model_type(S.model_type)


def begin_step(runner: Any, so: Any, v2: bool) -> Any:
    """Before a non-empty ``execute_model`` (the general path: a worker process, CUDA events,
    trackers): the step's id, phase and size; the native step path starts its time. Returns
    ``(phase, nseq, ntok, step id)``, or None when this process cannot record."""
    if S.model_type is None:
        detect_model(runner)
    r = S.rec if S.rec is not None else _open()
    if r is None:
        return None
    # The step id the engine core gave this output: opened here in a worker process (in one
    # process the engine core's side holds it open already).
    if so is S.last_so:
        S.worker_here = True
        sid = S.engine_step
    else:
        sid = getattr(so, STEP_ATTR, 0)
    if sid and sid != S.engine_step:
        if S.worker_step:
            r.end_step()
        r.begin_step(sid)
        S.worker_step = sid
    ntok = so.total_num_scheduled_tokens
    if so is S.last_so:
        # In one process: what the scheduler's side recorded for this output.
        S.path.execute_begin()
        phase, nseq = S.last_phase, S.last_nseq
    else:
        phase = getattr(so, PHASE_ATTR, None)  # as the engine core classified it
        if phase is None:
            phase, nseq = classify(so, S.recompute)
        else:
            nseq = len(so.num_scheduled_tokens)
        S.path.execute_begin_with(phase, nseq, ntok)
    S.in_step = True
    if S.graphs_on:
        _graph_begin(runner, v2)
    if S.moe is not None:
        try:
            S.moe.begin_step(ntok)
        except Exception as e:
            S.fail("MoE routing tracker", e)
    if S.cuda is not None:
        S.cuda.start()
    return (phase, nseq, ntok, sid)


def worker_step_begins(p: Any, so: Any) -> bool:
    """The model runner's step in a worker process, on the host clock without trackers: the
    engine core's step id opened, the step begun with the phase the engine core classified and
    shipped (``PHASE_ATTR``). ``False`` when ``so`` does not carry them (the general path then
    classifies it)."""
    try:
        sid = so.profilemate_step  # STEP_ATTR
        phase = so.profilemate_phase  # PHASE_ATTR
    except AttributeError:
        return False
    try:
        if sid != S.engine_step:
            if S.worker_step:
                p.end_step()
            S.worker_step = 0
            p.begin_step(sid)
            S.worker_step = sid
        p.execute_begin_with(phase, len(so.num_scheduled_tokens), so.total_num_scheduled_tokens)
    except Exception as e:
        S.fail("GPUModelRunner.execute_model", e)
        return False
    return True


def end_step(step: Any, returned: bool, v2: bool) -> None:
    """After ``execute_model`` (the general path): the step's rows, its trackers; ``returned``:
    it returned the model's output itself (no ``sample_tokens`` call follows)."""
    S.in_step = False
    r = S.rec
    if r is not None:
        if S.cuda is not None:
            S.path.execute_end(False)  # model_execution; the forward pass when its events resolve
            S.cuda.stop(step)
            S.cuda.poll(r)
        else:
            # One call records model_execution, the forward pass and the language model's time.
            S.path.execute_end(True)
    step_ended_rarely(r, step[2], returned)


def step_ended_rarely(r: Any, ntok: Any, returned: bool) -> None:
    """What follows a model runner's step besides its rows: the trackers (a dense model on a CPU:
    two checks), the idle flusher armed, and a worker process's step closed when no
    ``sample_tokens`` call follows. ``ntok``: the step's tokens (or its ``SchedulerOutput``)."""
    if not S.idle_armed and r is not None:
        S.idle_armed = True
        _arm_idle_flush()
    if S.graph_watch is not None or S.moe is not None:
        if not isinstance(ntok, int):
            ntok = ntok.total_num_scheduled_tokens
        if S.graph_watch is not None:
            try:
                _graph_end(r, ntok)
            except Exception as e:
                S.fail("CUDA graph tracker", e)
        if S.moe is not None:
            try:
                S.moe.end_step(r if S.rec_moe else None)
            except Exception as e:
                S.fail("MoE routing tracker", e)
    if returned and S.worker_step:
        worker_step_ends()


# --- trackers: CUDA graphs and MoE routing (see _trackers) -----------------------------------------


def model_ready(runner: Any, v2: bool) -> None:
    """A model runner has set up its KV cache (after loading the model, before any step): its
    CUDA graph mode, and the MoE layers vLLM built."""
    from ._trackers import MoeRouting, runner_graph_mode

    S.model_seen = True
    # Every tensor-parallel rank routes the same tokens and runs the same step: one rank per group
    # records, or the merged files would count each step and each token once per rank. Pipeline
    # stages hold different layers (each stage's first tensor-parallel rank records its MoE
    # layers) but run the same steps (the first stage records the graph decisions).
    tp, pp = parallel_ranks()
    if tp:
        S.moe_elsewhere = f"tensor-parallel rank {tp}: its routing is the same as rank 0's, recorded there"
        S.moe = None  # a profiling run before this may have found the routers
    if tp or pp:
        S.graph_elsewhere = (
            f"tensor-parallel rank {tp}, pipeline rank {pp}: the same steps are recorded by the first rank"
        )
    if S.f_graph and not S.graph_elsewhere:
        S.graph_mode = runner_graph_mode(runner, v2)
        S.graphs_on = S.graph_mode != "NONE"
    if S.f_moe and not S.moe_elsewhere:
        cc = getattr(runner, "compilation_config", None)
        if cc is None:
            cc = getattr(getattr(runner, "vllm_config", None), "compilation_config", None)
        names = getattr(cc, "static_all_moe_layers", None)
        if names:
            if S.moe is None:
                S.moe = MoeRouting()
            S.moe.discover(cc)
            mode = getattr(cc, "mode", None)
            eager = bool(getattr(getattr(runner, "model_config", None), "enforce_eager", False))
            S.moe.compiled = not eager and mode is not None and int(getattr(mode, "value", mode) or 0) != 0


def parallel_ranks() -> Tuple[int, int]:
    """This process's (tensor-parallel, pipeline-parallel) rank; (0, 0) when vLLM's parallel
    state is not set up."""
    try:
        from vllm.distributed import parallel_state as ps

        return int(ps.get_tensor_model_parallel_rank()), int(ps.get_pp_group().rank_in_group)
    except Exception:
        return 0, 0


def moe_layer_built(runner: Any) -> None:
    """A MoE layer's runner was constructed: its router gets a counts row before any forward."""
    if S.moe is None:
        from ._trackers import MoeRouting

        S.moe = MoeRouting()
        if S.rec is not None:
            S.moe.recording = S.rec_moe
    S.moe.built(runner)
    if S.moe.rows and S.moe.aot_guard is None:
        from ._trackers import guard_compiled_artifacts

        S.moe.aot_guard = guard_compiled_artifacts(moe_artifact_refused)


def moe_artifact_refused(path: str) -> None:
    """vLLM found a compiled model without the MoE counting op in its cache: it compiles again."""
    if S.moe is not None:
        S.moe.refused_artifacts += 1
    logger.info(
        "profilemate: %s was compiled without MoE routing counting (a run without profiling): compiling again", path
    )


def moe_routed(router: Any, args: tuple, kwargs: dict, out: Any) -> None:
    """``FusedMoERouter.select_experts`` returned ``out`` (in a real step, or not)."""
    if S.moe_elsewhere:
        return
    if S.moe is None:
        from ._trackers import MoeRouting

        S.moe = MoeRouting()
        if S.rec is not None:
            S.moe.recording = S.rec_moe
    r = S.rec
    if S.in_step or (r is not None and r.in_step()):
        S.moe.route(router, args, kwargs, out[1])
    elif id(router) not in S.moe.layers:
        S.moe.register(router, None, kwargs.get("router_logits", args[1] if len(args) > 1 else None))


def _graph_begin(runner: Any, v2: bool) -> None:
    S.graph_step = None
    S.graph_watch = runner if v2 else getattr(runner, "cudagraph_dispatcher", None)


def _graph_end(r: Any, ntok: int) -> None:
    """Records the step's replay or eager row from the decision vLLM made for it."""
    decided, S.graph_step, S.graph_watch = S.graph_step, None, None
    if decided is None:
        return
    mode, desc = decided
    replay = getattr(mode, "name", "NONE") != "NONE"
    S.graph_counts["replay" if replay else "eager"] += 1
    if r is None:
        return
    if not S.rec_graph:
        S.graph_counts["unrecorded"] += 1
    elif replay:
        r.graph(1, ntok, int(desc.num_tokens))
    else:
        r.graph(2, ntok)


def graph_capture_starts() -> None:
    """Opens this process's part before the first capture, so that its row starts in it."""
    if S.rec is None:
        _open()


def graph_captured(num_tokens: int, ns: int) -> None:
    """vLLM captured a CUDA graph for ``num_tokens`` tokens in ``ns`` (host clock)."""
    if S.graph_elsewhere:
        return
    S.graphs_on = True
    S.graph_counts["capture"] += 1
    r = S.rec if S.rec is not None else _open()
    if r is None:
        return
    if S.rec_graph:
        r.graph(0, num_tokens, -1, ns)
    else:
        S.graph_counts["unrecorded"] += 1


def encoder_context(modalities: Any) -> str:
    names = []
    for m in modalities:
        n = "vision_encoder" if m in ("image", "video") else f"{m}_encoder"
        if n not in names:
            names.append(n)
    return "+".join(names) or "mm_encoder"
