"""The plugin's state in one process: one :class:`Profiling` object, :data:`STATE`.

Everything the plugin knows lives here: the configuration and the profilers switched on, the
native recorder of this process, the per-step state the hooks share, the hook table (what was
wrapped, what could not be and why), the errors caught, and the trackers. The hooks
(:mod:`profilemate_vllm._hooks`) are data plus small wrappers that receive this object; the
recording logic (:mod:`profilemate_vllm._plugin`) reads and writes it. This module imports no
other module of the package, so the modules form a tree::

    __init__ -> _instrument -> _hooks -> _plugin -> _trackers, _cuda, _phase -> _state

Fork handling: :meth:`Profiling.after_fork` runs in a forked child (``os.register_at_fork``);
the child keeps the parent's configuration and records into its own part.

To add state (a metrics exporter, ...), add an attribute in ``__init__`` and its name to
``__slots__`` (and reset it in :meth:`after_fork` if a child must not inherit it).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

logger = logging.getLogger("vllm.profilemate")

RUN_ENV = "PROFILEMATE_VLLM_RUN"
# The engine step id the engine core gives a non-empty ``SchedulerOutput``, an attribute that
# travels with it to the workers (vLLM pickles the object for worker processes).
STEP_ATTR = "profilemate_step"
# The phase code the engine core classified that output as (``_phase.classify``), shipped the same
# way: a worker process takes it instead of classifying the step again.
PHASE_ATTR = "profilemate_phase"
pc = time.perf_counter_ns

# Operation and component codes of the native module.
OP_SCHEDULING, OP_BATCH_PREPARATION, OP_MODEL_EXECUTION, OP_SAMPLING = 0, 1, 2, 3
ENCODER, DECODER = 0, 1


class Profiling:
    """The plugin's state in this process (see the module's documentation)."""

    # Slots, not a dict: the hooks read and write these on every engine step, and a slot is
    # about 1.7 ns faster per access than an instance dict's entry (some 60 accesses a step).
    __slots__ = (
        "register_calls",
        "active",
        "native",
        "config",
        "out_dir",
        "run",
        "is_frontend",
        "rank",
        "f_fwd",
        "f_cpu",
        "f_batch",
        "f_pre",
        "f_enc",
        "f_kv",
        "f_graph",
        "f_moe",
        "vllm_version",
        "vllm_tested",
        "rec",
        "path",
        "lock",
        "part_json_lock",
        "open_failed",
        "exiting",
        "logged_line",
        "part_seq",
        "part_dir",
        "leaked",
        "merged_signature",
        "warned_settings",
        "idle_activity",
        "idle_armed",
        "idle_event",
        "idle_thread",
        "idle_flushed",
        "idle_sched",
        "model_type",
        "timing",
        "cuda",
        "hook_status",
        "hook_labels",
        "errors",
        "live",
        "live_registries",
        "last_so",
        "worker_here",
        "last_phase",
        "last_nseq",
        "preempted",
        "recompute",
        "sched_reader",
        "step_seq",
        "engine_step",
        "worker_step",
        "in_step",
        "model_seen",
        "graphs_on",
        "graph_mode",
        "graph_watch",
        "graph_step",
        "capturing",
        "capture_manager",
        "graph_counts",
        "graph_elsewhere",
        "moe_elsewhere",
        "moe",
        "rec_graph",
        "rec_moe",
    )

    def __init__(self) -> None:
        # -- activation and configuration -------------------------------------------------
        self.register_calls = 0
        self.active = False
        self.native: Any = None  # the native module, once active
        self.config: Dict[str, Any] = {}
        self.out_dir = ""
        self.run = ""
        self.is_frontend = False
        self.rank: Optional[int] = None
        # Profilers switched on (PROFILEMATE_DISABLE / VLLM_PROFILING_DISABLE switch them off).
        self.f_fwd = self.f_cpu = self.f_batch = self.f_pre = self.f_enc = self.f_kv = False
        self.f_graph = self.f_moe = False  # the CUDA graph and MoE routing trackers
        self.vllm_version: Optional[str] = None
        self.vllm_tested: Optional[bool] = None
        # -- the native recorder of this process, opened at the first record ----------------
        self.rec: Any = None
        self.path: Any = None  # its step path (``Recorder.step_path()``), while it is open
        self.lock = threading.RLock()
        # part.json is rewritten by the refresher thread and by finalisation: one writer at a time.
        self.part_json_lock = threading.Lock()
        self.open_failed = False
        self.exiting = False
        self.logged_line = False
        self.part_seq = 0
        self.part_dir: Optional[str] = None
        self.leaked: List[Any] = []  # recorders inherited through fork: never shut down
        self.merged_signature: Any = None
        self.warned_settings: Set[str] = set()  # malformed plugin settings, each reported once
        # -- the idle flush (_plugin.note_activity): records since start besides the step path's
        # (counted natively, ``Recorder.activity``), armed, the thread
        self.idle_activity = 0
        self.idle_armed = False
        self.idle_event = threading.Event()
        self.idle_thread: Any = None  # None: not started; False: disabled
        self.idle_flushed = True  # part.json's `idle`: everything recorded is in the files
        self.idle_sched: Any = None  # the scheduler this process steps (engine core), if any
        self.model_type: Optional[str] = None
        self.timing = "host"
        self.cuda: Any = None  # the CUDA event timer, on a GPU
        # -- the hook table -----------------------------------------------------------------
        self.hook_status: Dict[str, str] = {}  # key -> ok / pending / off / why not
        self.hook_labels: Dict[str, Tuple[str, str]] = {}  # key -> (class label, method), in order
        self.errors: Dict[str, int] = {}
        # -- the API server's /metrics: the parts' series (native PartsSeries), read at scrape
        # time; created when vLLM builds its /metrics registry, never when profiling is off.
        self.live: Any = None
        self.live_registries = 0  # registries given profilemate's collector
        # -- per step ---------------------------------------------------------------------
        # The scheduler's last output (in-process, the worker reuses its phase).
        self.last_so: Any = None
        # A model runner of this process ran the scheduler's own output (one process): the step
        # id and phase need not travel with the output (STEP_ATTR, PHASE_ATTR are not set).
        self.worker_here = False
        self.last_phase = 0
        self.last_nseq = 0
        self.preempted: set = set()
        self.recompute: Dict[str, int] = {}  # requests recomputing after a preemption (_phase)
        self.sched_reader: Any = None  # what a step reads of its scheduler (_plugin._sched_reader)
        # Step ids: the engine core numbers the non-empty steps (1, 2, ...) and ships the id with
        # the SchedulerOutput (STEP_ATTR); a worker process opens the same id for its part.
        self.step_seq = 0  # engine core: the last id given to a non-empty step
        self.engine_step = 0  # the id the engine core's side holds open in this process (0: none)
        self.worker_step = 0  # the id a worker process opened for its forward pass (0: none)
        # Worker side. A step's time, phase, batch, forward time and pending sampling live in
        # the recorder (``Recorder.execute_begin`` ... ``sample_end``, the native step path);
        # ``in_step`` is set by the general path (worker processes, CUDA events, trackers),
        # for the trackers that count inside a step (``Recorder.in_step()`` covers both paths).
        self.in_step = False
        # -- trackers (worker side) -------------------------------------------------------
        self.model_seen = False
        self.graphs_on = False  # the runner's CUDA graph mode is not NONE (or vLLM captured graphs)
        self.graph_mode = ""
        self.graph_watch: Any = None  # in a real step with graphs on: the V1 dispatcher / V2 runner
        self.graph_step: Any = None  # (mode, descriptor) it decided for this step
        self.capturing = 0  # inside V1's capture loop (not its memory profiling)
        self.capture_manager: Any = None  # V2: the graph manager while capture_model captures
        self.graph_counts = {"capture": 0, "replay": 0, "eager": 0, "unrecorded": 0}
        # Set when this process is not the one that records a tracker for its parallel group.
        self.graph_elsewhere: Optional[str] = None
        self.moe_elsewhere: Optional[str] = None
        self.moe: Any = None  # _trackers.MoeRouting, once a MoE layer is known
        self.rec_graph = self.rec_moe = False  # what the open recorder records

    def fail(self, where: str, exc: BaseException) -> None:
        """An exception in the plugin's own code at ``where``: counted, reported once."""
        n = self.errors.get(where, 0) + 1
        self.errors[where] = n
        if n == 1:
            logger.warning(
                "profilemate: error in its %s hook, caught; vLLM goes on (later errors there are only counted): %r",
                where,
                exc,
            )

    def after_fork(self) -> None:
        """In a forked child: it has the parent's recorder but not its collector thread (kept
        alive, unused), and builds its own model runner, if any."""
        if self.rec is not None:
            self.leaked.append(self.rec)
        self.rec = None
        self.path = None
        self.part_json_lock = threading.Lock()  # the parent's refresher may have held it
        self.idle_armed = False  # the parent's idle flusher is not in this process
        self.idle_event = threading.Event()
        self.idle_thread = None
        self.idle_flushed = True
        self.idle_sched = None
        self.moe = None
        self.model_seen = self.graphs_on = False
        self.graph_mode = ""
        self.graph_elsewhere = self.moe_elsewhere = None
        for k in self.graph_counts:
            self.graph_counts[k] = 0
        self.is_frontend = False
        self.recompute.clear()
        self.step_seq = self.engine_step = self.worker_step = 0
        self.worker_here = False
        self.sched_reader = None
        self.live = None
        self.live_registries = 0
        self.part_seq = 0
        self.logged_line = False
        self.open_failed = False


STATE = Profiling()

WRAPPED_ATTR = "__profilemate_wrapped__"  # on a wrapper: the function it wraps
