"""The phase of an engine step, from the per-request mix of one ``SchedulerOutput``.

A request is prefilling in a step when it is new (``scheduled_new_reqs``), when it resumes after
a preemption (its KV cache was freed and is recomputed), when it has no output token yet (its
prompt is not fully computed: num_computed_tokens < prompt length), or when it is scheduled more
tokens than one decode step takes (one, plus its speculative draft tokens): a chunk of a prompt or
of a recomputation. Everything else decodes. A step with both is ``mixed``, as chunked prefill
makes.

Only the ``SchedulerOutput`` is read, so the scheduler's process and every worker classify a step
alike (Model Runner V1 and V2). The rule agrees with vLLM's own ``compute_iteration_details``
except for a resumed request that already has output tokens: vLLM counts it as generation, while
its step recomputes (prefills) its KV cache.

A pure decode step (every request running, one token each, no drafts) is classified without a
Python loop: that is the step that runs thousands of times.
"""

from __future__ import annotations

from typing import Any, Tuple

PREFILL = 0
DECODE = 1
MIXED = 2
PHASE_NAMES = ("prefill", "decode", "mixed")


def classify(scheduler_output: Any) -> Tuple[int, int]:
    """Returns ``(phase, num_seqs)`` of a non-empty step."""
    new = len(scheduler_output.scheduled_new_reqs)
    cached = scheduler_output.scheduled_cached_reqs
    ids = cached.req_ids
    n = len(ids)
    if not n:
        return (PREFILL if new else DECODE), new
    resumed = cached.resumed_req_ids
    spec = scheduler_output.scheduled_spec_decode_tokens
    outputs = cached.num_output_tokens
    if not new and not resumed and not spec and scheduler_output.total_num_scheduled_tokens == n:
        prefill = outputs.count(0)
    else:
        prefill = 0
        scheduled = scheduler_output.num_scheduled_tokens
        for rid, out in zip(ids, outputs):
            k = scheduled[rid]
            if (k > 1 and (not spec or k > 1 + len(spec.get(rid, ())))) or out == 0 or (resumed and rid in resumed):
                prefill += 1
    prefill_total = prefill + new
    if prefill_total == 0:
        return DECODE, n
    if prefill_total == n + new:
        return PREFILL, n + new
    return MIXED, n + new
