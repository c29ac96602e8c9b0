"""profilemate for vLLM: set ``VLLM_PROFILING_DIR`` (or ``PROFILEMATE_DIR``), run vLLM as usual.

This package is a vLLM plugin (entry point group ``vllm.general_plugins``), so vLLM loads it in
every process it starts. Unless one of those variables is set it does nothing at all. When set,
it observes vLLM's scheduler and model runner and records, through the profilemate core (the
native module ``profilemate_vllm._native``), the output contract's files:

- ``forward_pass_timing.csv`` / ``forward_pass_summary.json`` (one row per non-empty engine step,
  phase from the per-request mix, with the worker rank as an extra last column),
- ``cpu_operations_timing.csv`` (scheduling, batch_preparation, model_execution, sampling),
- ``batch_utilization.csv`` (each scheduled batch against the scheduler's limits),
- ``preemption_events.csv`` / ``request_lifecycle.csv`` (started, preempted, resumed, finished,
  evicted),
- ``encoder_decoder_timing.csv`` (multimodal encoder and language-model time),
- ``kv_cache_usage.csv``,
- ``cuda_graph_events.csv`` (captures timed, each step's replay or eager run) where a model runner
  uses CUDA graphs, and ``moe_expert_routing.csv`` (tokens per expert per MoE layer per step)
  where the model has MoE layers routed through ``FusedMoERouter.select_experts``,
- ``step_timeline.csv`` (one row per non-empty engine step, joining the tables above by their
  ``step`` column: the engine core numbers the steps and the workers record the same ids),
- and the summaries and ``profilemate_run.json``.

Every process writes its own part under ``DIR/parts/<run>/``; the front end merges them into
``DIR`` when vLLM shuts its engine down. After a crash, ``python -m profilemate_vllm merge DIR``
completes the files from what was written.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ._instrument import is_active, register

__all__ = ["register", "is_active", "merge", "runs", "__version__"]

try:
    from importlib.metadata import version as _version

    __version__ = _version("profilemate-vllm")
except Exception:  # pragma: no cover - not installed as a distribution
    __version__ = "0.0.0"


def merge(dir: str, run: Optional[str] = None) -> Dict[str, Any]:
    """Builds the top-level contract files in ``dir`` from the parts of ``run`` (default: the
    latest run recorded there). Returns the merge report (parts, rows per file)."""
    import json

    from . import _native

    return json.loads(_native.merge(dir, run))


def runs(dir: str) -> List[str]:
    """The runs recorded under ``dir``, oldest first."""
    from . import _native

    return list(_native.runs(dir))
