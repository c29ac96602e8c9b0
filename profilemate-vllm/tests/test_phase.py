"""The phase rule on random schedules made by vLLM's own scheduler, against vLLM's request state.

vLLM's real ``Scheduler`` (no model: a stand-in model runner output samples one token per
request that reaches the end of its tokens, accepts a random number of draft tokens) is driven
with random workloads that force preemptions and chunked recomputation (few KV blocks, small
token budgets, ``long_prefill_token_threshold`` down to one token). For every step the
reference phase comes from vLLM's ``Request`` objects: a scheduled request processes its prompt
when, before the step, ``num_computed_tokens`` is below its prompt length or below the tokens it
had computed when it was last preempted (read from the request as vLLM preempts it). The rule
under test sees only the ``SchedulerOutput``, as a worker in another process does (it is pickled
and unpickled first).
"""

from __future__ import annotations

import os
import pickle
import random
from collections import Counter
from typing import Dict, List, Tuple

import pytest

from conftest import REPORT
from profilemate_vllm._phase import DECODE, MIXED, PHASE_NAMES, PREFILL, classify, forget_finished

SEEDS_PER_CONFIG = 12


def _old_rule(so) -> int:
    """The rule before recomputation was tracked: a resumed request only on its first step back."""
    new = len(so.scheduled_new_reqs)
    cached = so.scheduled_cached_reqs
    spec = so.scheduled_spec_decode_tokens
    prefill = new
    for rid, out in zip(cached.req_ids, cached.num_output_tokens):
        k = so.num_scheduled_tokens[rid]
        if (k > 1 and (not spec or k > 1 + len(spec.get(rid, ())))) or out == 0 or rid in cached.resumed_req_ids:
            prefill += 1
    n = new + len(cached.req_ids)
    return DECODE if prefill == 0 else PREFILL if prefill == n else MIXED


def _scheduler(model: str, blocks: int, block_size: int, seqs: int, budget: int, threshold: int, spec: bool, v2: bool):
    import torch
    from vllm import EngineArgs
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    extra = {}
    if spec:
        extra["speculative_config"] = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    args = EngineArgs(
        model=model,
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,
        enable_chunked_prefill=True,
        max_model_len=(blocks - 1) * block_size,
        max_num_seqs=seqs,
        max_num_batched_tokens=budget,
        long_prefill_token_threshold=threshold,
        num_gpu_blocks_override=blocks,
        block_size=block_size,
        **extra,
    )
    config = args.create_engine_config()
    config.cache_config.num_gpu_blocks = blocks
    spec_ = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=16, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec_)])
    sched = Scheduler(config, kv, StructuredOutputManager(config), block_size=block_size, log_stats=True)
    if v2:
        sched.use_v2_model_runner = True  # resumed requests are sent as new ones (Model Runner V2)
    return sched


