"""The native module: recording through the profilemate core (Rust)."""

from os import PathLike
from typing import Iterable, Optional, Sequence, Sized, Union

__version__: str

def resolve_config() -> str:
    """The configuration in force (PROFILEMATE_* and VLLM_PROFILING_* variables), as JSON.

    Raises ValueError naming a malformed variable."""

def merge(dir: Union[str, PathLike[str]], run: Optional[str] = None) -> str:
    """Merges the parts of ``run`` (default: the latest) under ``dir`` into its contract files;
    returns the report as JSON. Raises RuntimeError when there is nothing to merge."""

def runs(dir: Union[str, PathLike[str]]) -> list[str]:
    """The runs recorded under ``dir``, oldest first."""

class Recorder:
    """One process's session, writing into its own part directory."""

    def __init__(
        self, part_dir: Union[str, PathLike[str]], timing: str = "host", trackers: Sequence[str] = ()
    ) -> None:
        """``trackers``: the ones this process has something for (``cuda_graph``,
        ``moe_expert``); the others are off (no empty files). Raises ValueError for another name."""
    @property
    def dir(self) -> str: ...
    @property
    def timing(self) -> str: ...
    @property
    def trackers(self) -> list[str]:
        """The trackers this session records (named and not disabled by the environment)."""
    def begin_step(self, step: int) -> None:
        """Opens engine step ``step`` (1 to 2**40 - 1): every row this process records until
        :meth:`end_step` carries it in its ``step`` column (one step open at a time; opening
        another replaces it). The engine-core process numbers vLLM's non-empty steps and opens
        each around scheduling and its output's bookkeeping; a worker process opens the same id
        around its forward pass and sampling, so that the rows of one step join across
        processes. Raises ValueError for an id out of range.

        >>> rec.begin_step(12); rec.cpu(0, 250_000, 1); rec.end_step()  # a scheduling row of step 12
        """
    def end_step(self) -> None:
        """Closes the open step and records its bounds (its start and now: the step's wall time in
        ``step_timeline.csv``); nothing when none is open."""
    def cancel_step(self) -> None:
        """Closes the open step without recording it: the engine core opens the next id before
        scheduling and cancels it when the scheduler returns nothing to run (rows recorded
        meanwhile keep the id, which the next non-empty step reuses)."""
    def forward_of_step(self, step: int, phase: int, num_seqs: int, num_tokens: int, forward_ns: int) -> None:
        """A forward pass of step ``step`` (0: outside any step) measured late (CUDA events that
        resolve a step or two after their pass): its forward row and language-model (decoder)
        time, recorded now in ``step`` whatever step is open."""
    def forward(self, phase: int, batch_size: int, num_tokens: int, duration_ns: int) -> None:
        """A forward pass that ended now; phase 0 prefill, 1 decode, 2 mixed."""
    def cpu(self, op: int, duration_ns: int, phase: int = -1) -> None:
        """A CPU operation that ended now: 0 scheduling, 1 batch_preparation, 2 model_execution,
        3 sampling; ``phase`` >= 0 adds ``phase=...`` as context."""
    def batch(
        self,
        phase: int,
        num_seqs: int,
        max_num_seqs: int,
        num_tokens: int,
        max_tokens: int,
        running_queue_len: int,
        waiting_queue_len: int,
    ) -> None: ...
    def set_limits(self, max_num_seqs: int, max_tokens: int, kv_total_blocks: int) -> None:
        """The scheduler's limits, once per scheduler (``kv_total_blocks`` < 0: no KV readings)."""
    def step_path(self) -> StepPath:
        """The step path of this recorder (see :class:`StepPath`)."""
    def in_step(self) -> bool: ...
    def activity(self) -> int:
        """Steps recorded through the step path so far."""
    def started(self, request_id: str) -> None: ...
    def preempted(self, request_id: str, reason: str, extra_info: str) -> None: ...
    def resumed(self, request_id: str) -> None: ...
    def finished(self, request_id: str, extra_info: str) -> None: ...
    def evicted(self, request_id: str, reason: str, extra_info: str) -> None: ...
    def component(self, component: int, duration_ns: int, context: str) -> None:
        """0 encoder, 1 decoder, 2 cross_attention."""
    def kv_cache(self, used_blocks: int, total_blocks: int, prefix_cache_queries: int, prefix_cache_hits: int) -> None: ...
    def graph(self, event: int, batch_size: int, padded_batch_size: int = -1, duration_ns: int = -1) -> None:
        """A CUDA graph event, now: 0 capture (for ``batch_size`` tokens, lasting ``duration_ns``),
        1 replay (a step of ``batch_size`` tokens padded to ``padded_batch_size``), 2 eager step."""
    def moe_layer(self, layer: int, tokens_per_expert: Sequence[int]) -> None:
        """Tokens one MoE layer routed to each expert in one step, indexed by expert id."""
    def declare_model_type(self, model_type: str) -> None:
        """``encoder_decoder`` or ``decoder_only``."""
    def flush(self) -> None: ...
    def shutdown(self) -> Optional[str]:
        """Final rows, summaries and manifest; the manifest as JSON (None if already shut down)."""

