"""The native module: recording through the profilemate core (Rust)."""

from os import PathLike
from typing import Optional, Sequence, Union

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
    def scheduled(
        self,
        phase: int,
        scheduling_ns: int,
        num_seqs: int,
        max_num_seqs: int,
        num_tokens: int,
        max_tokens: int,
        running_queue_len: int,
        waiting_queue_len: int,
        kv_used_blocks: int,
        kv_total_blocks: int,
        prefix_cache_queries: int,
        prefix_cache_hits: int,
    ) -> None:
        """A non-empty step seen by the scheduler: scheduling time (skipped if negative), the
        batch, and a KV cache reading (skipped if ``kv_total_blocks`` is negative)."""
    def executed(self, phase: int, num_seqs: int, num_tokens: int, execution_ns: int, forward_ns: int) -> None:
        """A model runner step that ended now: model_execution (skipped if negative), the
        forward pass, and the decoder (language model) component."""
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