def _drive(sched, rng: random.Random, spec: bool) -> List[Tuple[int, int, int, int, bool]]:
    """Random requests through ``sched``; per step (reference, ours, old rule, recomputing)."""
    from vllm import SamplingParams
    from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput
    from vllm.v1.request import Request

    max_len = sched.max_model_len
    had: Dict[str, int] = {}  # tokens a request had computed when it was last preempted
    original = sched._preempt_request

    def preempt(request, *args, **kwargs):
        had[request.request_id] = max(had.get(request.request_id, 0), request.num_computed_tokens)
        return original(request, *args, **kwargs)

    sched._preempt_request = preempt
    to_add = rng.randint(3, 10)
    added = 0
    recompute: Dict[str, int] = {}
    steps = []
    while added < to_add or sched.has_unfinished_requests():
        if added < to_add and (not sched.has_unfinished_requests() or rng.random() < 0.3):
            prompt = rng.randint(1, max_len // 3)
            out = rng.randint(1, max_len - prompt)
            params = SamplingParams(max_tokens=out, min_tokens=out, ignore_eos=True)
            sched.add_request(Request(f"r{added}", [rng.randrange(3, 1000) for _ in range(prompt)], params, None))
            added += 1
        if rng.random() < 0.02 and sched.requests:
            victim = rng.choice(sorted(sched.requests))
            from vllm.v1.request import RequestStatus

            sched.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
        so = sched.schedule()
        ids = list(so.num_scheduled_tokens)
        if not ids:
            forget_finished(pickle.loads(pickle.dumps(so)), recompute)
            sched.update_from_output(so, ModelRunnerOutput(req_ids=[], req_id_to_index={}))
            continue
        # The reference, from vLLM's request state (num_computed_tokens has been advanced by
        # this step's tokens already).
        prefill = 0
        recomputing = 0
        for rid in ids:
            r = sched.requests[rid]
            before = r.num_computed_tokens - so.num_scheduled_tokens[rid]
            if before < r.num_prompt_tokens or before < had.get(rid, 0):
                prefill += 1
                if before < had.get(rid, 0) and r.num_output_tokens > 0:
                    recomputing += 1
        reference = DECODE if prefill == 0 else PREFILL if prefill == len(ids) else MIXED
        seen = pickle.loads(pickle.dumps(so))  # what a worker in another process gets
        ours, nseq = classify(seen, recompute)
        assert nseq == len(ids)
        steps.append((reference, ours, _old_rule(seen), recomputing, bool(so.scheduled_spec_decode_tokens)))
        # The model's answer: a token for every request that reached the end of its tokens.
        sampled = []
        for rid in ids:
            r = sched.requests[rid]
            drafts = len(so.scheduled_spec_decode_tokens.get(rid, ()))
            if r.num_computed_tokens - drafts >= r.num_tokens:
                sampled.append([rng.randrange(3, 1000) for _ in range(1 + rng.randint(0, drafts))])
            else:
                sampled.append([])
        output = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=sampled)
        sched.update_from_output(so, output)
        if spec:
            live = [rid for rid in ids if rid in sched.requests and not sched.requests[rid].is_finished()]
            drafts = [[rng.randrange(3, 1000) for _ in range(rng.randint(0, 3))] for _ in live]
            sched.update_draft_token_ids(DraftTokenIds(live, drafts))
    assert not recompute, f"requests left in the recompute table: {recompute}"
    return steps


CONFIGS = [
    # blocks, block size, max seqs, token budget, long prefill threshold, spec decode, V2
    (7, 16, 4, 32, 1, False, False),
    (8, 16, 6, 64, 0, False, False),
    (6, 16, 3, 16, 2, False, False),
    (9, 16, 4, 48, 1, True, False),
    (7, 16, 4, 32, 1, False, True),
    (10, 16, 8, 24, 3, False, False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_phase_equals_the_reference_on_random_schedules(model, config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    blocks, block_size, seqs, budget, threshold, spec, v2 = config
    totals: Counter = Counter()
    for seed in range(SEEDS_PER_CONFIG):
        sched = _scheduler(model, blocks, block_size, seqs, budget, threshold, spec, v2)
        steps = _drive(sched, random.Random(seed * 1000 + CONFIGS.index(config)), spec)
        for i, (reference, ours, old, recomputing, drafted) in enumerate(steps):
            assert ours == reference, (
                f"seed {seed} step {i}: ours {PHASE_NAMES[ours]}, vLLM's request state says {PHASE_NAMES[reference]}"
            )
            totals["steps"] += 1
            totals["recompute_steps"] += bool(recomputing)
            totals["old_rule_decode_while_recomputing"] += bool(recomputing) and old == DECODE
            totals[PHASE_NAMES[ours]] += 1
            totals["draft_steps"] += drafted
    assert totals["steps"] > 200
    if spec:
        assert totals["draft_steps"] > 0, "the drafts reach the scheduler's output"
    # The schedules exercise what the rule is for: recomputation the old rule called decode.
    if threshold == 1 and not spec:
        assert totals["old_rule_decode_while_recomputing"] > 0, totals
    REPORT.append(
        f"phase property ({'-'.join(map(str, config))}, {SEEDS_PER_CONFIG} seeds): {totals['steps']} steps equal "
        f"to vLLM's request state ({totals['prefill']} prefill, {totals['mixed']} mixed, {totals['decode']} decode); "
        f"{totals['recompute_steps']} steps recompute, {totals['old_rule_decode_while_recomputing']} of them the old rule called decode"
        + (f"; {totals['draft_steps']} steps verify draft tokens" if spec else "")
    )