class PartsSeries:
    """profilemate's live series of every part of one run (``dir/parts/<run>/*``), as Prometheus
    text: what the plugin adds to vLLM's ``/metrics`` in the API server.

    Each :meth:`render` reads the rows the parts completed since the previous call (parts that
    appear later are picked up) and returns every series in the Prometheus text format 0.0.4:
    counters and histograms summed over the parts, gauges from the part that records them.
    Reads files only; unreadable files are tried again at the next call."""

    def __init__(self, dir: Union[str, PathLike[str]], run: str) -> None: ...
    def render(self) -> str:
        """The series now, as Prometheus text (``prometheus_client.parser`` reads it)."""
    @property
    def parts(self) -> int:
        """The parts found so far."""


class StepPath:
    """The step path of one recorder (``Recorder.step_path()``): each timed region of vLLM's
    engine step is a call when it begins and one when it ends; the clock is read natively."""

    def schedule_begin(self, step: int) -> None:
        """``Scheduler.schedule`` begins: opens engine step ``step`` and starts its scheduling time."""
    def scheduled(
        self,
        phase: int,
        num_seqs: int,
        num_tokens: int,
        running: Union[int, Sized],
        waiting: Union[int, Sized],
        waiting2: Union[int, Sized],
        kv_free_blocks: int,
        prefix_cache_queries: int,
        prefix_cache_hits: int,
    ) -> None:
        """A non-empty step seen by the scheduler: the scheduling time since ``schedule_begin``,
        the batch against the recorder's limits, and a KV cache reading (skipped if
        ``kv_free_blocks`` or the limits' total is negative). Kept for ``execute_begin``.

        ``running``, ``waiting`` and ``waiting2`` are queue lengths, or the queues themselves
        (a ``list``, an object of the ``set_queue_type`` type, anything with ``len()``): the
        running queue's length, and the waiting queue's as ``waiting + waiting2``."""
    def set_queue_type(self, queue_type: type, base: type) -> None:
        """Queues of exactly ``queue_type`` given to ``scheduled`` are measured by ``base``'s C
        length function (``base``: a base class of ``queue_type`` with one, such as
        ``collections.deque``), without a Python frame; the caller vouches that
        ``len()`` of a ``queue_type`` returns what ``base``'s does. ``TypeError`` otherwise."""
    def execute_begin(self) -> None:
        """The model runner's step begins, with the step ``scheduled`` recorded last."""
    def execute_begin_with(self, phase: int, num_seqs: int, num_tokens: int) -> None:
        """The model runner's step begins, classified by the caller."""
    def execute_end(self, forward: bool) -> None:
        """The step ended: model_execution and (``forward``) the forward pass and decoder time."""
    def forward_begin(self) -> None: ...
    def forward_end(self) -> None:
        """``_model_forward``: its time adds to the step's forward time (inside a step only)."""
    def op_begin(self, op: int) -> None: ...
    def op_end(self, op: int) -> None:
        """CPU operation ``op`` inside a step, with the step's phase as context."""
    def sample_begin(self) -> bool:
        """``sample_tokens`` begins; ``True`` when it follows a step's ``execute_model``."""
    def sample_end(self) -> None: ...
    def begin_step(self, step: int) -> None:
        """Opens engine step ``step`` (a worker process opens the engine core's id)."""
    def end_step(self) -> None:
        """Closes the open step."""


def has_zero(counts: Iterable[int]) -> bool:
    """Whether ``counts`` holds a 0 (``not all(counts)``), scanned natively: for a list of ints a
    comparison of each item against CPython's cached 0, about 1.5 ns a count."""
