"""Runs real vLLM on the tiny LLaVA model with images; writes vLLM's own counts as JSON.

Per non-empty step, vLLM's ``SchedulerIterationDetails`` (with ``num_encoder_inputs``, the images
whose vision encoder runs in that step), from a stat logger.

    python multimodal.py --model DIR --out result.json
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from PIL import Image
    from vllm import EngineArgs, SamplingParams
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.metrics.loggers import StatLoggerBase

    steps = []

    class Counts(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            d = getattr(scheduler_stats, "iteration_details", None) if scheduler_stats else None
            if d is not None and not d.is_dummy:
                steps.append({"num_encoder_inputs": d.num_encoder_inputs, "requests": d.num_ctx_requests + d.num_generation_requests})

        def log_engine_initialized(self):
            pass

    engine = LLMEngine.from_engine_args(
        EngineArgs(
            model=args.model,
            dtype="float32",
            enforce_eager=True,
            enable_prefix_caching=False,
            max_model_len=256,
            max_num_seqs=2,
            seed=0,
            limit_mm_per_prompt={"image": 1},
            mm_processor_cache_gb=0,
            disable_log_stats=False,
            enable_logging_iteration_details=True,
        ),
        stat_loggers=[Counts],
    )
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    prompts = [
        {"prompt": f"<image> describe picture {i}", "multi_modal_data": {"image": Image.new("RGB", (32, 32), c)}}
        for i, c in enumerate(colors)
    ] + [{"prompt": "no image here, just text"}]
    params = SamplingParams(max_tokens=8, min_tokens=8, ignore_eos=True, temperature=0.0)
    for i, p in enumerate(prompts):
        engine.add_request(f"mm-{i}", p, params)
    finished = 0
    while engine.has_unfinished_requests():
        finished += sum(o.finished for o in engine.step())
    result = {"images": len(colors), "requests": len(prompts), "finished": finished, "steps": steps}
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
